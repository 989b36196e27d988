"""Readings of config values that take more than one form (a number or a keyword), checked in one place."""

from __future__ import annotations

from typing import Literal

from frameloom.errors import FrameloomError


def shift_value(value: float | str, key: str = "objective.shift") -> float | Literal["auto"]:
    """A timestep shift: a positive number, or `auto` (the model's resolution-dependent rule)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise FrameloomError(f"{key} must be a positive number or auto, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FrameloomError(f"{key} must be a positive number or auto, not {value!r}")
    return float(value)
