"""torchrun entry point of the reliability battery: `frameloom train ARGS...` plus one optional test hook.

RELIABILITY_STALL="RANK:STEP:FILE": rank RANK, in the backward pass of step STEP, writes its pid to FILE and
sleeps, so that the test can kill it exactly there (tests/test_reliability_processes.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def install_stall(spec: str) -> None:
    rank, step, marker = spec.split(":", 2)
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    from frameloom.train.trainer import Trainer

    original = Trainer._micro_step

    def micro_step(self, batch, micro, *args, **kwargs):
        if self.step + 1 == int(step):

            def stall(grad):
                Path(marker).write_text(str(os.getpid()))
                time.sleep(600)
                return grad

            next(p for p in self.module.parameters() if p.requires_grad).register_hook(stall)
        return original(self, batch, micro, *args, **kwargs)

    Trainer._micro_step = micro_step


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a stack dump on demand (a hung process)
    if os.environ.get("RELIABILITY_STALL"):
        install_stall(os.environ["RELIABILITY_STALL"])
    from frameloom.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
