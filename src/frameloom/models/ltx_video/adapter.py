"""The LTX-Video adapter, codec and objective: frameloom's layout on diffusers' LTX-Video classes.

Conventions bridged (read from diffusers' ``LTXPipeline``):

- tokens: ``LTXVideoTransformer3DModel`` takes packed tokens ``(B, T' H' W', C p_t p p)`` with
  ``T' = T / p_t``, ``H' = H / p``, ``W' = W / p`` (``LTXPipeline._pack_latents``: channel-major inside a
  patch, tokens in (t, h, w) order) plus the grid size; ``pack_latents``/``unpack_latents`` do that and back;
- RoPE positions: ``rope_interpolation_scale = (vae_t / frame_rate, vae_s, vae_s)`` (latent positions in
  seconds and pixels); ``frame_rate`` is the clips' frame rate: a ``frame_rate`` argument of ``forward``
  (training: one per sample, ``(B,)``, each clip's rate as sampled, so a batch may mix rates; the ``(B, 1,
  1, 1, 1)`` time scale broadcasts over diffusers' ``(B, 1, T, H, W)`` time grid; sampling: ``sample.fps``),
  else the adapter's own (``model.config.frame_rate``, else 25, the pipeline's default; family.py);
- time: ``timestep = 1000 * sigma``, one per sample ``(B,)`` or one per latent frame ``(B, T)`` (image-to-video:
  the clean first frame is at time 0, as ``LTXImageToVideoPipeline`` gives each token
  ``t * (1 - conditioning_mask)``); prediction: the velocity ``noise - x0``;
- text: real token embeddings plus the mask (``encoder_attention_mask``): masked positions get a -10000
  bias, so zero padding of any length gives the pipeline's result (models/text.py, ``PaddedT5TextEncoder``);
- latents: ``(z - latents_mean) * scaling_factor / latents_std`` (``DiffusersVAECodec``);
  VAEs with ``timestep_conditioning`` (LTX-Video 0.9.1+) decode at ``decode_timestep`` (0, the pipeline's
  default, which also adds no decode noise).
- shift (training and sampling): the scheduler's dynamic shift, ``e^mu`` with ``mu`` linear in the latent
  token count ``T' H' W'`` (``resolution_mu``; 1024 -> 0.95, 4096 -> 2.05 for LTX-Video). LTX-Video's own
  trainer draws ``t = sigmoid(N(mu, 1))``, which is exactly logit-normal(0, 1) shifted by ``e^mu``
  (``sigmoid(u + mu) = e^mu s / (1 + (e^mu - 1) s)`` with ``s = sigmoid(u)``): frameloom draws that.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from frameloom.config.schema import LoraConfig
from frameloom.models.codecs import DiffusersVAECodec
from frameloom.models.diffusers_family import DiffusersDenoiser
from frameloom.objectives.flow import FlowMatching
from frameloom.sampling.family_sampling import resolution_mu

__all__ = [
    "LTXDenoiser",
    "LTXVideoCodec",
    "ResolutionShiftedFlow",
    "pack_latents",
    "rope_scale",
    "token_timesteps",
    "unpack_latents",
]


def pack_latents(x: torch.Tensor, p: int = 1, p_t: int = 1) -> torch.Tensor:
    """``(B, C, T, H, W)`` -> tokens ``(B, T/p_t * H/p * W/p, C * p_t * p * p)`` (LTXPipeline's packing)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // p_t, p_t, h // p, p, w // p, p)
    # (B, T', H', W', C, p_t, p, p) -> tokens in (t, h, w) order, features channel-major.
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_latents(
    tokens: torch.Tensor, grid: tuple[int, int, int], p: int = 1, p_t: int = 1
) -> torch.Tensor:
    """Inverse of ``pack_latents``: ``(B, T' H' W', C p_t p p)`` with ``grid = (T', H', W')`` ->
    ``(B, C, T' p_t, H' p, W' p)``."""
    b = tokens.shape[0]
    t, h, w = grid
    x = tokens.reshape(b, t, h, w, -1, p_t, p, p)
    # (B, T', H', W', C, p_t, p, p) -> (B, C, T', p_t, H', p, W', p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def token_timesteps(t: torch.Tensor, grid: tuple[int, int, int], patch_t: int = 1) -> torch.Tensor:
    """The transformer's ``timestep`` ``1000 * t``: ``(B,)`` as it is, or per latent frame ``(B, T)`` ->
    per token ``(B, T' H' W')`` in the tokens' (t, h, w) order (one value per temporal patch)."""
    if t.dim() == 1:
        return t.float() * 1000
    frames, h, w = grid
    per_frame = t.float()[:, ::patch_t][:, :frames]  # (B, T')
    return (per_frame[:, :, None].expand(-1, -1, h * w) * 1000).flatten(1)  # (B, T'H'W')


def rope_scale(
    frame_rate: float | torch.Tensor, temporal_compression: int, spatial_compression: int
) -> tuple[float | torch.Tensor, int, int]:
    """``rope_interpolation_scale`` ``(vae_t / frame_rate, vae_s, vae_s)``; a ``(B,)`` tensor of frame rates
    gives a ``(B, 1, 1, 1, 1)`` time scale (diffusers' LTX RoPE multiplies its ``(B, 1, T, H, W)`` grid)."""
    if isinstance(frame_rate, torch.Tensor):
        return (
            (temporal_compression / frame_rate.float()).view(-1, 1, 1, 1, 1),
            spatial_compression,
            spatial_compression,
        )
    return (temporal_compression / float(frame_rate), spatial_compression, spatial_compression)


class LTXDenoiser(DiffusersDenoiser):
    """``forward(x_t (B, C, T, H, W), t (B,) or (B, T), text (B, L, D), mask (B, L), frame_rate=None)
    -> v (B, C, T, H, W)``; ``frame_rate`` (a float, or ``(B,)``) overrides the adapter's (module docstring)."""

    def __init__(
        self,
        transformer: nn.Module,
        pretrained: str | os.PathLike,
        lora: LoraConfig | None = None,
        *,
        vae_compression: tuple[int, int, int] = (8, 32, 32),
        frame_rate: float = 25.0,
    ):
        super().__init__(transformer, pretrained, lora)
        cfg = transformer.config
        self.patch, self.patch_t = int(cfg.patch_size), int(cfg.patch_size_t)
        self.latent_channels = int(cfg.out_channels)
        self.vae_compression = tuple(int(c) for c in vae_compression)
        self.frame_rate = float(frame_rate)
        self.rope_scale = rope_scale(self.frame_rate, self.vae_compression[0], self.vae_compression[1])

    def pipeline_text(self, emb: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``LTXPipeline``'s ``prompt_embeds`` and ``prompt_attention_mask`` (the padded positions are masked
        out, so their values, zero here, never reach the output)."""
        return {"prompt_embeds": emb, "prompt_attention_mask": mask}

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None,
        frame_rate: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.transformer.dtype
        b, _, frames, height, width = x_t.shape
        grid = (frames // self.patch_t, height // self.patch, width // self.patch)
        if text_mask is None:
            text_mask = torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
        if t.dim() == 1:
            t = t.expand(b)
        # 1. Pack into tokens.
        tokens = pack_latents(x_t, self.patch, self.patch_t)  # (B, T'H'W', C p_t p p)
        # 2. The diffusers call: timestep = 1000 * sigma (per sample, or per token for a clean first frame),
        #    the grid and the RoPE scale of the clips' frame rate.
        scale = self.rope_scale
        if frame_rate is not None:  # one rate (a float: the pipeline's arithmetic) or one per sample (B,)
            if isinstance(frame_rate, torch.Tensor):
                frame_rate = frame_rate.to(x_t.device)
            scale = rope_scale(frame_rate, self.vae_compression[0], self.vae_compression[1])
        out = self.transformer(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=text_emb.to(dtype),
            timestep=token_timesteps(t, grid, self.patch_t),  # (B,) or (B, T'H'W')
            encoder_attention_mask=text_mask.to(dtype),
            num_frames=grid[0],
            height=grid[1],
            width=grid[2],
            rope_interpolation_scale=scale,
            return_dict=False,
        )[0]  # (B, T'H'W', C p_t p p)
        # 3. Back to (B, C, T, H, W).
        return unpack_latents(out, grid, self.patch, self.patch_t)


class LTXVideoCodec(DiffusersVAECodec):
    """``AutoencoderKLLTXVideo`` as a codec; decodes with ``decode_timestep`` when the VAE is
    timestep-conditioned (LTX-Video 0.9.1+), as ``LTXPipeline`` does with its default 0."""

    decode_timestep: float = 0.0

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.vae.config.get("timestep_conditioning", False):
            return super().decode(latent)
        z = self.denormalize(latent.to(self.device, self.dtype))
        temb = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        return self.vae.decode(z, temb).sample


@dataclass
class ResolutionShiftedFlow(FlowMatching):
    """Flow matching whose shift is ``e^mu(tokens)`` (module docstring) when ``shift == "auto"``.

    ``patch = (p_t, p, p)`` turns the latent size into the transformer's token count.
    """

    base_seq_len: int = 1024
    max_seq_len: int = 4096
    base_shift: float = 0.95
    max_shift: float = 2.05
    patch: tuple[int, int, int] = (1, 1, 1)

    def resolve_shift(self, latent_size: tuple[int, int, int] | None = None) -> float:
        if self.shift != "auto":
            return float(self.shift)
        if latent_size is None:
            raise ValueError("the resolution-dependent shift needs latent_size=(T_lat, H_lat, W_lat)")
        return math.exp(self.mu(latent_size))

    def mu(self, latent_size: tuple[int, int, int]) -> float:
        """``mu`` for a latent of ``(T, H, W)``: tokens ``T/p_t * H/p * W/p`` through ``resolution_mu``."""
        t, h, w = latent_size
        tokens = (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])
        return resolution_mu(tokens, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
