"""Open-Sora 2.0's autoencoders as codecs: the video DC-AE loads its released key names strictly (written out
here from Open-Sora's layer definitions), compresses 4x in time and 32x in space at its real depth, tiles as
Open-Sora does; the HunyuanVideo VAE loads from a diffusers folder and from the released single file.

Parity with upstream (run in a scratch folder at tiny size, weights redrawn): DC-AE encode and decode max abs
difference 0.0 (112 keys, videos of 8 frames and images); Open-Sora's HunyuanVideo ``AutoencoderKLCausal3D``
and diffusers' ``AutoencoderKLHunyuanVideo`` have the same 184 keys, encoder/decoder outputs within 3e-7.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from frameloom.errors import FrameloomError
from frameloom.models.opensora2.codecs import (
    DCAECodec,
    TileSpec,
    blend_tiles,
    load_dc_ae,
    load_hunyuan_vae,
    tiled,
)
from frameloom.models.opensora2.dc_ae import DCAEConfig, VideoDCAE
from opensora2_tiny import DCAE, VAE, build_dc_ae, build_vae, redraw


def released_dc_ae_keys(c: DCAEConfig) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of Open-Sora's DC-AE file for config ``c``, from its ``dc_ae.py``/``ops.py``
    (ConvLayer.conv/.norm, ResidualBlock.main, OpSequential.op_list, ResBlock conv1/conv2, EfficientViTBlock
    context_module (LiteMLA qkv/aggreg/proj) and local_module (GLUMBConv), upsample/downsample blocks)."""
    keys: dict[str, tuple[int, ...]] = {}

    def conv(
        name: str, cin: int, cout: int, k: int = 3, groups: int = 1, bias: bool = True, norm: bool = False
    ):
        keys[f"{name}.conv.weight"] = (cout, cin // groups, k, k, k)
        if bias:
            keys[f"{name}.conv.bias"] = (cout,)
        if norm:
            keys[f"{name}.norm.weight"] = keys[f"{name}.norm.bias"] = (cout,)

    def block(name: str, kind: str, ch: int) -> None:
        if kind == "res":
            conv(f"{name}.main.conv1", ch, ch)
            conv(f"{name}.main.conv2", ch, ch, bias=False, norm=True)
            return
        m = f"{name}.context_module.main"
        conv(f"{m}.qkv", ch, 3 * ch, k=1, bias=False)
        heads = ch // c.attention_head_dim
        keys[f"{m}.aggreg.0.0.weight"] = (3 * ch, 1, 5, 5, 5)
        keys[f"{m}.aggreg.0.1.weight"] = (3 * ch, 3 * ch // (3 * heads), 1, 1, 1)
        conv(f"{m}.proj", 2 * ch, ch, k=1, bias=False, norm=True)
        m = f"{name}.local_module.main"
        conv(f"{m}.inverted_conv", ch, 8 * ch, k=1)
        conv(f"{m}.depth_conv", 8 * ch, 8 * ch, groups=8 * ch)
        conv(f"{m}.point_conv", 4 * ch, ch, k=1, bias=False, norm=True)

    ew, dw, n = c.encoder_widths, c.decoder_widths, len(c.encoder_widths)
    conv("encoder.project_in", c.in_channels, ew[0])
    for i in range(n):
        for d in range(c.encoder_depths[i]):
            block(f"encoder.stages.{i}.op_list.{d}", c.block_types[i], ew[i])
        if i < n - 1:
            conv(f"encoder.stages.{i}.op_list.{c.encoder_depths[i]}.main", ew[i], ew[i + 1])
    conv("encoder.project_out.main.op_list.0", ew[-1], c.latent_channels)
    conv("decoder.project_in.main", c.latent_channels, dw[-1])
    for i in range(n):
        up = int(i < n - 1)
        if up:
            conv(f"decoder.stages.{i}.op_list.0.main.conv", dw[i + 1], dw[i])
        for d in range(c.decoder_depths[i]):
            block(f"decoder.stages.{i}.op_list.{d + up}", c.block_types[i], dw[i])
    keys["decoder.project_out.op_list.0.weight"] = keys["decoder.project_out.op_list.0.bias"] = (dw[0],)
    conv("decoder.project_out.op_list.2", dw[0], c.in_channels)
    return keys


def test_dc_ae_released_keys_load_strictly(tmp_path):
    config = DCAEConfig(**DCAE)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in released_dc_ae_keys(config).items()}
    save_file(state, str(tmp_path / "F32T4C128_AE.safetensors"))
    codec = load_dc_ae(tmp_path / "F32T4C128_AE.safetensors", overrides=DCAE)
    assert set(codec.model.state_dict()) == set(state)
    assert all(torch.equal(codec.model.state_dict()[k], v) for k, v in state.items())
    # the full-size f32t4c128 (built on the meta device: no memory): the same 339 names and shapes, which
    # upstream's DCAE has too (checked in the scratch oracle), 459M parameters
    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in VideoDCAE(DCAEConfig()).state_dict().items()}
    assert full == released_dc_ae_keys(DCAEConfig()) and len(full) == 339
    broken = dict(state)
    broken.pop("decoder.project_out.op_list.0.weight")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(FrameloomError, match="missing decoder.project_out.op_list.0.weight"):
        load_dc_ae(tmp_path / "broken.safetensors", overrides=DCAE)


def test_dc_ae_compression_and_scaling(tmp_path):
    codec = load_dc_ae(build_dc_ae(tmp_path), overrides=DCAE)
    assert codec.compression == (2, 4, 4) and codec.latent_channels == 8 and not codec.causal
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 8, 2, 4, 4) == (2, 8, *codec.latent_size(4, 16, 16))
    torch.testing.assert_close(z * 0.493, codec.model.encode(video))  # latents are raw / 0.493
    assert codec.decode(z).shape == (2, 3, 4, 16, 16)
    assert codec.encode(video[:, :, :1]).shape == (2, 8, 1, 4, 4)  # an image: no temporal downsampling
    # the real f32t4c128: 4x time, 32x space
    assert DCAECodec(VideoDCAE(DCAEConfig(encoder_widths=[8] * 6, decoder_widths=[8] * 6, attention_head_dim=8,
                                          latent_channels=8))).compression == (4, 32, 32)  # fmt: skip


def test_tiles_blend_linearly_and_one_tile_is_the_plain_pass():
    a, b = torch.full((1, 4), 10.0), torch.full((1, 4), 2.0)
    # the first 2 slices of b mix with a's last 2: weights i / 2 = 0, 0.5
    assert blend_tiles(a, b, 2, dim=1).tolist() == [[10.0, 6.0, 2.0, 2.0]]
    spec = TileSpec(size=8, ratio=1.0, overlap=0.25)  # stride 6, blend 2, keep 6
    x = torch.arange(14.0).view(1, 14)
    # an identity fn: blending equal values changes nothing
    assert torch.equal(tiled(lambda y: y * 1, x, 1, spec), x)
    assert torch.equal(tiled(lambda y: y + 1, x[:, :8], 1, spec), x[:, :8] + 1)


def test_dc_ae_tiled_codec_matches_shapes_and_keys_its_identity(tmp_path):
    plain = load_dc_ae(build_dc_ae(tmp_path), overrides=DCAE)
    # 8-frame, 16-pixel tiles, 25% overlap: strides 6 and 12 cover 3 latents each (3 kept per tile)
    tiled_codec = DCAECodec(plain.model, tiling=True, spatial_tile=16, temporal_tile=8)
    video = torch.rand(1, 3, 12, 24, 24) * 2 - 1  # 2 x 2 x 2 tiles
    z = tiled_codec.encode(video)
    assert z.shape == plain.encode(video).shape == (1, 8, 6, 6, 6)
    assert tiled_codec.decode(z).shape == video.shape
    assert tiled_codec.identity != plain.identity  # tiled latents differ slightly: another cache entry
    with pytest.raises(FrameloomError, match="do not line up"):
        DCAECodec(plain.model, tiling=True, spatial_tile=16, temporal_tile=4)
    small = video[:, :, :8, :16, :16]  # one tile: exactly the plain pass
    torch.testing.assert_close(tiled_codec.encode(small), plain.encode(small), rtol=0, atol=0)


def test_hunyuan_vae_from_a_diffusers_folder_and_from_the_released_file(tmp_path):
    folder = build_vae(tmp_path)
    codec = load_hunyuan_vae(folder)
    assert codec.class_name == "AutoencoderKLHunyuanVideo" and codec.compression == (4, 8, 8)
    assert codec.scaling_factor == pytest.approx(0.476986) and codec.latent_channels == 4
    redraw(codec.vae, seed=5, std=0.05)
    save_file(
        {k: v.contiguous() for k, v in codec.vae.state_dict().items()},
        str(tmp_path / "hunyuan_vae.safetensors"),
    )
    released = load_hunyuan_vae(tmp_path / "hunyuan_vae.safetensors", overrides=dict(VAE))
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = released.encode(video)
    assert z.shape == (1, 4, 2, 2, 2)
    torch.testing.assert_close(z, codec.encode(video), rtol=0, atol=0)
    mode = codec.vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(z, mode * 0.476986)  # Open-Sora: scale_factor * (z - 0)
    with pytest.raises(FrameloomError, match="unexpected"):
        load_hunyuan_vae(tmp_path / "hunyuan_vae.safetensors", overrides={**VAE, "layers_per_block": 0})
