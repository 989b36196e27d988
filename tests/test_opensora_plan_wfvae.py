"""WF-VAE (models/opensora_plan/wfvae.py) and its codec: released keys load strictly, shapes (4x time, 8x8
space, causal), the Haar transforms by hand, chunked == whole-clip encode/decode (also at an even latent
length, where upstream's chunked decode differs), and the codec's per-channel normalization.

Parity with upstream (``WFVAEModel``, run at tiny size outside the repository, weights redrawn): whole-clip
encode max |diff| <= 1e-6, decode <= 2.5e-5 (outputs ~30, so <= 7e-7 relative), for 1..25 frames; GroupNorm +
nearest variant decode 5.3e-4 on outputs ~770 (docs/opensora_plan.md).
"""

from __future__ import annotations

import pytest
import torch

from frameloom.errors import FrameloomError
from frameloom.models.codecs import CodecError
from frameloom.models.opensora_plan.codec import WFVAECodec, load_wfvae
from frameloom.models.opensora_plan.released import WFVAE_CLASS, released_wfvae_shapes, write_folder
from frameloom.models.opensora_plan.wfvae import (
    WFVAE,
    HaarWaveletTransform2D,
    HaarWaveletTransform3D,
    InverseHaarWaveletTransform2D,
    InverseHaarWaveletTransform3D,
    WFVAEConfig,
    chunk_bounds,
)

TINY = dict(
    latent_dim=8,
    base_channels=8,
    encoder_num_resblocks=1,
    decoder_num_resblocks=1,
    encoder_energy_flow_hidden_size=8,
    decoder_energy_flow_hidden_size=16,
    norm_type="layernorm",
    t_interpolation="trilinear",
    connect_res_layer_num=1,
    scale=[0.5, 1.0, 2.0, 1.5, 0.7, 1.1, 0.9, 1.3],
    shift=[0.1, -0.2, 0.0, 0.3, 0.05, -0.1, 0.2, 0.0],
)


def tiny_vae(seed: int = 0) -> WFVAE:
    torch.manual_seed(seed)
    vae = WFVAE(WFVAEConfig(**TINY))
    with torch.no_grad():
        for p in vae.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return vae.eval()


def write_tiny_vae(folder, seed: int = 0, with_constants: bool = True):
    state = tiny_vae(seed).state_dict()
    if not with_constants:
        state = {k: v for k, v in state.items() if "wavelet_transform" not in k}
    return write_folder(folder, WFVAE_CLASS, TINY, state)


def test_released_state_dict_loads_strictly(tmp_path):
    shapes = released_wfvae_shapes(TINY)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    folder = write_folder(tmp_path / "vae", WFVAE_CLASS, TINY, state)
    vae = load_wfvae(folder)
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == shapes
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    # the fixed wavelet filters may be absent; a learned key may not
    bare = write_tiny_vae(tmp_path / "bare", with_constants=False)
    assert torch.equal(
        load_wfvae(bare).encoder.wavelet_transform_in.h_conv.conv.weight, torch.full((1, 1, 2, 2, 2), 0.3536)
    )
    del state["decoder.up1.0.conv1.conv.weight"]
    with pytest.raises(FrameloomError, match=r"missing 1 key\(s\): decoder.up1.0.conv1.conv.weight"):
        load_wfvae(write_folder(tmp_path / "bad", WFVAE_CLASS, TINY, state))


def test_haar_transforms_by_hand():
    # a constant clip of 1 frame: the causal pad repeats it, so the low band is 8 x 0.3536 x c, the rest 0
    x = torch.full((1, 3, 1, 4, 4), 2.0)
    coeffs = HaarWaveletTransform3D()(x)
    assert coeffs.shape == (1, 24, 1, 2, 2)
    torch.testing.assert_close(coeffs[:, :3], torch.full((1, 3, 1, 2, 2), 8 * 0.3536 * 2.0))
    assert coeffs[:, 3:].abs().max() < 1e-6  # float rounding of +-0.3536 sums
    # inverse after forward: the Haar patterns are orthogonal, so it scales by 8 x 0.3536^2 (1.00023)
    y = torch.randn(2, 3, 9, 8, 8)
    back = InverseHaarWaveletTransform3D()(HaarWaveletTransform3D()(y))
    torch.testing.assert_close(back, y * 8 * 0.3536**2, rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 3, 5, 8, 8)
    torch.testing.assert_close(
        InverseHaarWaveletTransform2D()(HaarWaveletTransform2D()(z)), z, rtol=1e-5, atol=1e-6
    )


def test_shapes_and_causality():
    vae = tiny_vae()
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (1, 8, 3, 2, 2)
        assert vae.decode(mean).shape == (1, 3, 9, 16, 16)
        # causal: the first 5 frames' latents do not depend on the frames after them
        prefix, _ = vae.encode(x[:, :, :5])
        torch.testing.assert_close(prefix, mean[:, :, :2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "frames", [13, 17]
)  # 4 latent frames (even: upstream's chunked decode differs) and 5
def test_chunked_equals_whole_clip(frames):
    vae = tiny_vae()
    x = torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode(x)
        video = vae.decode(mean)
        vae.chunked = True
        mean_c, _ = vae.encode(x)
        video_c = vae.decode(mean)
    torch.testing.assert_close(mean_c, mean, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(video_c, video, rtol=1e-5, atol=5e-5)
    assert chunk_bounds(4, 2) == [(0, 1), (1, 3), (3, 4)] and chunk_bounds(17, 8) == [(0, 1), (1, 9), (9, 17)]
    # the streaming state is released after a chunked call
    assert all(getattr(m, "cache", None) is None for m in vae.modules())


def test_codec_normalization_and_errors(tmp_path):
    codec = WFVAECodec.from_pretrained(write_tiny_vae(tmp_path / "vae"))
    assert codec.latent_channels == 8 and codec.latent_size(93, 480, 640) == (24, 60, 80)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean, _ = codec.vae.encode(video)
    shift = torch.tensor(TINY["shift"]).view(1, -1, 1, 1, 1)
    scale = torch.tensor(TINY["scale"]).view(1, -1, 1, 1, 1)
    z = codec.encode(video)
    torch.testing.assert_close(z, (mean - shift) * scale)
    torch.testing.assert_close(codec.decode(z), codec.vae.decode(mean), rtol=1e-5, atol=1e-5)
    sampled = codec.encode(video, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, z)
    tiled = WFVAECodec.from_pretrained(tmp_path / "vae", tiling=True)
    assert tiled.vae.chunked and tiled.identity == codec.identity  # same latents: not part of the cache key
    other = WFVAECodec.from_pretrained(write_tiny_vae(tmp_path / "vae2", seed=1))
    assert other.identity != codec.identity
    with pytest.raises(CodecError, match="4k \\+ 1"):
        codec.encode(torch.zeros(1, 3, 4, 16, 16))
