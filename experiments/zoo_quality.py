"""Sample quality of a zoo model, judged by the external ccexam MNIST classifier.

Samples ``--n`` images with DDIM (``--steps`` steps, eta 0, one seeded generator per image so samples do
not depend on the batch size), then reports:

- ``judge_confidence_mean``: mean top-1 softmax probability of the judge (sharp digits score high);
- ``class_histogram``: judge argmax counts (mode coverage; ideal is ~uniform);
- ``fid_judge128``: Fréchet distance between the judge's 128-d penultimate features of the samples and of
  the 10 000 MNIST test images (torchmetrics ``FrechetInceptionDistance`` with a custom feature module);
- ``fid_judge128_real_floor``: the same FID for ``--n`` real images (MNIST valid split) — the floor at this N.

Writes ``experiments/results/zoo_quality_<name>.json`` and a sample grid ``zoo_quality_<name>.png``.

Usage::

    python experiments/zoo_quality.py --name mnist-ddpm --n 1000
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


def sample_ddim(model_dir: Path, n: int, steps: int, seed: int, batch: int) -> tuple[torch.Tensor, float]:
    r"""
    Draw ``n`` DDIM samples from a diffusers checkpoint directory.

    Args:
        model_dir (`pathlib.Path`): diffusers pipeline directory (``unet/`` + ``scheduler/``).
        n (`int`): number of images.
        steps (`int`): DDIM steps.
        seed (`int`): image ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        batch (`int`): images per pipeline call.

    Returns:
        `tuple[torch.Tensor, float]`: images ``[n, 1, 28, 28]`` in ``[0, 1]`` and the sampling wall time (s).
    """
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = []
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, min(n, start + batch))]
        with torch.no_grad():
            im = pipe(
                batch_size=len(gens), generator=gens, num_inference_steps=steps, eta=0.0, output_type="np"
            ).images
        out.append(torch.from_numpy(im).permute(0, 3, 1, 2).float())
    return torch.cat(out), time.perf_counter() - t0


def judge_report(
    images: torch.Tensor, real_ref: torch.Tensor, real_floor: torch.Tensor | None = None
) -> dict:
    r"""
    Judge confidence, class histogram and judge-feature FID of ``images``.

    Args:
        images (`torch.Tensor`): ``[N, 1, 28, 28]`` in ``[0, 1]``.
        real_ref (`torch.Tensor`): reference real images (MNIST test), same layout.
        real_floor (`torch.Tensor`, *optional*): other real images to report the FID floor at this N.

    Returns:
        `dict`: the metrics.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from tdq.zoo.judge import load_judge

    judge = load_judge()
    with torch.no_grad():
        probs = torch.cat([judge(images[i : i + 500]).softmax(-1) for i in range(0, len(images), 500)])
    conf, cls = probs.max(-1)
    hist = torch.bincount(cls, minlength=10)
    p = hist.double() / hist.sum()
    ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(10))

    def fid_of(x: torch.Tensor) -> float:
        fid = FrechetInceptionDistance(feature=judge.feature_extractor(), normalize=True)
        with torch.no_grad():
            for i in range(0, len(real_ref), 1000):
                fid.update(real_ref[i : i + 1000], real=True)
            for i in range(0, len(x), 1000):
                fid.update(x[i : i + 1000], real=False)
            return float(fid.compute())

    rep = {
        "n": len(images),
        "judge_confidence_mean": float(conf.mean()),
        "judge_confident_frac_0.9": float((conf > 0.9).double().mean()),
        "class_histogram": hist.tolist(),
        "class_entropy_normalized": ent,
        "fid_judge128": fid_of(images),
    }
    if real_floor is not None:
        rep["fid_judge128_real_floor"] = fid_of(real_floor)
    return rep


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    r"""
    Save the first ``nrow**2`` images as a PNG grid.

    Args:
        images (`torch.Tensor`): ``[N, 1, 28, 28]`` in ``[0, 1]``.
        path (`pathlib.Path`): output PNG.
        nrow (`int`, *optional*, defaults to `10`): images per row and rows.
    """
    from PIL import Image

    k = min(len(images), nrow * nrow)
    rows = math.ceil(k / nrow)
    grid = np.zeros((rows * 30, nrow * 30), dtype=np.uint8)
    arr = (images[:k, 0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    for i in range(k):
        r, c = divmod(i, nrow)
        grid[r * 30 + 1 : r * 30 + 29, c * 30 + 1 : c * 30 + 29] = arr[i]
    Image.fromarray(grid).resize((nrow * 60, rows * 60), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="mnist-ddpm")
    ap.add_argument(
        "--model-dir", default=None, help="evaluate this diffusers dir instead of tdq.zoo.path(name)"
    )
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix for the output file names")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import tdq.zoo
    from tdq.zoo.data import load_mnist

    model_dir = Path(a.model_dir) if a.model_dir else tdq.zoo.path(a.name)
    info_path = model_dir / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    images, secs = sample_ddim(model_dir, a.n, a.steps, a.seed, a.batch)
    test_x, _ = load_mnist("test")
    valid_x, _ = load_mnist("valid")
    rep = judge_report(images, torch.from_numpy(test_x), torch.from_numpy(valid_x[: a.n]))
    res = {
        "name": a.name,
        "model_dir": str(model_dir),
        "train_step": info.get("step"),
        "sampler": f"DDIM {a.steps} steps, eta 0",
        "seed": a.seed,
        "sampling_seconds": secs,
        "threads": a.threads,
        **rep,
    }
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"zoo_quality_{a.name}{a.tag}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    save_grid(images, out / f"{stem}.png")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
