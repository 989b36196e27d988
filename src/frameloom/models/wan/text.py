"""Wan's text encoding, exactly as ``WanPipeline._get_t5_prompt_embeds``: the prompt is cleaned first
(``ftfy.fix_text`` when ftfy is installed, HTML unescaped twice, whitespace collapsed and stripped), then
UMT5 runs *with* the attention mask (``T5TextEncoder`` semantics).

The pipeline zero-pads the embeddings to ``max_sequence_length`` and gives the transformer no mask;
``T5TextEncoder``'s output (real tokens, zeros elsewhere, a mask) carries the same information, and the Wan
adapter rebuilds the zero padding (wan/adapter.py). The cleaning changes the embeddings of some captions, so
it is part of the encoder's ``identity`` (with whether ftfy took part).
"""

from __future__ import annotations

import html
import re

import torch

from frameloom.models.text import T5TextEncoder, derive_identity

__all__ = ["WanTextEncoder", "clean_prompt"]


def _ftfy():
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def clean_prompt(text: str) -> str:
    """Wan's ``prompt_clean``: ftfy (if installed), ``html.unescape`` twice, collapse whitespace, strip."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder(T5TextEncoder):
    """UMT5 (``T5TextEncoder`` semantics) behind Wan's prompt cleaning."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        super().__init__(model, tokenizer, max_length=max_length)
        self.identity = derive_identity(self.identity, clean="wan-v1", ftfy=_ftfy() is not None)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        return super().encode([clean_prompt(t) for t in texts])
