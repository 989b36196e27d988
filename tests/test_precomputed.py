"""Pre-extracted latents and text features (Pyramid Flow's ``latent``/``text_fea``, fast-DiT's ``.npy``):
the files are read in the format the seed's tools write, training never decodes a video nor loads a text
encoder, and shapes that do not fit the model are one line at start."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from frameloom.config import load_config
from frameloom.data import video as video_io
from frameloom.data.manifest import read_manifest
from frameloom.data.precomputed import (
    PrecomputedDataset,
    PrecomputedError,
    collate_precomputed,
    load_tensor_file,
    normalize_latent,
)
from frameloom.data.prepare import prepare
from frameloom.errors import FrameloomError
from frameloom.models import text as text_models
from frameloom.train.trainer import Trainer
from media import index_frames, write_video
from tiny import TINY

D = 24  # token features per token of the fake T5
P = 8  # pooled vector


def _text_fea(path: Path, tokens: int, value: float, pooled: bool = True) -> None:
    """What Pyramid Flow's tools/extract_text_features.py saves: batch-of-one tensors, T5 padded to 128 (the
    pooled CLIP vector is left out for the tiny DiT, which takes no pooled input)."""
    emb = torch.zeros(1, 128, D, dtype=torch.bfloat16)
    emb[0, :tokens] = value
    mask = torch.zeros(1, 128, dtype=torch.int64)
    mask[0, :tokens] = 1
    content = {"prompt_embed": emb, "prompt_attention_mask": mask}
    if pooled:
        content["pooled_prompt_embed"] = torch.full((1, P), value, dtype=torch.bfloat16)
    torch.save(content, path)


def _latent(path: Path, frames: int, value: float, channels: int = 3, size: int = 8) -> None:
    """What tools/extract_video_vae_latents.py saves: the VAE sample (1, C, T, H, W) in bf16, unnormalised."""
    torch.save(torch.full((1, channels, frames, size, size), value, dtype=torch.bfloat16), path)


@pytest.fixture(params=[True])
def pyramid(tmp_path, request) -> Path:
    """A Pyramid Flow jsonl with absolute latent/text_fea paths (as its tools write), prepared; the param says
    whether the text features carry the pooled vector."""
    root = tmp_path / "data"
    (root / "lat").mkdir(parents=True)
    lines = []
    for i in range(4):
        write_video(root / f"v{i}.mp4", index_frames(6, 8, 8), fps=8)
        _latent(root / "lat" / f"v{i}.pt", frames=6, value=float(i))
        _text_fea(root / "lat" / f"v{i}_text.pt", tokens=3 + i, value=float(i), pooled=request.param)
        lines.append({"video": str(root / f"v{i}.mp4"), "text": f"clip {i}", "latent": str(root / "lat" / f"v{i}.pt"),
                      "text_fea": str(root / "lat" / f"v{i}_text.pt")})  # fmt: skip
    _text_fea(root / "lat" / "empty_text.pt", tokens=1, value=-1.0, pooled=request.param)
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    prepare(root / "data.jsonl", root / "m.parquet", progress=False)
    return root / "m.parquet"


def _config(manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        [*TINY, f"data.manifest={manifest}", f"run_dir={run_dir}", "model.text_encoder=null",
         "checkpoint.every=0", "train.batch_size=2", "model.config={patch_size: [1, 4, 4], hidden_size: 32, "
         "depth: 2, num_heads: 2, pooled_text: false}", *extra],
    )  # fmt: skip


def test_items_read_the_seed_format(pyramid):
    ds = PrecomputedDataset(pyramid, latent_frames=lambda f: f, spec_frames=4)
    item = ds[2]
    assert (
        item["latent"].shape == (3, 4, 8, 8) and item["latent"].dtype == torch.float32
    )  # batch dim dropped, cut
    assert torch.equal(item["latent"], torch.full((3, 4, 8, 8), 2.0))
    assert (
        item["text_emb"].shape == (5, D) and item["text_mask"].tolist() == [True] * 5
    )  # trimmed to the mask
    assert item["text_extras"]["pooled"].shape == (P,) and float(item["text_extras"]["pooled"][0]) == 2.0
    batch = collate_precomputed([ds[0], ds[3]])
    assert batch["latent"].shape == (2, 3, 4, 8, 8) and batch["text_emb"].shape == (2, 6, D)
    assert batch["text_mask"].sum(1).tolist() == [3, 6] and batch["text_extras"]["pooled"].shape == (2, P)


def test_pyramid_normalization_by_hand():
    # get_vae_latent: frame 0 (z - shift) * scale (miniflux: -0.04, 1 / 1.8726), frames 1.. (z + 0.2343) / 3.0986
    z = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(2, 2, 1, 1)
    out = normalize_latent(z, "pyramid_flux")
    assert out[0, 0, 0, 0].item() == pytest.approx((1.0 + 0.04) / 1.8726)
    assert out[0, 1, 0, 0].item() == pytest.approx((2.0 + 0.2343) / 3.0986)
    assert normalize_latent(z, "pyramid_mmdit")[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.1490) / 1.8415)
    assert normalize_latent(z, "none") is z


@pytest.mark.parametrize("pyramid", [False], indirect=True)
def test_trains_without_decoding_a_video_or_loading_a_text_encoder(pyramid, tmp_path, monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("must not be called")

    monkeypatch.setattr(video_io, "decode_clip", no)
    monkeypatch.setattr(text_models.T5TextEncoder, "from_pretrained", no)
    # model.text_encoder=null: there is none to load; caption dropout takes the stored features of "".
    cfg = _config(pyramid, tmp_path / "run", "train.steps=2", "data.empty_text_fea=lat/empty_text.pt")
    trainer = Trainer(cfg)
    assert trainer.precomputed and trainer.cached and trainer.text_encoder is None and trainer.text_dim == D
    assert trainer.empty_mask.tolist() == [True]
    result = trainer.fit()
    assert result.step == 2 and np.isfinite(result.last_loss)


@pytest.mark.parametrize("pyramid", [False], indirect=True)
def test_empty_prompt_features_for_caption_dropout(pyramid, tmp_path):
    # Without a "" row, caption dropout needs data.empty_text_fea (the seed's own null_text_embeds is never
    # set when it trains from text_fea); it is read in the seed's format.
    with pytest.raises(FrameloomError, match="data.empty_text_fea"):
        Trainer(_config(pyramid, tmp_path / "run"))
    cfg = _config(pyramid, tmp_path / "run", "data.empty_text_fea=lat/empty_text.pt")
    trainer = Trainer(cfg)
    assert trainer.empty_emb.shape == (1, D) and float(trainer.empty_emb[0, 0]) == -1.0
    Trainer(_config(pyramid, tmp_path / "run2", "objective.caption_dropout=0"))  # no dropout: nothing needed


@pytest.mark.parametrize("pyramid", [False], indirect=True)
def test_shapes_that_do_not_fit_are_one_line_at_start(pyramid, tmp_path):
    root = pyramid.parent
    _latent(root / "lat" / "v0.pt", frames=6, value=0.0, channels=4)
    with pytest.raises(PrecomputedError, match=r"4 channels, but the model takes 3"):
        Trainer(_config(pyramid, tmp_path / "a", "objective.caption_dropout=0"))
    _latent(root / "lat" / "v0.pt", frames=6, value=0.0, size=16)
    with pytest.raises(PrecomputedError, match=r"16x16 latent grid, but data.height x data.width gives 8x8"):
        Trainer(_config(pyramid, tmp_path / "b", "objective.caption_dropout=0"))
    _latent(root / "lat" / "v0.pt", frames=2, value=0.0)
    with pytest.raises(PrecomputedError, match=r"2 latent frames, data.num_frames needs 4"):
        Trainer(_config(pyramid, tmp_path / "c", "objective.caption_dropout=0"))


@pytest.mark.slow
@pytest.mark.parametrize("pyramid", [False], indirect=True)
def test_rows_without_text_features_are_encoded(pyramid, tmp_path, monkeypatch):
    # Drop text_fea from two rows: those captions go through the configured text encoder, the others keep
    # their stored features; the stored size must then match the encoder's (tiny T5: 32), checked at start.
    import pyarrow.parquet as pq

    table = read_manifest(pyramid)
    fea = table.column("text_fea").to_pylist()
    table = table.set_column(table.column_names.index("text_fea"), "text_fea", [[None, fea[1], None, fea[3]]])
    pq.write_table(table, pyramid)
    monkeypatch.setattr(
        video_io, "decode_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded"))
    )
    cfg = _config(
        pyramid,
        tmp_path / "run",
        "model.text_encoder=tiny-byt5",
        "objective.caption_dropout=0",
        "train.steps=2",
    )
    with pytest.raises(PrecomputedError, match="24 dims per token, but the model takes 32"):
        Trainer(cfg)
    for i in (1, 3):
        emb = torch.zeros(1, 128, 32)
        emb[0, :4] = 0.5
        mask = torch.zeros(1, 128, dtype=torch.int64)
        mask[0, :4] = 1
        torch.save({"prompt_embed": emb, "prompt_attention_mask": mask}, pyramid.parent / fea[i])
    trainer = Trainer(cfg)
    assert trainer.precomputed and not trainer.cached and trainer.text_encoder is not None
    batch = trainer._collate([trainer.dataset[0], trainer.dataset[1]])
    latent, cond = trainer._encode(batch)
    encoded, _ = trainer.text_encoder.encode(["clip 0"])
    assert latent.shape == (2, 3, 4, 8, 8)
    assert torch.allclose(cond.emb[0, : encoded.shape[1]], encoded[0].float())  # row 0: encoded here
    assert cond.mask[1].sum() == 4 and torch.all(cond.emb[1, :4] == 0.5)  # row 1: its stored features
    assert trainer.fit().step == trainer.cfg.train.steps


def test_tensor_files_are_never_unpickled_and_npy_is_read(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "ran"),)

    torch.save({"latent": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PrecomputedError, match="weights_only"):
        load_tensor_file(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()
    np.save(tmp_path / "f.npy", np.ones((1, 4, 2, 2), np.float32))  # fast-DiT: one (1, 4, 32, 32) per image
    assert load_tensor_file(tmp_path / "f.npy").shape == (1, 4, 2, 2)
    np.save(tmp_path / "o.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(PrecomputedError, match="cannot load"):
        load_tensor_file(tmp_path / "o.npy")


# ------------------------------------------------------------------ Pyramid Flow: the jsonl's own files


def _pyramid_jsonl(root: Path) -> Path:
    """A Pyramid Flow jsonl as ``frameloom cache --pyramid-jsonl`` (models/pyramid_flow/files.py) writes it:
    absolute video paths, ``latents/NNNNNN.pt`` raw (1, 16, T, h, w) bf16 VAE latents and ``text/NNNNNN.pt``
    dicts (T5 tokens padded to model.text_max_length with their mask, the pooled CLIP vector), beside the
    jsonl, and ``text/empty.pt`` for "". The videos themselves are gone (the seed trains from the files
    alone). Sizes of the tiny models: 25 frames of 64 x 64 -> (16, 4, 8, 8); T5 32 dims over 16 tokens;
    pooled 32."""
    g = torch.Generator().manual_seed(0)
    (root / "latents").mkdir(parents=True)
    (root / "text").mkdir()

    def text_fea(tokens: int) -> dict:
        emb, mask = torch.zeros(1, 16, 32), torch.zeros(1, 16, dtype=torch.long)
        emb[0, :tokens], mask[0, :tokens] = torch.randn(tokens, 32, generator=g), 1
        return {
            "prompt_embed": emb,
            "prompt_attention_mask": mask,
            "pooled_prompt_embed": torch.randn(1, 32, generator=g),
        }

    lines = []
    for i in range(4):
        torch.save(
            torch.randn(1, 16, 4, 8, 8, generator=g).to(torch.bfloat16), root / "latents" / f"{i:06d}.pt"
        )
        torch.save(text_fea(2 + i), root / "text" / f"{i:06d}.pt")
        lines.append({"video": str(root / f"v{i}.mp4"), "text": f"clip {i}", "latent": f"latents/{i:06d}.pt",
                      "text_fea": f"text/{i:06d}.pt"})  # fmt: skip
    torch.save(text_fea(1), root / "text" / "empty.pt")
    (root / "video_text.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "video_text.jsonl"


def test_pyramid_flow_trains_from_its_jsonl_files_without_a_video_or_text_encoder(tmp_path, monkeypatch):
    import av

    from frameloom import pipeline
    from frameloom.models.pyramid_flow import codec as pyramid_codec
    from frameloom.models.pyramid_flow import family as pyramid_family
    from test_pyramid_train import shrunk

    def no(*args, **kwargs):
        raise AssertionError("must not be called")

    for module, name in [(video_io, "decode_clip"), (av, "open"), (pipeline, "load_text_encoder"),
                         (pyramid_family, "load_text_encoder")]:  # fmt: skip
        monkeypatch.setattr(module, name, no)
    jsonl = _pyramid_jsonl(tmp_path / "data")
    manifest = jsonl.parent / "manifest.parquet"
    summary = prepare(jsonl, manifest, progress=False)  # no video to probe: sized from the latents
    assert summary.kept == 4 and summary.from_latents == 4 and summary.rejected == {}
    assert "4 without their video, sized from their latent file" in summary.line()
    table = read_manifest(manifest)
    assert [table.column(c).to_pylist() for c in ("num_frames", "height", "width")] == [
        [25] * 4,
        [64] * 4,
        [64] * 4,
    ]
    cfg = shrunk(
        "pyramid_flow_miniflux_384p.yaml", manifest, tmp_path / "run", "data.empty_text_fea=text/empty.pt"
    )
    assert cfg.data.require_cache  # the preset's: pre-extracted latent + text_fea satisfy it
    trainer = Trainer(cfg)
    assert trainer.precomputed and trainer.cached and trainer.text_encoder is None and trainer.text_dim == 32
    # latent_normalization auto: the miniflux normalisation of the raw stored latent (the codec's own formula)
    raw = torch.load(jsonl.parent / "latents" / "000002.pt", weights_only=True)
    item = trainer.dataset[2]
    assert torch.equal(item["latent"], pyramid_codec.normalize_latent(raw.float(), "miniflux")[0])
    fea = torch.load(jsonl.parent / "text" / "000002.pt", weights_only=True)
    assert (
        torch.equal(item["text_emb"], fea["prompt_embed"][0, :4]) and item["text_mask"].tolist() == [True] * 4
    )
    assert torch.equal(item["text_extras"]["pooled"], fea["pooled_prompt_embed"][0])
    empty = torch.load(jsonl.parent / "text" / "empty.pt", weights_only=True)
    assert torch.equal(
        trainer.empty_extras["pooled"], empty["pooled_prompt_embed"][0]
    )  # dropout: "" together
    result = trainer.fit()
    assert result.step == 2 and all(np.isfinite(result.losses))


def test_pyramid_flow_files_that_do_not_fit_are_one_line(tmp_path):
    from test_pyramid_train import shrunk

    jsonl = _pyramid_jsonl(tmp_path / "data")
    # without its video, a row stands on its latent: one that cannot be read is rejected with the reason
    good = (jsonl.parent / "latents" / "000003.pt").read_bytes()
    (jsonl.parent / "latents" / "000003.pt").write_bytes(b"not a tensor file")
    summary = prepare(jsonl, tmp_path / "bad" / "m.parquet", progress=False)
    assert summary.kept == 3 and summary.rejected == {"missing": 1}
    [(path, reason, detail)] = [
        tuple(r.values()) for r in csv.DictReader(open(tmp_path / "bad" / "rejected.csv"))
    ]
    assert path.endswith("v3.mp4") and "no such file, and its latent is unusable: " in detail
    (jsonl.parent / "latents" / "000003.pt").write_bytes(good)
    manifest = jsonl.parent / "manifest.parquet"
    prepare(jsonl, manifest, progress=False)
    cfg = shrunk("pyramid_flow_miniflux_384p.yaml", manifest, tmp_path / "run", "data.empty_text_fea=text/empty.pt",
                 "data.height=128")  # fmt: skip
    with pytest.raises(
        PrecomputedError, match=r"a 8x8 latent grid, but its bucket \(25 frames of 128x64\) gives 16x8"
    ):
        Trainer(cfg)
    # a pooled vector of another size than the transformer's pooled_projection_dim (32), then none at all
    fea = torch.load(jsonl.parent / "text" / "000000.pt", weights_only=True)
    torch.save({**fea, "pooled_prompt_embed": torch.zeros(1, 24)}, jsonl.parent / "text" / "000000.pt")
    cfg = shrunk(
        "pyramid_flow_miniflux_384p.yaml", manifest, tmp_path / "run1", "data.empty_text_fea=text/empty.pt"
    )
    with pytest.raises(
        PrecomputedError,
        match=r"text features text/000000.pt have a 'pooled' vector of 24, but the model takes 32",
    ):
        Trainer(cfg)
    torch.save(
        {k: v for k, v in fea.items() if k != "pooled_prompt_embed"}, jsonl.parent / "text" / "000000.pt"
    )
    with pytest.raises(PrecomputedError, match=r"text/000000.pt have no 'pooled' vector"):
        Trainer(cfg)
    torch.save(fea, jsonl.parent / "text" / "000000.pt")
    # one row without text features: its caption would be encoded every step, which require_cache refuses
    import pyarrow.parquet as pq

    table = read_manifest(manifest)
    fea = table.column("text_fea").to_pylist()
    table = table.set_column(table.column_names.index("text_fea"), "text_fea", [[None, *fea[1:]]])
    pq.write_table(table, manifest)
    cfg = shrunk(
        "pyramid_flow_miniflux_384p.yaml", manifest, tmp_path / "run2", "data.empty_text_fea=text/empty.pt"
    )
    with pytest.raises(FrameloomError, match="require_cache=true: 1 of 4 rows .* no text_fea file"):
        Trainer(cfg)
