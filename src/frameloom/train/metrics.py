"""metrics.jsonl (one JSON object per optimizer step) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("frameloom.train")


def parse_lines(text: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics.jsonl text and how many lines could not be read.

    A line that is not a JSON object is left out: at the end of the file it is the torn tail of a write a
    kill interrupted; elsewhere the file was damaged (both are counted)."""
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


class MetricsLogger:
    """Appends one line per step to run_dir/metrics.jsonl; mirrors scalars to TensorBoard every `tb_every` steps.

    On resume from step S, lines with step > S (written after the checkpoint by the interrupted run) are
    dropped first, and so is a torn last line (a kill in the middle of a write), so the file always describes
    one consistent history. The rewrite goes through a temporary file and a rename.
    """

    def __init__(
        self, run_dir: str | Path, *, resume_step: int = 0, tensorboard: bool = True, tb_every: int = 10
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._fh = open(self.path, "a", buffering=1)
        self.tb_every = max(1, tb_every)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        records, bad = parse_lines(self.path.read_text(errors="replace"))
        if bad:
            log.warning("%s: dropped %d unreadable line(s) (a write cut short by a kill)", self.path, bad)
        kept = [r for r in records if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None and (step % self.tb_every == 0 or step == 1):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl (unreadable lines, such as a torn last line, left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    return parse_lines(path.read_text(errors="replace"))[0] if path.exists() else []
