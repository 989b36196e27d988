"""Every dialect: a fixture in its exact layout (real mp4s), prepare reads it, convert writes it back, round
trips keep the fields both formats express, auto-detection, pickle refusal and path safety."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from frameloom.cli import main
from frameloom.data.dialects import (
    DIALECTS,
    convert_manifest,
    detect_format,
    opensora,
    read_dialect,
    write_dialect,
)
from frameloom.data.dialects.opensora import read_opensora
from frameloom.data.dialects.pyramid import load_tensor
from frameloom.data.manifest import read_manifest
from frameloom.data.prepare import NothingKept, prepare
from frameloom.errors import FrameloomError
from media import index_frames, write_image, write_video

# The media every fixture shares: (relative path, frames, height, width, fps); c.jpg is an image.
MEDIA = {
    "clips/a.mp4": (30, 16, 16, 24.0),
    "clips/b.mp4": (20, 16, 32, 12.0),
    "stills/c.jpg": (1, 8, 12, 0.0),
}

# What each dialect can express besides path and the probed measurements.
EXPRESSES = {
    "folder": {
        "text",
        "captions",
        "aesthetic",
        "cut_start",
        "cut_end",
        "crop",
        "tech",
        "motion",
        "latent",
        "text_fea",
        "condition_image",
    },
    "opensora": {
        "text",
        "captions",
        "aesthetic",
        "cut_start",
        "cut_end",
        "crop",
        "tech",
        "motion",
        "latent",
        "text_fea",
        "condition_image",
    },
    "opensora-plan": {"text", "captions", "aesthetic", "cut_start", "cut_end", "crop", "tech", "motion"},
    "cogvideox": {"text", "condition_image"},
    "pyramid": {"text", "latent", "text_fea"},
}
MEASURED = ("num_frames", "height", "width", "fps", "is_image")


def _media(root: Path) -> None:
    for rel, (frames, h, w, fps) in MEDIA.items():
        if rel.endswith(".jpg"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_image(root / rel, np.full((h, w, 3), 90, np.uint8))
        else:
            write_video(root / rel, index_frames(frames, h, w), fps=fps)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def make_layout(fmt: str, root: Path) -> Path:
    """The fixture data set of ``fmt`` under ``root``; returns the SOURCE to pass to prepare."""
    _media(root)
    if fmt == "folder":
        (root / "clips" / "a.txt").write_text("a red square\n")  # sidecar caption
        lines = [
            {"path": "clips/a.mp4", "aesthetic": 6.0, "crop": [0, 16, 0, 8]},
            {"path": "clips/b.mp4", "text": "b blue", "cut_start": 2, "cut_end": 18},
            {"path": "stills/c.jpg", "text": "c still"},
        ]
        (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return root
    if fmt == "opensora":
        _csv(
            root / "meta.csv",
            ["path", "text", "num_frames", "height", "width", "aspect_ratio", "resolution", "fps", "aes"],
            [
                ["clips/a.mp4", "a red square", 30, 16, 16, 1.0, 256, 24.0, 6.0],
                ["clips/b.mp4", "b blue", "", "", "", "", "", "", ""],  # prepare probes the rest
                ["stills/c.jpg", "c still", 1, 8, 12, 0.667, 96, 0.0, 3.0],
            ],
        )
        return root / "meta.csv"
    if fmt == "opensora-plan":
        records = [
            {
                "path": "clips/a.mp4",
                "cap": ["a red square", "a square, red"],
                "resolution": {"height": 16, "width": 16},
                "num_frames": 18,  # the seed reads frames [cut[0], cut[0] + num_frames) = [2, 20)
                "fps": 24,
                "aesthetic": 6.1,
                "cut": [2, 20],
                "crop": [0, 16, 0, 8],
                "tech": 0.5,
                "motion": 0.9,
            },
            {
                "path": "clips/b.mp4",
                "cap": "b blue",
                "resolution": {"height": 16, "width": 32},
                "num_frames": 20,
                "fps": 12,
                "aes": 3.0,
            },
            {"path": "stills/c.jpg", "cap": ["c still"], "resolution": {"height": 8, "width": 12}},
        ]
        (root / "anno.json").write_text(json.dumps(records))
        (root / "data.txt").write_text(f"{root},{root / 'anno.json'}\n")
        return root / "data.txt"
    if fmt == "cogvideox":
        (root / "prompts.txt").write_text("a red square\n\nb blue\n")  # an empty line is skipped
        (root / "videos.txt").write_text("clips/a.mp4\nclips/b.mp4\n")
        (root / "images.txt").write_text("stills/c.jpg\nstills/c.jpg\n")
        return root
    if fmt == "pyramid":
        (root / "lat").mkdir()
        torch.save(torch.zeros(4, 2, 2, 2), root / "lat" / "a.pt")
        torch.save(torch.ones(3, 8), root / "lat" / "a_text.pt")
        lines = [
            {
                "video": "clips/a.mp4",
                "text": "a red square",
                "latent": "lat/a.pt",
                "text_fea": "lat/a_text.pt",
            },
            {"video": "clips/b.mp4", "text": "b blue"},
            {"image": "stills/c.jpg", "text": "c still"},
        ]
        (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return root / "data.jsonl"
    raise AssertionError(fmt)


def _rows(manifest: Path) -> dict[str, dict]:
    """Manifest rows keyed by the real path of their file, path columns made absolute and real."""
    base = manifest.resolve().parent
    out = {}
    for row in read_manifest(manifest).to_pylist():
        for name in ("path", "latent", "text_fea", "condition_image"):
            if row.get(name) is not None:
                row[name] = str((base / row[name]).resolve())
        out[row["path"]] = row
    return out


def _pick(row: dict, names) -> dict:
    return {n: row.get(n) for n in sorted(names)}


# ------------------------------------------------------------------------------------ each dialect


@pytest.mark.parametrize("fmt", DIALECTS)
def test_detect_format(tmp_path, fmt):
    assert detect_format(make_layout(fmt, tmp_path / fmt)) == fmt


def test_detect_format_errors(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(FrameloomError, match="cannot tell the format"):
        detect_format(tmp_path / "notes.md")
    with pytest.raises(FrameloomError, match="not found"):
        detect_format(tmp_path / "nope")


def test_prepare_folder(tmp_path):
    source = make_layout("folder", tmp_path / "d")
    summary = prepare(source, source / "m.parquet", progress=False)
    assert summary.fmt == "folder" and summary.kept == 3 and summary.rejected == {}
    rows = {r["path"]: r for r in read_manifest(source / "m.parquet").to_pylist()}
    assert rows["clips/a.mp4"]["text"] == "a red square" and rows["clips/a.mp4"]["crop"] == [0, 16, 0, 8]
    assert (rows["clips/b.mp4"]["cut_start"], rows["clips/b.mp4"]["cut_end"]) == (2, 18)


def test_prepare_opensora_probes_missing_columns(tmp_path):
    source = make_layout("opensora", tmp_path / "d")
    summary = prepare(source, tmp_path / "d" / "m.parquet", progress=False)
    assert summary.fmt == "opensora" and summary.kept == 3 and summary.corrected == 0
    rows = {r["path"]: r for r in read_manifest(tmp_path / "d" / "m.parquet").to_pylist()}
    b = rows["clips/b.mp4"]  # only path and text were given
    assert (b["num_frames"], b["height"], b["width"], b["fps"]) == (20, 16, 32, 12.0)
    assert b["aspect_ratio"] == 0.5 and b["resolution"] == 512
    assert rows["clips/a.mp4"]["aesthetic"] == 6.0  # Open-Sora's "aes"
    assert rows["stills/c.jpg"]["is_image"] is True


def test_prepare_opensora_plan_fields(tmp_path):
    source = make_layout("opensora-plan", tmp_path / "d")
    summary = prepare(source, tmp_path / "d" / "m.parquet", progress=False)
    assert summary.fmt == "opensora-plan" and summary.kept == 3
    rows = {r["path"]: r for r in read_manifest(tmp_path / "d" / "m.parquet").to_pylist()}
    a = rows["clips/a.mp4"]
    assert a["text"] == "a red square" and a["captions"] == ["a red square", "a square, red"]
    assert (a["cut_start"], a["cut_end"], a["crop"]) == (2, 20, [0, 16, 0, 8])
    assert (a["aesthetic"], a["tech"], a["motion"]) == (6.1, 0.5, 0.9)
    assert rows["clips/b.mp4"]["aesthetic"] == 3.0 and rows["clips/b.mp4"]["captions"] is None  # one caption
    assert rows["stills/c.jpg"]["is_image"] is True


def test_prepare_cogvideox_and_pyramid(tmp_path):
    cog = make_layout("cogvideox", tmp_path / "cog")
    assert prepare(cog, cog / "m.parquet", progress=False).kept == 2
    rows = {r["path"]: r for r in read_manifest(cog / "m.parquet").to_pylist()}
    assert (
        rows["clips/b.mp4"]["text"] == "b blue" and rows["clips/b.mp4"]["condition_image"] == "stills/c.jpg"
    )

    pyr = make_layout("pyramid", tmp_path / "pyr")
    assert prepare(pyr, tmp_path / "pyr" / "m.parquet", progress=False).kept == 3
    rows = {r["path"]: r for r in read_manifest(tmp_path / "pyr" / "m.parquet").to_pylist()}
    assert (rows["clips/a.mp4"]["latent"], rows["clips/a.mp4"]["text_fea"]) == ("lat/a.pt", "lat/a_text.pt")
    assert rows["stills/c.jpg"]["is_image"] is True
    assert torch.equal(load_tensor(tmp_path / "pyr" / rows["clips/a.mp4"]["latent"]), torch.zeros(4, 2, 2, 2))


def test_cogvideox_line_counts_must_match(tmp_path):
    root = make_layout("cogvideox", tmp_path / "cog")
    (root / "videos.txt").write_text("clips/a.mp4\n")
    with pytest.raises(FrameloomError, match="prompts.txt has 2 entries but videos.txt has 1"):
        prepare(root, root / "m.parquet", progress=False)


# --------------------------------------------------------------------------- convert writes it back


@pytest.mark.parametrize("fmt", DIALECTS)
def test_convert_writes_the_layout_back(tmp_path, fmt):
    # prepare the fixture, convert the manifest back into the same root: the new files list the same
    # entries with the same fields as the originals (paths relative to the root, as in the fixture).
    source = make_layout(fmt, tmp_path / "d")
    root = tmp_path / "d"
    before = read_dialect(fmt, source)
    prepare(source, root / "m.parquet", progress=False)
    outputs = {
        "folder": root,
        "opensora": root / "meta_back.csv",
        "opensora-plan": root / "back.txt",
        "cogvideox": root,
        "pyramid": root / "back.jsonl",
    }
    if fmt == "folder":
        (root / "captions.jsonl").unlink()  # the writer refuses to leave two caption tables
    result = convert_manifest(root / "m.parquet", fmt, outputs[fmt])
    after = read_dialect(fmt, outputs[fmt] if fmt not in ("folder", "cogvideox") else root)
    assert result.rows == len(after.entries)

    def listed(listing):
        return {
            e.path: {k: v for k, v in e.fields.items() if k in EXPRESSES[fmt] and v not in (None, "")}
            for e in listing.entries
        }

    assert listed(after) == listed(before)
    if fmt == "opensora-plan":
        text = (root / "back.txt").read_text().strip()
        assert text == f"{root.resolve()},{root.resolve() / 'back.json'}"
        records = json.loads((root / "back.json").read_text())
        assert records[0]["resolution"] == {"height": 16, "width": 16} and records[0]["cut"] == [2, 20]


@pytest.mark.parametrize("k", [10_000, 2])
def test_opensora_memory_efficient_layout_written_and_read_as_the_seed(tmp_path, monkeypatch, k):
    # Open-Sora 2.0 scripts/cnv/shard.py: X.parquet plus X/00001.parquet... with ceil(N / K) rows per shard
    # (K = 10000) and without the measured columns; the seed reads path + the six measured columns from
    # X.parquet and the rest of row i from shard i // ceil(N / K). K = 2 gives shards of 2 rows and 1 row.
    monkeypatch.setattr(opensora, "EFFICIENT_SHARDS", k)
    source = make_layout("opensora", tmp_path / "d")
    prepare(source, tmp_path / "d" / "m.parquet", progress=False)
    main_file = tmp_path / "out" / "meta.parquet"
    (tmp_path / "out" / "meta").mkdir(parents=True)
    (tmp_path / "out" / "meta" / "00009.parquet").write_bytes(b"stale")  # a leftover of a larger write
    result = convert_manifest(tmp_path / "d" / "m.parquet", "opensora", main_file, memory_efficient=True)
    expected = (
        ["00001.parquet", "00002.parquet", "00003.parquet"] if k > 3 else ["00001.parquet", "00002.parquet"]
    )
    assert [p.name for p in sorted((tmp_path / "out" / "meta").iterdir())] == expected
    assert result.rows == 3 and [f.name for f in result.files] == ["meta.parquet", *expected]
    first = pq.read_table(tmp_path / "out" / "meta" / "00001.parquet")
    assert first.num_rows == (1 if k > 3 else 2)
    assert "num_frames" not in first.column_names and "fps" not in first.column_names
    assert first.column("text").to_pylist()[0] == "a red square"
    # The seed reads only the measured columns from X.parquet: keep only those, the texts come from shards.
    slim = pq.read_table(main_file, columns=list(opensora.EFFICIENT_MAIN))
    pq.write_table(slim, main_file)
    listing = read_dialect("auto", main_file)
    entries = listing.entries
    assert [e.fields["text"] for e in entries] == ["a red square", "b blue", "c still"]
    assert [e.fields["num_frames"] for e in entries] == [30, 20, 1]
    summary = prepare(main_file, tmp_path / "m2.parquet", progress=False, trust_metadata=True)
    assert summary.kept == 3
    # A shard whose paths differ from X.parquet's rows is an error naming the shard.
    shard = tmp_path / "out" / "meta" / "00001.parquet"
    pq.write_table(first.set_column(0, "path", pa.array(["x.mp4"] * first.num_rows)), shard)
    with pytest.raises(FrameloomError, match="00001.parquet: its paths differ"):
        _ = read_dialect("opensora", main_file).entries


def test_opensora_folder_of_parquet_files_is_read_in_name_order(tmp_path):
    source = make_layout("opensora", tmp_path / "d")
    prepare(source, tmp_path / "d" / "m.parquet", progress=False)
    table = read_manifest(tmp_path / "d" / "m.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(table.slice(2), shards / "b.parquet")
    pq.write_table(table.slice(0, 2), shards / "a.parquet")
    assert detect_format(shards) == "opensora"
    listing = read_opensora(shards)
    assert [Path(e.path).name for e in listing.entries] == ["a.mp4", "b.mp4", "c.jpg"]


# ----------------------------------------------------------------------------------------- round trips

# Where a converted copy goes inside its fresh folder ("": the folder itself).
OUT_NAME = {
    "folder": "",
    "opensora": "out.csv",
    "opensora-plan": "data.txt",
    "cogvideox": "",
    "pyramid": "out.jsonl",
}
PAIRS = [(a, b) for a in DIALECTS for b in DIALECTS if a != b]


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_round_trip_keeps_shared_fields(tmp_path, a, b):
    # A -> manifest -> B -> manifest -> A -> manifest: every field both A and B express is unchanged, and so
    # are the probed measurements. Outputs go to fresh folders (absolute paths into the media root).
    media = tmp_path / "media"
    first = tmp_path / "m1" / "m.parquet"
    prepare(make_layout(a, media), first, progress=False)
    convert_manifest(first, b, tmp_path / "b" / OUT_NAME[b])
    second = tmp_path / "m2" / "m.parquet"
    prepare(tmp_path / "b" / OUT_NAME[b], second, fmt=b, progress=False, extra_roots=[media])
    convert_manifest(second, a, tmp_path / "a" / OUT_NAME[a])
    third = tmp_path / "m3" / "m.parquet"
    prepare(tmp_path / "a" / OUT_NAME[a], third, fmt=a, progress=False, extra_roots=[media])

    shared = (EXPRESSES[a] & EXPRESSES[b]) | set(MEASURED)
    one, three = _rows(first), _rows(third)
    if "cogvideox" in (a, b):
        one = {p: r for p, r in one.items() if not r["is_image"]}  # CogVideoX lists videos only
    assert sorted(three) == sorted(one)
    for path in one:
        assert _pick(three[path], shared) == _pick(one[path], shared), path


# ------------------------------------------------------------------------------------ metadata policy


def test_probed_values_replace_given_ones_unless_trusted(tmp_path):
    root = tmp_path / "d"
    _media(root)
    _csv(
        root / "meta.csv",
        ["path", "text", "num_frames", "height", "width", "fps"],
        [["clips/a.mp4", "a", 99, 16, 16, 24.0], ["clips/gone.mp4", "x", 10, 16, 16, 24.0]],
    )
    summary = prepare(root / "meta.csv", root / "m.parquet", progress=False)
    assert summary.corrected == 1 and "1 with metadata corrected by probing" in summary.line()
    assert read_manifest(root / "m.parquet").column("num_frames").to_pylist() == [30]
    assert summary.rejected == {"missing": 1}
    # --trust-metadata: the seeds' way: given values kept, files only checked to exist.
    trusted = prepare(root / "meta.csv", root / "t.parquet", progress=False, trust_metadata=True)
    assert trusted.corrected == 0 and trusted.rejected == {"missing": 1}
    table = read_manifest(root / "t.parquet")
    assert table.column("num_frames").to_pylist() == [99] and table.column("resolution").to_pylist() == [256]


def test_bad_cut_and_crop_are_rejected(tmp_path):
    root = tmp_path / "d"
    _media(root)
    records = [
        # the seed reads frames [cut[0], cut[0] + num_frames) = [5, 105) of a 30-frame file (cut[1] is unread)
        {
            "path": "clips/a.mp4",
            "cap": ["x"],
            "resolution": {"height": 16, "width": 16},
            "cut": [5, 6],
            "num_frames": 100,
        },
        {
            "path": "clips/b.mp4",
            "cap": ["y"],
            "resolution": {"height": 16, "width": 32},
            "crop": [0, 64, 0, 8],
        },
        {"cap": ["no path"]},
    ]
    (root / "anno.json").write_text(json.dumps(records))
    with pytest.raises(NothingKept) as info:
        prepare(root / "anno.json", root / "m.parquet", fmt="opensora-plan", progress=False)
    assert info.value.summary.rejected == {"bad_cut": 1, "bad_crop": 1, "bad_entry": 1}
    with open(root / "rejected.csv", newline="") as fh:
        details = {r["reason"]: r["detail"] for r in csv.DictReader(fh)}
    assert (
        "[5, 105)" in details["bad_cut"]
        and "30 frames" in details["bad_cut"]
        and "32x16" in details["bad_crop"]
    )


# ------------------------------------------------------------------------------------------------ pickle


def test_pickle_annotations_need_the_flag(tmp_path, capsys):
    root = tmp_path / "d"
    _media(root)
    record = {"path": "clips/a.mp4", "cap": ["from a pickle"], "resolution": {"height": 16, "width": 16}}
    with open(root / "anno.pkl", "wb") as fh:
        pickle.dump([record], fh)
    (root / "data.txt").write_text(f"{root},{root / 'anno.pkl'}\n")
    with pytest.raises(FrameloomError, match="loading a pickle can run arbitrary code"):
        prepare(root / "data.txt", root / "m.parquet", progress=False)
    assert main(["prepare", str(root / "data.txt"), "--out", str(root / "m.parquet"), "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    args = ["prepare", str(root / "data.txt"), "--out", str(root / "m.parquet"), "--quiet", "--allow-pickle"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("opensora-plan: kept 1,")
    assert read_manifest(root / "m.parquet").column("text").to_pylist() == ["from a pickle"]


class _Payload:
    """Unpickling this calls os.makedirs(target): the code a crafted tensor file would run."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_tensor_files_load_with_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"latent": torch.zeros(2), "x": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(FrameloomError, match="weights_only"):
        load_tensor(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- path safety


def _escape_layout(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_video(root / "in.mp4", index_frames(6, 16, 16), fps=12)
    write_video(outside / "secret.mp4", index_frames(6, 16, 16), fps=12)
    (root / "link_out.mp4").symlink_to(outside / "secret.mp4")
    (root / "link_in.mp4").symlink_to(root / "in.mp4")
    return root, outside


def test_paths_escaping_the_root_are_rejected(tmp_path):
    root, outside = _escape_layout(tmp_path)
    _csv(
        root / "meta.csv",
        ["path", "text"],
        [
            ["in.mp4", "inside"],
            ["link_in.mp4", "a link that stays inside"],
            ["../outside/secret.mp4", "dot-dot"],
            [str(outside / "secret.mp4"), "absolute elsewhere"],
            ["link_out.mp4", "a link out"],
            ["sub/../in.mp4", "dot-dot that stays inside"],
        ],
    )
    # Open-Sora's tools write absolute paths: accepted as written. A relative path may not lead out, by '..'
    # or through a symlink.
    summary = prepare(root / "meta.csv", root / "m.parquet", progress=False)
    assert summary.kept == 4 and summary.rejected == {"outside_root": 2}
    kept = read_manifest(root / "m.parquet").column("path").to_pylist()
    assert kept == ["in.mp4", "link_in.mp4", str(outside / "secret.mp4"), "in.mp4"]
    with open(root / "rejected.csv", newline="") as fh:
        rejected = {r["path"]: r for r in csv.DictReader(fh)}
    assert {r["reason"] for r in rejected.values()} == {"outside_root"}
    assert (
        "symlink" in rejected["link_out.mp4"]["detail"]
        and "'..'" in rejected["../outside/secret.mp4"]["detail"]
    )
    # --strict-roots: absolute paths must lie under the root too.
    strict = prepare(root / "meta.csv", root / "s.parquet", progress=False, strict_roots=True)
    assert strict.kept == 3 and strict.rejected == {"outside_root": 3}

    # An allowed extra root lets them in (the flag and the config key).
    assert prepare(root / "meta.csv", root / "m.parquet", progress=False, extra_roots=[outside]).kept == 6
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  extra_roots: [outside]\n")  # relative to the config's folder
    assert (
        main(
            [
                "prepare",
                str(root / "meta.csv"),
                "--out",
                str(root / "c.parquet"),
                "--quiet",
                "--config",
                str(cfg),
            ]
        )
        == 0
    )
    assert read_manifest(root / "c.parquet").num_rows == 6
    assert (
        main(
            [
                "prepare",
                str(root / "meta.csv"),
                "--out",
                str(root / "f.parquet"),
                "--quiet",
                "--allow-root",
                str(outside),
            ]
        )
        == 0
    )
    assert read_manifest(root / "f.parquet").num_rows == 6


def test_escapes_in_every_dialect_and_in_tensor_paths(tmp_path):
    root, outside = _escape_layout(tmp_path)
    torch.save(torch.zeros(2), outside / "lat.pt")
    lines = [
        {"video": "in.mp4", "text": "ok"},
        {"video": "link_out.mp4", "text": "symlink out"},
        {"video": "in.mp4", "text": "latent outside", "latent": "../outside/lat.pt"},
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert prepare(root / "data.jsonl", root / "p.parquet", progress=False).rejected == {"outside_root": 2}

    (root / "prompts.txt").write_text("a\nb\n")
    (root / "videos.txt").write_text("in.mp4\n../outside/secret.mp4\n")
    assert prepare(root, root / "c.parquet", progress=False).rejected == {"outside_root": 1}

    # Open-Sora-Plan: entries are relative to their DATA_ROOT; an absolute path elsewhere escapes it.
    record = {"path": str(outside / "secret.mp4"), "cap": ["x"], "resolution": {"height": 16, "width": 16}}
    (root / "anno.json").write_text(json.dumps([record, {**record, "path": "in.mp4"}]))
    (root / "data.txt").write_text(f"{root},{root / 'anno.json'}\n")
    summary = prepare(root / "data.txt", root / "o.parquet", progress=False)
    assert summary.kept == 1 and summary.rejected == {"outside_root": 1}

    # The folder dialect: a caption table entry pointing out of the folder.
    folder = tmp_path / "folder"
    write_video(folder / "x.mp4", index_frames(6, 16, 16), fps=12)
    (folder / "captions.jsonl").write_text(
        json.dumps({"path": str(outside / "secret.mp4"), "text": "x"}) + "\n"
    )
    assert prepare(folder, folder / "m.parquet", progress=False).rejected == {"outside_root": 1}


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_convert(tmp_path, capsys):
    source = make_layout("pyramid", tmp_path / "d")
    assert main(["prepare", str(source), "--out", str(tmp_path / "d" / "m.parquet"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("pyramid: kept 3, rejected 0")
    out = tmp_path / "d" / "os.csv"
    assert main(["convert", str(tmp_path / "d" / "m.parquet"), "--to", "opensora", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("wrote 3 rows to ")
    header = out.read_text().splitlines()[0].replace('"', "").split(",")
    assert header[:8] == [
        "path",
        "text",
        "num_frames",
        "height",
        "width",
        "aspect_ratio",
        "resolution",
        "fps",
    ]
    assert main(["convert", str(tmp_path / "nope.parquet"), "--to", "pyramid", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "d" / "m.parquet"), "--to", "webdataset", "--out", str(out)])
    # CogVideoX cannot list images: the writer says so.
    result = write_dialect(
        "cogvideox", read_manifest(tmp_path / "d" / "m.parquet"), tmp_path / "cog", base=tmp_path / "d"
    )
    assert result.rows == 2 and any("1 image rows left out" in n for n in result.notes)
