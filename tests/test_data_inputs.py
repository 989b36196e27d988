"""Data sets as the seeds lay them out and as users break them: containers FFmpeg reads under any name,
caption files that obey the path rules, Open-Sora-Plan's num_frames from cut[0], CogVideoX's line pairing,
trusted metadata that cannot be right, path rules at every entry point, and one clear line for every bad
input (exit 2, no traceback)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data.dialects import convert_manifest, read_dialect
from frameloom.data.dialects.cogvideox import EMPTY_CAPTION, seed_lines
from frameloom.data.manifest import from_rows, load_manifest, read_manifest, write_manifest
from frameloom.data.prepare import prepare
from frameloom.data.sampler import build_sampler
from frameloom.data.video import ClipSpec, decode_clip
from frameloom.errors import FrameloomError
from media import frame_index_of, index_frames, write_video


def _rejects(manifest: Path) -> dict[str, tuple[str, str]]:
    with open(manifest.parent / "rejected.csv", newline="") as fh:
        return {r["path"]: (r["reason"], r["detail"]) for r in csv.DictReader(fh)}


# ------------------------------------------------------------------------------- folders: what is a video


CONTAINERS = [
    ("a.ogv", "libvpx", 12),
    ("b.mpg", "mpeg1video", 25),
    ("c.flv", "flv", 12),
    ("d.wmv", "wmv2", 12),
    ("e.ts", "mpeg2video", 25),
    ("f.y4m", "rawvideo", 12),
    ("g.mxf", "mpeg2video", 25),
]


def test_every_container_ffmpeg_reads_is_a_sample_and_skipped_files_are_counted(tmp_path):
    root = tmp_path / "d"
    for name, codec, fps in CONTAINERS:
        write_video(root / name, index_frames(8, 16, 16), fps=fps, codec=codec)
    write_video(root / "clip.mp4", index_frames(8, 16, 16), fps=12).rename(
        root / "clip.weird"
    )  # unknown suffix
    (root / "notes.xyz").write_text("not media\n" * 20)  # unknown suffix, probed, not media
    (root / "orphan.txt").write_text("a caption without a video")
    (root / "a.txt").write_text("the ogv's caption")
    (root / ".DS_Store").write_bytes(b"\0" * 10)
    summary = prepare(root, root / "m.parquet", progress=False)
    rows = {r["path"]: r for r in read_manifest(root / "m.parquet").to_pylist()}
    assert sorted(rows) == sorted([n for n, _, _ in CONTAINERS] + ["clip.weird"])
    assert rows["a.ogv"]["text"] == "the ogv's caption" and rows["a.ogv"]["codec"] == "vp8"
    assert all(r["num_frames"] == 8 for r in rows.values())
    assert summary.rejected == {} and summary.ignored == {"not_media": 2, "hidden": 1}
    assert summary.line().startswith(
        "kept 8 (7 without caption), rejected 0, ignored 3 (hidden: 1, not_media: 2) in "
    )


def test_sidecar_and_caption_tables_obey_the_path_rules(tmp_path):
    root, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("the secret")
    write_video(root / "clip.mp4", index_frames(6, 16, 16), fps=12)
    write_video(root / "ok.mp4", index_frames(6, 16, 16), fps=12)
    (root / "clip.txt").symlink_to(elsewhere / "secret.txt")
    summary = prepare(root, root / "m.parquet", progress=False)
    table = read_manifest(root / "m.parquet")
    assert table.column("path").to_pylist() == ["ok.mp4"] and "the secret" not in str(table.to_pylist())
    assert summary.rejected == {"outside_root": 1}
    reason, detail = _rejects(root / "m.parquet")["clip.mp4"]
    assert reason == "outside_root" and "sidecar caption clip.txt" in detail
    (root / "clip.txt").unlink()
    (root / "captions.jsonl").symlink_to(elsewhere / "secret.txt")
    with pytest.raises(FrameloomError, match="captions.jsonl: .*same path rules"):
        prepare(root, root / "m.parquet", progress=False)


# ------------------------------------------------------------------------------------- Open-Sora-Plan


def test_opensora_plan_num_frames_counts_from_cut_start(tmp_path):
    # The seed: frame_indices = arange(cut[0], cut[0] + num_frames); cut[1] is never read.
    root = tmp_path / "d"
    write_video(root / "v.mp4", index_frames(30, 16, 16), fps=24)
    record = {"path": "v.mp4", "cap": ["x"], "resolution": {"height": 16, "width": 16}, "num_frames": 10,
              "fps": 24, "cut": [5, 99]}  # fmt: skip
    (root / "anno.json").write_text(json.dumps([record]))
    (root / "data.txt").write_text(f"{root},{root / 'anno.json'}\n")
    for trust in (False, True):
        prepare(root / "data.txt", root / "m.parquet", progress=False, trust_metadata=trust)
        row = read_manifest(root / "m.parquet").to_pylist()[0]
        assert (row["cut_start"], row["cut_end"]) == (5, 15)
        assert row["num_frames"] == (15 if trust else 30)  # trusted: the least the file must hold
        video = decode_clip(row, ClipSpec(10), root=root)
        assert [frame_index_of(video[:, t].numpy()) for t in range(10)] == list(range(5, 15))
    convert_manifest(root / "m.parquet", "opensora-plan", tmp_path / "back" / "data.txt")
    back = json.loads((tmp_path / "back" / "data.json").read_text())[0]
    assert (back["num_frames"], back["cut"]) == (10, [5, 15])  # the seed reads frames 5..14 again
    # Too few frames for cut[0] + num_frames: bad_cut, checked against the probe.
    record["num_frames"] = 28
    (root / "anno.json").write_text(json.dumps([record, {**record, "num_frames": 10}]))
    prepare(root / "data.txt", root / "m.parquet", progress=False)
    assert _rejects(root / "m.parquet")["v.mp4"][0] == "bad_cut"


def test_opensora_plan_records_of_the_wrong_type_are_one_line(tmp_path, capsys):
    root = tmp_path / "d"
    write_video(root / "v.mp4", index_frames(6, 16, 16), fps=12)
    record = {"path": "v.mp4", "cap": ["x"], "resolution": {"height": 16, "width": 16}, "num_frames": "many"}
    (root / "anno.json").write_text(json.dumps([record]))
    assert main(["prepare", str(root / "anno.json"), "--out", str(root / "m.parquet"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "anno.json, record 1, field 'num_frames': 'many' is not a number" in err


# ------------------------------------------------------------------------------------------- CogVideoX


def test_cogvideox_lines_split_as_the_seed_reads_them(tmp_path):
    # The seed: [line.strip() for line in open(p).readlines() if len(line.strip()) > 0] (text mode: \n, \r\n,
    # \r). A U+2028 or a form feed inside a caption is not a line break there.
    text = "a\u2028b\nc\fd\r\ne\rf\n\n  g  \n"
    (tmp_path / "p.txt").write_text(text, newline="")
    with open(tmp_path / "p.txt", encoding="utf-8") as fh:
        seed = [line.strip() for line in fh.readlines() if len(line.strip()) > 0]
    assert seed_lines(text) == seed == ["a\u2028b", "c\fd", "e", "f", "g"]


def test_cogvideox_round_trip_keeps_the_pairing(tmp_path):
    root = tmp_path / "d"
    captions = ["line\u2028separator", "", "form\ffeed", "   ", "two\nlines"]
    rows = []
    for i, text in enumerate(captions):
        write_video(root / f"v{i}.mp4", index_frames(6, 16, 16), fps=12)
        rows.append(
            {"path": f"v{i}.mp4", "text": text, "num_frames": 6, "height": 16, "width": 16, "fps": 12.0}
        )
    write_manifest(from_rows(rows), root / "m.parquet")
    convert_manifest(root / "m.parquet", "cogvideox", root)
    lines = (root / "prompts.txt").read_text(encoding="utf-8").split("\n")
    assert lines[1] == EMPTY_CAPTION and len(lines) == 6  # 5 lines and the final newline
    entries = read_dialect("cogvideox", root).entries
    assert [e.path for e in entries] == [f"v{i}.mp4" for i in range(5)]
    assert [e.fields["text"] for e in entries] == ["line\u2028separator", "", "form\ffeed", "", "two lines"]


# ------------------------------------------------------------------------------------ trusted metadata


def test_trusted_metadata_that_cannot_be_right_is_rejected(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b", "c", "d", "e"):
        write_video(root / f"{name}.mp4", index_frames(6, 16, 16), fps=12)
    header = ["path", "text", "num_frames", "height", "width", "fps"]
    rows = [["a.mp4", "ok", 6, 16, 16, 12.0], ["b.mp4", "nan fps", 6, 16, 16, "nan"],
            ["c.mp4", "zero fps", 6, 16, 16, 0], ["d.mp4", "no frames", 0, 16, 16, 12],
            ["e.mp4", "negative", 6, -16, 16, 12]]  # fmt: skip
    with open(root / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    summary = prepare(root / "meta.csv", root / "m.parquet", progress=False, trust_metadata=True)
    assert summary.kept == 1 and summary.rejected == {"bad_metadata": 4}
    details = {p: d for p, (_, d) in _rejects(root / "m.parquet").items()}
    assert details == {
        "b.mp4": "fps nan is not a frame rate",
        "c.mp4": "fps 0.0 is not a frame rate",
        "d.mp4": "num_frames 0 is not at least 1",
        "e.mp4": "height -16 is not at least 1",
    }
    # Without --trust-metadata the files are probed and the given values replaced: all kept.
    assert prepare(root / "meta.csv", root / "p.parquet", progress=False).kept == 5


def test_trust_metadata_round_trips_write_the_measured_columns(tmp_path):
    # A writer that wrote a wrong num_frames / fps / size would pass a round trip that re-probes; under
    # --trust-metadata the written values are read back as they are, so they must equal the probe's.
    root = tmp_path / "media"
    write_video(root / "a.mp4", index_frames(30, 16, 24), fps=24)
    write_video(root / "b.mp4", index_frames(20, 32, 16), fps=29.97)
    prepare(root, tmp_path / "m0" / "m.parquet", progress=False)
    first = {Path(r["path"]).name: r for r in read_manifest(tmp_path / "m0" / "m.parquet").to_pylist()}
    targets = {"opensora": "o.csv", "opensora-plan": "data.txt", "pyramid": "p.jsonl"}
    for fmt, name in targets.items():
        out = tmp_path / fmt / name
        convert_manifest(tmp_path / "m0" / "m.parquet", fmt, out)
        trusted = tmp_path / fmt / "m.parquet"
        prepare(out, trusted, fmt=fmt, progress=False, trust_metadata=True, extra_roots=[root])
        back = {Path(r["path"]).name: r for r in read_manifest(trusted).to_pylist()}
        for file, row in first.items():
            if fmt == "pyramid":  # the jsonl has no metadata: probed, nothing to compare
                continue
            for col in ("num_frames", "height", "width"):
                assert back[file][col] == row[col], (fmt, file, col)
            assert back[file]["fps"] == pytest.approx(row["fps"], abs=1e-3), (fmt, file)  # 3 decimals written
    assert first["b.mp4"]["fps"] == 29.97


# ---------------------------------------------------------------------------------- every entry point


def _escaping_manifest(tmp_path: Path) -> Path:
    write_video(tmp_path / "outside.mp4", index_frames(6, 8, 8), fps=8)
    (tmp_path / "m").mkdir()
    row = {"path": "../outside.mp4", "text": "x", "num_frames": 6, "height": 8, "width": 8, "fps": 8.0}
    return write_manifest(
        from_rows([row, {**row, "path": str(tmp_path / "outside.mp4")}]), tmp_path / "m" / "m.parquet"
    )


@pytest.mark.parametrize(
    "command", [pytest.param("train", marks=pytest.mark.slow), pytest.param("cache", marks=pytest.mark.slow),
                "inspect", "convert"],
)  # fmt: skip
def test_a_manifest_leading_out_of_its_folder_is_refused_everywhere(tmp_path, capsys, command):
    manifest = _escaping_manifest(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data:\n  manifest: {manifest}\nrun_dir: {tmp_path / 'run'}\nmodel:\n  text_encoder: tiny-byt5\n"
    )
    argv = {
        "train": ["train", str(cfg)],
        "cache": ["cache", str(cfg)],
        "inspect": ["inspect", str(manifest)],
        "convert": ["convert", str(manifest), "--to", "pyramid", "--out", str(tmp_path / "o.jsonl")],
    }[command]
    assert main(argv) == 2
    err = [
        line for line in capsys.readouterr().err.strip().splitlines() if "error" in line
    ]  # not progress bars
    assert len(err) == 1
    err = err[0]
    assert (
        "1 path(s) lead outside its folder (outside_root), e.g. row 1, column 'path': '../outside.mp4'" in err
    )
    if command == "inspect":  # the absolute path is fine; allowing the folder lets the relative one in too
        cfg.write_text(f"data:\n  extra_roots: [{tmp_path}]\n")
        assert main(["inspect", str(manifest), "--config", str(cfg), "--out", str(tmp_path / "i.png")]) == 0


def test_frame_policy_without_buckets_needs_batch_one():
    cfg = load_config(None, ["data.frame_policy=4k+1", "data.num_frames=17", "train.batch_size=2"])
    with pytest.raises(FrameloomError, match="data.frame_policy=4k\\+1 gives clips of different lengths"):
        build_sampler(cfg, list(range(10)))
    cfg.train.batch_size = 1
    assert build_sampler(cfg, list(range(10))).batch_size == 1


# ----------------------------------------------------------------------------------- one line, exit 2


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


CSV_HEAD = "path,text,num_frames,height,width,fps,aspect_ratio,resolution\n"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("text_in_num_frames_inspect", "row 1, column 'num_frames': 'abc' is not a number"),
        ("text_in_num_frames_prepare", "row 1, column 'num_frames': 'abc' is not a number"),
        ("int_fps_with_null", None),  # an integer fps column with an empty cell: read, not a traceback
        ("empty_csv_inspect", "the file is empty"),
        ("header_only_inspect", None),
        ("malformed_list", "column 'crop': '[1,2' is not a JSON list"),
        ("non_utf8_prompts", "prompts.txt, line 1: not UTF-8 text"),
        ("convert_plan_null_fps", None),
        pytest.param("train_empty_manifest", "has no rows", marks=pytest.mark.slow),
        ("huge_number", "'1e30' is out of range"),
    ],
)
def test_bad_inputs_end_in_one_line(tmp_path, capsys, case, needle):
    d = tmp_path
    write_video(d / "x.mp4", index_frames(6, 8, 8), fps=8)
    ok = "x.mp4,hi,6,8,8,8,1.0,64\n"
    cases = {
        "text_in_num_frames_inspect": lambda: ["inspect", str(_write(d / "a.csv", CSV_HEAD + "x.mp4,hi,abc,8,8,8,1,64\n"))],
        "text_in_num_frames_prepare": lambda: ["prepare", str(_write(d / "a.csv", CSV_HEAD + "x.mp4,hi,abc,8,8,8,1,64\n")),
                                               "--out", str(d / "m.parquet"), "--trust-metadata", "--quiet"],
        "int_fps_with_null": lambda: ["inspect", str(_write(d / "a.csv", CSV_HEAD + ok + "x.mp4,hi,6,8,8,,1.0,64\n"))],
        "empty_csv_inspect": lambda: ["inspect", str(_write(d / "a.csv", ""))],
        "header_only_inspect": lambda: ["inspect", str(_write(d / "a.csv", CSV_HEAD))],
        "malformed_list": lambda: ["inspect", str(_write(d / "a.csv", CSV_HEAD[:-1] + ",crop\n" + ok[:-1] + ',"[1,2"\n'))],
        "non_utf8_prompts": lambda: ["prepare", str(_write(d / "cog" / "prompts.txt", b"\xff\xfe bad\n").parent),
                                     "--out", str(d / "c.parquet"), "--quiet"],
        "convert_plan_null_fps": lambda: ["convert", str(_write(d / "a.csv", CSV_HEAD + ok + "x.mp4,hi,6,8,8,,1.0,64\n")),
                                          "--to", "opensora-plan", "--out", str(d / "o" / "data.txt")],
        "train_empty_manifest": lambda: ["train", str(_write(d / "cfg.yaml", f"data:\n  manifest: {_write(d / 'a.csv', CSV_HEAD)}\n"
                                                             f"run_dir: {d / 'run'}\nmodel:\n  text_encoder: tiny-byt5\n"))],
        "huge_number": lambda: ["inspect", str(_write(d / "a.csv", CSV_HEAD + "x.mp4,hi,1e30,8,8,8,1,64\n"))],
    }  # fmt: skip
    argv = cases[case]()
    if case == "non_utf8_prompts":
        _write(d / "cog" / "videos.txt", "x.mp4\n")
    code = main(argv)
    err = "\n".join(
        line for line in capsys.readouterr().err.strip().splitlines() if line and "it/s]" not in line
    )
    if needle is None:
        assert code == 0, err
        if case == "convert_plan_null_fps":
            records = json.loads((d / "o" / "data.json").read_text())
            assert "fps" in records[0] and "fps" not in records[1]  # unknown: left out, the seed assumes 24
        return
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert err.startswith(f"frameloom {argv[0]}: error: ")


def test_nan_and_infinite_cells_in_a_manifest(tmp_path):
    rows = "x.mp4,hi,6,8,8,nan,1.0,64\n"
    path = _write(tmp_path / "a.csv", CSV_HEAD + rows)
    with pytest.raises(FrameloomError, match="row 1, column 'fps': nan is not a frame rate"):
        read_manifest(path)
    table = read_manifest(_write(tmp_path / "b.csv", CSV_HEAD + "x.mp4,hi,6.0,8,8,,,\n"))
    assert table.column("num_frames").to_pylist() == [6] and table.column("fps").to_pylist() == [None]
    assert table.column("resolution").to_pylist() == [64]  # derived where empty
    assert math.isclose(table.column("aspect_ratio")[0].as_py(), 1.0)
    assert pa.types.is_int64(table.schema.field("num_frames").type)


def test_a_path_with_a_nul_byte_is_a_bad_entry(tmp_path):
    # Found by the fuzz test: os calls raise on a NUL byte; such an entry names no file and is rejected.
    write_video(tmp_path / "ok.mp4", index_frames(6, 8, 8), fps=8)
    _write(tmp_path / "meta.csv", "path,text\nok.mp4,fine\nbad\0name.mp4,x\n")
    summary = prepare(tmp_path / "meta.csv", tmp_path / "m.parquet", progress=False)
    assert summary.kept == 1 and summary.rejected == {"bad_entry": 1}
    with pytest.raises(FrameloomError, match="row 2, column 'path': the path holds a NUL byte"):
        row = {"path": "x.mp4", "text": "", "num_frames": 1, "height": 1, "width": 1}
        manifest = write_manifest(from_rows([row, {**row, "path": "a\0b.mp4"}]), tmp_path / "n.parquet")
        load_manifest(manifest)


@pytest.mark.parametrize("decode_timeout", [0.0, 30.0])
def test_a_file_swapped_for_an_escaping_symlink_is_substituted_at_decode(tmp_path, decode_timeout):
    """The path rules hold where the file is opened, in the sandbox too (rel16's ``_decode``): a clip that
    became a symlink out of the manifest's folder after the manifest was checked fails as outside_root and is
    replaced, like an undecodable one."""
    from frameloom.pipeline import ClipDataset

    root = tmp_path / "data"
    root.mkdir()
    rows = []
    for name in ("a.mp4", "b.mp4"):
        write_video(root / name, index_frames(4, 8, 8), fps=8)
        rows.append({"path": name, "text": name, "num_frames": 4, "height": 8, "width": 8, "fps": 8.0})
    manifest = write_manifest(from_rows(rows), root / "m.parquet")
    dataset = ClipDataset(manifest, ClipSpec(num_frames=4), decode_timeout=decode_timeout)
    write_video(tmp_path / "secret.mp4", index_frames(4, 8, 8), fps=8)
    (root / "a.mp4").unlink()
    (root / "a.mp4").symlink_to(tmp_path / "secret.mp4")
    item = dataset[0]
    assert item["index"] == 1 and item["substituted"] == 1
    expected = decode_clip(rows[1], ClipSpec(num_frames=4), root=root, output="float")
    assert torch.equal(item["video"], expected)
    [failure] = item["failures"]
    assert failure["path"] == "a.mp4" and failure["reason"].startswith("outside_root: ")
    if dataset.sandbox is not None:
        assert dataset.sandbox.started == 1  # b.mp4 decoded in the sandbox; a.mp4 refused before it
        dataset.sandbox.close()


def test_convert_to_imagenet_round_trips_the_labels(tmp_path):
    """dit15's label table through ``frameloom convert --to imagenet`` (columnar writer, slice by slice): the
    table reads back to the same files and labels, rows without a label left out and counted."""
    import numpy as np
    from PIL import Image

    for label, name in enumerate(["cat", "dog"]):
        for i in range(2):
            (tmp_path / "img" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 60 * label + i, np.uint8)).save(
                tmp_path / "img" / name / f"{i}.png"
            )
    (tmp_path / "img" / "cat" / "notes.md").write_text("not an image")
    manifest = tmp_path / "m" / "m.parquet"
    summary = prepare(tmp_path / "img", manifest, fmt="imagenet", progress=False)
    assert summary.kept == 4 and summary.ignored == {"not_image": 1}
    table = read_manifest(manifest)
    assert table.column("label").to_pylist() == [0, 0, 1, 1]
    unlabelled = table.slice(0, 1).set_column(
        table.column_names.index("label"), "label", pa.nulls(1, pa.int64())
    )
    unlabelled = unlabelled.set_column(unlabelled.column_names.index("text"), "text", pa.array(["a cat"]))
    write_manifest(pa.concat_tables([table, unlabelled]), manifest)
    assert main(["convert", str(manifest), "--to", "imagenet", "--out", str(tmp_path / "t")]) == 0
    back = read_dialect("imagenet", tmp_path / "t" / "labels.csv")
    rows = [
        (str(Path(e.root, e.path).resolve()), e.fields["label"], e.fields["class_name"]) for e in back.entries
    ]
    expected = [(str((tmp_path / "img" / n / f"{i}.png").resolve()), lab, n)
                for lab, n in enumerate(["cat", "dog"]) for i in range(2)]  # fmt: skip
    assert rows == expected
