"""The 24 GB route for Wan 2.1 14B, as `frameloom plan` sees it: prints JSON.

Writes a configs-only Wan 2.1 T2V 14B directory (diffusers' WanTransformer3DModel and AutoencoderKLWan
defaults are the released 14B transformer and the Wan VAE; no weights: the planner reads configs only) and
plans configs/wan_lora.yaml (LoRA rank 32, 81 x 480 x 832, batch 1, activation checkpointing) for one GPU
in several layouts: bf16 base; fp8 base; fp8 base + 30 swapped blocks; the same with the activations
offloaded (the checkpointed blocks' inputs in host memory); the same at 33 frames. Each says the device and
host GiB and whether it fits 24 GiB minus a reserve for the CUDA context and workspaces.

    python benchmarks/plan_24gb.py [--gpu-memory 24] [--reserve 1.5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

GiB = 1024**3


def write_wan14b_configs(root: Path) -> Path:
    """model_index.json + transformer/vae/scheduler configs of Wan2.1-T2V-14B-Diffusers; placeholder text parts."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    with torch.device("meta"):
        WanTransformer3DModel().save_config(root / "transformer")  # defaults: 40 x 5120, ffn 13824, 14B
        AutoencoderKLWan().save_config(root / "vae")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_config(root / "scheduler")
    for part in ("text_encoder", "tokenizer"):  # not read by the planner (text shapes come from the config)
        (root / part).mkdir(parents=True, exist_ok=True)
        (root / part / "config.json").write_text("{}")
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "AutoTokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def main() -> None:
    from frameloom.config import load_config
    from frameloom.memory.plan import plan_memory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-memory", type=float, default=24.0, help="GiB (default 24)")
    parser.add_argument("--reserve", type=float, default=1.5, help="GiB for CUDA context/workspaces (1.5)")
    args = parser.parse_args()
    preset = Path(__file__).resolve().parents[1] / "configs" / "wan_lora.yaml"
    budget = int((args.gpu_memory - args.reserve) * GiB)
    out = {"model": "Wan2.1-T2V-14B (configs only)", "clip": "81x480x832", "budget_gib": budget / GiB}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_wan14b_configs(Path(tmp) / "wan14b")
        layouts = {
            "bf16 base": [],
            "fp8 base": ["model.fp8_base=true"],
            "fp8 base + 30 blocks swapped": ["model.fp8_base=true", "parallel.blocks_to_swap=30"],
            "fp8 base + 30 blocks swapped + activations offloaded": [
                "model.fp8_base=true",
                "parallel.blocks_to_swap=30",
                "parallel.offload_activations=true",
            ],
            "fp8 base + 30 blocks swapped, 33 x 480 x 832": [
                "model.fp8_base=true",
                "parallel.blocks_to_swap=30",
                "data.num_frames=33",
            ],
        }
        for name, extra in layouts.items():
            cfg = load_config(preset, [f"model.pretrained={root}", *extra])
            start = time.perf_counter()
            plan = plan_memory(cfg, gpu_memory=budget)
            bucket = plan.buckets[0]
            out[name] = {
                "device_gib": round(bucket.total / GiB, 2),
                "host_gib": round(plan.static.host / GiB, 2),
                "weights_device_gib": round(plan.static.weights_device / GiB, 2),
                "activations_gib": round(bucket.activations / GiB, 2),
                "latent_positions": bucket.latent_positions,
                "fits": bucket.fits,
                "max_batch": bucket.max_batch,
                "plan_seconds": round(time.perf_counter() - start, 1),
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
