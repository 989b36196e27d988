"""Peak memory per process and step time of the native DiT under each data-parallel mode and checkpointing
mode, side by side in one run; printed as JSON.

Every configuration runs in a fresh pair of processes (gloo on CPU, NCCL with --device cuda) so that its peak
is its own: on CPU the peak is the growth of the resident set (ru_maxrss minus the RSS before the model is
built), on CUDA `torch.cuda.max_memory_allocated`. Each process trains `--steps` AdamW steps on a synthetic
batch (timing: the median of the steps after the first). Besides the peak, each row has the model state
this process holds after a step, measured (local weights + gradients + AdamW moments, shards under FSDP) and
expected (fp32 weights 4P + gradients 4P + AdamW 8P with P parameters and n processes: DDP 16P, FSDP2 16P/n;
ZeRO-2 also holds the gathered weights from forward to backward, ZeRO-3 about two blocks' worth), and the
activations autograd saved for backward (parameters excluded). On a CPU-only machine "offload" moves
nothing (it measures only its copies), and the RSS peak also holds the full model built before sharding.

Usage: python benchmarks/parallel_memory.py [--hidden 256 --depth 6 --frames 4 --size 32 --batch 2]
       [--steps 3] [--device cpu|cuda] [--modes ddp,zero2,zero3,zero3_offload] [--ckpt none,full,selective]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

MODES = {
    "ddp": {"data_parallel": "ddp"},
    "zero2": {"data_parallel": "fsdp", "zero": 2},
    "zero3": {"data_parallel": "fsdp", "zero": 3},
    "zero3_offload": {"data_parallel": "fsdp", "zero": 3, "cpu_offload": True},
}
CKPT = {
    "none": {},
    "full": {"activation_checkpointing": "full"},
    "selective": {"activation_checkpointing": "selective", "checkpoint_every": 2},  # every 2nd block
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(
    rank: int, world: int, port: int, args: argparse.Namespace, mode: str, ckpt: str, out: str
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from frameloom.config.schema import ParallelConfig
    from frameloom.models.dit.model import VideoDiT
    from frameloom.parallel import destroy_distributed, init_distributed, parallelize

    env = init_distributed(args.device)
    cuda = env.device.type == "cuda"
    torch.manual_seed(0)
    base = _rss_bytes()
    model = VideoDiT(in_channels=4, patch_size=(1, 2, 2), hidden_size=args.hidden, depth=args.depth,
                     num_heads=args.heads, text_dim=64).to(env.device)  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    par = parallelize(model, ParallelConfig(**MODES[mode], **CKPT[ckpt]), env)
    opt = torch.optim.AdamW(par.module.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 4, args.frames, args.size, args.size, generator=g).to(env.device)
    text = torch.randn(args.batch, 16, 64, generator=g).to(env.device)
    mask = torch.ones(args.batch, 16, dtype=torch.bool, device=env.device)
    t = torch.rand(args.batch, generator=g).to(env.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, saved, state = [], _SavedBytes(), 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        saved.reset()
        with par.activation_context(), torch.autocast(env.device.type, torch.bfloat16, enabled=cuda):
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = (par.forward(x, t, text, mask).float() - x).square().mean()
            loss.backward()
        opt.step()
        state = _state_bytes(par.module, opt)  # weights + gradients + optimizer state held by this process
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    result = {
        "rank": rank,
        "peak_bytes": peak,
        "state_bytes": state,
        "saved_bytes": saved.total,
        "step_s": statistics.median(times[1:] or times),
        "params": params,
    }
    torch.save(result, Path(out) / f"{mode}-{ckpt}-{rank}.pt")
    destroy_distributed()


class _SavedBytes:
    """Bytes of the activations autograd keeps for backward (outside recomputed regions; parameters, which
    FSDP gathers and frees itself, are not counted), deduplicated by storage."""

    def __init__(self) -> None:
        self.total, self.seen = 0, set()

    def reset(self) -> None:
        self.total, self.seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            key = t.untyped_storage().data_ptr()
            if key not in self.seen:
                self.seen.add(key)
                self.total += t.untyped_storage().nbytes()
        return t

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _state_bytes(module: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Local (this process's shard of) weights + gradients + optimizer moments, exactly."""
    total = sum(_local_bytes(p) + _local_bytes(p.grad) for p in module.parameters())
    for st in opt.state.values():
        total += sum(_local_bytes(v) for k, v in st.items() if k != "step")
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_bytes(mode: str, params: int, world: int) -> int:
    """Model-state arithmetic per process (see the module docstring)."""
    full = 16 * params
    return full if mode == "ddp" else full // world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="DiT width (default 256)")
    ap.add_argument("--depth", type=int, default=6, help="DiT blocks (default 6)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--frames", type=int, default=4, help="latent frames (default 4)")
    ap.add_argument("--size", type=int, default=32, help="latent height = width (default 32: 1024 tokens)")
    ap.add_argument("--batch", type=int, default=2, help="samples per process (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default 3)")
    ap.add_argument("--world", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    ap.add_argument("--modes", default=",".join(MODES), help="data-parallel modes to run")
    ap.add_argument("--ckpt", default=",".join(CKPT), help="checkpointing modes to run")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in args.modes.split(","):
            for ckpt in args.ckpt.split(","):
                mp.start_processes(_worker, args=(args.world, _free_port(), args, mode, ckpt, out),
                                   nprocs=args.world, start_method="spawn")  # fmt: skip
                per_rank = [torch.load(Path(out) / f"{mode}-{ckpt}-{r}.pt") for r in range(args.world)]
                params = per_rank[0]["params"]
                rows.append({
                    "mode": mode,
                    "checkpointing": ckpt,
                    "peak_mib_per_process": round(max(r["peak_bytes"] for r in per_rank) / 2**20, 1),
                    "state_mib_measured": round(max(r["state_bytes"] for r in per_rank) / 2**20, 1),
                    "state_mib_expected": round(state_bytes(mode, params, args.world) / 2**20, 1),
                    "saved_activations_mib": round(max(r["saved_bytes"] for r in per_rank) / 2**20, 1),
                    "step_s": round(max(r["step_s"] for r in per_rank), 3),
                })  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    tokens = args.frames * (args.size // 2) ** 2
    print(json.dumps({
        "device": args.device,
        "processes": args.world,
        "model": {"hidden": args.hidden, "depth": args.depth, "heads": args.heads, "params": params},
        "tokens_per_sample": tokens,
        "batch_per_process": args.batch,
        "peak_memory": "cuda max_memory_allocated" if args.device == "cuda" else "RSS growth (ru_maxrss - RSS before model)",
        "state_mib_measured": "local weights + gradients + AdamW moments after the step (shards under FSDP)",
        "state_mib_expected": "16P (DDP), 16P/n (FSDP2; ZeRO-2 also holds the gathered weights in a step)",
        "saved_activations_mib": "tensors autograd keeps for backward, parameters excluded",
        "results": rows,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
