"""Peak memory of `frameloom export` against the size of the base model: prints JSON.

Builds a CogVideoX-shaped pipeline directory locally (16 layers x 768 wide: ~450 MB of fp32 transformer
weights; tiny VAE and text encoder), trains a LoRA run for one step, then runs each export in a fresh
process and reports its peak resident memory above the process's memory right before the export (after the
imports), in MB: the resident set (``ru_maxrss``, which also counts the page cache of memory-mapped weight
files) and the anonymous memory (``RssAnon``, sampled every 5 ms: the copies export itself makes), the latter
also as a multiple of the transformer's size. The brief: at most one copy of the base plus the adapter.

    python benchmarks/export_memory.py [--layers 16] [--width 768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, threading, time
from frameloom.export import export_run
from safetensors import safe_open  # imported before the baseline, as everything export uses

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

anon_peak = [0]
done = threading.Event()

def poll():  # anonymous memory (not the page cache of memory-mapped weight files), sampled every 5 ms
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status_kb("RssAnon"))
        time.sleep(0.005)

before, anon_before = status_kb("VmRSS"), status_kb("RssAnon")
thread = threading.Thread(target=poll, daemon=True)
thread.start()
export_run(sys.argv[1], fmt=sys.argv[2], out=sys.argv[3])
done.set()
thread.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
print(json.dumps({"before_kb": before, "peak_kb": peak, "anon_before_kb": anon_before, "anon_peak_kb": anon_peak[0]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=768, help="heads x 64")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from families import build_tiny_cogvideox, family_config
    from frameloom.config import load_config
    from frameloom.data import synthetic
    from frameloom.train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pre = build_tiny_cogvideox(root / "cog", num_layers=args.layers, heads=args.width // 64, head_dim=64)
        base_mb = sum(f.stat().st_size for f in (pre / "transformer").glob("*.safetensors")) / 2**20
        synthetic.write_synthetic_set(
            root / "data", num_clips=2, seed=0, height=16, width=16, num_frames=5, progress=False
        )
        run = root / "run"
        cfg = load_config(
            None,
            family_config(
                "cogvideox",
                pre,
                root / "data" / "manifest.parquet",
                run,
                "model.lora.rank=4",
                "train.steps=1",
            ),
        )
        train(cfg)
        ckpt_mb = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file()) / 2**20
        out = {"transformer_mb": round(base_mb, 1), "checkpoint_mb": round(ckpt_mb, 2)}
        for fmt in ("lora", "diffusers"):
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(run), fmt, str(root / f"out-{fmt}")],
                capture_output=True,
                text=True,
                check=True,
            )
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            extra_mb = (numbers["peak_kb"] - numbers["before_kb"]) / 1024
            anon_mb = (numbers["anon_peak_kb"] - numbers["anon_before_kb"]) / 1024
            out[f"export_{fmt}_peak_rss_above_imports_mb"] = round(extra_mb, 1)
            out[f"export_{fmt}_peak_anon_above_imports_mb"] = round(anon_mb, 1)
            out[f"export_{fmt}_anon_x_transformer"] = round(anon_mb / base_mb, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
