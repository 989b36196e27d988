"""Process hygiene under torchrun (2 gloo ranks, 2 loader workers each, a decode sandbox per worker):

- kill -9 of the launcher only: every rank, worker and decoder is gone within seconds (no orphan left that
  could still write a checkpoint);
- kill -9 of one rank in the middle of its backward pass: the others exit within `parallel.timeout_s`;
- a clean finish exits 0 and leaves no process behind.

Every process of a launch carries RELIABILITY_TAG in its environment, which is how the tests find them all,
also after they lost their parent. Each test prints the seconds it measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.pipeline import text_encoder_dir
from reliability import tagged_processes, wait_untagged
from tiny import TINY

pytestmark = pytest.mark.slow

ENTRY = Path(__file__).with_name("reliability_entry.py")
TIMEOUT_S = 30  # parallel.timeout_s of these runs


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hygiene")
    synthetic.write_synthetic_set(root / "data", num_clips=24, seed=0, height=8, width=8, num_frames=4)
    manifest = root / "data" / "manifest.parquet"
    text_encoder_dir(load_config(None, [*TINY, f"run_dir={root / 'runs' / 'x'}"]))  # built once, not per rank
    return manifest


def launch(manifest: Path, run: Path, steps: int, **env: str) -> tuple[subprocess.Popen, str]:
    """torchrun, 2 processes, on-the-fly decoding (a sandbox per loader worker); returns (launcher, tag)."""
    tag = uuid.uuid4().hex
    cfg = run.parent / "empty.yaml"
    cfg.write_text("")
    args = [*TINY, f"data.manifest={manifest}", f"run_dir={run}", f"train.steps={steps}", "data.num_workers=2",
            "data.use_cache=never", "checkpoint.every=2", f"parallel.timeout_s={TIMEOUT_S}"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max_restarts=0", str(ENTRY), str(cfg), *args]  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    log = open(run.parent / f"{run.name}.log", "w")
    proc = subprocess.Popen(command, env=dict(os.environ, RELIABILITY_TAG=tag, **env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return proc, tag


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, (run.parent / f"{run.name}.log").read_text()[-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"step {step} never came")


def test_killing_the_launcher_leaves_no_orphan(manifest, tmp_path):
    run = tmp_path / "launcher"
    proc, tag = launch(manifest, run, steps=400)
    wait_for_step(run, 2, proc)
    tree = tagged_processes(tag)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only
    proc.wait()
    seconds, left = wait_untagged(tag, TIMEOUT_S)
    print(f"\nkill -9 of torchrun ({len(tree)} processes: launcher, 2 ranks, their loader workers and decode "
          f"sandboxes): all gone in {seconds:.2f} s; orphans {len(left)}")  # fmt: skip
    assert left == []
    assert len(tree) >= 1 + 2 + 2 * 2 + 2 * 2  # the sandboxes existed too


def test_killing_one_rank_in_backward_stops_the_others(manifest, tmp_path):
    run = tmp_path / "rank"
    marker = tmp_path / "stalled.pid"
    proc, tag = launch(manifest, run, steps=400, RELIABILITY_STALL=f"1:3:{marker}")
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "rank.log").read_text()[
            -3000:
        ]
        time.sleep(0.05)
    time.sleep(0.2)
    victim = int(marker.read_text())
    os.kill(victim, signal.SIGKILL)  # rank 1, inside its backward pass of step 3
    start = time.monotonic()
    seconds, left = wait_untagged(tag, TIMEOUT_S + 30)
    code = proc.wait(timeout=30)
    print(f"\nkill -9 of rank 1 in backward: every other process gone in {seconds:.2f} s "
          f"(parallel.timeout_s {TIMEOUT_S}); launcher exit {code}; orphans {len(left)}")  # fmt: skip
    assert left == [] and seconds < TIMEOUT_S and code != 0
    assert time.monotonic() - start < TIMEOUT_S + 30


def test_a_clean_finish_exits_0_without_hanging(manifest, tmp_path):
    run = tmp_path / "clean"
    start = time.monotonic()
    proc, tag = launch(manifest, run, steps=3)
    code = proc.wait(timeout=300)
    seconds = time.monotonic() - start
    _, left = wait_untagged(tag, 10)
    print(f"\nclean torchrun finish: exit {code} after {seconds:.1f} s; processes left {len(left)}")
    assert code == 0, (tmp_path / "clean.log").read_text()[-3000:]
    assert left == []
