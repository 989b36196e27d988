"""Frozen text encoders: captions -> (embeddings, mask) for the denoiser's cross-attention.

Interface (``TextEncoder``): ``identity`` (changes whenever the embeddings would: weights, config, tokenizer,
``max_length``, dtype; the text cache keys on it), ``dim``, ``max_length``,
``encode(texts) -> (emb (B, L, dim) float, mask (B, L) bool)``, and optionally
``encode_extras(texts) -> {name: (B, ...)}`` for per-caption tensors besides the tokens (a pooled vector).

Convention: a batch is padded to its longest caption (at most ``max_length`` tokens, truncation keeps the
final EOS); ``mask`` marks real tokens and the embeddings at padded positions are zero, so a caption's
embedding does not depend on what else is in its batch and can be cached trimmed to its real length.
Pretrained families whose pipelines run T5 over ids padded to a fixed length *without* an attention mask
(CogVideoX, LTX-Video) use ``PaddedT5TextEncoder``: every real token's embedding then depends on the padding
that follows it, so the fixed-length padding is part of the encoding (and of its ``identity``).

``build_tiny_t5`` makes the random-init tiny T5 + byte-level tokenizer the quickstart and tests use: it needs
no vocabulary file and nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from frameloom.errors import FrameloomError
from frameloom.models.codecs import config_sha256, weights_sha256

__all__ = [
    "PaddedT5TextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "build_tiny_t5",
    "derive_identity",
]

# ByT5: 256 byte values + 3 specials (<pad>=0, </s>=1, <unk>=2) + 125 extra ids.
BYT5_VOCAB_SIZE = 384


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def derive_identity(identity: str, **changes) -> str:
    """The identity of an encoder that encodes differently from the one with ``identity`` (another
    encoding mode, a prepended token, prompt cleaning): a hash of the inner identity and the ``changes``."""
    return hashlib.sha256(json.dumps({"inner": identity, **changes}, sort_keys=True).encode()).hexdigest()


def pool_text(text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean of text-encoder tokens, ``(B, L, D), (B, L) -> (B, D)``; a row without tokens gives 0."""
    weights = torch.ones_like(text[..., 0]) if mask is None else mask.to(text.dtype)  # (B, L)
    return (text * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)


class TextEncoderError(FrameloomError):
    """A text encoder that cannot be loaded."""


class TextEncoder(ABC):
    """The interface every text encoder follows (see the module docstring)."""

    identity: str
    dim: int
    max_length: int
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> ``(emb (B, L, dim) float, mask (B, L) bool)``, L = longest caption (<= max_length)."""

    def encode_extras(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Per-caption conditioning besides the tokens, ``{name: (B, ...)}`` (e.g. a pooled CLIP vector
        ``pooled`` (B, P)); none by default. The text cache stores these beside the tokens, caption dropout
        replaces them by the empty prompt's, and the denoiser receives them as keyword arguments."""
        return {}

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(identity={self.identity[:12]}..., dim={self.dim}, max_length={self.max_length})"


def _tokenizer_sha256(tokenizer) -> str:
    """A hash of how the tokenizer maps text to ids: its class, vocabulary and special tokens.

    The tokenizer's files are not hashed because their contents carry paths and library-version details that
    change without changing a single token id.
    """
    spec = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": getattr(tokenizer, "padding_side", "right"),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


class T5TextEncoder(TextEncoder):
    """A frozen ``transformers.T5EncoderModel`` with its tokenizer (T5, T5 v1.1, ByT5, UMT5-style weights)."""

    def __init__(self, model, tokenizer, max_length: int = 226):
        if max_length < 1:
            raise TextEncoderError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(model.config.d_model)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        identity = {
            "encoder": "t5-v1",
            "config": config_sha256(model.config),
            "weights": weights_sha256(model),
            "tokenizer": _tokenizer_sha256(tokenizer),
            "max_length": self.max_length,  # truncation changes the embeddings of long captions
            "dtype": str(self.dtype),
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        max_length: int = 226,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        **encoder_kw,
    ) -> T5TextEncoder:
        """Load model and tokenizer from a local directory (a pipeline folder: pass the subfolders);
        ``encoder_kw`` go to the encoder class's constructor.

        The model class follows the config's ``model_type``: ``UMT5EncoderModel`` for ``umt5`` (Wan),
        ``MT5EncoderModel`` for ``mt5`` (Open-Sora-Plan's mT5-XXL), ``T5EncoderModel`` otherwise.
        Byte-level (ByT5) and other slow-only tokenizers have no "fast" version:
        loading falls back to ``use_fast=False`` when the default attempt fails.
        """
        import transformers
        from transformers import AutoTokenizer

        root = Path(directory)
        model_dir = root / subfolder if subfolder else root
        tok_dir = root / tokenizer_subfolder if tokenizer_subfolder else model_dir
        try:
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as exc:
            raise TextEncoderError(
                f"no readable text encoder config at {model_dir / 'config.json'}: {exc}"
            ) from None
        model_cls = {"umt5": transformers.UMT5EncoderModel, "mt5": transformers.MT5EncoderModel}.get(
            model_type, transformers.T5EncoderModel
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError, TypeError):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), use_fast=False, local_files_only=True)
            except (OSError, ValueError, TypeError) as exc:
                raise TextEncoderError(f"cannot load a tokenizer from {tok_dir}: {exc}") from None
        # transformers >= 4.56 calls the argument ``dtype``; older versions ``torch_dtype``.
        dtype_kw = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        try:
            model = model_cls.from_pretrained(str(model_dir), local_files_only=True, **{dtype_kw: dtype})
        except (OSError, ValueError) as exc:
            raise TextEncoderError(f"cannot load {model_cls.__name__} from {model_dir}: {exc}") from None
        # the identity is hashed on CPU, before any move
        encoder = cls(model, tokenizer, max_length=max_length, **encoder_kw)
        if device is not None:
            encoder.to(device)
        return encoder

    def to(self, device: torch.device | str) -> T5TextEncoder:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def tokenize(self, texts: list[str], padding: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> ``(ids (B, L), mask (B, L) bool)`` on the encoder's device, at most ``max_length``
        tokens; ``padding`` is ``longest`` (the batch's longest caption) or ``max_length``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        batch = self.tokenizer(
            list(texts),
            padding=padding,
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,  # appends EOS: "" becomes just [EOS], so every caption has >= 1 token
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device).bool()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(texts)
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, dim)
        # Zero the padded positions: their values depend on the batch's other captions, never on this one.
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        return emb, mask


class PaddedT5TextEncoder(T5TextEncoder):
    """T5 over ids padded to ``max_length`` and run *without* an attention mask, as the CogVideoX and
    LTX-Video pipelines encode (``_get_t5_prompt_embeds``): the padding is part of every embedding.

    ``encode`` returns ``(emb (B, max_length, D), mask (B, max_length))``. With ``keep_padding`` (CogVideoX,
    whose transformer attends to all ``max_length`` positions) the padded positions keep their values and
    the mask is all True; without it (LTX-Video, whose transformer masks them out) they are zeroed and the
    mask marks the real tokens.
    """

    def __init__(self, model, tokenizer, max_length: int = 128, keep_padding: bool = False):
        super().__init__(model, tokenizer, max_length=max_length)
        self.keep_padding = bool(keep_padding)
        mode = {"keep_padding": True} if self.keep_padding else {}
        self.identity = derive_identity(self.identity, encoding="padded-unmasked-v1", **mode)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(texts, padding="max_length")  # (B, max_length)
        emb = self.model(input_ids=ids).last_hidden_state  # (B, max_length, D): no mask, as the pipelines
        if self.keep_padding:
            return emb, torch.ones_like(mask)
        return emb * mask.unsqueeze(-1).to(emb.dtype), mask


def build_tiny_t5(
    out_dir: str | os.PathLike,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    seed: int = 0,
    umt5: bool = False,
) -> Path:
    """Save a random-init tiny ``T5EncoderModel`` (``UMT5EncoderModel`` with ``umt5``, Wan's kind) with a
    ``ByT5Tokenizer`` into ``out_dir`` and return it.

    Deterministic given ``seed`` (the global RNG state is left untouched); needs no download and no
    vocabulary file (bytes are tokens). Load it with ``T5TextEncoder.from_pretrained(out_dir)``.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)

    if d_model % num_heads:
        raise TextEncoderError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_cls(
        vocab_size=BYT5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(out)
    ByT5Tokenizer(extra_ids=BYT5_VOCAB_SIZE - 259).save_pretrained(out)
    return out
