"""Latent codecs and text encoders, on tiny models saved locally (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from frameloom.models.codecs import CodecError, DiffusersVAECodec, PixelCodec, weights_sha256
from frameloom.models.text import T5TextEncoder, build_tiny_t5

# A CogVideoX VAE small enough for CPU tests: 2 blocks -> spatial /2, and (only one downsampler) time /2.
TINY_COGVIDEOX = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 2,
    up_block_types=("CogVideoXUpBlock3D",) * 2,
    block_out_channels=(8, 16),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
)


def _save_cogvideox(out: Path, seed: int = 0, **overrides) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    AutoencoderKLCogVideoX(**{**TINY_COGVIDEOX, **overrides}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return _save_cogvideox(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5"), seed=0)


def _video(b: int = 1, t: int = 5, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------ codecs


def test_pixel_codec_is_identity():
    codec = PixelCodec()
    video = _video(2, 4, 8, 8)
    assert codec.identity == "pixel-v1"
    assert codec.latent_channels == 3 and codec.compression == (1, 1, 1)
    assert torch.equal(codec.encode(video), video)
    assert torch.equal(codec.decode(codec.encode(video)), video)
    assert codec.latent_size(4, 8, 8) == (4, 8, 8)
    assert PixelCodec(torch.bfloat16).identity != codec.identity
    with pytest.raises(CodecError):
        codec.encode(torch.zeros(3, 4, 8, 8))  # no batch dim


def test_vae_codec_loads_frozen_with_shapes(vae_dir):
    codec = DiffusersVAECodec.from_pretrained(vae_dir)
    assert codec.class_name == "AutoencoderKLCogVideoX" and codec.is_video
    assert not codec.vae.training
    assert not any(p.requires_grad for p in codec.vae.parameters())
    assert codec.latent_channels == 4
    assert codec.compression == (2, 2, 2)
    video = _video(2, 5, 16, 16)
    latent = codec.encode(video)
    assert latent.shape == (2, 4, *codec.latent_size(5, 16, 16)) == (2, 4, 3, 8, 8)
    assert not latent.requires_grad
    assert codec.decode(latent).shape == video.shape
    assert codec.encode(_video(1, 9, 16, 16)).shape[2] == 5  # causal: 1 + (9 - 1) / 2
    assert codec.enable_tiling() and codec.enable_slicing()


def test_vae_normalization_shift_and_scale_by_hand(tmp_path):
    vae_dir = _save_cogvideox(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.25)
    codec = DiffusersVAECodec.from_pretrained(vae_dir)
    video = _video()
    with torch.no_grad():
        raw = codec.vae.encode(video).latent_dist.mode()
        assert torch.allclose(codec.encode(video), (raw - 0.25) * 0.5)
        z = torch.randn(1, 4, 3, 8, 8)
        expected = codec.vae.decode(z / 0.5 + 0.25).sample
    assert torch.allclose(codec.decode(z), expected, atol=1e-6)
    assert torch.allclose(codec.denormalize(codec.normalize(raw)), raw, atol=1e-6)


def test_vae_normalization_per_channel_mean_std(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 4.0]
    vae_dir = _save_cogvideox(tmp_path / "vae", scaling_factor=None, latents_mean=mean, latents_std=std)
    codec = DiffusersVAECodec.from_pretrained(vae_dir)
    video = _video()
    with torch.no_grad():
        raw = codec.vae.encode(video).latent_dist.mode()
    m, s = torch.tensor(mean).view(1, 4, 1, 1, 1), torch.tensor(std).view(1, 4, 1, 1, 1)
    assert torch.allclose(codec.encode(video), (raw - m) / s, atol=1e-6)
    assert torch.allclose(codec.denormalize(codec.encode(video)), raw, atol=1e-5)


def test_vae_sample_with_generator(vae_dir):
    codec = DiffusersVAECodec.from_pretrained(vae_dir)
    video = _video()
    a = codec.encode(video, generator=torch.Generator().manual_seed(1))
    b = codec.encode(video, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, codec.encode(video))  # the default is the mode, not a sample


def test_vae_identity_tracks_weights_not_location(vae_dir, tmp_path):
    first = DiffusersVAECodec.from_pretrained(vae_dir)
    again = DiffusersVAECodec.from_pretrained(vae_dir)
    assert first.identity == again.identity
    # Saved elsewhere (config's private keys differ): same weights, same identity.
    first.vae.save_pretrained(tmp_path / "copy")
    assert DiffusersVAECodec.from_pretrained(tmp_path / "copy").identity == first.identity
    # One weight changed: another identity.
    with torch.no_grad():
        next(iter(again.vae.parameters())).view(-1)[0] += 1e-3
    again.vae.save_pretrained(tmp_path / "changed")
    assert DiffusersVAECodec.from_pretrained(tmp_path / "changed").identity != first.identity
    # Another dtype computes other latents: another identity.
    assert DiffusersVAECodec.from_pretrained(vae_dir, dtype=torch.bfloat16).identity != first.identity


def _tiny_wan():
    from diffusers import AutoencoderKLWan

    mean, std = [0.1, 0.2, -0.1, 0.0], [0.5, 2.0, 1.0, 3.0]
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=mean, latents_std=std, scale_factor_temporal=2, scale_factor_spatial=2,
    )  # fmt: skip
    return vae, mean, std, 1.0


def _tiny_ltx():
    from diffusers import AutoencoderKLLTXVideo

    mean, std = [0.1, 0.2, -0.1, 0.0], [0.5, 2.0, 1.0, 3.0]
    vae = AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 16), down_block_types=("LTXVideoDownBlock3D",) * 2,
        decoder_block_out_channels=(8, 16), layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False,) * 3, downsample_type=("conv", "conv"), upsample_residual=(False, False),
        upsample_factor=(1, 1), patch_size=2, patch_size_t=1, scaling_factor=0.7,
    )  # fmt: skip
    with torch.no_grad():  # LTX keeps its statistics as buffers, not in the config
        vae.latents_mean.copy_(torch.tensor(mean))
        vae.latents_std.copy_(torch.tensor(std))
    return vae, mean, std, 0.7


@pytest.mark.parametrize("make", [_tiny_wan, _tiny_ltx], ids=["wan", "ltx"])
def test_video_vae_families(make, tmp_path):
    torch.manual_seed(0)
    vae, mean, std, scale = make()
    vae.save_pretrained(tmp_path / "vae")
    codec = DiffusersVAECodec.from_pretrained(tmp_path / "vae")
    assert codec.latent_channels == 4 and codec.is_video
    # The ratios read from the config agree with what the model actually does.
    assert codec.compression == codec._probe_compression(frames=5, size=16)
    video = _video()
    latent = codec.encode(video)
    assert latent.shape == (1, 4, *codec.latent_size(5, 16, 16))
    with torch.no_grad():
        raw = codec.vae.encode(video).latent_dist.mode()
    m, s = torch.tensor(mean).view(1, 4, 1, 1, 1), torch.tensor(std).view(1, 4, 1, 1, 1)
    assert torch.allclose(latent, (raw - m) / s * scale, atol=1e-5)
    assert codec.decode(latent).shape == video.shape


def test_weights_hash_is_order_and_dtype_aware():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(a) != weights_sha256(b.to(torch.bfloat16))


def test_image_vae_folds_time_into_batch(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
    ).save_pretrained(tmp_path / "vae")
    codec = DiffusersVAECodec.from_pretrained(tmp_path / "vae")
    assert not codec.is_video and codec.compression == (1, 2, 2)
    video = _video(2, 3, 16, 16)
    latent = codec.encode(video)
    assert latent.shape == (2, 4, 3, 8, 8)
    # Frame 1 of clip 1 is encoded on its own, exactly as a single image.
    with torch.no_grad():
        single = codec.vae.encode(video[1:2, :, 1]).latent_dist.mode() * codec.scaling_factor
    assert torch.allclose(latent[1:2, :, 1], single, atol=1e-5)
    assert codec.decode(latent).shape == video.shape


def test_vae_load_errors(tmp_path):
    with pytest.raises(CodecError, match="no VAE config"):
        DiffusersVAECodec.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CodecError, match="AutoencoderKL-family"):
        DiffusersVAECodec.from_pretrained(tmp_path / "bad")


# --------------------------------------------------------------------------------------------- text


def test_tiny_t5_is_deterministic(t5_dir, tmp_path):
    again = build_tiny_t5(tmp_path / "again", seed=0)
    a = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    b = T5TextEncoder.from_pretrained(again, max_length=32)
    assert a.identity == b.identity
    texts = ["a red square moving left", "blue"]
    (ea, ma), (eb, mb) = a.encode(texts), b.encode(texts)
    assert torch.equal(ea, eb) and torch.equal(ma, mb)
    other = T5TextEncoder.from_pretrained(build_tiny_t5(tmp_path / "other", seed=1), max_length=32)
    assert other.identity != a.identity
    # max_length is part of the identity: it changes the embeddings of long captions.
    assert T5TextEncoder.from_pretrained(t5_dir, max_length=16).identity != a.identity


def test_t5_encoder_is_frozen_and_shaped(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    assert enc.dim == 32 and enc.max_length == 32
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    emb, mask = enc.encode(["a red square", "a blue circle moving up"])
    assert emb.shape == (2, mask.shape[1], 32) and mask.dtype == torch.bool
    assert not emb.requires_grad


def test_t5_different_captions_differ(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    emb, mask = enc.encode(["a red square", "a tan square"])
    assert mask[0].sum() == mask[1].sum()
    assert not torch.allclose(emb[0], emb[1])


def test_t5_mask_is_bytes_plus_eos_up_to_max_length(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=12)
    texts = ["cat", "héllo", "a very long caption indeed", ""]
    emb, mask = enc.encode(texts)
    lengths = [min(len(t.encode("utf-8")) + 1, 12) for t in texts]
    assert mask.sum(1).tolist() == lengths
    assert mask.shape[1] == max(lengths)
    # Real tokens come first; padded positions carry no embedding.
    for row, n in zip(mask, lengths):
        assert row[:n].all() and not row[n:].any()
    assert (emb[~mask] == 0).all()
    # Truncation keeps the EOS at the end.
    ids = enc.tokenizer(texts[2], max_length=12, truncation=True)["input_ids"]
    assert len(ids) == 12 and ids[-1] == enc.tokenizer.eos_token_id


def test_t5_empty_prompt_is_just_eos(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    emb, mask = enc.encode([""])
    assert mask.tolist() == [[True]] and emb.shape == (1, 1, 32)
    assert enc.tokenizer("")["input_ids"] == [enc.tokenizer.eos_token_id]


def test_t5_embedding_independent_of_batch(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    alone, m_alone = enc.encode(["a cat"])
    batched, m_batched = enc.encode(["a cat", "a much longer caption than the first"])
    n = int(m_alone.sum())
    assert torch.allclose(alone[0, :n], batched[0, :n], atol=1e-5)
    assert (batched[0, n:] == 0).all()


def test_t5_rejects_a_bare_string(t5_dir):
    enc = T5TextEncoder.from_pretrained(t5_dir, max_length=32)
    with pytest.raises(TypeError):
        enc.encode("a cat")
