"""FID of each bundled model's samples against the MNIST test set with the real TF-FID Inception features (and the
external judge's 128-d features, for comparison), plus the real-data floor at the same sample count.

    python experiments/zoo_inception_fid.py [--models mnist-ddpm mnist-t2i mnist-dit] [--n 100] [--n-real 1000]

Writes `experiments/results/zoo_inception_fid.json`. Samplers: DDIM 50 steps; t2i/DiT at each model's guidance
scale with digit = seed % 10 (the `tdq run` conventions). Inception costs ~0.3-1 s per image on 2 CPU cores, so
the default counts are small: read the floor (real vs real at the same count) beside every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tdq.eval.data import frechet_distance, load_dataset_images, load_domain_judge
from tdq.eval.features import InceptionFeatures
from tdq.eval.metrics import extract_features
from tdq.run.models import ModelConfig, load_model
from tdq.sampling import make_sampler, make_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "tdq" / "configs" / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mnist-ddpm", "mnist-t2i", "mnist-dit"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-real", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_inception_fid.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    inception = InceptionFeatures()
    judge_feat = load_domain_judge("mnist-test")[1]
    real, _ = load_dataset_images("mnist-test", args.n_real)
    real_inc = extract_features(real, inception)
    real_judge = extract_features(real, judge_feat)
    # Floor: a disjoint slice of real test images of the sample count, against the same reference set.
    floor_imgs, _ = load_dataset_images("mnist-test", args.n_real + args.n)
    floor_imgs = floor_imgs[args.n_real :]
    result = {
        "n_samples": args.n,
        "n_real": args.n_real,
        "sampler": "DDIM 50 steps, eta 0",
        "floor_real_vs_real": {
            "inception": frechet_distance(real_inc, extract_features(floor_imgs, inception)),
            "judge128": frechet_distance(real_judge, extract_features(floor_imgs, judge_feat)),
        },
        "models": {},
    }
    for name in args.models:
        cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml")))
        m = load_model(cfg)
        t0 = time.perf_counter()
        smp = make_sampler(m, make_scheduler(m.scheduler, "ddim"), num_inference_steps=50, batch_size=50)
        images = smp(list(range(args.n))).images
        c = m.crop
        if c:
            images = images[:, :, c:-c, c:-c]
        result["models"][name] = {
            "fid_inception": frechet_distance(real_inc, extract_features(images, inception)),
            "fid_judge128": frechet_distance(real_judge, extract_features(images, judge_feat)),
            "guidance_scale": getattr(m, "guidance_scale", None),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, result["models"][name], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
