"""The Wan 2.1 adapter: frameloom's denoiser call on diffusers' ``WanTransformer3DModel``.

Conventions it bridges (read from diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``):

- time: frameloom's flow time ``t in [0, 1]`` (1 = noise) is the scheduler's sigma; the transformer takes
  ``timestep = 1000 * sigma`` (``FlowMatchEulerDiscreteScheduler``: ``timesteps = sigmas * 1000``);
- prediction: the velocity ``noise - x0`` (``prediction_type = flow_prediction``), frameloom's flow target;
- text: the pipeline gives the transformer ``max_sequence_length`` (512 for Wan 2.1) token embeddings with
  the padding *zeroed* and no mask (Wan was trained that way); the adapter zeroes masked positions and pads
  or cuts to ``text_len`` (``model.text_max_length``), so a cached, trimmed caption gives the same input;
- I2V: ``[x_t | cond | image]`` channels in (wan/i2v.py), ``cat([x_t, mask, cond])`` and the image tokens
  into the transformer.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from frameloom.config.schema import LoraConfig
from frameloom.models.diffusers_family import DiffusersDenoiser
from frameloom.models.wan.i2v import first_frame_mask, split_i2v

__all__ = ["WanDenoiser", "fixed_length_text"]


def fixed_length_text(emb: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """``(B, L, D)`` + mask -> ``(B, length, D)`` with masked positions zero (Wan's zero padding)."""
    if mask is not None:
        emb = emb * mask[..., None].to(emb.dtype)
    if emb.shape[1] >= length:
        return emb[:, :length]
    return torch.nn.functional.pad(emb, (0, 0, 0, length - emb.shape[1]))


class WanDenoiser(DiffusersDenoiser):
    """``forward(x_t (B, C[+C+K], t, h, w), t (B,), text (B, L, D), mask (B, L)) -> v (B, C, t, h, w)``.

    ``image_tokens`` is set for I2V (the CLIP token count N; the width D is the transformer's
    ``image_dim``); then ``x_t`` carries ``[x_t | cond | image]`` (wan/i2v.py).
    """

    def __init__(
        self,
        transformer: nn.Module,
        pretrained: str | os.PathLike,
        lora: LoraConfig | None = None,
        *,
        text_len: int = 512,
        image_tokens: int | None = None,
    ):
        super().__init__(transformer, pretrained, lora)
        self.text_len = int(text_len)
        self.image_tokens = image_tokens
        cfg = transformer.config
        self.latent_channels = int(cfg.out_channels)
        self.i2v = image_tokens is not None
        if self.i2v:
            # Wan 2.1 I2V: in_channels = C (noisy) + k (mask) + C (condition) -> k = in - 2 C (4 for the VAE).
            self.mask_channels = int(cfg.in_channels) - 2 * self.latent_channels
            self.image_dim = int(cfg.image_dim)

    def pipeline_text(self, emb: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Wan pipelines' ``prompt_embeds``: zero-padded to ``text_len``, no mask."""
        return {"prompt_embeds": fixed_length_text(emb, mask, self.text_len)}

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = self.transformer.dtype
        # 1. Text: zeroed padding at Wan's fixed length, no mask.
        text = fixed_length_text(text_emb, text_mask, self.text_len).to(dtype)  # (B, text_len, D)
        # 2. Input channels (I2V: noisy latent, mask, condition latent; image tokens aside).
        image = None
        hidden = x_t
        if self.i2v:
            x, cond, image = split_i2v(x_t, self.latent_channels, self.image_tokens, self.image_dim)
            grid = tuple(x.shape[2:])
            mask = first_frame_mask(x.shape[0], self.mask_channels, grid, dtype=x.dtype, device=x.device)
            hidden = torch.cat([x, mask, cond], dim=1)  # (B, 2C + k, t, h, w)
            image = image.to(dtype)  # (B, N, D_img)
        # 3. The diffusers call: timestep = 1000 * sigma.
        timestep = t.float().expand(x_t.shape[0]) * 1000
        return self.transformer(
            hidden_states=hidden.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]  # (B, C, t, h, w)
