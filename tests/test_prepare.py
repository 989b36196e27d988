"""The folder dialect and ``prepare``: captions, extra columns, rejects with reasons, summary counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from frameloom.cli import main
from frameloom.data.dialects.folder import read_folder
from frameloom.data.manifest import read_manifest, resolve_path
from frameloom.data.prepare import NothingKept, PrepareSummary, prepare
from frameloom.errors import FrameloomError
from media import index_frames, write_audio, write_image, write_video


def _clip(path: Path, frames: int = 8, size=(16, 16), codec: str = "libx264") -> Path:
    return write_video(path, index_frames(frames, *size), fps=12, codec=codec)


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "data"
    _clip(root / "a.mp4")
    (root / "a.txt").write_text("  a clip with a sidecar caption \n")
    _clip(root / "sub" / "b.mkv", frames=10, size=(16, 32))
    _clip(root / "c.avi", frames=6, size=(17, 33), codec="mpeg4")
    write_image(root / "d.png", np.full((8, 12, 3), 50, np.uint8))
    (root / "notes.txt").write_text("not a sample")
    (root / ".hidden").mkdir()
    _clip(root / ".hidden" / "skip.mp4")
    _csv(
        root / "captions.csv",
        ["path", "text", "color", "score"],
        [
            ["a.mp4", "ignored: the sidecar wins", "red", 1.5],
            ["sub/b.mkv", "a blue thing", "blue", 2.5],
            ["./d.png", "a picture", "grey", 3.0],
            ["gone.mp4", "listed but missing", "green", 0.0],
        ],
    )
    return root


def test_read_folder_captions_and_extras(folder):
    rows, rejects = read_folder(folder)
    by_path = {r["path"]: r for r in rows}
    assert sorted(by_path) == ["a.mp4", "c.avi", "d.png", "sub/b.mkv"]
    assert by_path["a.mp4"]["text"] == "a clip with a sidecar caption"
    assert by_path["a.mp4"]["color"] == "red"  # extra columns still apply with a sidecar caption
    assert by_path["sub/b.mkv"]["text"] == "a blue thing"
    assert by_path["sub/b.mkv"]["score"] == 2.5  # numeric columns stay numeric
    assert by_path["d.png"]["text"] == "a picture"
    assert by_path["c.avi"]["text"] == ""  # no caption: kept, unconditional
    assert rejects == [("gone.mp4", "missing")]


def test_read_folder_jsonl(tmp_path):
    _clip(tmp_path / "x.mp4")
    _clip(tmp_path / "y.mp4")
    lines = [{"path": "x.mp4", "text": "ex", "direction": "left"}, {"path": "y.mp4", "text": "why"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows, rejects = read_folder(tmp_path)
    assert rows == [
        {"path": "x.mp4", "text": "ex", "direction": "left"},
        {"path": "y.mp4", "text": "why"},
    ]
    assert rejects == []


def test_read_folder_errors(tmp_path):
    with pytest.raises(FrameloomError):
        read_folder(tmp_path / "nowhere")
    _clip(tmp_path / "x.mp4")
    _csv(tmp_path / "captions.csv", ["path", "text"], [["x.mp4", "one"]])
    (tmp_path / "captions.jsonl").write_text(json.dumps({"path": "x.mp4", "text": "two"}) + "\n")
    with pytest.raises(FrameloomError, match="two captions"):
        read_folder(tmp_path)
    (tmp_path / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(FrameloomError, match="line 1"):
        read_folder(tmp_path)


def test_prepare_writes_manifest_and_rejects(folder):
    # Bad files among the good ones: each must be rejected with its reason, none may stop the run.
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("a caption saved with the wrong name\n" * 5)
    write_audio(folder / "song.m4v", codec="aac")  # audio in an mp4 container with a video suffix
    good = _clip(folder / "whole.mp4", frames=30)
    (folder / "half.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    out = folder / "manifest.parquet"
    summary = prepare(folder, out, fmt="folder", workers=2, progress=False)

    assert isinstance(summary, PrepareSummary)
    assert summary.kept == 5 and summary.uncaptioned == 2  # c.avi and whole.mp4
    assert summary.rejected == {
        "missing": 1,
        "empty": 1,
        "not_media": 1,
        "no_video_stream": 1,
        "undecodable": 1,
    }
    assert summary.manifest == out and summary.rejected_csv == folder / "rejected.csv"
    line = summary.line()
    assert line.startswith("kept 5 (2 without caption), rejected 5 (missing: 1, empty: 1, not_media: 1, ")
    assert line.endswith(" s") and "\n" not in line

    table = read_manifest(out)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["a.mp4", "c.avi", "d.png", "sub/b.mkv", "whole.mp4"]
    b = rows["sub/b.mkv"]
    assert (b["num_frames"], b["height"], b["width"], b["fps"]) == (10, 16, 32, 12.0)
    assert b["aspect_ratio"] == pytest.approx(0.5) and b["resolution"] == 512
    assert b["color"] == "blue" and b["score"] == 2.5 and b["text"] == "a blue thing"
    assert rows["c.avi"]["codec"] == "mpeg4" and (rows["c.avi"]["height"], rows["c.avi"]["width"]) == (17, 33)
    assert rows["d.png"]["is_image"] is True and rows["d.png"]["num_frames"] == 1
    assert rows["a.mp4"]["text"] == "a clip with a sidecar caption"
    assert resolve_path(out, "a.mp4") == (folder / "a.mp4").resolve()

    with open(summary.rejected_csv, newline="") as fh:
        rejected = {r["path"]: (r["reason"], r["detail"]) for r in csv.DictReader(fh)}
    assert {p: reason for p, (reason, _) in rejected.items()} == {
        "gone.mp4": "missing",
        "zero.mp4": "empty",
        "text.mp4": "not_media",
        "song.m4v": "no_video_stream",
        "half.mp4": "undecodable",
    }
    assert all(detail for _, detail in rejected.values())


def test_prepare_manifest_elsewhere_uses_absolute_paths(folder, tmp_path):
    out = tmp_path / "manifests" / "m.csv"
    summary = prepare(folder, out, workers=1, progress=False)  # fmt auto: a folder
    assert summary.kept == 4
    table = read_manifest(out)
    for path in table.column("path").to_pylist():
        assert Path(path).is_absolute() and Path(path).exists()
    assert (out.parent / "rejected.csv").exists()


def test_prepare_that_keeps_nothing_is_an_error(tmp_path, capsys):
    # An empty folder, and a source whose every entry is rejected: exit 2 with the summary and the fix, no
    # manifest (an empty one would only fail later), rejected.csv written.
    (tmp_path / "src").mkdir()
    with pytest.raises(NothingKept, match="kept 0, rejected 0 in .*the source lists no entries") as info:
        prepare(tmp_path / "src", tmp_path / "m.parquet", progress=False)
    assert info.value.summary.kept == 0 and not (tmp_path / "m.parquet").exists()
    _csv(
        tmp_path / "meta.csv",
        ["path", "text"],
        [["../elsewhere/a.mp4", "x"], ["gone.mp4", "y"], ["../b.mp4", "z"]],
    )
    argv = ["prepare", str(tmp_path / "meta.csv"), "--out", str(tmp_path / "m.parquet"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rejected 3 (missing: 1, outside_root: 2)" in err
    assert "--allow-root" in err and not (tmp_path / "m.parquet").exists()
    assert (tmp_path / "rejected.csv").read_text().count("\n") == 4


def test_prepare_format_errors(tmp_path, folder):
    with pytest.raises(FrameloomError, match="not found"):
        prepare(tmp_path / "nope", tmp_path / "m.parquet")
    file = tmp_path / "meta.csv"
    file.write_text("path,text\n")
    with pytest.raises(NothingKept, match="lists no entries"):  # an Open-Sora table with no rows
        prepare(file, tmp_path / "m.parquet", fmt="auto", progress=False)
    with pytest.raises(FrameloomError, match="no .parquet shards"):
        prepare(folder, tmp_path / "m.parquet", fmt="opensora")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(FrameloomError, match="cannot tell the format"):
        prepare(tmp_path / "notes.md", tmp_path / "m.parquet", fmt="auto")
    with pytest.raises(FrameloomError, match="unknown format"):
        prepare(folder, tmp_path / "m.parquet", fmt="webdataset")
    with pytest.raises(FrameloomError, match="needs a folder"):
        prepare(file, tmp_path / "m.parquet", fmt="folder")
