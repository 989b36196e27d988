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
    """auto: pre-extracted tensors when every manifest row names a `latent` file, else the cache when it is
    complete for this run's spec, else encode on the fly (with a warning that counts the missing entries);
    precomputed: the manifest's `latent`/`text_fea` files (data/precomputed.py); never: always on the fly."""
    require_cache: bool = False
    """Refuse to start (naming how many entries are missing) unless every training sample comes from the
    cache; the presets set it, so an incomplete `frameloom cache` never silently turns into decoding.
    (Pre-extracted tensors are not the cache: a precomputed run needs none.)"""
    latent_normalization: str = "auto"
    """Pre-extracted latents: `auto` (the family's: Pyramid Flow's own normalisation for model.family
    pyramid_flow, per its variant; `none` for every other family), `none` (stored as the denoiser takes them,
    e.g. fast-DiT's x0.18215), or Pyramid Flow's training-time normalisation `pyramid_flux` (miniflux) /
    `pyramid_mmdit` (SD3)."""
    empty_text_fea: str | None = None
    """Pre-extracted text features of the empty prompt "" (caption dropout when no text encoder is loaded);
    relative to the manifest's folder. Default: a manifest row with empty text and a text_fea file."""
    num_workers: int = 0
    """DataLoader worker processes (they ignore SIGTERM/SIGINT: the trainer handles preemption)."""
    persistent_workers: bool = True
    """With num_workers > 0: keep the workers alive for the whole run (no restart at epoch boundaries)."""
    pin_memory: bool = True
    """Page-locked host batches for asynchronous copies to the GPU (CUDA only; ignored on CPU)."""
    prefetch_factor: int = 2
    """With num_workers > 0: batches each worker prepares ahead."""
    decode_timeout: float = 60.0
    """Seconds one sample may take to decode when decoding on the fly. Each loader process decodes in a
    sandbox subprocess (data/sandbox.py): a sample whose decoder crashes or runs longer than this is replaced
    like any undecodable one and listed in run_dir/quarantine.jsonl. 0 decodes in the loader process itself
    (no protection)."""
    # -- frame and caption rules of the seeds, path safety (data/video.py, data/captions.py, docs/datasets.md) --
    speed_factor: float = 1.0
    """Open-Sora-Plan speed_factor (>= 1): subsample the strided frames further, by up to this factor."""
    temporal_crop: str = "start"
    """`start` (clips begin at the first usable frame) or `random` (a window drawn per seed, sample and epoch)."""
    frame_policy: str | None = None
    """Valid clip lengths: null (exactly num_frames), `4k+1`, `8n+1`, `opensora_plan` (>= 29, (n-1) % 4 == 0,
    latent length divisible by parallel.sp_size) or `pyramid` ((n-1) % 8 == 0). With a policy,
    num_frames is a maximum: shorter videos give the longest valid clip they hold."""
    caption_fps_suffix: bool = False
    """Open-Sora: append " {fps} FPS." (the clip's frame rate, fps // stride) to every non-empty caption."""
    caption_motion_score: bool = False
    """Open-Sora 2.0: append the row's motion score (column `motion` or `score_vmafmotion`, rounded):
    " 3 motion score.", or " 24 FPS, 3 motion score." with caption_fps_suffix."""
    caption_aesthetic: str = "off"
    """Open-Sora-Plan aesthetic phrases for scores <= 4.25 / >= 5.75: `off`, `fixed` (first phrase, after the
    caption; one text per sample, cache-friendly) or `random` (phrase and side drawn per seed, sample, epoch)."""
    caption_choice: str = "random"
    """Rows with several captions (`captions`, from Open-Sora-Plan's `cap` list): `random` (one drawn per seed,
    sample and epoch, as the seed picks one per load; the cache holds them all) or `first`."""
    caption_clean: str = "off"
    """`opensora_plan`: clean captions as Open-Sora-Plan does (`text_preprocessing`: lower-case, drop URLs,
    HTML, handles, codes, odd punctuation; docs/datasets.md), or `off`."""
    extra_roots: list[str] = field(default_factory=list)
    """Folders besides a dataset file's own root (or the manifest's folder) that its entries may point into
    (`prepare --config`, and every command that loads the manifest); relative entries are taken from the
    config file's folder. Other paths leading out of their root are rejected as outside_root."""
    strict_roots: bool = False
    """Absolute paths must lie under the root too (the manifest's folder, a dataset file's folder, or an extra
    root), in every format; by default absolute paths are accepted where the seeds' tools write them (Open-Sora
    tables, Pyramid Flow jsonl, the manifest)."""
    # -- bucket policies (data/buckets.py; docs/datasets.md, "Buckets") --
    bucket: str = "none"
    """Bucket policy: `none` (every clip at height x width x num_frames), `opensora` (bucket_config),
    `opensora_plan` (max_hxw / hw_stride or force_resolution), `fixed` (CogVideoX: one size, short clips
    dropped), `temporal` (Pyramid Flow: one size, buckets by latent length)."""
    bucket_config: dict[str, Any] = field(default_factory=dict)
    """opensora: {resolution name ("256px", "720p"): {num_frames: [keep probability, batch size per process]}};
    the probability may be [p, q] (q: chance to move on to the next smaller frame count)."""
    fps_max: float | None = None
    """Open-Sora frame stride: every ceil(fps / fps_max)-th frame of videos at fps >= fps_max (None: off);
    the opensora bucket policy counts usable frames with it too. Exclusive with frame_stride/target_fps."""
    max_hxw: int | None = None
    """opensora_plan: largest sample area h * w (required unless force_resolution)."""
    min_hxw: int | None = None
    """opensora_plan: smaller sample areas are dropped (None: max_hxw / 4)."""
    hw_stride: int = 32
    """opensora_plan: sample height and width are center-cropped to multiples of this."""
    force_resolution: bool = False
    """opensora_plan: crop-and-resize every sample to max_height x max_width."""
    max_height: int | None = None
    """opensora_plan with force_resolution: sample height (None: data.height)."""
    max_width: int | None = None
    """opensora_plan with force_resolution: sample width (None: data.width)."""
    drop_short_ratio: float = 1.0
    """opensora_plan: a video with fewer than num_frames (resampled) frames is dropped with this probability."""
    group_data: bool = False
    """Open-Sora-Plan's --group_data, accepted for its configs: frameloom always batches by shape "T x H x W"
    in megabatches, and opensora_plan always drops shapes with fewer than 4 x train.batch_size x
    train.grad_accum x megabatch samples (v1.3 applies that filter with or without the flag)."""
    megabatch: int = 8
    """Consecutive batches of one shape in an epoch's order (the unit whose order is shuffled). Plays the role
    of Open-Sora-Plan's world size; the order never depends on the number of processes."""
    temporal_compression: int | None = None
    """Video frames per latent frame of the codec, for frame-count rules (None: 4 for opensora_plan,
    8 for temporal)."""
    latent_multiple: int = 1
    """temporal: latent frame counts are rounded down to a multiple of this (Pyramid Flow video_sync_group)."""
    resize: str = "cover"
    """`cover` (antialiased bilinear resize, center crop) or `adm` (DiT's center_crop_arr: BOX halvings +
    BICUBIC, center crop; square sizes)."""
    hflip: bool = False
    """Random horizontal flip, drawn per sample and epoch (DiT); in the cache, once per file (fast-DiT)."""


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
    dtype: str = "float32"
    """Precision of the LoRA weights (`float32` or `bfloat16`); the frozen base uses `model.dtype`."""


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
    text_max_length: int | None = None
    """Text tokens kept per caption; null: the family's own length (dit 64, cogvideox the transformer's
    max_text_seq_length (226), wan 512, ltx_video 128: what each pipeline uses)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    id_token: str | None = None
    """Trigger word prepended (with a space) to every non-empty caption when encoding (CogVideoX --id_token)."""
    dtype: str = "float32"
    """Precision of a pretrained denoiser: its trained weights (full fine-tune) or its frozen base (LoRA)."""
    text_statistics: str = "auto"
    """Mean/std a pooled-text denoiser standardizes its text with: `auto` (fit on the training captions for a
    model built from scratch, keep a pretrained model's saved values), `fit` (always refit), `keep`."""
    fp8_base: bool = False
    """LoRA only: store the frozen base's block linear weights in float8 (e4m3, one scale per output row) and
    compute in `model.dtype` (weight-only quantization: about half the memory of a bf16 base)."""
    encoder_dtype: str = "float32"
    """Precision of a family's frozen VAE and text encoder (`float32`, `bfloat16`, `float16`)."""
    vae_tiling: bool = False
    """Tiled VAE encode/decode (large clips: less memory, same model)."""
    vae_slicing: bool = False
    """Encode/decode one sample of a batch at a time (less memory)."""


@dataclass
class ObjectiveConfig:
    """The training objective."""

    name: str | None = None
    """contract. `flow` (rectified flow), `ddpm` (discrete DDPM, linear betas 0.0001..0.02 over 1000 steps, for
    frameloom's own DiT), ...; null: the family's own (dit, wan, ltx_video: flow; cogvideox: its scheduler's
    v-prediction DDPM). A family refuses an objective it does not have."""
    timestep_sampling: str | None = None
    """Flow times: `uniform`, `logit_normal` (sigmoid(N(logit_mean, logit_std))), `sigmoid`
    (sigmoid(logit_std * N(0, 1)), never shifted: musubi-tuner's `sigmoid`) or `shift` (the same draw, then
    shifted: musubi-tuner's `shift`); `uniform` and `logit_normal` are shifted too. ddpm: `uniform` or
    `explicit_uniform` (one stratum of [0, 1000) per micro-batch of the step's global batch, Open-Sora-Plan's
    rank-stratified sampling). null: the family's own (dit, ltx_video: logit_normal; wan: uniform; ddpm and
    cogvideox: uniform integer timesteps, cogvideox's only choice)."""
    logit_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal)."""
    logit_std: float = 1.0
    """Std of the normal before the sigmoid (logit_normal; the scale of `sigmoid` and `shift`)."""
    shift: float | str | None = None
    """Timestep shift s in t' = s t / (1 + (s - 1) t): a number (1.0 is an unshifted schedule), `auto` (the
    resolution-dependent shift: dit Open-Sora 2.0's rule from the latent size, ltx_video e^mu; wan has none
    and uses its scheduler's), or null: the family's own (dit: none; wan: the scheduler config's
    flow_shift; ltx_video: e^mu from the latent size)."""
    min_t: float = 0.0
    """Training times are mapped into [min_t, max_t] after drawing (and shifting): t' = min_t + (max_t -
    min_t) t (musubi-tuner's min/max_timestep / 1000). For ddpm: integer timesteps in [min_t N, max_t N)."""
    max_t: float = 1.0
    """Upper end of the training time range (see min_t)."""
    loss_weighting: str = "none"
    """Per-sample flow loss weight: `none`, `sigma_sqrt` (1 / t^2) or `cosmap` (2 / (pi (1 - 2t + 2t^2)));
    SD3's schemes (diffusers' compute_loss_weighting_for_sd3)."""
    prediction_type: str = "epsilon"
    """ddpm: what the denoiser predicts, `epsilon` or `v_prediction` (Open-Sora-Plan v1.3)."""
    rescale_betas_zero_snr: bool = False
    """ddpm: rescale the betas to zero terminal SNR (Lin et al. 2023); samplers then use trailing timesteps."""
    snr_gamma: float | None = None
    """ddpm: min-SNR-gamma loss weighting (Open-Sora-Plan v1.3: 5.0); null: unweighted MSE."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt (enables classifier-free guidance)."""
    extras_dropout: float | None = None
    """Probability of replacing the text encoder's extra tensors (a pooled CLIP vector) by the empty prompt's,
    drawn independently of the tokens (Open-Sora 2.0 drops T5 and CLIP apart); None: with the tokens."""
    pyramid: dict[str, Any] = field(default_factory=dict)
    """Pyramid Flow recipe knobs (stage_ratios, stage_range, gamma, shift, frame_per_unit, corrupt_ratio,
    max_latent_frames): objectives/pyramid.py `PyramidOptions`, docs/pyramid_flow.md."""


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
    """Steps between host reads of the loss and grad norm: every `log_every` steps one all-reduce brings the
    interval's values to the host, metrics.jsonl gets one record per step and TensorBoard the interval's."""
    max_consecutive_skips: int = 20
    """Stop the run (exit status 2, last good checkpoint kept) after this many consecutive steps with a
    non-finite gradient; checked every `log_every` steps and before each checkpoint. 0 = never stop."""
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
    format: str = "auto"
    """`full` (one safetensors file per model), `sharded` (torch.distributed.checkpoint), `auto`: sharded when
    training with more than one process. Either resumes under any number of processes."""


@dataclass
class ParallelConfig:
    """Parallelism and memory savers, applied from outside the model (`frameloom.parallel`, docs/parallel.md).

    The world (torchrun's WORLD_SIZE) is laid out as a mesh `dp_replicate x dp_shard x sp`; ranks of one
    sp group (and of one video_sync_group) share their batch.
    """

    sp_size: int = 1
    """contract. Sequence-parallel (Ulysses) group size; must divide the world size and the attention heads."""
    data_parallel: str = "ddp"
    """`ddp` (replicated weights, all-reduced gradients) or `fsdp` (FSDP2 `fully_shard` per block, then root)."""
    dp_replicate: int = 1
    """fsdp only: replicate groups (HSDP): shard within world / (dp_replicate * sp_size) ranks, replicate across."""
    zero: int = 3
    """fsdp: 2 keeps the gathered parameters after forward (ZeRO-2), 3 reshards them (ZeRO-3, least memory)."""
    cpu_offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state in CPU memory (CPUOffloadPolicy)."""
    mixed_precision: str = "auto"
    """fsdp: `auto` (bf16 on CUDA, fp32 on CPU), `bf16` (bf16 compute, fp32 reduce and master weights), `fp32`."""
    activation_checkpointing: str = "none"
    """`none`, `full` (every block), or `selective` (checkpoint_blocks / checkpoint_every / opensora_grad_ckpt)."""
    checkpoint_blocks: int = 0
    """selective: checkpoint the first N blocks."""
    checkpoint_every: int = 0
    """selective: checkpoint every k-th block (blocks k-1, 2k-1, ...)."""
    opensora_grad_ckpt: list[int] | None = None
    """selective: Open-Sora's `(double, single)`: the first `double` joint blocks and first `single` single ones."""
    offload_activations: bool = False
    """Keep the tensors autograd saves for backward in CPU memory (torch.autograd.graph.save_on_cpu)."""
    compile: bool | str = False
    """torch.compile: `false`, `blocks` (each transformer block, after checkpointing, before DDP/FSDP; `true`
    means `blocks`) or `model` (the whole denoiser as one graph: fewer guard checks and fused kernels across
    blocks, faster steps for small or overhead-bound models, a longer first compile; not with FSDP or block
    swapping, which act per block)."""
    async_checkpoint: bool = False
    """Sharded checkpoints are written in the background (dcp.async_save); training continues meanwhile."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other processes (the process group's timeout). A rank whose peer
    died or hangs gives up after this long instead of forever; keep it above the longest checkpoint write."""
    blocks_to_swap: int = 0
    """Keep the frozen weights of the last N transformer blocks in CPU memory and bring each to the device
    only while it runs (forward and backward), prefetching the next one; LoRA only, needs
    activation_checkpointing (docs/families.md, "24 GB")."""
    video_sync_group: int = 1
    """Pyramid Flow: consecutive data-parallel ranks that receive the same video (each trains its own AR unit).
    Refused (> 1) by every objective that does not use it."""


@dataclass
class SampleConfig:
    """Sampling defaults for `frameloom sample` and validation."""

    steps: int = 30
    """Sampling steps."""
    scheduler: str = "auto"
    """Solver of frameloom's own sampler. ddpm objective: `euler_ancestral` (auto), `euler`, `ddim` or
    `dpmsolver++` (diffusers' schedulers' maths, frameloom.sampling.ddpm_samplers). Diffusers flow families
    (wan, ltx_video): `auto` = the model folder's scheduler (e.g. UniPC for the released Wan folders) or
    `euler` (Euler on the same shifted grid). frameloom's DiT integrates with Euler."""
    guidance: float = 5.0
    """Classifier-free guidance scale; 1 disables guidance."""
    negative_prompt: str = ""
    """Prompt the guidance steers away from."""
    shift: float | None = None
    """Timestep shift of the sampling grid; null: the family's own (dit: none; wan: the scheduler's
    flow_shift; ltx_video: e^mu from the latent size); 1.0 is an unshifted grid."""
    seed: int = 0
    """Noise seed."""
    fps: float | None = None
    """Frame rate of written mp4s and, for ltx_video, of the sampled frames (its RoPE time scale); null: the
    family's (ltx_video: 25, its pipeline's frame_rate; others: 8)."""
    use_ema: bool = True
    """Sample from the EMA weights when the checkpoint has them."""
    image: str | None = None
    """Image-to-video: the first frame to condition on (`frameloom sample --image`), for families that can."""
    image_guidance: float | None = None
    """Image guidance scale, separate from the text's (opensora2; None: the family's default, 3)."""
    oscillating_guidance: bool = False
    """opensora2: after 10 steps, guide only every other step (and scale image guidance over time)."""
    image_mode: str = "head"
    """opensora2 with `sample.image`: the image is the first frame (`head`), the last (`tail`) or both (`loop`)."""
    pyramid: dict[str, Any] = field(default_factory=dict)
    """Pyramid Flow sampler knobs (mode, first_frame_steps, video_steps, video_guidance, prompt_suffix):
    sampling/pyramid.py `PyramidSampleOptions`, docs/pyramid_flow.md."""


@dataclass
class ValidationConfig:
    """Periodic validation samples written as mp4 during training."""

    every: int = 0
    """Steps between validation sampling; 0 disables it."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to sample."""
    at_start: bool = False
    """Also sample the prompts before the first step (samples/step-00000000: the untrained baseline)."""


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
FREEFORM = {"model.config", "data.bucket_config", "objective.pyramid", "sample.pyramid"}

# String options one of whose words YAML 1.1 reads as a boolean (`no`, `off`, `yes`, `on`, ...): the boolean
# is taken back to that word. A boolean given to any other string option is an error that says to quote it.
YAML_BOOL_WORDS: dict[str, dict[bool, str]] = {
    "train.mixed_precision": {False: "no"},
    "data.caption_aesthetic": {False: "off"},
}
