"""Conditional sample quality of the latent zoo models (``mnist-t2i``, ``mnist-dit``), judged by the external
ccexam MNIST classifier.

Draws ``--n`` samples (``n / 10`` per digit) with the exported pipeline's DDIM scheduler (``--steps`` steps,
eta 0, classifier-free guidance ``--cfg``; one seeded generator per image), crops the 32x32 outputs to 28x28
and reports:

- ``judge_accuracy``: fraction of samples the judge classifies as the prompted / conditioned digit;
- ``judge_confidence_mean`` and the per-digit accuracy;
- ``fid_judge128``: Fréchet distance between judge 128-d features of the samples and of the 10 000 MNIST test
  images (torchmetrics ``FrechetInceptionDistance`` with the judge as feature extractor), and
  ``fid_judge128_real_floor``, the same for ``--n`` real MNIST valid images;
- ``clip_score_mnist_clip`` (``mnist-t2i`` only): CLIPScore ``100 * max(cos, 0)`` of image and prompt under
  the project's tiny in-domain CLIP (``tdq/zoo/checkpoints/mnist-clip``).

Writes ``experiments/results/zoo_quality_<name>.json`` and the grid ``zoo_samples_<name>.png`` (row = digit).

Usage::

    python experiments/zoo_quality_latent.py --name mnist-t2i --n 200 --steps 50 --cfg 5
    python experiments/zoo_quality_latent.py --name mnist-dit --n 200 --steps 50 --cfg 5
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a handwritten digit {}"


def _model_dir(name: str) -> Path:
    return ROOT / "tdq" / "zoo" / "checkpoints" / name


def sample(
    name: str,
    model_dir: Path,
    digits: list[int],
    steps: int,
    cfg: float,
    seed: int,
    batch: int,
    prompt: str = PROMPT,
    numerals: bool = False,
):
    r"""
    Sample one image per entry of ``digits`` from a latent zoo pipeline.

    Args:
        name (`str`): ``"mnist-t2i"`` (prompt ``"a handwritten digit <word>"``) or ``"mnist-dit"`` (class label).
        model_dir (`pathlib.Path`): exported pipeline directory.
        digits (`list[int]`): conditioning digit of each image.
        steps (`int`): DDIM steps.
        cfg (`float`): classifier-free guidance scale.
        seed (`int`): image ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        batch (`int`): images per pipeline call.
        prompt (`str`, *optional*): ``mnist-t2i`` prompt template, ``{}`` is filled with the digit.
        numerals (`bool`, *optional*, defaults to `False`): fill the template with ``"7"`` instead of ``"seven"``.

    Returns:
        `tuple[torch.Tensor, float]`: images ``[N, 1, 32, 32]`` in ``[0, 1]`` and sampling seconds.
    """
    from diffusers import DiTPipeline, StableDiffusionPipeline

    from tdq.zoo.latent import DIGIT_WORDS

    if name == "mnist-t2i":
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    else:
        pipe = DiTPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(digits), batch):
        ds = digits[s : s + batch]
        gens = [torch.Generator().manual_seed(seed + i) for i in range(s, s + len(ds))]
        with torch.no_grad():
            if name == "mnist-t2i":
                im = pipe(
                    [prompt.format(str(d) if numerals else DIGIT_WORDS[d]) for d in ds],
                    num_inference_steps=steps,
                    guidance_scale=cfg,
                    eta=0.0,
                    generator=gens,
                    output_type="np",
                ).images
            else:
                im = pipe(
                    class_labels=list(ds),
                    num_inference_steps=steps,
                    guidance_scale=cfg,
                    generator=gens,
                    output_type="np",
                ).images
        im = torch.from_numpy(np.asarray(im)).float()
        if im.ndim == 3:
            im = im[..., None]
        out.append(im.permute(0, 3, 1, 2)[:, :1])
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def clip_score(images32: torch.Tensor, prompts: list[str]) -> float:
    r"""
    CLIPScore ``100 * max(cos(image, text), 0)`` under the tiny in-domain CLIP ``mnist-clip``.

    Args:
        images32 (`torch.Tensor`): ``[N, 1, 32, 32]`` in ``[0, 1]``.
        prompts (`list[str]`): one prompt per image.

    Returns:
        `float`: mean CLIPScore.
    """
    from transformers import CLIPModel, CLIPTokenizer

    from tdq.zoo.latent_models import _pooled

    d = _model_dir("mnist-clip")
    model, tok = CLIPModel.from_pretrained(d).eval(), CLIPTokenizer.from_pretrained(d)
    px = (images32 * 2 - 1).expand(-1, 3, -1, -1)
    ie = torch.nn.functional.normalize(_pooled(model.get_image_features(pixel_values=px)), dim=-1)
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    te = torch.nn.functional.normalize(_pooled(model.get_text_features(input_ids=ids)), dim=-1)
    return float((100 * (ie * te).sum(-1).clamp(min=0)).mean())


def judge_report(
    images: torch.Tensor, digits: torch.Tensor, real_ref: torch.Tensor, real_floor: torch.Tensor
):
    r"""
    Judge accuracy w.r.t. the conditioning digit, confidence and judge-feature FID.

    Args:
        images (`torch.Tensor`): ``[N, 1, 28, 28]`` in ``[0, 1]``.
        digits (`torch.Tensor`): ``[N]`` conditioning digits.
        real_ref (`torch.Tensor`): MNIST test images.
        real_floor (`torch.Tensor`): ``N`` other real images (FID floor at this N).

    Returns:
        `dict`: the metrics.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from tdq.zoo.judge import load_judge

    judge = load_judge()
    with torch.no_grad():
        probs = judge(images).softmax(-1)
    conf, cls = probs.max(-1)
    correct = cls == digits

    def fid_of(x: torch.Tensor) -> float:
        fid = FrechetInceptionDistance(feature=judge.feature_extractor(), normalize=True)
        with torch.no_grad():
            for i in range(0, len(real_ref), 1000):
                fid.update(real_ref[i : i + 1000], real=True)
            fid.update(x, real=False)
            return float(fid.compute())

    return {
        "n": len(images),
        "judge_accuracy": float(correct.double().mean()),
        "judge_accuracy_per_digit": [float(correct[digits == d].double().mean()) for d in range(10)],
        "judge_confidence_mean": float(conf.mean()),
        "judge_class_histogram": torch.bincount(cls, minlength=10).tolist(),
        "fid_judge128": fid_of(images),
        "fid_judge128_real_floor": fid_of(real_floor),
    }


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    r"""
    Save up to ``nrow`` images per digit as a PNG grid (row ``d`` = digit ``d``).

    Args:
        images (`torch.Tensor`): ``[N, 1, H, W]`` in ``[0, 1]``, ordered digit-major (``N / 10`` per digit).
        path (`pathlib.Path`): output PNG.
        nrow (`int`, *optional*, defaults to `10`): images per row.
    """
    from PIL import Image

    per = len(images) // 10
    h, w = images.shape[-2:]
    grid = np.zeros((10 * (h + 2), nrow * (w + 2)), dtype=np.uint8)
    arr = (images[:, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    for d in range(10):
        for c in range(min(nrow, per)):
            grid[d * (h + 2) + 1 : d * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = arr[
                d * per + c
            ]
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", choices=["mnist-t2i", "mnist-dit"], required=True)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    ap.add_argument("--prompt", default=PROMPT, help="mnist-t2i prompt template ({} = digit)")
    ap.add_argument(
        "--numerals", action="store_true", help="mnist-t2i: fill the template with 0-9, not words"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from tdq.zoo.data import load_mnist
    from tdq.zoo.latent import DIGIT_WORDS, crop28

    model_dir = Path(a.model_dir) if a.model_dir else _model_dir(a.name)
    info_path = model_dir / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    per = math.ceil(a.n / 10)
    digits = [d for d in range(10) for _ in range(per)][: a.n]
    images32, secs = sample(a.name, model_dir, digits, a.steps, a.cfg, a.seed, a.batch, a.prompt, a.numerals)
    prompts = [a.prompt.format(str(d) if a.numerals else DIGIT_WORDS[d]) for d in digits]
    images = crop28(images32)
    test_x, _ = load_mnist("test")
    valid_x, _ = load_mnist("valid")
    rep = judge_report(
        images, torch.tensor(digits), torch.from_numpy(test_x), torch.from_numpy(valid_x[: a.n])
    )
    res = {
        "name": a.name,
        "model_dir": str(model_dir),
        "train_step": info.get("step"),
        "seconds_trained": info.get("seconds_trained"),
        "sampler": f"DDIM {a.steps} steps, eta 0, CFG {a.cfg}",
        "conditioning": (
            f"prompt '{a.prompt}' with digit {'numerals' if a.numerals else 'words'}"
            if a.name == "mnist-t2i"
            else "class label 0..9"
        ),
        "seed": a.seed,
        "sampling_seconds": secs,
        "threads": a.threads,
        **rep,
    }
    if a.name == "mnist-t2i" and (_model_dir("mnist-clip") / "config.json").is_file():
        res["clip_score_mnist_clip"] = clip_score(images32, prompts)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"zoo_quality_{a.name}{a.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    save_grid(images, out / f"zoo_samples_{a.name}{a.tag}.png")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
