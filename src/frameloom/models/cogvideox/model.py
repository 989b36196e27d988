"""The CogVideoX denoiser adapter: frameloom's ``(B, C, T, H, W)`` layout onto
``CogVideoXTransformer3DModel``'s ``(B, T, C, H, W)`` call, with the rotary embeddings of the latent grid.

The rotary embeddings are computed exactly as diffusers' CogVideoX pipelines do
(``_prepare_rotary_positional_embeddings``): CogVideoX 1.0 (no temporal patch) crops a centred region of
the base grid (``sample_height/width // patch_size``) to the actual grid; CogVideoX 1.5
(``patch_size_t`` set) uses the "slice" grid over the base size and ``ceil(T / patch_size_t)`` frames.
"""

from __future__ import annotations

import torch

from frameloom.models.diffusers_family import DiffusersDenoiser

__all__ = ["CogVideoXDenoiser", "rotary_embeddings"]


def rotary_embeddings(config, latent_frames: int, latent_h: int, latent_w: int, device) -> tuple | None:
    """(cos, sin) for a latent grid of ``latent_frames x latent_h x latent_w``, or None without RoPE."""
    if not config.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = config.patch_size, config.patch_size_t
    grid_h, grid_w = latent_h // p, latent_w // p
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=latent_frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(latent_frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


class CogVideoXDenoiser(DiffusersDenoiser):
    """``forward(x_t (B, C_in, T, H, W), t (B,) integer timesteps, text_emb (B, L, D), text_mask)``
    -> v prediction ``(B, C_out, T, H, W)``. ``text_mask`` is ignored: CogVideoX attends to all L tokens.

    For I2V models ``C_in = 2 C_out`` (noisy latent and image-conditioning latent, concatenated on channels by
    the objective / sampler). CogVideoX 1.5 needs ``T`` divisible by ``patch_size_t`` (the objective pads).

    The rotary tables depend on the latent grid alone: they are computed once per (grid, device) and kept
    (``rotary_for``), not rebuilt at every training or sampling step.
    """

    #: How many grids' rotary tables are kept (one per bucket shape; the oldest is dropped beyond this).
    ROTARY_CACHE_SIZE = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rotary: dict[tuple, tuple | None] = {}

    @torch.compiler.disable  # a dict lookup torch.compile would guard on: filling it would recompile the model
    def rotary_for(self, frames: int, h: int, w: int, device: torch.device | str) -> tuple | None:
        """``rotary_embeddings`` of this grid on ``device``, computed on first use and then reused (the
        tables are constants of the grid: the same tensors at every step). Run eagerly under torch.compile:
        the cache filling on the first step would otherwise fail a guard and recompile on the second."""
        key = (frames, h, w, torch.device(device))
        if key not in self._rotary:
            if len(self._rotary) >= self.ROTARY_CACHE_SIZE:
                self._rotary.pop(next(iter(self._rotary)))  # the oldest grid
            self._rotary[key] = rotary_embeddings(self.config, frames, h, w, device)
        return self._rotary[key]

    @property
    def config(self):
        return self.transformer.config

    @property
    def is_i2v(self) -> bool:
        return self.config.in_channels == 2 * (self.config.out_channels or self.config.in_channels)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = next(self.transformer.parameters()).dtype
        _, _, frames, h, w = x_t.shape
        # 1. Layout: (B, C, T, H, W) -> (B, T, C, H, W), the transformer's.
        hidden = x_t.permute(0, 2, 1, 3, 4).to(dtype)
        # 2. Conditioning: rotary embeddings of this grid; CogVideoX 1.5 I2V's "ofs" embedding input is 2.0.
        rotary = self.rotary_for(frames, h, w, x_t.device)
        ofs = hidden.new_full((1,), 2.0) if self.config.ofs_embed_dim else None
        # 3. The transformer, on integer timesteps (B,).
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=text_emb.to(dtype),
            timestep=t,
            ofs=ofs,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]  # (B, T, C_out, H, W)
        # 4. Back to frameloom's layout.
        return out.permute(0, 2, 1, 3, 4)
