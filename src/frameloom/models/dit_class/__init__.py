"""MiniSora / fast-DiT: the class-conditional DiT with learned sigma (`model.family: dit_class`)."""

from frameloom.models.dit_class.convert import DIT_CLASS_PRESETS
from frameloom.models.dit_class.model import ClassDiT

__all__ = ["DIT_CLASS_PRESETS", "ClassDiT"]
