"""Pyramid Flow's text side: T5 tokens for the transformer's joint attention plus pooled CLIP vector(s) for
its adaLN conditioning, loaded from the released folder layout (jy0205/Pyramid-Flow
``pyramid_dit/*_modules/modeling_text_encoder.py``):

- miniflux: ``tokenizer`` / ``text_encoder`` = CLIP-L (``CLIPTextModel``, its ``pooler_output``, 768) and
  ``tokenizer_2`` / ``text_encoder_2`` = T5-XXL;
- sd3: ``tokenizer`` / ``text_encoder`` = CLIP-L and ``tokenizer_2`` / ``text_encoder_2`` = CLIP-G (both
  ``CLIPTextModelWithProjection``, ``text_embeds``, concatenated to 2048) and ``tokenizer_3`` /
  ``text_encoder_3`` = T5-XXL.

``encode`` gives the T5 tokens (frameloom's convention: the batch's longest caption, zeros and mask False at the
padding; upstream pads to 128 and masks the same positions out in attention, so the transformer sees the same
thing) and ``encode_extras`` the ``pooled`` vector, so both are cached and dropped (10%) like any other text
encoder's. ``build_tiny`` writes a random tiny copy of that layout for tests and shrunk presets (no download).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from frameloom.errors import FrameloomError
from frameloom.models.codecs import config_sha256, weights_sha256
from frameloom.models.text import (
    T5TextEncoder,
    TextEncoder,
    TextEncoderError,
    _tokenizer_sha256,
    build_tiny_t5,
)

__all__ = ["PyramidTextEncoder", "build_tiny", "text_layout"]


def text_layout(variant: str) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    """([(CLIP encoder folder, tokenizer folder), ...], (T5 folder, tokenizer folder)) of a released variant."""
    if variant == "miniflux":
        return [("text_encoder", "tokenizer")], ("text_encoder_2", "tokenizer_2")
    if variant == "sd3":
        return [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")], (
            "text_encoder_3",
            "tokenizer_3",
        )
    raise FrameloomError(f"unknown Pyramid Flow variant {variant!r} (miniflux or sd3)")


class PyramidTextEncoder(TextEncoder):
    """T5 tokens + pooled CLIP vector(s) (``pooled``: CLIP-L pooler output for miniflux, CLIP-L and CLIP-G
    projected embeddings concatenated for sd3)."""

    def __init__(self, t5: T5TextEncoder, clips: list[tuple[torch.nn.Module, object]], variant: str):
        self.t5 = t5
        self.clips = [(m.eval().requires_grad_(False), tok) for m, tok in clips]
        self.variant = variant
        self.dim = t5.dim
        self.max_length = t5.max_length
        self.device = t5.device
        self.pooled_dim = sum(self._pooled_width(m) for m, _ in self.clips)
        identity = {
            "encoder": "pyramid-flow-text-v1",
            "variant": variant,
            "t5": t5.identity,
            "clips": [
                {
                    "config": config_sha256(m.config),
                    "weights": weights_sha256(m),
                    "tokenizer": _tokenizer_sha256(tok),
                }
                for m, tok in self.clips
            ],
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _pooled_width(model: torch.nn.Module) -> int:
        cfg = model.config
        return (
            int(getattr(cfg, "projection_dim", 0) or 0)
            if hasattr(model, "text_projection")
            else int(cfg.hidden_size)
        )

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        variant: str,
        max_length: int = 128,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> PyramidTextEncoder:
        """Load from a released model root (the folder holding ``text_encoder*`` / ``tokenizer*``)."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        root = Path(root)
        clip_dirs, (t5_dir, t5_tok) = text_layout(variant)
        clip_cls = CLIPTextModel if variant == "miniflux" else CLIPTextModelWithProjection
        for sub in [d for pair in clip_dirs for d in pair] + [t5_dir, t5_tok]:
            if not (root / sub).is_dir():
                raise TextEncoderError(f"{root} has no {sub}/ (the released Pyramid Flow {variant} layout)")
        t5 = T5TextEncoder.from_pretrained(
            root, max_length, dtype=dtype, subfolder=t5_dir, tokenizer_subfolder=t5_tok
        )
        clips = []
        for enc, tok in clip_dirs:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(root / tok), local_files_only=True)
                model = clip_cls.from_pretrained(str(root / enc), local_files_only=True, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise TextEncoderError(f"cannot load CLIP from {root / enc}: {exc}") from None
            clips.append((model, tokenizer))
        encoder = cls(t5, clips, variant)
        if device is not None:
            encoder.to(device)
        return encoder

    def to(self, device: torch.device | str) -> PyramidTextEncoder:
        self.t5.to(device)
        for m, _ in self.clips:
            m.to(device)
        self.device = torch.device(device)
        return self

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t5.encode(texts)

    @torch.no_grad()
    def encode_extras(self, texts: list[str]) -> dict[str, torch.Tensor]:
        pooled = []
        for model, tok in self.clips:
            ids = tok(
                list(texts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = model(input_ids=ids)
            pooled.append(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)  # (B, P_i)
        return {"pooled": torch.cat(pooled, dim=-1).float()}


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: every byte (GPT-2's byte-to-unicode map), with and without the
    end-of-word mark, plus the two specials."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny(out_dir: str | os.PathLike, variant: str = "miniflux", seed: int = 0, dim: int = 32) -> Path:
    """Write random tiny text encoders in the released ``variant`` layout into ``out_dir`` (T5: frameloom's tiny
    ByT5; CLIP: 2 layers, ``dim`` wide, a byte-level BPE tokenizer made on the spot). Deterministic in
    ``seed``; nothing is downloaded."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    clip_dirs, (t5_dir, t5_tok) = text_layout(variant)
    build_tiny_t5(out / t5_dir, d_model=dim, seed=seed)
    (out / t5_tok).mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (out / t5_dir / name).exists():
            (out / t5_tok / name).write_bytes((out / t5_dir / name).read_bytes())
    work = out / ".clip_vocab"
    work.mkdir(parents=True, exist_ok=True)
    (work / "vocab.json").write_text(json.dumps(_byte_level_vocab()))
    (work / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=16)
    for i, (enc, tok) in enumerate(clip_dirs):
        width = dim * (i + 1)  # CLIP-G is wider than CLIP-L
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1 + i)
            model = CLIPTextModel(config) if variant == "miniflux" else CLIPTextModelWithProjection(config)
        model.save_pretrained(out / enc)
        tokenizer.save_pretrained(out / tok)
    return out
