"""What every family loaded from a local diffusers directory shares (CogVideoX, Wan, LTX-Video).

A diffusers directory (``model.pretrained``) holds ``model_index.json`` and one subfolder per part:
``transformer/`` (trained), ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (frozen or
config only). This module:

- checks the directory and names everything missing in one ``FrameloomError`` (``check_pretrained``);
- loads the parts: frozen ones in eval mode with no gradients (``frozen``, ``load_vae_codec``), the
  transformer in ``model.dtype`` with LoRA applied when ``model.lora.rank > 0`` (``load_trainable_transformer``;
  the base may stay in bf16 while the LoRA weights train in ``model.lora.dtype``, fp32 by default);
- prepends ``model.id_token`` to every caption when encoding (``IdTokenTextEncoder``; its identity includes
  the token, so the text cache keys on it);
- defines ``DiffusersDenoiser``, the base class of every family adapter: it holds the diffusers model as
  ``.transformer`` (what export, validation and LoRA code reach for) and maps frameloom's layout
  ``forward(x_t (B, C, T, H, W), t (B,), text_emb (B, L, D), text_mask (B, L)) -> (B, C_out, T, H, W)``
  onto the model's own call in ``forward``;
- builds the family's diffusers pipeline around the in-training weights (``build_pipeline``) for validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frameloom.config.schema import Config, LoraConfig, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.text import TextEncoder

__all__ = [
    "DTYPES",
    "DiffusersDenoiser",
    "IdTokenTextEncoder",
    "add_id_token",
    "build_pipeline",
    "check_pretrained",
    "frozen",
    "load_trainable_transformer",
    "load_vae_codec",
    "parse_dtype",
    "pipeline_class",
    "read_model_index",
    "with_id_token",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` (or fp32/bf16/fp16) -> torch dtype; ``key`` names the config key."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise FrameloomError(f"{key}: unknown precision {name!r} (float32, bfloat16, float16)")
    return DTYPES[name]


# --------------------------------------------------------------------------------------------------------
# the directory


def check_pretrained(model_cfg: ModelConfig, parts: tuple[str, ...]) -> Path:
    """``model.pretrained`` as a Path after checking it is a diffusers directory with all ``parts``.

    Raises one ``FrameloomError`` naming the directory and every missing piece (``model_index.json`` and
    each ``<part>/`` subfolder), so a half-copied download is diagnosed in one go.
    """
    if not model_cfg.pretrained:
        raise FrameloomError(
            f"model.pretrained is not set (model.family {model_cfg.family!r} loads a local diffusers directory)"
        )
    root = Path(model_cfg.pretrained)
    if not root.is_dir():
        raise FrameloomError(f"model.pretrained: not a directory: {root}")
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for part in parts:
        folder = root / part
        if not folder.is_dir() or not any(folder.iterdir()):
            missing.append(f"{part}/")
    if missing:
        raise FrameloomError(
            f"model.pretrained {root} is not a complete diffusers directory: missing {', '.join(missing)}"
        )
    return root


def read_model_index(root: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a diffusers directory as a dict."""
    path = Path(root) / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read {path}: {exc}") from None


def pipeline_class(root: str | os.PathLike) -> type:
    """The diffusers pipeline class named by ``model_index.json``'s ``_class_name``."""
    import diffusers

    name = read_model_index(root).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise FrameloomError(f"{Path(root) / 'model_index.json'}: unknown pipeline class {name!r}")
    return cls


def _component_class(root: Path, part: str) -> type:
    """The class of one pipeline part, from ``model_index.json`` (``[library, class]``)."""
    import importlib

    entry = read_model_index(root).get(part)
    if not entry or len(entry) != 2:
        raise FrameloomError(f"{root / 'model_index.json'}: no entry for {part!r}")
    library, name = entry
    cls = getattr(importlib.import_module(library), name, None)
    if cls is None:
        raise FrameloomError(f"{root / 'model_index.json'}: {library}.{name} does not exist")
    return cls


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: how every non-trained part is kept."""
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# the parts


def load_vae_codec(cfg: Config, device: torch.device | str, subfolder: str = "vae"):
    """The family's VAE as a frozen ``DiffusersVAECodec`` in ``model.encoder_dtype``, with
    ``model.vae_tiling``/``model.vae_slicing``."""
    from frameloom.models.codecs import DiffusersVAECodec

    root = check_pretrained(cfg.model, (subfolder,))
    return DiffusersVAECodec.from_pretrained(
        root,
        subfolder=subfolder,
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        tiling=cfg.model.vae_tiling,
        slicing=cfg.model.vae_slicing,
    )


def load_trainable_transformer(model_cfg: ModelConfig, subfolder: str = "transformer") -> nn.Module:
    """Load ``<pretrained>/<subfolder>`` with its class from ``model_index.json`` and make it trainable.

    Full fine-tune (``model.lora.rank == 0``): all weights in ``model.dtype``, trainable. LoRA: the base in
    ``model.dtype`` and frozen, PEFT adapters on ``model.lora.target_modules`` in ``model.lora.dtype``.
    """
    from frameloom.models.lora import apply_lora

    root = check_pretrained(model_cfg, (subfolder,))
    cls = _component_class(root, subfolder)
    dtype = parse_dtype(model_cfg.dtype, "model.dtype")
    try:
        transformer = cls.from_pretrained(
            str(root), subfolder=subfolder, torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise FrameloomError(f"cannot load {cls.__name__} from {root / subfolder}: {exc}") from None
    if model_cfg.lora.rank > 0:
        apply_lora(transformer, model_cfg.lora, parse_dtype(model_cfg.lora.dtype, "model.lora.dtype"))
    else:
        transformer.requires_grad_(True)
    return transformer.train()


# --------------------------------------------------------------------------------------------------------
# id_token


def add_id_token(text: str, id_token: str | None) -> str:
    """``"<id_token> <text>"`` for a non-empty caption; the empty prompt (classifier-free guidance's
    unconditional input) stays empty. CogVideoX's ``--id_token`` prepends the same way."""
    if not id_token or not text:
        return text
    return f"{id_token} {text}"


class IdTokenTextEncoder(TextEncoder):
    """A text encoder that prepends ``id_token`` to every non-empty caption before encoding.

    Its ``identity`` hashes the inner encoder's identity with the token, so cached embeddings made without
    (or with another) token are never reused. ``inner`` is the wrapped encoder (pipelines reach its model).
    """

    def __init__(self, inner: TextEncoder, id_token: str):
        self.inner = inner
        self.id_token = id_token
        self.dim = inner.dim
        self.max_length = inner.max_length
        self.device = inner.device
        spec = json.dumps({"inner": inner.identity, "id_token": id_token}, sort_keys=True)
        self.identity = hashlib.sha256(spec.encode()).hexdigest()

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        return self.inner.encode([add_id_token(t, self.id_token) for t in texts])

    def to(self, device: torch.device | str) -> IdTokenTextEncoder:
        self.inner.to(device)
        self.device = torch.device(device)
        return self

    def __getattr__(self, name: str) -> Any:  # model, tokenizer, dtype ... of the wrapped encoder
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def with_id_token(encoder: TextEncoder, id_token: str | None) -> TextEncoder:
    """``encoder`` itself when ``id_token`` is empty, else wrapped in ``IdTokenTextEncoder``."""
    return IdTokenTextEncoder(encoder, id_token) if id_token else encoder


# --------------------------------------------------------------------------------------------------------
# the adapter base class

#: Block-list attribute names of diffusers transformers (CogVideoX/LTX/Flux: transformer_blocks; Wan: blocks).
BLOCK_LIST_NAMES = (
    "transformer_blocks",
    "single_transformer_blocks",
    "blocks",
    "double_blocks",
    "single_blocks",
)


class DiffusersDenoiser(nn.Module):
    """Base class of the family adapters around a diffusers transformer.

    Subclasses implement ``forward(x_t, t, text_emb, text_mask)`` in frameloom's layout (module docstring).
    ``transformer`` is the diffusers model (with injected PEFT layers for a LoRA run); ``pretrained`` the
    directory it came from; ``lora`` the LoRA settings (None for a full fine-tune).
    """

    def __init__(self, transformer: nn.Module, pretrained: str | os.PathLike, lora: LoraConfig | None = None):
        super().__init__()
        self.transformer = transformer
        self.pretrained = Path(pretrained)
        self.lora = lora if lora is not None and lora.rank > 0 else None

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def __getattr__(self, name: str) -> Any:
        """The transformer's block lists (``transformer_blocks``, ``blocks``, ...) read through the adapter,
        so the parallel layer (checkpointing, compile, FSDP units) finds them on the module it is given.
        They stay registered under ``transformer.`` only, so parameter names do not change."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in BLOCK_LIST_NAMES:
                transformer = self._modules.get("transformer")
                blocks = getattr(transformer, name, None) if transformer is not None else None
                if isinstance(blocks, nn.ModuleList):
                    return blocks
            raise

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained LoRA weights, ``{module.lora_A.weight, module.lora_B.weight}`` (see models/lora.py)."""
        from frameloom.models.lora import get_lora_state_dict

        if not self.is_lora:
            raise FrameloomError("this denoiser has no LoRA (model.lora.rank is 0)")
        return get_lora_state_dict(self.transformer)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------
# pipelines


def _unwrap_text_encoder(text_encoder: Any) -> Any:
    return text_encoder.inner if isinstance(text_encoder, IdTokenTextEncoder) else text_encoder


def build_pipeline(root: str | os.PathLike, transformer: nn.Module, text_encoder: Any, codec: Any):
    """The family's diffusers pipeline around already-loaded parts (no second copy of any weight):
    ``transformer`` (the in-training one, LoRA layers included), the frozen text encoder's model and
    tokenizer, the codec's VAE, and the scheduler from ``<root>/scheduler``."""
    root = Path(root)
    cls = pipeline_class(root)
    scheduler_cls = _component_class(root, "scheduler")
    scheduler = scheduler_cls.from_pretrained(str(root), subfolder="scheduler")
    te = _unwrap_text_encoder(text_encoder)
    return cls(
        tokenizer=te.tokenizer,
        text_encoder=te.model,
        vae=codec.vae,
        transformer=transformer,
        scheduler=scheduler,
    )
