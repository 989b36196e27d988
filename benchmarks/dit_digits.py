"""The dit_class recipe end to end on a small real image set, scored by an independent classifier; JSON out.

scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes; shipped inside scikit-learn) are written as
16x16 RGB PNGs in the ImageNet layout (one folder per class), then: ``prepare --format imagenet`` -> ``cache``
-> ``train`` (configs/dit_digits_cpu.yaml: a class-conditional DiT with learned sigma, improved-DDPM hybrid
loss) -> ``sample --fid-npz`` (respaced DDPM with guidance, balanced classes) -> every sample is shrunk back
to 8x8 gray and classified by a logistic regression trained on the real digits. The figure is how often a
sample is classified as the class it was generated for (chance 10%).

Needs scikit-learn (a dev extra). Usage:
    python benchmarks/dit_digits.py [--out DIR] [--steps 3000] [--samples 200] [--sample-steps 100]
        [--guidance 2.0] [overrides such as train.batch_size=32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_digits(root: Path, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``root/<label>/<index>.png`` (nearest-neighbour upscaled, gray as RGB); returns the 8x8
    images (0..16) and labels for the classifier."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        path = root / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (img / 16.0 * 255.0).round().astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB").save(path)
    return digits.images, digits.target


def to_digit_features(batch: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 samples -> (N, 64) features in the digits' own scale (8x8 gray, 0..16)."""
    n, h, w, _ = batch.shape
    gray = batch.astype(np.float64).mean(-1)  # (N, H, W)
    f = h // 8
    small = gray.reshape(n, 8, f, 8, w // 8).mean((2, 4))  # (N, 8, 8): mean of each f x f block
    return (small / 255.0 * 16.0).reshape(n, 64)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's)")
    parser.add_argument("--samples", type=int, default=200, help="generated samples (balanced over classes)")
    parser.add_argument(
        "--sample-steps", type=int, default=None, help="respaced DDPM steps (default: preset)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: preset)")
    args, overrides = parser.parse_known_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from frameloom.config import load_config
    from frameloom.data.prepare import prepare
    from frameloom.pipeline import run_cache
    from frameloom.sampling.generate import sample_command
    from frameloom.train.trainer import train

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dit_digits_"))
    result: dict = {"work": str(work)}
    t0 = time.perf_counter()
    images, labels = write_digits(work / "images")
    prepare(work / "images", work / "manifest.parquet", fmt="imagenet", progress=False)
    extra = [f"data.manifest={work / 'manifest.parquet'}", f"run_dir={work / 'run'}", "train.progress=false"]
    if args.steps is not None:
        extra.append(f"train.steps={args.steps}")
    cfg = load_config(ROOT / "configs" / "dit_digits_cpu.yaml", [*extra, *overrides])
    run_cache(cfg, progress=False)
    result["prepare_cache_s"] = round(time.perf_counter() - t0, 1)

    # 1. Train. The machine may be shared: the load average and this process's CPU time come with the wall
    # time (CPU seconds / threads estimates a quiet machine's time; the loader worker's CPU is not counted).
    import torch

    result["torch_threads"] = torch.get_num_threads()
    result["load_average_before"] = round(os.getloadavg()[0], 2)
    t1, c1 = time.perf_counter(), time.process_time()
    trained = train(cfg)
    result["train_s"] = round(time.perf_counter() - t1, 1)
    result["train_cpu_s"] = round(time.process_time() - c1, 1)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    result["train_steps"] = trained.step
    result["last_loss"] = round(trained.last_loss, 4)

    # 2. Sample a balanced FID-style batch (sample i is class i mod 10).
    t2 = time.perf_counter()
    sample_over = []
    if args.sample_steps is not None:
        sample_over.append(f"sample.steps={args.sample_steps}")
    (npz,) = sample_command(
        str(work / "run"),
        prompts=[],
        out=str(work / "samples"),
        guidance=args.guidance,
        overrides=sample_over,
        fid_npz=args.samples,
    )
    result["sample_s"] = round(time.perf_counter() - t2, 1)
    batch = np.load(npz)["arr_0"]  # (N, 16, 16, 3) uint8
    wanted = np.arange(len(batch)) % 10

    # 3. The independent judge: a logistic regression on the real 8x8 digits (its held-out accuracy shown).
    x = images.reshape(len(images), 64)
    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.25, random_state=0)
    judge = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    result["classifier_real_test_accuracy"] = round(float(judge.score(x_test, y_test)), 4)
    judge = LogisticRegression(max_iter=5000).fit(x, labels)  # then fit on every real digit
    predicted = judge.predict(to_digit_features(batch))
    result["samples"] = int(len(batch))
    result["sample_class_accuracy"] = round(float((predicted == wanted).mean()), 4)
    result["per_class_accuracy"] = {
        str(c): round(float((predicted[wanted == c] == c).mean()), 3) for c in range(10)
    }
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
