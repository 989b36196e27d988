"""Text encoders of the Wan and LTX-Video directories, encoding exactly as their diffusers pipelines do.

- Wan (``WanPipeline._get_t5_prompt_embeds``): the prompt is cleaned first (``ftfy.fix_text`` when ftfy is
  installed, HTML unescaped twice, whitespace collapsed and stripped), then UMT5 runs *with* the attention
  mask. The pipeline zero-pads the embeddings to ``max_sequence_length`` and gives the transformer no mask;
  ``T5TextEncoder``'s output (real tokens, zeros elsewhere, a mask) carries the same information, and the
  Wan adapter rebuilds the zero padding (wan/adapter.py).
- LTX-Video (``LTXPipeline._get_t5_prompt_embeds``): the ids are padded to ``max_sequence_length`` and T5
  runs *without* an attention mask, so every real token's embedding depends on the padding that follows it.
  ``PaddedT5TextEncoder`` does the same and returns the mask the transformer gets; positions past the
  caption are zeroed (they are masked out of cross-attention, so their values never matter).

Both change the embeddings relative to ``T5TextEncoder`` and therefore carry their own ``identity``.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import torch

from frameloom.errors import FrameloomError
from frameloom.models.text import T5TextEncoder, _transformers_version

__all__ = ["PaddedT5TextEncoder", "WanTextEncoder", "clean_prompt", "load_t5_like"]


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


def _rehash(identity: str, **extra) -> str:
    return hashlib.sha256(json.dumps({"inner": identity, **extra}, sort_keys=True).encode()).hexdigest()


class WanTextEncoder(T5TextEncoder):
    """UMT5 (``T5TextEncoder`` semantics) behind Wan's prompt cleaning."""

    def __init__(self, model, tokenizer, max_length: int = 512):
        super().__init__(model, tokenizer, max_length=max_length)
        self.identity = _rehash(self.identity, clean="wan-v1", ftfy=_ftfy() is not None)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        return super().encode([clean_prompt(t) for t in texts])


class PaddedT5TextEncoder(T5TextEncoder):
    """T5 over ids padded to ``max_length`` with no attention mask (LTX-Video's pipeline; module docstring).

    ``encode`` returns ``(emb (B, max_length, D), mask (B, max_length))``; padded positions are zero.
    """

    def __init__(self, model, tokenizer, max_length: int = 128):
        super().__init__(model, tokenizer, max_length=max_length)
        self.identity = _rehash(self.identity, encoding="padded-unmasked-v1")

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)  # (B, max_length)
        mask = batch["attention_mask"].to(self.device).bool()
        emb = self.model(input_ids=ids).last_hidden_state  # (B, max_length, D): no mask, as the pipeline
        return emb * mask.unsqueeze(-1).to(emb.dtype), mask


def load_t5_like(
    root: str | Path,
    encoder_cls: type[T5TextEncoder],
    *,
    max_length: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> T5TextEncoder:
    """``<root>/text_encoder`` (its class from ``config.json``'s ``architectures``: T5EncoderModel,
    UMT5EncoderModel) and ``<root>/tokenizer`` wrapped in ``encoder_cls``; frozen, in ``dtype``."""
    import transformers
    from transformers import AutoTokenizer

    root = Path(root)
    model_dir, tok_dir = root / "text_encoder", root / "tokenizer"
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read the text encoder config in {model_dir}: {exc}") from None
    name = (config.get("architectures") or ["T5EncoderModel"])[0]
    model_cls = getattr(transformers, name, None)
    if model_cls is None or name not in ("T5EncoderModel", "UMT5EncoderModel"):
        raise FrameloomError(f"{model_dir}: text encoder {name!r} is not a T5EncoderModel/UMT5EncoderModel")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, TypeError):
        try:  # byte-level / slow-only tokenizers (the tests' ByT5) have no fast version
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), use_fast=False, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise FrameloomError(f"cannot load a tokenizer from {tok_dir}: {exc}") from None
    dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    try:
        model = model_cls.from_pretrained(str(model_dir), local_files_only=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as exc:
        raise FrameloomError(f"cannot load {name} from {model_dir}: {exc}") from None
    encoder = encoder_cls(model, tokenizer, max_length=max_length)  # hashes weights on CPU, before any move
    if device is not None:
        encoder.to(device)
    return encoder
