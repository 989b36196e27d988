"""frameloom against diffusers' CogVideoX LoRA example on the same tiny pipeline and clips: prints JSON.

    python benchmarks/vs_diffusers_cogvideox.py PATH/TO/examples/cogvideo/train_cogvideox_lora.py \
        [--batch 1 4] [--short 3] [--long 13] [--threads 2]

The example script is the user's unmodified copy (diffusers' repository, ``examples/cogvideo``); it needs
what its requirements name (torchvision, decord, accelerate). Both sides get a tiny CogVideoX 1.0 pipeline
built here (2 layers, 2 heads x 16, tiny VAE and T5) and the same 8 synthetic 9-frame 32x32 clips in the
CogVideoX data-root layout (``prompts.txt`` / ``videos.txt``), fp32 on the CPU, LoRA rank 4 (alpha 4) on
to_q/to_k/to_v/to_out.0, AdamW lr 1e-3, the same batch and thread count, no validation, no checkpoints
but the last.

Per-step time is taken from the difference between a short and a long run of each side (start-up, model
loading and the example's up-front video encoding cancel): ``(t_long - t_short) / (long - short)``; start-up
is ``t_short - short * step``; peak RSS is the child process's ``ru_maxrss``. ``ratio`` is the example's
per-step time over frameloom's (> 1: frameloom is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIP = dict(num_frames=9, height=32, width=32)


def _child(cmd: list[str], threads: int, env_extra: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; wall seconds and the child's peak RSS in MB."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(env_extra or {}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def _setup(root: Path) -> tuple[Path, Path]:
    """The tiny pipeline and the data root (CogVideoX layout) with its frameloom manifest."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from families import build_tiny_cogvideox
    from frameloom.data import synthetic

    pre = build_tiny_cogvideox(root / "cog")
    data = root / "data"
    synthetic.write_synthetic_set(data, num_clips=8, seed=0, progress=False, **CLIP)
    videos = sorted(p.relative_to(data) for p in data.rglob("*.mp4"))
    captions = [(data / v).with_suffix(".txt").read_text().strip() for v in videos]
    (data / "videos.txt").write_text("".join(f"{v}\n" for v in videos))
    (data / "prompts.txt").write_text("".join(f"{c}\n" for c in captions))
    return pre, data


def _diffusers_cmd(script: str, pre: Path, data: Path, out: Path, steps: int, batch: int) -> list[str]:
    return [
        sys.executable, script,
        "--pretrained_model_name_or_path", str(pre),
        "--instance_data_root", str(data),
        "--caption_column", "prompts.txt",
        "--video_column", "videos.txt",
        "--height", str(CLIP["height"]), "--width", str(CLIP["width"]),
        "--max_num_frames", str(CLIP["num_frames"]), "--fps", "8",
        "--rank", "4", "--lora_alpha", "4",
        "--train_batch_size", str(batch), "--max_train_steps", str(steps),
        "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--optimizer", "adamw", "--mixed_precision", "no", "--seed", "0",
        "--checkpointing_steps", "100000", "--dataloader_num_workers", "0",
        "--output_dir", str(out),
    ]  # fmt: skip


def _frameloom_cmd(pre: Path, data: Path, run: Path, steps: int, batch: int) -> list[str]:
    return [
        sys.executable, "-m", "frameloom", "train", str(HERE.parent / "configs" / "cogvideox_lora.yaml"),
        f"model.pretrained={pre}", f"data.manifest={data / 'manifest.parquet'}", f"run_dir={run}",
        *(f"data.{k}={v}" for k, v in CLIP.items()), "data.target_fps=null",
        "model.dtype=float32", "model.encoder_dtype=float32", "model.vae_tiling=false",
        "model.lora.rank=4", "model.lora.alpha=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        f"train.batch_size={batch}", f"train.steps={steps}", "train.mixed_precision=no",
        "train.device=cpu", "train.progress=false", "checkpoint.every=0", "validation.every=0",
        "logging.tensorboard=false", "parallel.activation_checkpointing=none",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", help="path to diffusers' examples/cogvideo/train_cogvideox_lora.py")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=13)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not Path(args.script).is_file():
        raise SystemExit(f"not a file: {args.script}")
    from frameloom import pipeline
    from frameloom.config import load_config

    results = {"threads": args.threads, "short": args.short, "long": args.long}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre, data = _setup(root)
        cmd = _frameloom_cmd(pre, data, root / "cache-run", 1, 1)
        cfg = load_config(
            cmd[4], cmd[5:]
        )  # latents and text cached once, as a user would (`frameloom cache`)
        pipeline.run_cache(cfg, progress=False)
        for batch in args.batch:
            row = {}
            for side in ("diffusers", "frameloom"):
                times, peaks = {}, []
                for steps in (args.short, args.long):
                    out = root / f"{side}-b{batch}-s{steps}"
                    cmd = (
                        _diffusers_cmd(args.script, pre, data, out, steps, batch)
                        if side == "diffusers"
                        else _frameloom_cmd(pre, data, out, steps, batch)
                    )
                    times[steps], peak = _child(cmd, args.threads)
                    peaks.append(peak)
                step = (times[args.long] - times[args.short]) / (args.long - args.short)
                row[side] = {
                    "step_s": round(step, 4),
                    "startup_s": round(times[args.short] - args.short * step, 2),
                    "peak_rss_mb": round(max(peaks), 1),
                }
            row["ratio"] = round(row["diffusers"]["step_s"] / row["frameloom"]["step_s"], 3)
            results[f"batch_{batch}"] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
