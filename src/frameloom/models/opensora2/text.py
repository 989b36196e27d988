"""Open-Sora 2.0's text conditioning: T5-XXL tokens and the CLIP-L pooled vector, as one ``TextEncoder``.

Upstream (``opensora/models/text/conditioner.py``, ``HFEmbedder``): both tokenizers pad to ``max_length``
(T5 512, CLIP 77) with truncation, and both models run *without* an attention mask; the DiT attends to all
512 T5 positions. frameloom reproduces that with ``PaddedT5TextEncoder(keep_padding=True)`` (the fixed-length
unmasked output, mask all True) for ``encode`` and CLIP's ``pooler_output`` for ``encode_extras`` under the
name ``pooled``, which the trainer passes to the MMDiT as ``pooled=`` and drops independently of the tokens
(``objective.extras_dropout``; Open-Sora drops T5 and CLIP each with p = sqrt(0.1)).

``build_tiny_clip`` saves a random-init tiny ``CLIPTextModel`` with a byte-level ``CLIPTokenizer`` (no
merges, so no vocabulary download) for tests, as ``models.text.build_tiny_t5`` does for T5.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from frameloom.models.codecs import config_sha256, weights_sha256
from frameloom.models.text import (
    PaddedT5TextEncoder,
    TextEncoder,
    TextEncoderError,
    _transformers_version,
    derive_identity,
)

__all__ = ["OpenSoraTextEncoder", "build_tiny_clip", "load_clip"]


class OpenSoraTextEncoder(TextEncoder):
    """``encode``: T5 tokens ``(B, L, 4096)`` (fixed length, mask all True); ``encode_extras``:
    ``{"pooled": CLIP pooled (B, 768)}``. ``identity`` covers both encoders."""

    def __init__(self, t5: TextEncoder, clip_model, clip_tokenizer, clip_max_length: int = 77):
        self.t5 = t5
        self.clip = clip_model.eval().requires_grad_(False)
        self.clip_tokenizer = clip_tokenizer
        self.clip_max_length = int(clip_max_length)
        self.dim = t5.dim
        self.max_length = t5.max_length
        self.device = t5.device
        self.pooled_dim = int(clip_model.config.hidden_size)
        clip_id = {
            "config": config_sha256(clip_model.config),
            "weights": weights_sha256(clip_model),
            "vocab": hashlib.sha256(
                json.dumps(sorted(clip_tokenizer.get_vocab().items())).encode()
            ).hexdigest(),
            "max_length": self.clip_max_length,
            "dtype": str(next(clip_model.parameters()).dtype),
        }
        self.identity = derive_identity(t5.identity, opensora2_clip=clip_id)

    def to(self, device: torch.device | str) -> OpenSoraTextEncoder:
        self.t5.to(device)
        self.clip.to(device)
        self.device = torch.device(device)
        return self

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t5.encode(texts)

    @torch.no_grad()
    def encode_extras(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode_extras() takes a list of strings, not one string")
        ids = self.clip_tokenizer(
            list(texts), padding="max_length", max_length=self.clip_max_length, truncation=True,
            return_tensors="pt",
        )["input_ids"].to(self.device)  # fmt: skip
        return {
            "pooled": self.clip(input_ids=ids).pooler_output.float()
        }  # (B, clip width), no mask as upstream


def load_clip(directory: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``(CLIPTextModel, CLIPTokenizer)`` from a local directory (``openai/clip-vit-large-patch14`` layout, or
    ``build_tiny_clip``'s); the tokenizer may sit in the same folder or in ``tokenizer/``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(directory)
    model_dir = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    if not (model_dir / "config.json").is_file():
        raise TextEncoderError(f"model.config.clip: no CLIP text model config in {root}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True, **{dtype_kw: dtype})
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"cannot load CLIP from {root}: {exc}") from None
    return model, tokenizer


def load_text_encoder(
    t5_dir: str | os.PathLike,
    clip_dir: str | os.PathLike,
    *,
    t5_max_length: int = 512,
    clip_max_length: int = 77,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> OpenSoraTextEncoder:
    """T5 (fixed length, unmasked) + CLIP from local directories, frozen, on ``device``."""
    t5 = PaddedT5TextEncoder.from_pretrained(t5_dir, max_length=t5_max_length, dtype=dtype, keep_padding=True)
    model, tokenizer = load_clip(clip_dir, dtype)
    encoder = OpenSoraTextEncoder(t5, model, tokenizer, clip_max_length)
    return encoder.to(device) if device is not None else encoder


def _byte_symbols() -> list[str]:
    """CLIP's byte -> printable-unicode table (the GPT-2 byte-level BPE alphabet), in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tiny_clip(
    out_dir: str | os.PathLike,
    hidden: int = 16,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 77,
    seed: int = 0,
) -> Path:
    """Save a random-init tiny ``CLIPTextModel`` + a byte-level ``CLIPTokenizer`` (every byte a token, no
    merges) into ``out_dir``; deterministic given ``seed``, nothing downloaded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(out))
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(str(out))
    return out
