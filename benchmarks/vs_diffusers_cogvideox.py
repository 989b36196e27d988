"""frameloom against diffusers' CogVideoX LoRA example on the same tiny pipeline and clips: prints JSON.

    python benchmarks/vs_diffusers_cogvideox.py PATH/TO/examples/cogvideo/train_cogvideox_lora.py \
        [--batch 1 4] [--short 10] [--long 210] [--repeats 3] [--threads 2] [--frameloom-set KEY=VALUE ...]

The example script is the user's unmodified copy (diffusers' repository, ``examples/cogvideo``). Run this
benchmark with a Python that has what the example imports (torchvision, decord, accelerate, peft, ...) and
frameloom: both sides run as child processes of ``sys.executable``, so they use the same torch.

Both sides get a tiny CogVideoX 1.0 pipeline built here (2 layers, 2 heads x 16, tiny VAE and T5) and the
same 8 synthetic 9-frame 32x32 clips in the CogVideoX data-root layout (``prompts.txt`` / ``videos.txt``),
fp32 on the CPU, LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0, AdamW lr 1e-3 betas (0.9, 0.95) weight
decay 1e-4, gradient clipping at 1.0, the same batch and thread count (``OMP_NUM_THREADS``; no loader
worker processes on either side), no validation, no checkpoint but the final weights. frameloom trains
from its latent/text cache, filled once beforehand as a user runs ``frameloom cache``; the example encodes
its clips at start-up and its prompts with T5 at every step, as it always does.

Per-step time comes from the difference between a short and a long run of each side (start-up, model
loading and the example's up-front video encoding cancel): ``(t_long - t_short) / (long - short)``;
start-up is ``t_short - short * step``. A step of this tiny model takes tens of milliseconds while start-up
(imports, loading, the example's video encoding) takes 10-30 s and varies by a second or more between runs,
so the two runs must differ by a few hundred steps (default 10 and 210) for the difference to resolve a
step. Peak RSS is each child's own ``ru_maxrss`` (``os.wait4``), the
largest over its runs. Beside the wall-clock figures, the same differences of the children's CPU time
(user + system; ``cpu_step_s``, ``ratio_cpu``) are less disturbed by other processes on a shared machine
(with ``--threads 1`` they are the work itself; with more threads they include OpenMP's spin-waiting). Runs are interleaved (repeat r runs every side and batch once, the side order
alternating) and each figure is the median over ``--repeats``. ``ratio`` is the example's per-step time
over frameloom's (> 1: frameloom is faster). The load average is recorded before, after and at the end
of every child run (``loadavg_runs``: min / median / max of the 1-minute figure): the machine may be
shared. The frameloom side runs the ``cogvideox_lora.yaml`` preset, which compiles the whole denoiser
(``parallel.compile: model``); one untimed warm-up run per side and batch fills torch.compile's on-disk cache
first. ``--frameloom-set`` adds config overrides to the frameloom side only (e.g. ``parallel.compile=false``
for the eager figure); they are printed in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIP = dict(num_frames=9, height=32, width=32)
#: What the example imports beyond frameloom's own dependencies (module -> pip package).
EXAMPLE_NEEDS = {
    "torchvision": "torchvision",
    "decord": "decord",
    "accelerate": "accelerate",
    "peft": "peft",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "sentencepiece": "sentencepiece",
}
SIDES = ("diffusers", "frameloom")


class BenchError(SystemExit):
    """One line on stderr and exit status 2."""

    def __init__(self, message: str):
        print(f"vs_diffusers_cogvideox: {message}", file=sys.stderr)
        super().__init__(2)


def check_environment(script: str) -> None:
    """The example file exists and this Python can import what it needs (it is the children's Python)."""
    if not Path(script).is_file():
        raise BenchError(f"not a file: {script} (give the path to examples/cogvideo/train_cogvideox_lora.py)")
    missing = [pkg for mod, pkg in EXAMPLE_NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise BenchError(
            f"{sys.executable} cannot import {', '.join(missing)}, which diffusers' example needs: run this "
            f"benchmark with a Python that has them (pip install {' '.join(missing)}) and frameloom"
        )
    if importlib.util.find_spec("frameloom") is None:
        raise BenchError(f"{sys.executable} cannot import frameloom (pip install -e . or set PYTHONPATH=src)")


def run_child(cmd: list[str], threads: int, log: Path) -> tuple[float, float, float]:
    """Run ``cmd`` to completion: (wall seconds, CPU seconds (user + system), the child's own peak RSS in
    MB). A failure is one error naming the log file, whose last lines are printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise BenchError(
            f"{cmd[1]} {cmd[2] if len(cmd) > 2 else ''} failed (exit {proc.returncode}); log: {log}"
        )
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: kilobytes


def setup(root: Path) -> tuple[Path, Path]:
    """The tiny pipeline and the data root (CogVideoX layout, ``prompts.txt``/``videos.txt``) with its
    frameloom manifest."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import pyarrow.parquet as pq

    from families import build_tiny_cogvideox
    from frameloom.data import synthetic

    pre = build_tiny_cogvideox(root / "cog")
    data = root / "data"
    synthetic.write_synthetic_set(data, num_clips=8, seed=0, progress=False, fps=8, **CLIP)
    rows = pq.read_table(data / "manifest.parquet", columns=["path", "text"]).to_pylist()
    (data / "videos.txt").write_text("".join(f"{r['path']}\n" for r in rows))
    (data / "prompts.txt").write_text("".join(f"{r['text']}\n" for r in rows))
    return pre, data


def diffusers_cmd(script: str, pre: Path, data: Path, out: Path, steps: int, batch: int) -> list[str]:
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
        "--optimizer", "adamw", "--adam_beta1", "0.9", "--adam_beta2", "0.95",
        "--adam_weight_decay", "1e-4", "--max_grad_norm", "1.0",
        "--mixed_precision", "no", "--seed", "0",
        "--checkpointing_steps", "100000", "--dataloader_num_workers", "0",
        "--output_dir", str(out),
    ]  # fmt: skip


def frameloom_args(pre: Path, data: Path, run: Path, steps: int, batch: int) -> list[str]:
    """The config file and overrides of the frameloom run (the preset, sized down to the example's)."""
    return [
        str(HERE.parent / "configs" / "cogvideox_lora.yaml"),
        f"model.pretrained={pre}", f"data.manifest={data / 'manifest.parquet'}", f"run_dir={run}",
        *(f"data.{k}={v}" for k, v in CLIP.items()), "data.target_fps=null",
        "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false",
        "model.dtype=float32", "model.encoder_dtype=float32", "model.vae_tiling=false",
        "model.lora.rank=4", "model.lora.alpha=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        "optim.betas=[0.9,0.95]", "optim.weight_decay=1e-4", "optim.grad_clip=1.0",
        f"train.batch_size={batch}", f"train.steps={steps}", "train.mixed_precision=no",
        "train.device=cpu", "train.progress=false", "checkpoint.every=0", "validation.every=0",
        "logging.tensorboard=false", "parallel.activation_checkpointing=none",
    ]  # fmt: skip


def frameloom_cmd(pre: Path, data: Path, run: Path, steps: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "frameloom", "train", *frameloom_args(pre, data, run, steps, batch)]


def check_ran(side: str, out: Path, steps: int) -> None:
    """The child trained ``steps`` optimizer steps (frameloom: metrics.jsonl) and wrote its weights
    (the example: its final LoRA file)."""
    if side == "frameloom":
        lines = (out / "metrics.jsonl").read_text().splitlines()
        last = max((json.loads(line).get("step", 0) for line in lines if '"loss"' in line), default=0)
        if last != steps:
            raise BenchError(f"frameloom stopped at step {last} of {steps}: {out}")
    elif not (out / "pytorch_lora_weights.safetensors").is_file():
        raise BenchError(f"the example wrote no pytorch_lora_weights.safetensors: {out}")


def summarise(times: list[tuple[float, float]], short: int, long: int) -> tuple[float, float, list]:
    """``times`` = [(t_short, t_long) per repeat] -> (median step s, median start-up s, per-repeat steps)."""
    steps = [(tl - ts) / (long - short) for ts, tl in times]
    startups = [ts - short * s for (ts, _), s in zip(times, steps)]
    return statistics.median(steps), statistics.median(startups), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", help="path to diffusers' examples/cogvideo/train_cogvideox_lora.py")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--short", type=int, default=10, help="optimizer steps of the short run (default 10)")
    parser.add_argument("--long", type=int, default=210, help="optimizer steps of the long run (default 210)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each child (default 2)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="which side(s) to run")
    parser.add_argument(
        "--workdir", help="keep the pipeline, clips, runs and logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--frameloom-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides of the frameloom side only (e.g. parallel.compile=false)",
    )
    args = parser.parse_args()
    if not 0 < args.short < args.long:
        raise BenchError("need 0 < --short < --long")
    if bad := [kv for kv in args.frameloom_set if "=" not in kv]:
        raise BenchError(f"--frameloom-set takes KEY=VALUE, got {' '.join(bad)}")
    if "diffusers" in args.sides:
        check_environment(args.script)

    import torch

    from frameloom import pipeline
    from frameloom.config import load_config

    results: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "short": args.short,
        "long": args.long,
        "repeats": args.repeats,
        "frameloom_set": args.frameloom_set,
        "loadavg_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        pre, data = setup(root)
        # latents and text cached once, as a user would (`frameloom cache`)
        cache_args = frameloom_args(pre, data, root / "cache-run", 1, 1)
        pipeline.run_cache(load_config(cache_args[0], cache_args[1:]), progress=False)

        # raw[batch, side][kind] = [(short, long) per repeat], kind "wall" or "cpu"
        raw = {(b, s): {"wall": [], "cpu": []} for b in args.batch for s in args.sides}
        peaks = {(b, s): 0.0 for b in args.batch for s in args.sides}
        loads: list[float] = []  # 1-minute load average at the end of each child run

        def command(side: str, out: Path, steps: int, batch: int) -> list[str]:
            if side == "diffusers":
                return diffusers_cmd(args.script, pre, data, out, steps, batch)
            return frameloom_cmd(pre, data, out, steps, batch) + args.frameloom_set

        # one untimed short run of each side and batch first: torch.compile's on-disk kernel cache (the
        # frameloom preset compiles its blocks) and the OS file cache are then warm for every timed run, as
        # they are after a user's first run; a cold cache would add minutes to one repeat's short run only
        for batch in args.batch:
            for side in args.sides:
                out = root / f"{side}-b{batch}-warmup"
                run_child(command(side, out, args.short, batch), args.threads, root / f"{out.name}.log")
        for r in range(args.repeats):
            order = args.sides if r % 2 == 0 else args.sides[::-1]
            for batch in args.batch:
                for side in order:
                    wall, cpu = [], []
                    for steps in (args.short, args.long):
                        out = root / f"{side}-b{batch}-s{steps}-r{r}"
                        seconds, cpu_s, peak = run_child(
                            command(side, out, steps, batch), args.threads, root / f"{out.name}.log"
                        )
                        check_ran(side, out, steps)
                        wall.append(seconds)
                        cpu.append(cpu_s)
                        peaks[batch, side] = max(peaks[batch, side], peak)
                        loads.append(os.getloadavg()[0])
                    raw[batch, side]["wall"].append(tuple(wall))
                    raw[batch, side]["cpu"].append(tuple(cpu))
                    print(
                        f"repeat {r} batch {batch} {side}: wall {wall[0]:.2f}/{wall[1]:.2f} s, "
                        f"cpu {cpu[0]:.2f}/{cpu[1]:.2f} s, load {os.getloadavg()[0]:.1f}",
                        file=sys.stderr,
                    )

        for batch in args.batch:
            row: dict = {}
            for side in args.sides:
                step, startup, per_repeat = summarise(raw[batch, side]["wall"], args.short, args.long)
                cpu_step, cpu_startup, cpu_per_repeat = summarise(
                    raw[batch, side]["cpu"], args.short, args.long
                )
                row[side] = {
                    "step_s": round(step, 4),
                    "startup_s": round(startup, 2),
                    "cpu_step_s": round(cpu_step, 4),
                    "cpu_startup_s": round(cpu_startup, 2),
                    "peak_rss_mb": round(peaks[batch, side], 1),
                    "step_s_per_repeat": [round(s, 4) for s in per_repeat],
                    "cpu_step_s_per_repeat": [round(s, 4) for s in cpu_per_repeat],
                }
            if len(args.sides) == 2:
                row["ratio"] = round(row["diffusers"]["step_s"] / row["frameloom"]["step_s"], 3)
                row["ratio_cpu"] = round(row["diffusers"]["cpu_step_s"] / row["frameloom"]["cpu_step_s"], 3)
            results[f"batch_{batch}"] = row
        results["loadavg_runs"] = {
            "min": round(min(loads), 2),
            "median": round(statistics.median(loads), 2),
            "max": round(max(loads), 2),
        }
    results["loadavg_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
