"""CLIPScore goes through torchmetrics with a local CLIP; cross-checked against the cosine computed by hand."""

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
)

from tdq.eval.clip import clip_score, load_clip
from tdq.testing.pipelines import tiny_clip_tokenizer


def _tiny_clip(tmp_path):
    tok = tiny_clip_tokenizer(tmp_path / "tok")
    text = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    ).eval()
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tok,
    )
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_score_matches_manual_cosine(tmp_path):
    path = _tiny_clip(tmp_path)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a digit", "a handwritten digit", "digit"]
    score = clip_score(images, prompts, path)
    model, proc = load_clip(path)
    rgb = (images.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8)
    batch = proc(text=prompts, images=list(rgb), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=batch["pixel_values"])
        txt = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    manual = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp(min=0).mean().item()
    assert abs(score - manual) < 1e-3
    # The same call with an in-memory model agrees.
    assert abs(clip_score(images, prompts, (model, proc)) - score) < 1e-5
