"""How the world is laid out: a `dp_replicate x dp_shard x sp` mesh, and which ranks share a batch.

Pure arithmetic (no process group), so every size rule is checked, with a clear message, before anything is
built. Ranks are laid out row-major over the mesh, as `init_device_mesh` does:
`rank = (r * dp_shard + s) * sp + p`, so the `sp_size` ranks of one sequence-parallel group are consecutive
(on one node, where the all-to-all is fastest) and `rank // sp_size` is the data-parallel index.
"""

from __future__ import annotations

from dataclasses import dataclass

from frameloom.config.schema import ParallelConfig
from frameloom.errors import FrameloomError

DATA_PARALLEL = ("ddp", "fsdp")
CHECKPOINTING = ("none", "full", "selective")
COMPILE = (False, True, "blocks", "model")
MIXED_PRECISION = ("auto", "bf16", "fp32")
MESH_AXES = ("dp_replicate", "dp_shard", "sp")


@dataclass(frozen=True)
class ParallelPlan:
    """Mesh sizes and the data-parallel layout of one run."""

    world_size: int
    dp_replicate: int
    dp_shard: int
    sp: int
    video_sync_group: int = 1

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.dp_replicate, self.dp_shard, self.sp)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (each with its own slice of the global batch, or its own AR unit)."""
        return self.dp_replicate * self.dp_shard

    @property
    def data_world(self) -> int:
        """Distinct batches per micro-step: ranks of one sp group and one video_sync_group share theirs."""
        return self.dp_size // self.video_sync_group

    def dp_rank(self, rank: int) -> int:
        return rank // self.sp

    def sp_rank(self, rank: int) -> int:
        return rank % self.sp

    def data_rank(self, rank: int) -> int:
        """Index of the batch this rank reads (ranks sharing a batch get the same index)."""
        return self.dp_rank(rank) // self.video_sync_group

    def sync_rank(self, rank: int) -> int:
        """Position inside the video_sync_group (Pyramid Flow: which AR unit of the shared video)."""
        return self.dp_rank(rank) % self.video_sync_group


def validate_parallel_config(p: ParallelConfig) -> None:
    """Values that are wrong whatever the world size."""
    if p.data_parallel not in DATA_PARALLEL:
        raise FrameloomError(f"parallel.data_parallel must be ddp or fsdp, not {p.data_parallel!r}")
    if p.zero not in (2, 3):
        raise FrameloomError(f"parallel.zero must be 2 or 3, not {p.zero!r}")
    if p.mixed_precision not in MIXED_PRECISION:
        raise FrameloomError(
            f"parallel.mixed_precision must be auto, bf16 or fp32, not {p.mixed_precision!r}"
        )
    if p.activation_checkpointing not in CHECKPOINTING:
        raise FrameloomError(
            f"parallel.activation_checkpointing must be none, full or selective, not {p.activation_checkpointing!r}"
        )
    if p.compile not in COMPILE:
        raise FrameloomError(f"parallel.compile must be false, true, blocks or model, not {p.compile!r}")
    if p.compile == "model" and (p.data_parallel == "fsdp" or p.blocks_to_swap > 0):
        raise FrameloomError(
            "parallel.compile=model compiles the whole denoiser, but FSDP and block swapping act per block: "
            "use parallel.compile=blocks"
        )
    for name in ("sp_size", "dp_replicate", "video_sync_group"):
        if getattr(p, name) < 1:
            raise FrameloomError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.checkpoint_blocks < 0 or p.checkpoint_every < 0:
        raise FrameloomError("parallel.checkpoint_blocks and parallel.checkpoint_every must be >= 0")
    if p.opensora_grad_ckpt is not None and (len(p.opensora_grad_ckpt) != 2 or min(p.opensora_grad_ckpt) < 0):
        raise FrameloomError(
            f"parallel.opensora_grad_ckpt must be [double, single] (two counts >= 0), got {p.opensora_grad_ckpt}"
        )
    selective = (p.checkpoint_blocks > 0) + (p.checkpoint_every > 0) + (p.opensora_grad_ckpt is not None)
    if p.activation_checkpointing == "selective" and selective != 1:
        raise FrameloomError(
            "parallel.activation_checkpointing=selective needs exactly one of parallel.checkpoint_blocks, "
            "parallel.checkpoint_every or parallel.opensora_grad_ckpt"
        )
    if p.activation_checkpointing != "selective" and selective:
        raise FrameloomError(
            "parallel.checkpoint_blocks/checkpoint_every/opensora_grad_ckpt need "
            "parallel.activation_checkpointing=selective"
        )
    if p.data_parallel == "ddp" and (p.dp_replicate != 1 or p.cpu_offload):
        raise FrameloomError(
            "parallel.dp_replicate and parallel.cpu_offload apply to parallel.data_parallel=fsdp only"
        )


def plan_parallel(p: ParallelConfig, world_size: int, batch_size: int) -> ParallelPlan:
    """Check `p` against the world size and per-process batch size, and return the mesh layout."""
    validate_parallel_config(p)
    if batch_size < 1:
        raise FrameloomError(f"train.batch_size must be >= 1, got {batch_size}")
    sp = p.sp_size
    if world_size % sp:
        raise FrameloomError(f"parallel.sp_size={sp} does not divide the world size {world_size}")
    if p.data_parallel == "ddp":
        dp_replicate, dp_shard = world_size // sp, 1
    else:
        if world_size % (p.dp_replicate * sp):
            raise FrameloomError(
                f"parallel.dp_replicate x parallel.sp_size = {p.dp_replicate} x {sp} does not divide the "
                f"world size {world_size}"
            )
        dp_replicate, dp_shard = p.dp_replicate, world_size // (p.dp_replicate * sp)
    plan = ParallelPlan(world_size, dp_replicate, dp_shard, sp, p.video_sync_group)
    if plan.dp_size % p.video_sync_group:
        raise FrameloomError(
            f"parallel.video_sync_group={p.video_sync_group} does not divide the {plan.dp_size} data-parallel "
            f"ranks (world {world_size} / sp_size {sp})"
        )
    return plan


def check_sequence_split(num_tokens: int, num_heads: int, sp: int, where: str = "") -> None:
    """Ulysses needs the token count and the attention heads divisible by the sequence-parallel size.
    `where` names the shape (e.g. a bucket's latent grid) in the message."""
    if sp == 1:
        return
    if num_heads % sp:
        raise FrameloomError(f"parallel.sp_size={sp} does not divide the model's {num_heads} attention heads")
    if num_tokens % sp:
        at = f" ({where})" if where else ""
        raise FrameloomError(
            f"parallel.sp_size={sp} does not divide the {num_tokens} video tokens per sample{at} "
            "(latent frames x height x width / patch); change data.num_frames/height/width or the buckets"
        )


def check_video_sync_group(num_latent_frames: int, group: int) -> None:
    """Pyramid Flow's rule: every rank of a video_sync_group trains its own unit of the video's latent frames."""
    if group > 1 and num_latent_frames % group:
        raise FrameloomError(
            f"parallel.video_sync_group={group} does not divide the {num_latent_frames} latent frames"
        )
