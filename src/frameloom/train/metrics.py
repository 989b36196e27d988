"""metrics.jsonl (one JSON object per optimizer step) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one line per step to run_dir/metrics.jsonl; mirrors scalars to TensorBoard every `tb_every` steps.

    On resume from step S, lines with step > S (written after the checkpoint by the interrupted run) are
    dropped first, so the file always describes one consistent history.
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
        kept = [
            ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step
        ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None and (step % self.tb_every == 0 or step == 1):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
