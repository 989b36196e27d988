"""Open-Sora 2.0's sampler: Euler on its shifted grid with text and image guidance, oscillating guidance, and
image-to-video / looping through the ``cond`` input (hpcaitech/Open-Sora ``opensora/utils/sampling.py``,
``I2VDenoiser``, ``get_schedule``, ``get_oscillation_gs``; ``opensora/utils/inference.py``).

1. Grid: ``linspace(1, 0, steps + 1)`` shifted by ``t' = a t / (1 + (a - 1) t)`` with
   ``a = (1 + (S - 256) * 2 / 3840) * sqrt(T_lat)``, ``S`` = video tokens per latent frame (``h w / p^2``);
   ``sample.shift`` (null: that rule) sets ``a``. The model is called with ``t``; ``x += (t_next - t) v``.
2. Guidance, one batched forward of three branches per step: ``v_c`` (prompt, image), ``v_i`` (negative
   prompt, image), ``v_0`` (negative prompt, no image): ``v = v_0 + g_img (v_i - v_0) + g_txt (v_c - v_i)``;
   without an image the last two coincide and two branches are run: ``v = v_0 + g_txt (v_c - v_0)``.
   Defaults: 50 steps, ``g_txt`` 7.5 (``sample.guidance``), ``g_img`` 3 (``sample.image_guidance``).
3. Oscillating guidance (``sample.oscillating_guidance``; the released inference configs turn it on for text
   and image): after the first 10 steps every odd step uses scale 1 (no guidance). With an image it also
   scales the image guidance in time: at step ``i`` the upper value is ``linspace(g_img, 1, steps + 1)[i]``
   and latent frame ``f`` gets ``linspace(1, upper, T_lat)[f]`` (``scale_temporal_osci``).
4. Image conditioning (``sample.image``, ``frameloom sample --image``; ``sample.image_mode``): the image is
   encoded as a one-frame video and marks latent frame 0 (``head``), the last one (``tail``) or both
   (``loop``: the same image at both ends, a looping video); after the last step those frames are replaced
   by the reference latent, as upstream does. With the non-causal DC-AE, the 3 extra frames a marked latent
   frame decodes to are cut (upstream's "remove the duplicate frames").

Noise: one CPU generator per (prompt, seed), ``randn(C, t, h, w)`` (frameloom's convention), so a video does
not depend on its batch. The prompts are used as given: add " 24 FPS, 4 motion score." to match training
captions made with the fps and motion-score rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from frameloom.config.schema import Config
from frameloom.errors import FrameloomError
from frameloom.objectives.flow import opensora_shift, shift_timesteps

__all__ = [
    "IMAGE_MODES",
    "guided_velocity",
    "image_condition",
    "opensora_timesteps",
    "oscillating_scale",
    "sample_latents",
    "sample_videos",
    "temporal_image_scale",
]

IMAGE_MODES = ("head", "tail", "loop")
DEFAULT_IMAGE_GUIDANCE = 3.0


def opensora_timesteps(
    steps: int, tokens_per_frame: int, latent_frames: int, shift: float | None = None
) -> list[float]:
    """The ``steps + 1`` times from 1 to 0 (``get_schedule``): uniform, then shifted by ``shift`` or by
    Open-Sora's resolution-and-length rule."""
    if steps < 1:
        raise FrameloomError(f"sample.steps must be >= 1, got {steps}")
    alpha = shift if shift is not None else opensora_shift(tokens_per_frame, latent_frames)
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift_timesteps(t, alpha).tolist()


def oscillating_scale(scale: float, step: int, warmup: int = 10) -> float:
    """``scale`` for the first ``warmup`` steps and every even step after, else 1 (``get_oscillation_gs``)."""
    return scale if step < warmup or step % 2 == 0 else 1.0


def temporal_image_scale(scale: float, step: int, steps: int, frames: int) -> torch.Tensor:
    """Per-latent-frame image guidance ``(frames,)``: ``linspace(1, u, frames)`` with
    ``u = linspace(scale, 1, steps + 1)[step]`` (``scale_temporal_osci``)."""
    upper = torch.linspace(scale, 1.0, steps + 1)[step]
    return torch.linspace(1.0, float(upper), frames)


def guided_velocity(
    v_cond: torch.Tensor,
    v_image: torch.Tensor,
    v_none: torch.Tensor,
    text_scale: float,
    image_scale: float | torch.Tensor,
) -> torch.Tensor:
    """``v_0 + g_img (v_i - v_0) + g_txt (v_c - v_i)`` (``I2VDenoiser.denoise``); ``image_scale`` a number or
    a tensor broadcasting against ``(B, C, T, H, W)``."""
    return v_none + image_scale * (v_image - v_none) + text_scale * (v_cond - v_image)


def image_condition(reference: torch.Tensor, latent_frames: int, mode: str) -> torch.Tensor:
    """``cond = [mask; mask * ref]`` ``(N, 1 + C, T, h, w)`` from reference latents ``(N, C, 1, h, w)``:
    latent frame 0 (``head``), the last (``tail``) or both (``loop``) (``prepare_inference_condition``)."""
    if mode not in IMAGE_MODES:
        raise FrameloomError(f"sample.image_mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    N, C, _, h, w = reference.shape
    mask = reference.new_zeros(N, 1, latent_frames, h, w)
    ref = reference.new_zeros(N, C, latent_frames, h, w)
    frames = {"head": [0], "tail": [latent_frames - 1], "loop": [0, latent_frames - 1]}[mode]
    for f in frames:
        mask[:, :, f] = 1
        ref[:, :, f] = reference[:, :, 0]
    return torch.cat([mask, ref], dim=1)


def _pad_text(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - emb.shape[1]
    return (F.pad(emb, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra))) if extra > 0 else (emb, mask.bool())


def _images(cfg: Config, n: int) -> torch.Tensor | None:
    from frameloom.sampling.family_sampling import load_images, validation_images

    if cfg.sample.image:
        return load_images([cfg.sample.image] * n, cfg.data.height, cfg.data.width)
    if cfg.model.config.get("validation_images"):
        return validation_images(cfg, n)
    return None


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    text_encoder,
    codec,
    cfg: Config,
    prompts: Sequence[str],
    seeds: Sequence[int],
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalized latents ``(N, C, t, h, w)`` for ``prompts`` (one seed each); ``images`` ``(N, 3, H, W)`` in
    [-1, 1] (default: ``sample.image``, else ``model.config.validation_images``, else text-to-video)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    s = cfg.sample
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    p = model.patch_size
    T, h, w = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    N, C = len(prompts), model.latent_channels
    # 1. noise per (prompt, seed) on the CPU; the shifted grid
    x = torch.stack(
        [torch.randn((C, T, h, w), generator=torch.Generator().manual_seed(int(sd))) for sd in seeds]
    ).to(device)  # (N, C, T, h, w) float32
    times = opensora_timesteps(s.steps, (h // p) * (w // p), T, None if s.shift is None else float(s.shift))
    # 2. text: prompt and negative prompt, tokens (padded to one length) and pooled vectors
    emb, mask = text_encoder.encode(list(prompts))
    pooled = text_encoder.encode_extras(list(prompts))["pooled"]
    neg, neg_mask = text_encoder.encode([s.negative_prompt])
    neg_pooled = text_encoder.encode_extras([s.negative_prompt])["pooled"]
    length = max(emb.shape[1], neg.shape[1])
    emb, mask = _pad_text(emb, mask, length)
    neg, neg_mask = _pad_text(neg.expand(N, -1, -1), neg_mask.expand(N, -1), length)
    # 3. the image condition (N, 1 + C, T, h, w), if any
    if images is None:
        images = _images(cfg, N)
    cond = reference = None
    if images is not None:
        if not getattr(model.config, "cond_embed", False):
            raise FrameloomError(
                "image-to-video needs a model with image conditioning (model.config.cond_embed)"
            )
        reference = codec.encode(images[:, :, None].to(codec.device)).float().to(device)  # (N, C, 1, h, w)
        cond = image_condition(reference, T, s.image_mode)
    branches = 3 if cond is not None else 2
    text = torch.cat([emb, neg, neg][:branches]).to(device, dtype)
    text_mask = torch.cat([mask, neg_mask, neg_mask][:branches]).to(device)
    vec = torch.cat([pooled, neg_pooled.expand(N, -1), neg_pooled.expand(N, -1)][:branches]).to(device, dtype)
    kwargs = {}
    if cond is not None:
        kwargs["cond"] = torch.cat([cond, cond, torch.zeros_like(cond)]).to(device, dtype)
    g_txt = float(s.guidance)
    g_img = float(s.image_guidance if s.image_guidance is not None else DEFAULT_IMAGE_GUIDANCE)
    # 4. Euler steps with guidance
    for i in range(len(times) - 1):
        t_in = torch.full((branches * N,), times[i], device=device, dtype=dtype)
        x_in = torch.cat([x] * branches).to(dtype)  # (branches * N, C, T, h, w)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):  # bf16 on GPUs
            v = model(x_in, t_in, text, text_mask, pooled=vec, **kwargs).float()
        text_scale = oscillating_scale(g_txt, i) if s.oscillating_guidance else g_txt
        if cond is None:
            v_cond, v_none = v.chunk(2)
            v = v_none + text_scale * (v_cond - v_none)
        else:
            v_cond, v_image, v_none = v.chunk(3)
            image_scale: float | torch.Tensor = (
                oscillating_scale(g_img, i) if s.oscillating_guidance else g_img
            )
            if s.oscillating_guidance and image_scale > 1.0:
                image_scale = temporal_image_scale(image_scale, i, s.steps, T).to(device).view(1, 1, T, 1, 1)
            v = guided_velocity(v_cond, v_image, v_none, text_scale, image_scale)
        x = x + (times[i + 1] - times[i]) * v
    # 5. the conditioned frames are the reference
    if reference is not None:
        keep = cond[:, :1].bool().expand_as(x)
        x = torch.where(keep, cond[:, 1:].to(x), x)
    return x


@torch.no_grad()
def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds, images=None) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] (the family's ``sample`` hook)."""
    from frameloom.sampling.family_sampling import decode_latents

    if images is None:
        images = _images(cfg, len(prompts))
    videos = decode_latents(codec, sample_latents(model, text_encoder, codec, cfg, prompts, seeds, images))
    if images is not None and not getattr(codec, "causal", True):
        pad = codec.compression[0] - 1  # frames a marked latent adds beyond the image
        mode = cfg.sample.image_mode
        start = pad if mode in ("head", "loop") else 0
        stop = videos.shape[2] - (pad if mode in ("tail", "loop") else 0)
        videos = videos[:, :, start:stop]
    return videos
