"""The command-line contract: every command listed, --help everywhere, one-line errors with status 2."""

import subprocess
import sys

import pytest

from frameloom.cli import main

COMMANDS = ["quickstart", "prepare", "inspect", "convert", "cache", "train", "sample", "export", "verify"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "frameloom", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: frameloom " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", "missing.parquet"], "missing.parquet"),
        (["convert", "missing.parquet", "--to", "opensora", "--out", "x.csv"], "missing.parquet"),
        (["export", "no-such-run", "--format", "lora", "--out", "x"], "no-such-run"),
    ],
)
def test_missing_inputs_are_one_clear_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"frameloom {argv[0]}: error: ") and needle in err and "\n" not in err


def test_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim: {lrr: 1}\n")
    assert main(["train", str(cfg)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "frameloom train: error: unknown key optim.lrr; did you mean optim.lr?"
    )
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", str(cfg.with_name("ok.yaml"))]) == 2
    capsys.readouterr()
    cfg.write_text("")
    assert main(["train", str(cfg), "--train.steps", "x"]) == 2
    assert capsys.readouterr().err.strip() == "frameloom train: error: train.steps: expected int, got str 'x'"
    assert main(["cache", str(cfg)]) == 2
    assert "data.manifest is not set" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "m.parquet")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_no_traceback_from_subprocess(tmp_path):
    out = run("train", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("frameloom train: error: config file not found")
