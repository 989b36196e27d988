"""`frameloom plan CONFIG`: how much memory one training process needs, per bucket, before anything is loaded.

How the estimate is made (no weights are read, nothing is allocated):

1. The denoiser is built from its configs on the ``meta`` device (``diffusers_family.skeleton``), with the
   run's LoRA, dtypes and fp8 base, and the run's activation checkpointing applied.
2. Static memory, from the parameters: weights (by dtype, fp8 included), AdamW's two states per trainable
   parameter (in its dtype), the EMA's fp32 copy of the trainable weights. The layout moves or divides them:
   FSDP shards weights, gradients and optimizer over ``dp_shard`` (ZeRO-3 plus one gathered block and the
   next prefetched; ZeRO-2 keeps the gathered weights), ``cpu_offload`` puts the shards in host memory, DDP
   adds its gradient buckets (a second copy of the gradients), ``blocks_to_swap`` keeps the swapped blocks'
   frozen weights in host memory except two blocks' worth.
3. Activations, per bucket: one training step (the family's objective ``draw``, the model call, the loss,
   ``backward``) runs on meta tensors of the bucket's latent and text shapes under ``LiveBytes``, which
   records the peak of live tensor bytes (activations kept for backward, temporaries, the gradients).
   Attention is counted as a fused kernel (flash / memory-efficient, what CUDA and CPU pick: the output
   and a float32 logsumexp are kept, never the ``L x L`` scores). The optimizer step adds the gradients
   plus one temporary per trainable weight (foreach AdamW) once the activations are gone.
4. Per bucket: peak = static + max(step peak, gradients + one optimizer temporary); the largest batch that
   fits from two traces (batch 1 and 2: activations grow linearly with the batch). Sequence parallelism
   divides the activations by ``sp_size`` (an approximation: the all-to-all buffers are not counted).

The tests compare these numbers with the peak the CPU allocator reports for the same step of a tiny model
(tests/test_memory_plan.py). What it does not see: the CUDA caching allocator's fragmentation and
workspaces (cuBLAS, cuDNN: typically 0.5-2 GiB), the CUDA context (~0.5 GiB), activation offload.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from frameloom.config.schema import Config
from frameloom.errors import FrameloomError
from frameloom.memory.live_bytes import LiveBytes

__all__ = ["BucketPlan", "InputShapes", "MemoryPlan", "Static", "flash_like_attention", "plan_memory"]

GiB = 1024**3


@dataclass(frozen=True)
class InputShapes:
    """What a training step of a family consumes: latent channels and the VAE's ``(t, h, w)`` compression,
    the text length and width; ``extra_channels(grid)`` adds channels a clip's latent also carries (Wan I2V)."""

    latent_channels: int
    compression: tuple[int, int, int]
    text_length: int
    text_dim: int
    extra_channels: Callable[[tuple[int, int, int]], int] | None = None

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        ct, ch, cw = self.compression
        t = frames if ct == 1 else 1 + (frames - 1) // ct
        return t, height // ch, width // cw

    def channels(self, grid: tuple[int, int, int]) -> int:
        return self.latent_channels + (self.extra_channels(grid) if self.extra_channels else 0)


@dataclass
class Static:
    """Bytes per process that do not depend on the batch."""

    weights_device: int = 0
    weights_host: int = 0
    gradients: int = 0
    optimizer_device: int = 0
    optimizer_host: int = 0
    ema: int = 0
    ddp_buckets: int = 0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def device(self) -> int:
        """Resident between steps (the gradients come and go with the step; DDP's buckets stay)."""
        return self.weights_device + self.optimizer_device + self.ema + self.ddp_buckets

    @property
    def host(self) -> int:
        return self.weights_host + self.optimizer_host


@dataclass
class BucketPlan:
    name: str
    latent: tuple[int, int, int, int]
    latent_positions: int
    batch: int
    activations: int
    """Bytes of the step above the static memory (activations, temporaries, gradients, optimizer step)."""
    per_sample: int
    """Growth of ``activations`` per extra sample in the batch."""
    total: int
    fits: bool | None = None
    max_batch: int | None = None


@dataclass
class MemoryPlan:
    family: str
    layout: str
    gpu_memory: int | None
    static: Static
    buckets: list[BucketPlan] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        s = self.static
        lines = [
            f"frameloom plan: {self.family}, {self.layout}"
            + (f", GPU memory {self.gpu_memory / GiB:.1f} GiB" if self.gpu_memory else ", no GPU size given"),
            f"parameters: {s.total_params:,} ({s.trainable_params:,} trainable)",
            "per process (GiB)         device     host",
            f"  weights              {g(s.weights_device)} {g(s.weights_host)}",
            f"  gradients            {g(s.gradients)}",
            f"  optimizer (AdamW)    {g(s.optimizer_device)} {g(s.optimizer_host)}",
            f"  EMA                  {g(s.ema)}",
            f"  DDP gradient buckets {g(s.ddp_buckets)}",
            "bucket (frames x h x w)   latent (C, t, h, w) positions  batch  activations    total  fits  max batch",
        ]
        for b in self.buckets:
            fits = "-" if b.fits is None else ("yes" if b.fits else "NO")
            largest = "-" if b.max_batch is None else str(b.max_batch)
            lines.append(
                f"  {b.name:<23} {str(b.latent):<21} {b.latent_positions:>9} {b.batch:>6} {g(b.activations)} "
                f"{g(b.total)}  {fits:>4}  {largest:>9}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# attention as a fused kernel


class _FlashLike(torch.autograd.Function):
    """The memory of a fused attention kernel: keeps q, k, v, the output and a float32 logsumexp per query
    (``(..., L)``) for backward; never the ``L x S`` scores. Values are not computed (shapes only)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flash_like_attention() -> Iterator[None]:
    """Inside: ``F.scaled_dot_product_attention`` is counted as a fused kernel (``_FlashLike``)."""
    f = torch.nn.functional
    original = f.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        return _FlashLike.apply(query, key, value)

    f.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        f.scaled_dot_product_attention = original


# --------------------------------------------------------------------------------------------------------
# the model and its inputs


def input_shapes(cfg: Config) -> InputShapes:
    """The family's ``input_shapes`` hook, or (frameloom's own DiT) the generic codec's and text encoder's."""
    from frameloom import pipeline
    from frameloom.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.input_shapes is not None:
        return family.input_shapes(cfg)
    codec = pipeline.load_codec(cfg, "cpu")
    encoder = pipeline.load_text_encoder(cfg, "cpu")
    return InputShapes(codec.latent_channels, tuple(codec.compression), encoder.max_length, encoder.dim)


def skeleton_model(cfg: Config, shapes: InputShapes) -> torch.nn.Module:
    """The run's denoiser on the meta device (configs only), with its activation checkpointing."""
    from frameloom.models import diffusers_family as df
    from frameloom.models.registry import get_family
    from frameloom.parallel.memory import apply_activation_checkpointing

    with torch.device("meta"), df.skeleton():
        model = get_family(cfg.model.family).build_denoiser(
            cfg.model, shapes.latent_channels, shapes.text_dim
        )
    model.train()
    apply_activation_checkpointing(model, cfg.parallel)
    return model


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _block_frozen_bytes(model: torch.nn.Module) -> list[int]:
    from frameloom.parallel.memory import transformer_blocks

    return [_bytes(p for p in b.parameters() if not p.requires_grad) for b in transformer_blocks(model)]


def static_memory(cfg: Config, model: torch.nn.Module, world_size: int) -> tuple[Static, str]:
    """Static bytes per process and a one-line description of the layout (module docstring, step 2)."""
    from frameloom.parallel.plan import plan_parallel

    p = cfg.parallel
    plan = plan_parallel(p, world_size, cfg.train.batch_size)
    params = list(model.parameters())
    trainable = [q for q in params if q.requires_grad]
    weights = _bytes(params) + _bytes(model.buffers())
    grads = _bytes(trainable)
    optim = 2 * grads
    ema = 4 * sum(q.numel() for q in trainable) if cfg.train.ema_decay > 0 else 0
    s = Static(
        weights_device=weights,
        gradients=grads,
        optimizer_device=optim,
        ema=ema,
        trainable_params=sum(q.numel() for q in trainable),
        total_params=sum(q.numel() for q in params),
    )
    parts = [f"{world_size} process(es)"]
    blocks = _block_frozen_bytes(model) or [0]
    if world_size > 1 and p.data_parallel == "fsdp":
        shard = plan.dp_shard
        gathered = 2 * max(blocks) if p.zero == 3 else weights - weights // shard
        s.weights_device, s.gradients, s.optimizer_device = (
            weights // shard + gathered,
            grads // shard,
            optim // shard,
        )
        s.ema = ema // shard
        parts.append(f"FSDP2 ZeRO-{p.zero} over {shard}")
        if p.cpu_offload:
            s.weights_host, s.optimizer_host = weights // shard, s.optimizer_device
            s.weights_device, s.optimizer_device = gathered, 0
            parts.append("CPU offload")
    elif world_size > 1:
        s.ddp_buckets = grads  # DDP's gradient buckets hold a second copy of the gradients
        parts.append("DDP")
    if p.blocks_to_swap > 0:
        chosen = blocks[len(blocks) - p.blocks_to_swap :]
        swapped = sum(chosen)
        resident = sum(sorted(chosen)[-2:])  # the block computing and the one prefetched
        s.weights_device -= swapped - resident
        s.weights_host += swapped
        parts.append(f"{p.blocks_to_swap} blocks swapped")
    if p.sp_size > 1:
        parts.append(f"sequence parallel {p.sp_size}")
    parts.append(f"activation checkpointing {p.activation_checkpointing}")
    return s, ", ".join(parts)


@torch.no_grad()
def _zero_grads(model: torch.nn.Module) -> None:
    for q in model.parameters():
        q.grad = None


@contextlib.contextmanager
def saved_tensors_on_host() -> Iterator[None]:
    """Inside: tensors autograd saves for backward leave the device (``parallel.offload_activations``, which
    uses ``save_on_cpu``); on meta they are kept as shapes and come back as fresh meta tensors when used."""

    def pack(t: torch.Tensor):
        return t.shape, t.dtype, t.stride() if t.is_contiguous() else None

    def unpack(packed):
        shape, dtype, _ = packed
        return torch.empty(shape, dtype=dtype, device="meta")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def autocast_like(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the float32 parameters of a meta skeleton to ``dtype``: what bf16 autocast computes in, so the
    traced activations have the sizes the GPU run keeps (fp8 and other dtypes untouched)."""
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype)


def trace_step(
    cfg: Config, model: torch.nn.Module, objective: Any, shapes: InputShapes, batch: int, frames_hw
) -> tuple[int, int]:
    """(peak, end) live bytes of one step on meta tensors: draw, model call, loss, backward (step 3)."""
    from frameloom.objectives.base import Conditioning, StepContext, predict

    grid = shapes.latent_grid(*frames_hw)
    x0 = torch.zeros(batch, shapes.channels(grid), *grid, device="meta")
    emb = torch.zeros(batch, shapes.text_length, shapes.text_dim, device="meta")
    mask = torch.ones(batch, shapes.text_length, dtype=torch.bool, device="meta")
    generator = torch.Generator().manual_seed(cfg.seed)
    offload = saved_tensors_on_host() if cfg.parallel.offload_activations else contextlib.nullcontext()
    with flash_like_attention(), torch.enable_grad(), LiveBytes() as live, offload:
        inputs = objective.draw(x0, generator, StepContext())
        pred = predict(objective, model, inputs, Conditioning(emb, mask, {}))
        loss = objective.loss(pred, inputs)
        loss.backward()
        del inputs, pred, loss
        end = live.current
    _zero_grads(model)
    return live.peak, end


def plan_memory(
    cfg: Config, *, gpu_memory: int | None = None, world_size: int = 1, device_type: str = "cuda"
) -> MemoryPlan:
    """The memory plan of ``cfg`` for one process of ``world_size`` (module docstring); ``gpu_memory`` in
    bytes (None: the local GPU's, if any) decides ``fits`` and the largest batch. ``device_type`` is where the
    run will train: on ``cuda`` ``train.mixed_precision`` auto/bf16 computes in bf16 (autocast), on ``cpu``
    in the weights' dtypes."""
    from frameloom import pipeline
    from frameloom.objectives import build_objective

    if gpu_memory is None and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    shapes = input_shapes(cfg)
    model = skeleton_model(cfg, shapes)
    objective = build_objective(cfg)
    static, layout = static_memory(cfg, model, world_size)
    mixed = cfg.train.mixed_precision == "bf16" or (
        cfg.train.mixed_precision == "auto" and device_type == "cuda"
    )
    if mixed:  # the step computes in bf16: trace a bf16 copy (the static part keeps the real dtypes)
        model = skeleton_model(cfg, shapes)
        autocast_like(model, torch.bfloat16)
        layout += ", bf16 autocast"
    if cfg.parallel.offload_activations:
        layout += ", activations offloaded"
    trainable = _bytes(q for q in model.parameters() if q.requires_grad)
    sp = max(1, cfg.parallel.sp_size)
    out = MemoryPlan(cfg.model.family, layout, gpu_memory, static)
    policy = pipeline.bucket_policy(cfg) if cfg.data.bucket != "none" else None
    if policy is None:
        sizes = [(cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.train.batch_size)]
    else:
        t = policy.table
        sizes = [(*t.shape(k), int(t.batch_size[k])) for k in range(len(t))]
    for frames, height, width, batch in sizes:
        grid = shapes.latent_grid(frames, height, width)
        one_peak, one_end = trace_step(cfg, model, objective, shapes, 1, (frames, height, width))
        two_peak, _ = trace_step(cfg, model, objective, shapes, 2, (frames, height, width))
        per_sample = max(0, two_peak - one_peak) // sp
        base = one_peak // sp - per_sample
        step = base + per_sample * batch
        activations = max(step, one_end + trainable)  # the optimizer step: gradients + one temporary
        total = static.device + activations
        plan = BucketPlan(
            f"{frames}x{height}x{width}",
            (shapes.channels(grid), *grid),
            grid[0] * grid[1] * grid[2],  # latent positions (the transformer's tokens are patches of them)
            batch,
            activations,
            per_sample,
            total,
        )
        if gpu_memory:
            plan.fits = total <= gpu_memory
            room = gpu_memory - static.device - base
            plan.max_batch = max(0, math.floor(room / per_sample)) if per_sample > 0 else None
        out.buckets.append(plan)
    if not out.buckets:
        raise FrameloomError("frameloom plan: the config has no bucket to plan for")
    return out
