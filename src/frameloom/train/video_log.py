"""Validation videos in TensorBoard: each mp4 a run writes under samples/ also appears in the Images tab as an
animated GIF (what ``SummaryWriter.add_video`` writes, without its moviepy dependency: a ``Summary.Image``
whose encoded bytes are a GIF), tagged ``validation/<file stem>`` at the step it was made.

The videos go into their own event file in ``run_dir/tensorboard`` (TensorBoard reads every event file of a
folder), so the scalar writer of the training loop is not touched.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["gif_bytes", "log_videos"]


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """``(T, H, W, 3)`` uint8 frames -> an animated GIF looping at ``fps`` (PIL's encoder)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
    )
    return buf.getvalue()


def log_videos(run_dir: str | Path, paths: Sequence[Path], step: int, fps: float) -> None:
    """Add the mp4s ``paths`` to ``run_dir/tensorboard`` as animated images at ``step``."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.writer import FileWriter

    from frameloom.sampling.video_io import read_mp4

    if not paths:
        return
    writer = FileWriter(str(Path(run_dir) / "tensorboard"), filename_suffix=".videos")
    try:
        for path in paths:
            frames = read_mp4(path)  # (T, H, W, 3) uint8
            t, h, w, c = frames.shape
            image = Summary.Image(
                height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps)
            )
            summary = Summary(value=[Summary.Value(tag=f"validation/{Path(path).stem}", image=image)])
            writer.add_event(Event(summary=summary, step=step, wall_time=time.time()))
    finally:
        writer.close()
