"""Sampling the pretrained (diffusers) families the way their own pipelines do, and validation through those
pipelines. Family-neutral: the family folders only say which grid, which condition and which pipeline.

1. Time grids of the flow-matching families (Wan, LTX-Video). frameloom's own sampler integrates on an
   explicit grid of times; for a pretrained family that grid must be the one its pipeline uses, or
   "frameloom's sample" and "the pipeline's sample" would differ by more than rounding. The grid is what
   diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` computes (read from diffusers 0.42,
   re-derived here):

   a. Training grid: ``N = num_train_timesteps`` (1000) times ``t_i = i / N``, ``i = N..1``; without dynamic
      shifting they are shifted once (``static_shift``), so ``sigma_min = shift(1 / N)``, ``sigma_max = 1``.
   b. Inference grid for ``n`` steps: ``linspace(sigma_max, sigma_min, n)`` (through ``N * sigma``, in
      float64), shifted again: ``static_shift`` with the config's ``shift``, or with dynamic shifting the
      exponential time shift ``e^mu / (e^mu + 1/t - 1)`` (the same map with ``shift = e^mu``); LTX-Video's
      pipeline passes its own ``linspace(1, 1/n, n)`` instead (float32).
   c. ``shift_terminal``: stretch so the last sigma equals it, ``1 - (1 - t) * (1 - terminal) / (1 - t_last)``.
   d. Append ``0``. The model is called with ``timestep = 1000 * sigma``; each step is ``x += (s_next - s) v``.

   Wan ships a ``UniPCMultistepScheduler`` (``flow_shift``, ``use_flow_sigmas``): a multistep solver with its
   own grid. frameloom samples with the folder's scheduler (``sample.scheduler: auto``): Euler on the grid
   above when it is ``FlowMatchEulerDiscreteScheduler``, else the scheduler object itself steps
   (``scheduler_sample``), so ``frameloom sample`` equals the pipeline for UniPC too; ``sample.scheduler:
   euler`` forces Euler on the grid with ``shift = flow_shift``. The solver used is written into each mp4's
   metadata (``comment``) and logged. LTX-Video's resolution-dependent
   shift (``calculate_shift`` in diffusers' LTX pipeline): ``mu`` is linear in the latent token count between
   ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``.

2. ``flow_sample_latents``: the pipelines' noise (``randn((1, C, t, h, w), generator=Generator().manual_seed(
   seed))`` per prompt, a batch of one from a CPU generator; LTX packs that same tensor into tokens), then
   ``euler_sample`` on the grid (or the folder's scheduler): per step one batched forward of
   ``[uncond; cond]``, ``v = v_u + g (v_c - v_u)``; I2V conditions are appended to ``x`` as channels at
   every call. Positive prompts carry ``model.id_token``, the negative prompt never does.
   (CogVideoX's DDIM loop is in models/cogvideox/sampling.py.)

3. ``validate_with_pipeline``: ``validation.prompts`` through the family's diffusers pipeline built around
   the in-training transformer (models/diffusers_family.py, ``build_pipeline``), one mp4 each. The prompts
   go in as embeddings computed by frameloom's own encoder (``model.pipeline_text`` puts them in the form
   the pipeline's ``encode_prompt`` returns), so the pipeline never runs its text path: the embeddings are
   the ones training saw (``model.id_token`` included) and optional text-cleaning packages the pipeline
   would call (Wan I2V's ``ftfy``) are not needed.

4. I2V conditioning images: ``sample.image`` (``frameloom sample --image``) or
   ``model.config.validation_images`` (``validation_images``, ``load_images``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frameloom.config.schema import Config
from frameloom.errors import FrameloomError
from frameloom.sampling.flow_euler import euler_sample

__all__ = [
    "decode_latents",
    "exponential_time_shift",
    "flow_match_sigmas",
    "flow_sample_latents",
    "folder_scheduler",
    "is_euler",
    "scheduler_sample",
    "conditioning_image_paths",
    "load_images",
    "resolution_mu",
    "scheduler_shift",
    "static_shift",
    "stretch_to_terminal",
    "validate_with_pipeline",
    "validation_images",
    "write_videos",
]

# --------------------------------------------------------------------------------------------------------
# 1. time grids (pure functions)

_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def static_shift(sigma, shift: float):
    """SD3's shift ``s * t / (1 + (s - 1) * t)`` (diffusers ``FlowMatchEulerDiscreteScheduler``, ``shift``)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def exponential_time_shift(mu: float, sigma):
    """Flux/LTX's dynamic shift ``e^mu / (e^mu + (1 / t - 1))``, i.e. ``static_shift`` with ``s = e^mu``."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def stretch_to_terminal(sigmas, terminal: float):
    """Stretch a decreasing grid so its last value is ``terminal`` (LTX-Video's ``shift_terminal``):
    ``1 - (1 - t) / c`` with ``c = (1 - t_last) / (1 - terminal)``."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - terminal)
    return 1 - one_minus / scale


def resolution_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The log-shift ``mu`` for ``seq_len`` latent tokens: the line through ``(base_seq_len, base_shift)`` and
    ``(max_seq_len, max_shift)`` (diffusers' ``calculate_shift``; LTX-Video's config: 1024 -> 0.95,
    4096 -> 2.05). Extrapolated, not clamped, outside that range, as the pipeline does."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def scheduler_shift(config: dict[str, Any]) -> float:
    """The static shift of a flow-matching scheduler config: ``shift`` (FlowMatchEuler) or ``flow_shift``
    (UniPC / DPM-Solver with ``use_flow_sigmas``, what Wan 2.1 ships: 3.0 for 480p, 5.0 for 720p)."""
    if config.get("use_flow_sigmas") and config.get("flow_shift") is not None:
        return float(config["flow_shift"])
    return float(config.get("shift", 1.0) or 1.0)


def flow_match_sigmas(
    num_steps: int,
    config: dict[str, Any],
    *,
    mu: float | None = None,
    sigmas: np.ndarray | list[float] | None = None,
) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float32, from ~1 down to 0) a pipeline integrates on (module docstring).

    ``config`` is the scheduler config (``shift``/``flow_shift``, ``use_dynamic_shifting``,
    ``shift_terminal``, ``num_train_timesteps``); ``mu`` is required with dynamic shifting; ``sigmas``
    replaces step b's linspace (LTX-Video's pipeline passes ``linspace(1, 1/n, n)``). The arithmetic follows
    the scheduler's dtypes (float64 for its own linspace, float32 for passed sigmas) so the grids agree to the
    last bit.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise FrameloomError(f"scheduler config: {key}=true is not supported by frameloom's flow sampler")
    if config.get("time_shift_type", "exponential") != "exponential":
        raise FrameloomError("scheduler config: only time_shift_type 'exponential' is supported")
    n_train = int(config.get("num_train_timesteps", 1000))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    shift = scheduler_shift(config)
    if dynamic and mu is None:
        raise ValueError("this scheduler uses dynamic shifting: pass mu (see resolution_mu)")

    if sigmas is None:
        # a. The training grid's ends, in float32 as the scheduler's __init__ computes them.
        train = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()) / n_train
        if not dynamic:
            train = static_shift(train, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        # b. The inference grid (float64 through timesteps, as set_timesteps does).
        grid = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        grid = np.asarray(sigmas).astype(np.float32)
        if grid.shape != (num_steps,):
            raise ValueError(f"sigmas must have {num_steps} entries, got {grid.shape}")
    grid = exponential_time_shift(mu, grid) if dynamic else static_shift(grid, shift)
    # c. Stretch to the terminal sigma, then d. append 0.
    terminal = config.get("shift_terminal")
    if terminal:
        grid = stretch_to_terminal(grid, float(terminal))
    out = torch.from_numpy(np.asarray(grid)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


# --------------------------------------------------------------------------------------------------------
# 2. frameloom's flow sampler on the pipeline's grid


def folder_scheduler(root: str | Path, shift: float | None = None):
    """The scheduler a model folder ships (``<root>/scheduler``, its class from ``model_index.json``), with
    ``shift`` (when given) replacing its ``shift`` / ``flow_shift`` (and any dynamic shifting)."""
    from frameloom.models.diffusers_family import component_class, part_config

    config = part_config(root, "scheduler")
    if shift is not None:  # UniPC / DPM-Solver name it flow_shift, FlowMatchEuler shift
        config = {**config, ("flow_shift" if "flow_shift" in config else "shift"): float(shift)}
        if config.get("use_dynamic_shifting"):
            config["use_dynamic_shifting"] = False
    return component_class(root, "scheduler").from_config(config)


def is_euler(scheduler) -> bool:
    """Whether frameloom's Euler on ``flow_match_sigmas`` is exactly this scheduler's solver."""
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@torch.no_grad()
def flow_sample_latents(
    model: torch.nn.Module,
    text_encoder,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    latent_shape: tuple[int, int, int, int],
    guidance: float,
    sigmas: torch.Tensor | None = None,
    scheduler: Any = None,
    steps: int | None = None,
    negative_prompt: str = "",
    conditions: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Latents ``(N, C, t, h, w)`` for ``prompts[i]`` from ``seeds[i]`` (module docstring, section 2).

    The solver is Euler on ``sigmas``, or a diffusers ``scheduler`` stepping ``steps`` times (the model
    folder's multistep solver, e.g. Wan's UniPC: ``scheduler.step`` on the guided velocity, the model called
    at ``timestep / 1000``). ``latent_shape`` is ``(C, t, h, w)``; ``conditions`` ``(N, K, t, h, w)`` are
    channels appended to ``x`` at every model call (Wan I2V's ``[cond | image]``); ``model_kwargs`` go to
    every call (LTX-Video's ``frame_rate``). The prompts are encoded with ``model.id_token``, the negative
    prompt without it.
    """
    from frameloom.models.diffusers_family import unwrap_text_encoder

    if (sigmas is None) == (scheduler is None):
        raise ValueError("pass exactly one of sigmas (Euler) and scheduler")
    device = next(model.parameters()).device
    neg_emb, neg_mask = unwrap_text_encoder(text_encoder).encode([negative_prompt])
    out = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        # 1. The pipeline's noise for a batch of one.
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(seed))).to(device)
        emb, mask = text_encoder.encode([prompt])
        cond = None if conditions is None else conditions[i : i + 1].to(device, noise.dtype)

        def model_fn(x, t, text, text_mask, cond=cond):
            if cond is not None:  # the classifier-free batch is [uncond; cond]: repeat the conditions
                x = torch.cat([x, cond.expand(x.shape[0], *cond.shape[1:])], dim=1)
            return model(x, t, text, text_mask, **(model_kwargs or {})).float()

        text, uncond = (emb.to(device), mask.to(device)), (neg_emb.to(device), neg_mask.to(device))
        g = guidance if guidance > 1.0 else 1.0  # guidance is skipped at g <= 1, as the pipelines do
        if scheduler is None:
            # 2a. Euler on the pipeline's grid with classifier-free guidance.
            x = euler_sample(model_fn, noise, sigmas.to(device), cond=text, uncond=uncond, guidance=g)
        else:
            # 2b. The folder's scheduler (a fresh multistep history per video).
            x = scheduler_sample(model_fn, noise, copy.deepcopy(scheduler), steps, text, uncond, g)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def scheduler_sample(
    model_fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    scheduler,
    steps: int,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    guidance: float,
) -> torch.Tensor:
    """``x0`` from ``noise`` with a diffusers flow scheduler: at each of its timesteps ``T`` one batched
    ``[uncond; cond]`` call at flow time ``T / 1000``, ``v = v_u + g (v_c - v_u)``, then
    ``scheduler.step(v, T, x)`` (the Wan pipelines' loop)."""
    from frameloom.sampling.flow_euler import _batch_cfg

    scheduler.set_timesteps(steps, device=noise.device)
    use_cfg = guidance != 1.0
    b = noise.shape[0]
    text, text_mask = _batch_cfg(cond, uncond, b) if use_cfg else cond
    x = noise
    for timestep in scheduler.timesteps:
        t = (timestep.float() / 1000).to(noise.device)
        if use_cfg:
            v_u, v_c = model_fn(torch.cat([x, x]), t.expand(2 * b), text, text_mask).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model_fn(x, t.expand(b), text, text_mask)
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
    return x


@torch.no_grad()
def decode_latents(codec, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents ``(N, C, t, h, w)`` -> videos ``(N, 3, T, H, W)`` in [-1, 1] on the CPU, one at a
    time (as the pipelines decode a batch of one)."""
    return torch.cat([codec.decode(x[None]).float().clamp(-1, 1).cpu() for x in latents])


# --------------------------------------------------------------------------------------------------------
# 3. validation through the family's pipeline


def write_videos(
    videos: torch.Tensor,
    prompts: Sequence[str],
    seed: int,
    cfg: Config,
    out_dir: str | Path,
    sampler: str | None = None,
):
    """One mp4 per prompt (``NNN-<slug>-seedS.mp4``) from videos ``(N, 3, T, H, W)`` in [-1, 1]; ``sampler``
    (what made them) goes into each file's ``comment`` tag."""
    from frameloom.models.registry import sample_fps
    from frameloom.sampling.generate import slug
    from frameloom.sampling.video_io import write_mp4

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tags = {"comment": f"frameloom sampler: {sampler}"} if sampler else None
    return [
        write_mp4(video, out_dir / f"{i:03d}-{slug(p)}-seed{seed}.mp4", fps=sample_fps(cfg), metadata=tags)
        for i, (p, video) in enumerate(zip(prompts, videos))
    ]


@torch.no_grad()
def validate_with_pipeline(
    model: torch.nn.Module,
    text_encoder,
    codec,
    cfg: Config,
    out_dir: str | Path,
    *,
    extra: Callable[[int], dict] | None = None,
    pipeline_cls: type | None = None,
    **parts: Any,
) -> list[Path]:
    """``validation.prompts`` through the family's diffusers pipeline around the in-training transformer
    (LoRA layers active), one mp4 each in ``out_dir``; returns the paths (module docstring, section 3).

    ``parts`` are pipeline parts beyond the transformer, text encoder, VAE and scheduler (Wan I2V's image
    encoder and processor); ``extra(i)`` adds per-prompt pipeline arguments (an I2V image, LTX's frame rate);
    ``pipeline_cls`` replaces the folder's pipeline class.
    The negative prompt is encoded without ``model.id_token``, as the pipeline would encode the string.
    """
    from frameloom.models.diffusers_family import build_pipeline, unwrap_text_encoder

    pipe = build_pipeline(model.pretrained, model.transformer, text_encoder, codec, pipeline_cls, **parts)
    pipe.set_progress_bar_config(disable=True)
    if cfg.sample.shift is not None and ({"shift", "flow_shift"} & set(pipe.scheduler.config)):
        pipe.scheduler = folder_scheduler(model.pretrained, cfg.sample.shift)  # a flow family's sample.shift
    sampler = (
        f"{type(pipe).__name__} with {type(pipe.scheduler).__name__} (the model folder's), "
        f"{cfg.sample.steps} steps, guidance {cfg.sample.guidance:g}"
    )
    logging.getLogger("frameloom.validate").info("validation with %s", sampler)
    prompts = list(cfg.validation.prompts)
    te_dtype = getattr(text_encoder, "dtype", torch.float32)
    tr_dtype = next(model.transformer.parameters()).dtype
    device = next(model.transformer.parameters()).device
    negative = model.pipeline_text(*unwrap_text_encoder(text_encoder).encode([cfg.sample.negative_prompt]))
    videos = []
    for i, prompt in enumerate(prompts):
        kwargs = dict(
            **model.pipeline_text(*text_encoder.encode([prompt])),  # the id token is the encoder's
            **{f"negative_{k}": v for k, v in negative.items()},
            num_frames=cfg.data.num_frames,
            height=cfg.data.height,
            width=cfg.data.width,
            num_inference_steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance,
            generator=torch.Generator().manual_seed(cfg.sample.seed),
            output_type="pt",
            **(extra(i) if extra is not None else {}),
        )
        # A bf16 base with an fp32 text encoder: let autocast reconcile the dtypes.
        with torch.autocast(device.type, dtype=tr_dtype, enabled=te_dtype != tr_dtype):
            frames = pipe(**kwargs).frames[0]  # (T, 3, H, W) in [0, 1]
        videos.append(frames.permute(1, 0, 2, 3).float() * 2 - 1)
    return write_videos(torch.stack(videos), prompts, cfg.sample.seed, cfg, out_dir, sampler)


# --------------------------------------------------------------------------------------------------------
# 4. I2V conditioning images


def load_images(paths: Sequence[str], height: int, width: int) -> torch.Tensor:
    """Images as ``(N, 3, H, W)`` floats in [-1, 1], resized (bilinear) to ``height x width``."""
    from PIL import Image

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FrameloomError(f"I2V conditioning image not found: {p}")
        img = Image.open(p).convert("RGB").resize((width, height), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def conditioning_image_paths(cfg: Config) -> list[str]:
    """The image-to-video first frames the config names: ``sample.image`` (``frameloom sample --image``,
    one image for every prompt), else ``model.config.validation_images`` (one per prompt, cycled)."""
    if cfg.sample.image:
        return [cfg.sample.image]
    return list(cfg.model.config.get("validation_images") or [])


def validation_images(cfg: Config, n: int) -> torch.Tensor:
    """The conditioning images (``conditioning_image_paths``) for ``n`` prompts, ``(n, 3, H, W)`` in
    [-1, 1] at the run's size: the first frames of image-to-video sampling and validation."""
    paths = conditioning_image_paths(cfg)
    if not paths:
        raise FrameloomError(
            "an image-to-video model needs a first frame: frameloom sample --image PATH, or "
            "model.config.validation_images (one image per prompt)"
        )
    return load_images([paths[i % len(paths)] for i in range(n)], cfg.data.height, cfg.data.width)
