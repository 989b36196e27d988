"""Pyramid Flow's models: released key names load strictly (and a wrong key is one line naming it), temporal
causality, the history positions, the VAE's chunked streaming and latent normalisation, the T5 + CLIP text side.
Upstream parity (outputs of jy0205/Pyramid-Flow's own modules at tiny size, max abs difference 0.0) was measured
in a scratch folder; docs/pyramid_flow.md records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from frameloom.errors import FrameloomError
from frameloom.models.pyramid_flow.codec import PyramidVAECodec, denormalize_latent, normalize_latent
from frameloom.models.pyramid_flow.family import load_denoiser, write_released
from frameloom.models.pyramid_flow.flux import PyramidFluxTransformer, flux_positions
from frameloom.models.pyramid_flow.mmdit import PyramidMMDiT
from frameloom.models.pyramid_flow.text import PyramidTextEncoder, build_tiny
from frameloom.models.pyramid_flow.vae import CausalVideoVAE, VAEConfig
from pyramid_keys import miniflux_shapes, random_state, sd3_shapes, vae_shapes

MINIFLUX = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=6,
    axes_dims_rope=[4, 6, 6],
)
SD3 = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    caption_projection_dim=16,
    pooled_projection_dim=6,
    pos_embed_max_size=12,
    joint_attention_dim=12,
)
VAE = dict(
    encoder_out_channels=4,
    encoder_block_out_channels=[8, 16, 16],
    encoder_layers_per_block=[1, 2, 1],
    encoder_spatial_down_sample=[True, True, False],
    encoder_temporal_down_sample=[True, True, False],
    encoder_norm_num_groups=4,
    decoder_in_channels=4,
    decoder_block_out_channels=[8, 16, 16],
    decoder_layers_per_block=[1, 2, 1],
    decoder_spatial_up_sample=[True, True, False],
    decoder_temporal_up_sample=[True, True, False],
    decoder_norm_num_groups=4,
)


def _released(folder: Path, class_name: str, config: dict, state: dict) -> Path:
    """A folder in the released layout: upstream's config.json (with its extra flags) + safetensors."""
    folder.mkdir(parents=True)
    extra = {"use_flash_attn": False, "use_temporal_causal": True, "use_gradient_checkpointing": False}
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config, **extra}))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "class_name,config,shapes",
    [
        (
            "PyramidFluxTransformer",
            {**MINIFLUX, "patch_size": 1, "interp_condition_pos": True},
            miniflux_shapes,
        ),
        ("PyramidDiffusionMMDiT", {**SD3, "pos_embed_type": "sincos", "qk_norm": "rms_norm"}, sd3_shapes),
    ],
)
def test_transformer_loads_released_keys_strictly(tmp_path, class_name, config, shapes):
    state = random_state(shapes(config))
    model = load_denoiser(_released(tmp_path / "ok", class_name, config, state))
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # a checkpoint of the whole upstream wrapper: `dit.` prefix, vae/text_encoder entries dropped
    wrapped = {f"dit.{k}": v for k, v in state.items()} | {"vae.encoder.x": torch.zeros(1)}
    load_denoiser(_released(tmp_path / "wrapped", class_name, config, wrapped))
    # a missing and an unexpected key: one line naming both
    broken = dict(state)
    gone = sorted(broken)[3]
    del broken[gone]
    broken["transformer_blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(FrameloomError) as err:
        load_denoiser(_released(tmp_path / "bad", class_name, config, broken))
    msg = str(err.value)
    assert "\n" not in msg and gone in msg and "transformer_blocks.0.attn.extra.weight" in msg
    assert "missing keys" in msg and "unexpected keys" in msg


def test_vae_loads_released_keys_strictly(tmp_path):
    state = random_state(vae_shapes(VAE), scale=0.1)
    folder = _released(tmp_path / "vae", "CausalVideoVAE", VAE, state)
    codec = PyramidVAECodec.from_pretrained(folder, "miniflux")
    assert codec.compression == (4, 4, 4) and codec.latent_channels == 4
    assert all(torch.equal(codec.vae.state_dict()[k], v) for k, v in state.items())
    state["decoder.conv_in.conv.weight"] = torch.zeros(1, 1, 3, 3, 3)
    with pytest.raises(FrameloomError, match=r"shape mismatch decoder.conv_in.conv.weight \(1, 1, 3, 3, 3\)"):
        PyramidVAECodec.from_pretrained(_released(tmp_path / "bad", "CausalVideoVAE", VAE, state), "miniflux")


def _redrawn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight (the output layers start at zero, which would make any comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _inputs(b=2, t=4, h=8, w=8, channels=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, channels, t, h, w, generator=g)
    text = torch.randn(b, 5, 12, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:b]
    return x, torch.tensor([900.0, 300.0])[:b], text, mask, torch.randn(b, 6, generator=g)


@pytest.mark.parametrize("variant", ["miniflux", "sd3"])
def test_temporal_causality(variant):
    build = (
        (lambda **k: PyramidFluxTransformer(**MINIFLUX, **k))
        if variant == "miniflux"
        else (lambda **k: PyramidMMDiT(**SD3, **k))
    )
    model = _redrawn(build())
    x, t, text, mask, pooled = _inputs()
    changed = x.clone()
    changed[:, :, 2:] += 1.0  # change the later frames only
    with torch.no_grad():
        a, b = model(x, t, text, mask, pooled), model(changed, t, text, mask, pooled)
        # earlier frames never see later ones
        torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=0, atol=0)
        assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-3
        # padding tokens of the text never reach a real token: changing them changes nothing
        text2 = text.clone()
        text2[1, 3:] = 7.0
        torch.testing.assert_close(model(x, t, text2, mask, pooled), a, rtol=0, atol=0)
        # with temporal_causal off (a deliberate option; upstream's flag cannot be turned off) frame 0 sees frame 3
        free = build(temporal_causal=False)
        free.load_state_dict(model.state_dict())
        c, d = free(x, t, text, mask, pooled), free(changed, t, text, mask, pooled)
        assert (c[:, :, :2] - d[:, :, :2]).abs().max() > 1e-3


def test_history_positions_are_interpolated_onto_the_current_grid():
    pos = flux_positions([(2, 1, 1), (1, 2, 2), (1, 4, 4)])  # history at 1/4 and 1/2 size, then the clip
    assert pos.shape == (2 + 4 + 16, 3)
    assert pos[:2].tolist() == [[0.0, 1.5, 1.5], [1.0, 1.5, 1.5]]  # 1 token spread over 4: its centre 1.5
    assert pos[2:6, 1:].tolist() == [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]]
    assert pos[2:6, 0].tolist() == [2.0] * 4 and pos[6:, 0].tolist() == [3.0] * 16
    assert pos[6:10, 1:].tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]


def test_history_changes_the_prediction_and_shapes():
    model = _redrawn(PyramidFluxTransformer(**MINIFLUX))
    x, t, text, mask, pooled = _inputs(t=1)
    hist = [torch.randn(2, 4, 2, 2, 2), torch.randn(2, 4, 1, 8, 8)]
    with torch.no_grad():
        plain = model(x, t, text, mask, pooled)
        with_hist = model(x, t, text, mask, pooled, history=hist)
    assert with_hist.shape == x.shape and (plain - with_hist).abs().max() > 1e-3


def test_vae_chunked_streaming_equals_the_whole_clip():
    vae = _redrawn(CausalVideoVAE(VAEConfig(**VAE)), seed=2)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.3)
    video = torch.randn(1, 3, 1 + 4 * 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full_mean, full_logvar = vae.encode(video, chunk=100)
        mean, logvar = vae.encode(video, chunk=1)  # 5 frames, then 4 at a time
        assert full_mean.shape == (1, 4, 5, 4, 4)
        torch.testing.assert_close(mean, full_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar, full_logvar, rtol=1e-5, atol=1e-5)
        whole = vae.decode(full_mean, chunk=100)
        torch.testing.assert_close(vae.decode(full_mean, chunk=1), whole, rtol=1e-4, atol=1e-4)
        assert whole.shape == (1, 3, 17, 16, 16)
        # causal: the first frame's latent is the same for the first frame alone
        torch.testing.assert_close(
            vae.encode(video[:, :, :1], chunk=1)[0], full_mean[:, :, :1], rtol=1e-5, atol=1e-5
        )


def test_latent_normalisation_per_variant():
    z = torch.zeros(1, 1, 3, 1, 1)
    mini = normalize_latent(z, "miniflux")[0, 0, :, 0, 0]
    assert mini.tolist() == pytest.approx([0.04 / 1.8726, 0.2343 / 3.0986, 0.2343 / 3.0986])
    sd3 = normalize_latent(z, "sd3")[0, 0, :, 0, 0]
    assert sd3.tolist() == pytest.approx([-0.1490 / 1.8415, 0.2343 / 3.0986, 0.2343 / 3.0986])
    raw = torch.randn(2, 4, 3, 2, 2)
    for variant in ("miniflux", "sd3"):
        torch.testing.assert_close(denormalize_latent(normalize_latent(raw, variant), variant), raw)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    return {v: build_tiny(root / v, v) for v in ("miniflux", "sd3")}


def test_text_encoder_gives_t5_tokens_and_pooled_clip(tiny_text):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    mini = PyramidTextEncoder.from_pretrained(tiny_text["miniflux"], "miniflux", max_length=16)
    emb, mask = mini.encode(["a red cat", ""])
    assert emb.shape[0] == 2 and mask.sum(1).tolist() == [10, 1]  # byte tokens + EOS; "" is just EOS
    pooled = mini.encode_extras(["a red cat"])["pooled"]
    clip = CLIPTextModel.from_pretrained(tiny_text["miniflux"] / "text_encoder")
    ids = mini.clips[0][1](["a red cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    torch.testing.assert_close(pooled, clip(input_ids=ids).pooler_output)
    sd3 = PyramidTextEncoder.from_pretrained(tiny_text["sd3"], "sd3", max_length=16)
    both = sd3.encode_extras(["a red cat"])["pooled"]
    assert both.shape == (1, 32 + 64) and sd3.pooled_dim == 96
    g = CLIPTextModelWithProjection.from_pretrained(tiny_text["sd3"] / "text_encoder_2")
    torch.testing.assert_close(both[:, 32:], g(input_ids=ids).text_embeds)
    assert mini.identity != sd3.identity
    with pytest.raises(FrameloomError, match="text_encoder_3"):
        PyramidTextEncoder.from_pretrained(tiny_text["miniflux"], "sd3")


@pytest.mark.parametrize("variant", ["miniflux", "sd3"])
def test_export_in_the_released_layout_loads_back(tmp_path, variant):
    model = _redrawn(PyramidFluxTransformer(**MINIFLUX) if variant == "miniflux" else PyramidMMDiT(**SD3))
    folder = write_released(model, tmp_path / "diffusion_transformer_384p")
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["_class_name"]
        == {"miniflux": "PyramidFluxTransformer", "sd3": "PyramidDiffusionMMDiT"}[variant]
    )
    assert (
        config["use_temporal_causal"] is True and (folder / "diffusion_pytorch_model.safetensors").is_file()
    )
    back = load_denoiser(folder)
    x, t, text, mask, pooled = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, text, mask, pooled), model(x, t, text, mask, pooled))


def test_vae_spatial_tiles_blend_to_the_untiled_shape():
    from frameloom.models.pyramid_flow.vae import blend

    # blending: the seam fades linearly from the previous tile into the next; constants stay constant
    a, b = torch.zeros(1, 1, 1, 4, 4), torch.ones(1, 1, 1, 4, 4)
    assert blend(a, b, 4, dim=3)[0, 0, 0, :, 0].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert torch.equal(blend(b, b.clone(), 2, dim=4), b)
    vae = _redrawn(CausalVideoVAE(VAEConfig(**VAE)), seed=2)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(0.3)
        video = torch.randn(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0))
        mean, _ = vae.encode(video)
        # one tile covering the frame: exactly the untiled encode
        torch.testing.assert_close(vae.tiled_encode(video, tile=32)[0], mean)
        # 16-pixel tiles (stride 12, 1-latent seams): the untiled shape, close to its values
        tiled, _ = vae.tiled_encode(video, tile=16)
        assert tiled.shape == mean.shape
        assert (tiled - mean).abs().mean() < 0.5 * mean.abs().mean()
        z = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        assert vae.tiled_decode(z, tile=4).shape == vae.decode(z).shape == (1, 3, 5, 32, 32)
