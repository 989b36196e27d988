"""Class labels through frameloom's text path: a "text encoder" whose caption is a class.

A caption is a class index (``"207"``), a class name from ``class_names`` (an ImageNet-layout manifest's folder
names), or ``""``: the null class, which caption dropout and the unconditional branch of guidance use. So
``objective.caption_dropout: 0.1`` is DiT's class dropout 0.1, and the cache stores one entry per class.
``encode`` returns one dummy token (the denoiser ignores it); the label travels as the extra tensor
``class_labels`` (B,) long, which the trainer hands to the model as a keyword argument.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from frameloom.errors import FrameloomError
from frameloom.models.text import TextEncoder

__all__ = ["ClassLabelEncoder"]


class ClassLabelEncoder(TextEncoder):
    """Captions -> class indices (see the module docstring); ``num_classes`` is the null class's index."""

    dim = 1
    max_length = 1

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise FrameloomError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names else []
        if len(self.class_names) > self.num_classes:
            raise FrameloomError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.by_name = {name: i for i, name in enumerate(self.class_names)}
        spec = {"encoder": "class-label-v1", "num_classes": self.num_classes, "names": self.class_names}
        self.identity = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> ClassLabelEncoder:
        self.device = torch.device(device)
        return self

    def label(self, text: str) -> int:
        """One caption's class index: "" -> null class, digits -> that index, else a class name."""
        text = str(text).strip()
        if text == "":
            return self.num_classes
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < self.num_classes:
                raise FrameloomError(f"class {index} is outside 0..{self.num_classes - 1}")
            return index
        if text in self.by_name:
            return self.by_name[text]
        raise FrameloomError(
            f"caption {text[:60]!r} is neither a class index nor a class name "
            f"({len(self.class_names)} names known: set model.config.class_names)"
        )

    def labels(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        return torch.tensor([self.label(t) for t in texts], dtype=torch.long, device=self.device)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.labels(texts)  # validates every caption
        b = len(labels)
        return torch.zeros(b, 1, 1, device=self.device), torch.ones(
            b, 1, dtype=torch.bool, device=self.device
        )

    def encode_extras(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"class_labels": self.labels(texts)}  # (B,)
