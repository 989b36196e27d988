"""Sampling for the flow-matching families (Wan 2.1 T2V/I2V, LTX-Video): frameloom's own Euler loop on the
pipeline's time grid, and validation through the family's diffusers pipeline.

frameloom's sample reproduces the diffusers pipeline with ``FlowMatchEulerDiscreteScheduler`` step for step
(tests/test_family_wan.py and test_family_ltx.py check it):

1. noise ``randn((1, C, t, h, w), generator=Generator().manual_seed(seed))`` per prompt, as the pipeline
   draws a batch of one from a CPU generator (LTX packs that same tensor into tokens: same values);
2. the time grid ``flow_match_sigmas`` (wan/schedule.py) from ``<pretrained>/scheduler`` and, for LTX-Video,
   ``mu`` from the latent token count; ``sample.shift != 1`` replaces the scheduler's static shift;
3. ``euler_sample``: per step one batched forward of ``[uncond; cond]``, ``v = v_u + g (v_c - v_u)``,
   ``x += (sigma_next - sigma) v``; I2V appends its condition channels to ``x`` at every call;
4. decode with the family's VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from frameloom.config.schema import Config
from frameloom.sampling.flow_euler import euler_sample

__all__ = ["flow_sample_latents", "validate_with_pipeline", "write_videos"]


@torch.no_grad()
def flow_sample_latents(
    model: torch.nn.Module,
    text_encoder,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    latent_shape: tuple[int, int, int, int],
    sigmas: torch.Tensor,
    guidance: float,
    negative_prompt: str = "",
    conditions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents ``(N, C, t, h, w)`` for ``prompts[i]`` from ``seeds[i]`` (module docstring, steps 1 and 3).

    ``latent_shape`` is ``(C, t, h, w)``; ``conditions`` ``(N, K, t, h, w)`` are channels appended to ``x``
    at every model call (Wan I2V's ``[cond | image]``).
    """
    device = next(model.parameters()).device
    neg_emb, neg_mask = text_encoder.encode([negative_prompt])
    out = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        # 1. The pipeline's noise for a batch of one.
        noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(seed))).to(device)
        emb, mask = text_encoder.encode([prompt])
        cond = None if conditions is None else conditions[i : i + 1].to(device, noise.dtype)

        def model_fn(x, t, text, text_mask, cond=cond):
            if cond is not None:  # the classifier-free batch is [uncond; cond]: repeat the conditions
                x = torch.cat([x, cond.expand(x.shape[0], *cond.shape[1:])], dim=1)
            return model(x, t, text, text_mask).float()

        # 3. Euler on the pipeline's grid with classifier-free guidance (skipped at g <= 1, as the pipelines).
        x = euler_sample(
            model_fn,
            noise,
            sigmas.to(device),
            cond=(emb.to(device), mask.to(device)),
            uncond=(neg_emb.to(device), neg_mask.to(device)),
            guidance=guidance if guidance > 1.0 else 1.0,
        )
        out.append(x)
    return torch.cat(out)


def write_videos(videos: torch.Tensor, prompts: Sequence[str], seed: int, cfg: Config, out_dir: str | Path):
    """One mp4 per prompt (``NNN-<slug>-seedS.mp4``) from videos ``(N, 3, T, H, W)`` in [-1, 1]."""
    from frameloom.sampling.generate import slug
    from frameloom.sampling.video_io import write_mp4

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_mp4(video, out_dir / f"{i:03d}-{slug(p)}-seed{seed}.mp4", fps=cfg.sample.fps)
        for i, (p, video) in enumerate(zip(prompts, videos))
    ]


@torch.no_grad()
def validate_with_pipeline(
    pipe, model: torch.nn.Module, text_encoder, cfg: Config, out_dir: str | Path, extra: Callable[[int], dict]
) -> list[Path]:
    """``validation.prompts`` through the diffusers pipeline ``pipe`` (built around the in-training
    transformer), one mp4 each; ``extra(i)`` adds per-prompt arguments (I2V's image)."""
    from frameloom.models.diffusers_family import add_id_token

    pipe.set_progress_bar_config(disable=True)
    prompts = list(cfg.validation.prompts)
    te_dtype = getattr(text_encoder, "dtype", torch.float32)
    tr_dtype = next(model.transformer.parameters()).dtype
    device = next(model.transformer.parameters()).device
    videos = []
    for i, prompt in enumerate(prompts):
        kwargs = dict(
            prompt=add_id_token(prompt, cfg.model.id_token),
            negative_prompt=cfg.sample.negative_prompt or None,
            num_frames=cfg.data.num_frames,
            height=cfg.data.height,
            width=cfg.data.width,
            num_inference_steps=cfg.sample.steps,
            guidance_scale=cfg.sample.guidance,
            generator=torch.Generator().manual_seed(cfg.sample.seed),
            output_type="pt",
            max_sequence_length=text_encoder.max_length,
            **extra(i),
        )
        # A bf16 base with an fp32 text encoder: let autocast reconcile the dtypes.
        with torch.autocast(device.type, dtype=tr_dtype, enabled=te_dtype != tr_dtype):
            frames = pipe(**kwargs).frames[0]  # (T, 3, H, W) in [0, 1]
        videos.append(frames.permute(1, 0, 2, 3).float() * 2 - 1)
    return write_videos(torch.stack(videos), prompts, cfg.sample.seed, cfg, out_dir)
