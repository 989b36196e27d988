"""Frame-index selection and seek-based decoding of one clip from a manifest row.

(Interface fixed here; the implementation is filled in by the foundation issue's decoding work.)
"""

from __future__ import annotations

from dataclasses import dataclass

from frameloom.errors import FrameloomError


class DecodeError(FrameloomError):
    """A clip could not be decoded. Carries the file's path and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode {path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class ClipSpec:
    """What to take from a video: which frames, which region, at which size.

    Exactly one of ``frame_stride`` (in source frames, may be fractional) and ``target_fps`` may be set;
    neither means stride 1. ``crop`` is (x0, x1, y0, y1) in displayed pixels, applied before resizing.
    ``height``/``width`` None keeps the source size. Resizing keeps the aspect ratio and center-crops.
    """

    num_frames: int
    frame_stride: float | None = None
    target_fps: float | None = None
    start_frame: int = 0
    crop: tuple[int, int, int, int] | None = None
    height: int | None = None
    width: int | None = None

    def key(self) -> str:
        """A stable text form, used in cache keys."""
        return (
            f"f{self.num_frames}-s{self.frame_stride}-fps{self.target_fps}-st{self.start_frame}"
            f"-c{self.crop}-{self.height}x{self.width}"
        )
