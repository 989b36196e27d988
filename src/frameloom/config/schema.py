"""The typed configuration: one dataclass per section, each field documented.

Names marked "contract" in a docstring are fixed by DESIGN.md ("Config keys that are part of the contract");
scripts and users rely on them. Everything here has a default, so an empty YAML file is a valid config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """Where the samples come from and how a clip is cut from each video."""

    manifest: str | None = None
    """contract. Path to the canonical manifest (Parquet or CSV); relative paths are taken from the config file."""
    num_frames: int = 16
    """Frames per training clip."""
    frame_stride: float | None = None
    """Take every n-th source frame (may be fractional). Mutually exclusive with target_fps."""
    target_fps: float | None = None
    """Resample clips to this frame rate (Open-Sora-Plan style float stride)."""
    height: int = 32
    """Clip height in pixels after resize-and-center-crop."""
    width: int = 32
    """Clip width in pixels after resize-and-center-crop."""
    cache_dir: str | None = None
    """Latent/text-embedding store; default: `.frameloom_cache` beside the manifest."""
    use_cache: str = "auto"
    """auto: read the cache when it is complete for this run's spec, else encode on the fly; never: always on the fly."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class LoraConfig:
    """Low-rank adaptation (through PEFT)."""

    rank: int = 0
    """contract. LoRA rank; 0 means a full fine-tune."""
    alpha: float | None = None
    """LoRA alpha; None means alpha = rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names that receive adapters."""


@dataclass
class ModelConfig:
    """The denoiser, its latent codec and its text encoder."""

    family: str = "dit"
    """contract. Model family from the registry (`dit`, later `cogvideox`, `wan`, `ltx_video`)."""
    pretrained: str | None = None
    """contract. A local diffusers-format directory, or null to build from `model.config`."""
    preset: str | None = None
    """A size preset of the family (for `dit`: tiny, S, B, L, XL); `model.config` entries override it."""
    config: dict[str, Any] = field(default_factory=dict)
    """Free-form constructor arguments of the family's model (e.g. hidden_size, depth, patch_size)."""
    codec: str = "pixel"
    """`pixel` (the denoiser works on pixels) or a local directory of a diffusers VAE."""
    text_encoder: str | None = None
    """Local directory of a T5 encoder + tokenizer; `tiny-byt5` builds the quickstart's tiny frozen encoder."""
    text_max_length: int = 64
    """Text tokens kept per caption."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""


@dataclass
class ObjectiveConfig:
    """The training objective."""

    name: str = "flow"
    """contract. `flow` (rectified flow); later `ddpm`, `pyramid_flow`."""
    timestep_sampling: str = "logit_normal"
    """`uniform` or `logit_normal`."""
    logit_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal)."""
    logit_std: float = 1.0
    """Std of the normal before the sigmoid (logit_normal)."""
    shift: float = 1.0
    """Timestep shift s in t' = s t / (1 + (s - 1) t); 1 = none."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt (enables classifier-free guidance)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """contract. Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "constant"
    """`constant` or `cosine` after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    """contract. Optimizer steps to train for."""
    batch_size: int = 8
    """contract. Samples per process per micro-step."""
    grad_accum: int = 1
    """contract. Micro-steps per optimizer step."""
    ema_decay: float = 0.999
    """EMA of the weights; 0 disables it."""
    mixed_precision: str = "auto"
    """`auto` (bf16 autocast on CUDA, fp32 on CPU), `bf16`, or `no`."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, or `cuda`."""
    log_every: int = 10
    """Steps between TensorBoard scalar writes (metrics.jsonl gets every step)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class CheckpointConfig:
    """Periodic checkpoints and resume."""

    every: int = 500
    """contract. Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """contract. Complete checkpoints kept; older ones are deleted; 0 keeps all."""
    resume: str | None = None
    """contract. null (fresh run), `latest`, or a checkpoint folder."""


@dataclass
class ParallelConfig:
    """Parallelism (filled in by the scale-out work)."""

    sp_size: int = 1
    """contract. Sequence-parallel group size."""


@dataclass
class SampleConfig:
    """Sampling defaults for `frameloom sample` and validation."""

    steps: int = 30
    """Euler steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1 disables guidance."""
    negative_prompt: str = ""
    """Prompt the guidance steers away from."""
    shift: float = 1.0
    """Timestep shift of the sampling grid."""
    seed: int = 0
    """Noise seed."""
    fps: float = 8.0
    """Frame rate of written mp4s."""
    use_ema: bool = True
    """Sample from the EMA weights when the checkpoint has them."""


@dataclass
class ValidationConfig:
    """Periodic validation samples written as mp4 during training."""

    every: int = 0
    """Steps between validation sampling; 0 disables it."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to sample."""


@dataclass
class LoggingConfig:
    """Where metrics go."""

    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""


@dataclass
class Config:
    """The whole configuration of a run."""

    run_dir: str = "runs/default"
    """contract. Folder for the resolved config, metrics, checkpoints and samples."""
    seed: int = 0
    """contract. Seed of everything random in the run."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Free-form mappings: any key is allowed below these.
FREEFORM = {"model.config"}
