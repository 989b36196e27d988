"""The released Pyramid Flow checkpoints' key names and shapes, written out from the architecture description
(SEED_MODELS.md; jy0205/Pyramid-Flow ``PyramidFluxTransformer``, ``PyramidDiffusionMMDiT``, ``CausalVideoVAE``)
independently of frameloom's modules, for a given config. Checked once against the upstream modules built at
tiny size (the key sets and shapes were identical); the tests load these state dicts with ``strict=True``."""

from __future__ import annotations

import torch


def _linear(out: dict, name: str, fin: int, fout: int) -> None:
    out[f"{name}.weight"] = (fout, fin)
    out[f"{name}.bias"] = (fout,)


def _ff(out: dict, name: str, dim: int) -> None:
    _linear(out, f"{name}.net.0.proj", dim, 4 * dim)
    _linear(out, f"{name}.net.2", 4 * dim, dim)


def _time_text(out: dict, dim: int, pooled: int) -> None:
    _linear(out, "time_text_embed.timestep_embedder.linear_1", 256, dim)
    _linear(out, "time_text_embed.timestep_embedder.linear_2", dim, dim)
    _linear(out, "time_text_embed.text_embedder.linear_1", pooled, dim)
    _linear(out, "time_text_embed.text_embedder.linear_2", dim, dim)


def miniflux_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    heads, hd = c["num_attention_heads"], c["attention_head_dim"]
    dim = heads * hd
    out: dict[str, tuple[int, ...]] = {}
    _time_text(out, dim, c["pooled_projection_dim"])
    _linear(out, "context_embedder", c["joint_attention_dim"], dim)
    _linear(out, "x_embedder", c["in_channels"], dim)
    for i in range(c["num_layers"]):
        b = f"transformer_blocks.{i}"
        _linear(out, f"{b}.norm1.linear", dim, 6 * dim)
        _linear(out, f"{b}.norm1_context.linear", dim, 6 * dim)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(out, f"{b}.attn.{n}", dim, dim)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            out[f"{b}.attn.{n}.weight"] = (hd,)
        _ff(out, f"{b}.ff", dim)
        _ff(out, f"{b}.ff_context", dim)
    for i in range(c["num_single_layers"]):
        b = f"single_transformer_blocks.{i}"
        _linear(out, f"{b}.norm.linear", dim, 3 * dim)
        _linear(out, f"{b}.proj_mlp", dim, 4 * dim)
        _linear(out, f"{b}.proj_out", 5 * dim, dim)
        for n in ("to_q", "to_k", "to_v"):
            _linear(out, f"{b}.attn.{n}", dim, dim)
        out[f"{b}.attn.norm_q.weight"] = (hd,)
        out[f"{b}.attn.norm_k.weight"] = (hd,)
    _linear(out, "norm_out.linear", dim, 2 * dim)
    _linear(out, "proj_out", dim, c["in_channels"])
    return out


def sd3_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    heads, hd, p = c["num_attention_heads"], c["attention_head_dim"], c["patch_size"]
    dim = heads * hd
    out: dict[str, tuple[int, ...]] = {}
    out["pos_embed.pos_embed"] = (1, c["pos_embed_max_size"] ** 2, dim)
    out["pos_embed.proj.weight"] = (dim, c["in_channels"], p, p)
    out["pos_embed.proj.bias"] = (dim,)
    _time_text(out, dim, c["pooled_projection_dim"])
    _linear(out, "context_embedder", c["joint_attention_dim"], c["caption_projection_dim"])
    for i in range(c["num_layers"]):
        last = i == c["num_layers"] - 1
        b = f"transformer_blocks.{i}"
        _linear(out, f"{b}.norm1.linear", dim, 6 * dim)
        _linear(out, f"{b}.norm1_context.linear", dim, (2 if last else 6) * dim)
        names = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"]
        for n in names + ([] if last else ["to_add_out"]):
            _linear(out, f"{b}.attn.{n}", dim, dim)
        for n in ("norm_q", "norm_k", "norm_add_q", "norm_add_k"):
            out[f"{b}.attn.{n}.weight"] = (hd,)
        _ff(out, f"{b}.ff", dim)
        if not last:
            _ff(out, f"{b}.ff_context", dim)
    _linear(out, "norm_out.linear", dim, 2 * dim)
    _linear(out, "proj_out", dim, p * p * c["in_channels"])
    return out


def _conv(out: dict, name: str, cin: int, cout: int, k: int = 3) -> None:
    out[f"{name}.conv.weight"] = (cout, cin, k, k, k)
    out[f"{name}.conv.bias"] = (cout,)


def _norm(out: dict, name: str, ch: int) -> None:
    out[f"{name}.weight"] = (ch,)
    out[f"{name}.bias"] = (ch,)


def _resnet(out: dict, name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout)
    if cin != cout:
        _conv(out, f"{name}.conv_shortcut", cin, cout, 1)


def _mid(out: dict, name: str, ch: int) -> None:
    _resnet(out, f"{name}.resnets.0", ch, ch)
    _resnet(out, f"{name}.resnets.1", ch, ch)
    a = f"{name}.attentions.0"
    _norm(out, f"{a}.group_norm", ch)
    for n in ("to_q", "to_k", "to_v", "to_out.0"):
        _linear(out, f"{a}.{n}", ch, ch)


def vae_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    ch, z = c["encoder_block_out_channels"], c["encoder_out_channels"]
    _conv(out, "encoder.conv_in", 3, ch[0])
    for i, cout in enumerate(ch):
        cin = ch[max(i - 1, 0)]
        for j in range(c["encoder_layers_per_block"][i]):
            _resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if c["encoder_spatial_down_sample"][i]:
            _conv(out, f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout)
        if c["encoder_temporal_down_sample"][i]:
            _conv(out, f"encoder.down_blocks.{i}.temporal_downsamplers.0.conv", cout, cout)
    _mid(out, "encoder.mid_block", ch[-1])
    _norm(out, "encoder.conv_norm_out", ch[-1])
    _conv(out, "encoder.conv_out", ch[-1], 2 * z)
    dch = c["decoder_block_out_channels"]
    rev = dch[::-1]
    _conv(out, "decoder.conv_in", z, dch[-1])
    _mid(out, "decoder.mid_block", dch[-1])
    for i, cout in enumerate(rev):
        cin = rev[max(i - 1, 0)]
        for j in range(c["decoder_layers_per_block"][i]):
            _resnet(out, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if c["decoder_spatial_up_sample"][i]:
            _conv(out, f"decoder.up_blocks.{i}.upsamplers.0.conv", cout, 4 * cout)
        if c["decoder_temporal_up_sample"][i]:
            _conv(out, f"decoder.up_blocks.{i}.temporal_upsamplers.0.conv", cout, 2 * cout)
    _norm(out, "decoder.conv_norm_out", dch[0])
    _conv(out, "decoder.conv_out", dch[0], 3)
    _conv(out, "quant_conv", 2 * z, 2 * z, 1)
    _conv(out, "post_quant_conv", z, z, 1)
    return out


def random_state(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """A state dict with these keys and shapes, drawn from N(0, scale^2) with a fixed seed (no zero layers)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in sorted(shapes.items())}
