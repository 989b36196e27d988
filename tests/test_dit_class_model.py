"""The class-conditional DiT: released key layout (strict), train.py checkpoints, diffusers round trip, sizes,
the label encoder."""

from __future__ import annotations

import argparse

import pytest
import torch

from frameloom.errors import FrameloomError
from frameloom.models.dit_class import convert
from frameloom.models.dit_class.family import load_denoiser
from frameloom.models.dit_class.labels import ClassLabelEncoder
from frameloom.models.dit_class.model import ClassDiT, sincos_2d

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 4,
        "num_classes": 10}  # fmt: skip


def redraw(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter from N(0, 0.2^2): the zero-initialised adaLN/output layers would make outputs trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 431.0, 999.0]), torch.tensor([2, 9, 10])


def test_released_layout_loads_strictly_and_names_bad_keys(tmp_path):
    shapes = convert.released_shapes(TINY)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    assert len(sd) == 8 + 10 * 2 + 4 and sd["y_embedder.embedding_table.weight"].shape == (11, 32)
    model = ClassDiT(**TINY)
    convert.load_strict(model, sd, "tiny.pt")
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    # the released layout is exactly the model's own state dict
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    with pytest.raises(FrameloomError, match=r"missing 1 key\(s\): blocks\.0\.mlp\.fc2\.bias"):
        convert.load_strict(
            ClassDiT(**TINY), {k: v for k, v in sd.items() if k != "blocks.0.mlp.fc2.bias"}, "x"
        )
    with pytest.raises(FrameloomError, match=r"unexpected 1 key\(s\): extra\.weight"):
        convert.load_strict(ClassDiT(**TINY), {**sd, "extra.weight": torch.zeros(1)}, "x")
    # a released file: its config is read off the shapes (heads given: 32 is no paper width)
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    loaded = load_denoiser(tmp_path / "DiT-tiny.pt", {"num_heads": 4})
    assert loaded.config == {**ClassDiT(**TINY).config}
    assert torch.equal(loaded.final_layer.linear.weight, sd["final_layer.linear.weight"])
    with pytest.raises(FrameloomError, match="num_heads"):
        load_denoiser(tmp_path / "DiT-tiny.pt")


def test_train_checkpoint_uses_ema_and_weights_only(tmp_path):
    model = redraw(ClassDiT(**TINY))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt = {
        "model": model.state_dict(),
        "ema": ema,
        "opt": {"state": {}},
        "args": argparse.Namespace(lr=1e-4),
    }
    torch.save(ckpt, tmp_path / "0050000.pt")
    sd = convert.load_released_file(tmp_path / "0050000.pt")
    assert torch.equal(sd["pos_embed"], ema["pos_embed"])  # the EMA, as DiT's find_model
    torch.save({"w": torch.zeros(1), "code": _Unsafe()}, tmp_path / "evil.pt")
    with pytest.raises(FrameloomError, match="weights_only"):
        convert.load_released_file(tmp_path / "evil.pt")


class _Unsafe:
    pass


def test_fixed_positions_match_dit_formula():
    pos = sincos_2d(8, 2, 3)  # (6, 8): first half encodes the column, second half the row
    col, row = 2.0, 1.0  # token 5 = row 1, column 2
    omega = [1.0, 0.01]  # 10000 ** (-k / 2) for k = 0, 1 (dim/2 = 4 -> 2 frequencies)
    expected = [torch.sin(torch.tensor(col * omega[0])), torch.sin(torch.tensor(col * omega[1])),
                torch.cos(torch.tensor(col * omega[0])), torch.cos(torch.tensor(col * omega[1])),
                torch.sin(torch.tensor(row * omega[0])), torch.sin(torch.tensor(row * omega[1])),
                torch.cos(torch.tensor(row * omega[0])), torch.cos(torch.tensor(row * omega[1]))]  # fmt: skip
    assert torch.allclose(pos[5], torch.stack(expected), atol=1e-6)


def test_diffusers_round_trip_and_parity(tmp_path):
    from diffusers import DiTTransformer2DModel

    ours = redraw(ClassDiT(**TINY)).eval()
    sd = ours.state_dict()
    theirs = DiTTransformer2DModel(**convert.diffusers_config(ours.config))
    convert.load_strict(theirs, convert.to_diffusers_state_dict(sd), "converted")
    theirs.save_pretrained(tmp_path / "transformer")
    back = load_denoiser(tmp_path / "transformer").eval()
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(
            back(x, t, class_labels=y), ours(x, t, class_labels=y)
        )  # ours -> diffusers -> ours
        # diffusers' DiT differs from the upstream code (timestep frequencies / (half - 1), MLP norm eps 1e-5);
        # diffusers_compat reproduces it
        ref = theirs.eval()(x, t, class_labels=y).sample
        compat = ClassDiT(**TINY, diffusers_compat=True).eval()
        compat.load_state_dict(sd)
        assert (compat(x, t, class_labels=y) - ref).abs().max().item() < 1e-4
        assert (ours(x, t, class_labels=y) - ref).abs().max().item() > 1e-3
    # diverged per-block embedder copies have no DiT equivalent: refused with the key
    dsd = convert.to_diffusers_state_dict(sd)
    dsd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] += 1
    with pytest.raises(FrameloomError, match="transformer_blocks.1.norm1.emb.class_embedder"):
        convert.from_diffusers_state_dict(dsd, sd["pos_embed"])


def test_video_shaped_input_and_float_labels():
    model = redraw(ClassDiT(**TINY)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        image = model(x, t, class_labels=y)
        video = model(x[:, :, None], t, None, None, class_labels=y.float())  # the trainer's float extras
    assert image.shape == (3, 8, 8, 8) and video.shape == (3, 8, 1, 8, 8)
    assert torch.equal(video[:, :, 0], image)
    with torch.no_grad():  # two frames: each frame as its own image (frames patchified by the 3-D kernel)
        two = model(torch.stack([x, x.flip(-1)], 2), t, class_labels=y)
        flipped = model(x.flip(-1), t, class_labels=y)
    assert two.shape == (3, 8, 2, 8, 8)
    torch.testing.assert_close(two[:, :, 0], image, rtol=0, atol=1e-5)
    torch.testing.assert_close(two[:, :, 1], flipped, rtol=0, atol=1e-5)
    # a grid other than the position table's gets its own sin-cos table
    assert model(torch.randn(1, 4, 8, 16), t[:1], class_labels=y[:1]).shape == (1, 8, 8, 16)


@pytest.mark.slow  # two inductor compiles (~1 min)
def test_compiled_model_follows_changing_shapes():
    """`parallel.compile: model` (the digits preset): the trainer's (B, C, 1, H, W) batches, then another batch
    size and grid which makes dynamo recompile with dynamic shapes (inductor failed on the old patchify there);
    outputs and input gradients equal eager's to float32 reassociation."""
    from frameloom.parallel.memory import compile_unavailable

    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    eager = redraw(ClassDiT(**TINY))
    compiled = redraw(ClassDiT(**TINY))
    compiled.compile()
    g = torch.Generator().manual_seed(3)
    try:
        for batch, size in [(4, 8), (2, 12)]:
            x = torch.randn(batch, 4, 1, size, size, generator=g)
            t = torch.randint(0, 1000, (batch,), generator=g).float()
            y = torch.randint(0, 11, (batch,), generator=g).float()
            outs = []
            for model in (eager, compiled):
                xi = x.clone().requires_grad_()
                out = model(xi, t, class_labels=y)
                out.square().sum().backward()
                outs.append((out.detach(), xi.grad))
            for ours, reference in zip(outs[1], outs[0]):  # float32 reassociation: 1e-4 of the range
                assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max(), (batch, size)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["DiT-XL/2", "DiT-B/4", "S-8"])
def test_paper_sizes(preset):
    with torch.device("meta"):
        model = ClassDiT(**convert.preset_config(preset))
    total = (
        sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    )  # upstream: pos_embed a Parameter
    shapes = convert.released_shapes({**model.config})
    assert total == sum(torch.Size(s).numel() for s in shapes.values())
    if preset == "DiT-XL/2":
        assert total == 675_129_632  # "DiT Parameters: 675,129,632" in fast-DiT's training logs


def test_label_encoder():
    enc = ClassLabelEncoder(10, ["zero", "one"])
    assert enc.labels(["3", "", "one", " 9 "]).tolist() == [3, 10, 1, 9]
    emb, mask = enc.encode(["3", ""])
    assert emb.shape == (2, 1, 1) and emb.abs().sum() == 0 and mask.all()
    assert enc.encode_extras(["0", ""])["class_labels"].tolist() == [0, 10]
    with pytest.raises(FrameloomError, match="outside 0..9"):
        enc.labels(["10"])
    with pytest.raises(FrameloomError, match="neither a class index nor a class name"):
        enc.labels(["tench"])
    assert enc.identity != ClassLabelEncoder(10).identity


@pytest.mark.parametrize(
    ("preset", "params", "channels"),
    [
        ("dit_xl2_256", 675_129_632, 3),
        ("dit_b4_256", 130_426_496 + 64 * 768, 3),
        ("dit_digits_cpu", None, None),
    ],
)
def test_presets_build(preset, params, channels):
    from pathlib import Path

    from frameloom.config import load_config
    from frameloom.models.dit_class.family import model_kwargs, options

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
    assert cfg.model.family == "dit_class" and cfg.objective.name == "iddpm" and cfg.data.num_frames == 1
    with torch.device("meta"):
        model = ClassDiT(**model_kwargs(cfg.model, 4 if cfg.model.codec != "pixel" else 3))
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == params
    assert options(cfg.model).guided_channels == channels
