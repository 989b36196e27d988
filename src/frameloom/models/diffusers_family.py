"""What every family loaded from a local diffusers directory shares (CogVideoX, Wan, LTX-Video).

A diffusers directory (``model.pretrained``) holds ``model_index.json`` and one subfolder per part:
``transformer/`` (trained), ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (frozen or
config only). This module:

- checks the directory and names everything missing in one ``FrameloomError`` (``check_pretrained``) and
  reads its configs (``read_model_index``, ``part_config``);
- loads the parts: frozen ones in eval mode with no gradients (``frozen``, ``load_vae_codec``,
  ``load_text_encoder``), the transformer in ``model.dtype`` with LoRA applied when ``model.lora.rank > 0``
  (``load_trainable_transformer``; the base may stay in bf16 while the LoRA weights train in
  ``model.lora.dtype``, fp32 by default), and checks the widths the trainer passes (``check_widths``);
- prepends ``model.id_token`` to every caption when encoding (``IdTokenTextEncoder``; its identity includes
  the token, so the text cache keys on it);
- builds the flow-matching objective of the flow families from ``objective.*`` (``flow_objective``);
- defines ``DiffusersDenoiser``, the base class of every family adapter: it holds the diffusers model as
  ``.transformer`` (what export, validation and LoRA code reach for) and maps frameloom's layout
  ``forward(x_t (B, C, T, H, W), t (B,), text_emb (B, L, D), text_mask (B, L)) -> (B, C_out, T, H, W)``
  onto the model's own call in ``forward``; ``pipeline_text`` gives frameloom's text embeddings in the form
  the family pipeline's ``encode_prompt`` returns;
- builds the family's diffusers pipeline around the in-training weights (``build_pipeline``) for validation.

What a family folder adds is only what differs: its adapter, objective rules, encoder mode and sampler
(docs/families.md, "Shared modules").
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frameloom.config.schema import Config, LoraConfig, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.text import T5TextEncoder, TextEncoder, derive_identity

__all__ = [
    "DTYPES",
    "PARTS",
    "DiffusersDenoiser",
    "IdTokenTextEncoder",
    "add_id_token",
    "build_pipeline",
    "check_pretrained",
    "check_objective_name",
    "check_widths",
    "component_class",
    "flow_objective",
    "frozen",
    "load_pretrained_denoiser",
    "load_text_encoder",
    "load_trainable_transformer",
    "load_vae_codec",
    "parse_dtype",
    "part_config",
    "pipeline_class",
    "read_model_index",
    "skeleton",
    "vae_latent_shape",
    "text_length",
    "unwrap_text_encoder",
    "with_id_token",
]

#: The parts every family directory has (I2V variants add theirs, e.g. Wan's image encoder and processor).
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read {path}: {exc}") from None


def read_model_index(root: str | os.PathLike) -> dict[str, Any]:
    """``model_index.json`` of a diffusers directory as a dict."""
    return _read_json(Path(root) / "model_index.json")


def part_config(root: str | os.PathLike, part: str) -> dict[str, Any]:
    """The config of one part as a dict: ``<root>/<part>/config.json``, or ``scheduler_config.json`` for the
    scheduler; a missing or broken file is one clear error."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return _read_json(Path(root) / part / name)


def pipeline_class(root: str | os.PathLike) -> type:
    """The diffusers pipeline class named by ``model_index.json``'s ``_class_name``."""
    import diffusers

    name = read_model_index(root).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise FrameloomError(f"{Path(root) / 'model_index.json'}: unknown pipeline class {name!r}")
    return cls


def component_class(root: str | os.PathLike, part: str) -> type:
    """The class of one pipeline part, from ``model_index.json`` (``[library, class]``)."""
    import importlib

    root = Path(root)
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


def load_vae_codec(
    cfg: Config, device: torch.device | str, codec_cls: type | None = None, parts: tuple[str, ...] = PARTS
):
    """The family's VAE as a frozen codec (``codec_cls``, default ``DiffusersVAECodec``; its
    ``from_pretrained(root, subfolder=, dtype=, device=, tiling=, slicing=)``) in ``model.encoder_dtype``,
    with ``model.vae_tiling``/``model.vae_slicing``, after checking the directory has ``parts``."""
    from frameloom.models.codecs import DiffusersVAECodec

    root = check_pretrained(cfg.model, parts)
    return (codec_cls or DiffusersVAECodec).from_pretrained(
        root,
        subfolder="vae",
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        tiling=cfg.model.vae_tiling,
        slicing=cfg.model.vae_slicing,
    )


def load_text_encoder(
    cfg: Config,
    device: torch.device | str,
    encoder_cls: type[T5TextEncoder] = T5TextEncoder,
    *,
    default_length: int,
    parts: tuple[str, ...] = PARTS,
    **encoder_kw,
) -> TextEncoder:
    """``<pretrained>/text_encoder`` (T5 or UMT5) + ``tokenizer/`` as a frozen ``encoder_cls`` (the family's
    encoding mode; ``encoder_kw`` to its constructor) in ``model.encoder_dtype``, over
    ``model.text_max_length`` tokens (null: the family's ``default_length``), with ``model.id_token``
    prepended."""
    root = check_pretrained(cfg.model, parts)
    encoder = encoder_cls.from_pretrained(
        root,
        max_length=text_length(cfg.model, default_length),
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        subfolder="text_encoder",
        tokenizer_subfolder="tokenizer",
        **encoder_kw,
    )
    return with_id_token(encoder, cfg.model.id_token)


def text_length(model_cfg: ModelConfig, default: int) -> int:
    """``model.text_max_length``, or the family's ``default`` (its pipeline's length) when it is null."""
    return int(model_cfg.text_max_length) if model_cfg.text_max_length is not None else int(default)


_SKELETON = contextvars.ContextVar("frameloom_skeleton", default=False)


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Inside: ``load_trainable_transformer`` builds the transformer from its config alone, no weights read
    (with ``torch.device("meta")`` around it, a model of any size costs nothing: the memory planner)."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def vae_latent_shape(root: str | os.PathLike) -> tuple[int, tuple[int, int, int]]:
    """``(latent channels, (t, h, w) compression)`` of ``<root>/vae`` from its config alone (a meta-device
    skeleton, so the codec's own compression rule applies)."""
    from frameloom.models.codecs import _compression_from_model

    cls = component_class(root, "vae")
    with torch.device("meta"):
        vae = cls.from_config(cls.load_config(str(Path(root) / "vae")))
    cfg = vae.config
    compression = _compression_from_model(vae, True)
    if compression is None:
        raise FrameloomError(f"{Path(root) / 'vae'}: cannot tell the VAE's compression from its config")
    return int(cfg.get("latent_channels") or cfg.get("z_dim")), compression


def _cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``dtype`` everywhere but in the modules the class keeps in float32 (``_keep_in_fp32_modules``), as
    ``from_pretrained(torch_dtype=dtype)`` casts (Wan keeps its norms, time embedder and RoPE in fp32)."""
    nn.Module.to(model, dtype)
    keep = set(getattr(type(model), "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            nn.Module.to(module, torch.float32)
    return model


def load_trainable_transformer(model_cfg: ModelConfig, subfolder: str = "transformer") -> nn.Module:
    """Load ``<pretrained>/<subfolder>`` with its class from ``model_index.json`` and make it trainable.

    Full fine-tune (``model.lora.rank == 0``): all weights in ``model.dtype``, trainable. LoRA: the base in
    ``model.dtype`` and frozen, PEFT adapters on ``model.lora.target_modules`` in ``model.lora.dtype``;
    with ``model.fp8_base`` the blocks' frozen linear weights are stored in fp8 (memory/fp8.py).
    """
    from frameloom.models.lora import apply_lora

    root = check_pretrained(model_cfg, (subfolder,))
    cls = component_class(root, subfolder)
    dtype = parse_dtype(model_cfg.dtype, "model.dtype")
    try:
        if _SKELETON.get():  # the planner: shapes and dtypes only
            transformer = _cast_like_from_pretrained(
                cls.from_config(cls.load_config(str(root / subfolder))), dtype
            )
        else:
            transformer = cls.from_pretrained(
                str(root), subfolder=subfolder, torch_dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError) as exc:
        raise FrameloomError(f"cannot load {cls.__name__} from {root / subfolder}: {exc}") from None
    if model_cfg.lora.rank > 0:
        apply_lora(transformer, model_cfg.lora, parse_dtype(model_cfg.lora.dtype, "model.lora.dtype"))
    else:
        transformer.requires_grad_(True)
    if model_cfg.fp8_base:
        if model_cfg.lora.rank <= 0:
            raise FrameloomError("model.fp8_base stores a frozen base: it needs a LoRA (model.lora.rank > 0)")
        from frameloom.memory.fp8 import quantize_frozen_linears
        from frameloom.parallel.memory import transformer_blocks

        quantize_frozen_linears(transformer_blocks(transformer))
    return transformer.train()


def check_widths(latent: tuple[int, int], text: tuple[int, int]) -> None:
    """``latent = (VAE latent channels, what the transformer expects)``, ``text = (text encoder width, what
    the transformer expects)``; a given size of 0 is not checked (export and sampling rebuild the denoiser
    from the directory alone)."""
    if latent[0] and latent[0] != latent[1]:
        raise FrameloomError(f"the VAE has {latent[0]} latent channels, the transformer expects {latent[1]}")
    if text[0] and text[0] != text[1]:
        raise FrameloomError(f"the text encoder has dim {text[0]}, the transformer expects {text[1]}")


def load_pretrained_denoiser(build_denoiser, family: str, path: str | os.PathLike, **model_kw) -> nn.Module:
    """The ``load_denoiser`` hook of a diffusers family: a diffusers directory (or its ``transformer/``
    folder) -> ``build_denoiser`` with full weights and no LoRA; ``model_kw`` are further ``model.*`` keys."""
    root = Path(path)
    pretrained = root if (root / "model_index.json").is_file() else root.parent
    return build_denoiser(ModelConfig(family=family, pretrained=str(pretrained), **model_kw), 0, 0)


def check_objective_name(cfg: Config, own: str) -> None:
    """``objective.name`` must be null (the family's own) or ``own``: a family never silently trains with
    another objective than the one it has."""
    name = cfg.objective.name
    if name is not None and name != own:
        raise FrameloomError(
            f"model.family {cfg.model.family} trains with objective.name={own} (or null), not {name!r}"
        )


def flow_objective(
    cfg: Config,
    default_shift: float | str,
    flow_cls: type | None = None,
    *,
    default_sampling: str = "logit_normal",
    **extra,
):
    """Flow matching from ``objective.*`` for a flow family: ``objective.name`` must be ``flow`` or null; the
    shift is ``objective.shift``, or the family's ``default_shift`` (its scheduler's) when that is null (1.0
    is an unshifted schedule); likewise ``objective.timestep_sampling`` and ``default_sampling``.
    ``flow_cls`` (default ``FlowMatching``) gets ``extra`` too."""
    from frameloom.objectives import flow_settings
    from frameloom.objectives.flow import FlowMatching

    check_objective_name(cfg, "flow")
    # `auto` is the family's resolution-dependent shift: its default when it has one (LTX's e^mu), else the
    # scheduler's (Wan)
    settings = flow_settings(cfg.objective, default_shift, default_sampling, auto_shift=default_shift)
    try:
        return (flow_cls or FlowMatching)(**settings, **extra)
    except ValueError as exc:
        raise FrameloomError(f"objective: {exc}") from None


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
        self.identity = derive_identity(inner.identity, id_token=id_token)

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

    @property
    def checkpoint_trainable_only(self) -> bool:
        """A LoRA run's checkpoints hold the adapter, not the frozen base (checkpoint/trainable.py)."""
        return self.is_lora

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

    def pipeline_text(self, emb: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """frameloom's text embeddings ``(B, L, D)`` + mask ``(B, L)`` as the family pipeline's prompt
        arguments (what its ``encode_prompt`` returns; the negative ones take a ``negative_`` prefix).
        Default: ``prompt_embeds`` as they are (CogVideoX: the fixed-length, unmasked T5 output)."""
        return {"prompt_embeds": emb}

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


def unwrap_text_encoder(text_encoder: Any) -> Any:
    """The encoder inside an ``IdTokenTextEncoder`` (itself otherwise): it encodes without the id token."""
    return text_encoder.inner if isinstance(text_encoder, IdTokenTextEncoder) else text_encoder


def build_pipeline(
    root: str | os.PathLike,
    transformer: nn.Module,
    text_encoder: Any,
    codec: Any,
    pipeline_cls: type | None = None,
    **parts: Any,
):
    """The family's diffusers pipeline around already-loaded parts (no second copy of any weight):
    ``transformer`` (the in-training one, LoRA layers included), the frozen text encoder's model and
    tokenizer, the codec's VAE, the scheduler from ``<root>/scheduler``, and any further ``parts`` the
    pipeline class takes (Wan I2V: ``image_encoder``, ``image_processor``). ``pipeline_cls`` replaces the
    class ``model_index.json`` names (LTX-Video's image-to-video pipeline around a T2V folder)."""
    root = Path(root)
    cls = pipeline_cls or pipeline_class(root)
    scheduler = component_class(root, "scheduler").from_pretrained(str(root), subfolder="scheduler")
    te = unwrap_text_encoder(text_encoder)
    return cls(
        tokenizer=te.tokenizer,
        text_encoder=te.model,
        vae=codec.vae,
        transformer=transformer,
        scheduler=scheduler,
        **parts,
    )
