"""LoRA through PEFT: build the adapter from ``model.lora``, read and write its weights, and name them the
way diffusers' ``load_lora_weights`` and ComfyUI expect.

Key forms (for a module path ``M`` such as ``transformer_blocks.0.attn1.to_q``):

- PEFT inside frameloom (``get_lora_state_dict``): ``M.lora_A.weight`` ``(r, in)``, ``M.lora_B.weight``
  ``(out, r)``; the scale is ``alpha / r``.
- diffusers (``to_diffusers_keys``): ``transformer.M.lora_A.weight`` / ``transformer.M.lora_B.weight``; the
  adapter config (rank, alpha, targets) travels in the safetensors metadata, which is how
  ``load_lora_weights`` recovers alpha.
- ComfyUI (``to_comfyui_keys``): ``diffusion_model.C.lora_down.weight`` (= lora_A),
  ``diffusion_model.C.lora_up.weight`` (= lora_B) and ``diffusion_model.C.alpha`` (a scalar tensor; ComfyUI
  scales by ``alpha / r`` with ``r = lora_down.shape[0]``), where ``C`` is the module's name in ComfyUI's own
  model (the family's ``comfyui_module`` map; ``module_path_map`` builds one). ComfyUI's
  ``model_lora_keys_unet`` (comfy/lora.py) matches ``diffusion_model.C`` to the model weight
  ``diffusion_model.C.weight`` (its "generic" LoRA format).
- kohya (``to_kohya_keys``): ``lora_unet_<C with "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``: the other name ``model_lora_keys_unet`` maps to the same weight (musubi-tuner's and
  sd-scripts' files use it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frameloom.config.schema import LoraConfig
from frameloom.errors import FrameloomError

__all__ = [
    "ADAPTER",
    "apply_lora",
    "get_lora_state_dict",
    "lora_alpha",
    "peft_lora_config",
    "set_lora_state_dict",
    "module_path_map",
    "to_comfyui_keys",
    "to_diffusers_keys",
    "to_kohya_keys",
]

#: The adapter name frameloom trains (PEFT's default).
ADAPTER = "default"


def lora_alpha(cfg: LoraConfig) -> float:
    """``model.lora.alpha``, or the rank when unset."""
    return float(cfg.alpha) if cfg.alpha is not None else float(cfg.rank)


def peft_lora_config(cfg: LoraConfig):
    """A ``peft.LoraConfig`` from ``model.lora`` (rank, alpha, target modules, dropout); rank must be > 0."""
    from peft import LoraConfig as PeftLoraConfig

    if cfg.rank <= 0:
        raise FrameloomError("model.lora.rank must be > 0 for a LoRA (0 means a full fine-tune)")
    if not cfg.target_modules:
        raise FrameloomError("model.lora.target_modules is empty")
    return PeftLoraConfig(
        r=int(cfg.rank),
        lora_alpha=lora_alpha(cfg),
        lora_dropout=float(cfg.dropout),
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,  # B = 0: the adapted model starts exactly at the base model
    )


def apply_lora(module: nn.Module, cfg: LoraConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inject trainable LoRA layers (adapter ``default``) into ``module`` in place and freeze everything else.

    diffusers models (``PeftAdapterMixin``) get them through ``add_adapter``, so that the model's own LoRA
    machinery (``load_lora_adapter``, ``fuse_lora``) knows the adapter; other modules through PEFT's
    ``inject_adapter_in_model``. The LoRA weights are kept in ``dtype`` (fp32 by default) whatever the base's
    precision; PEFT casts the layer input to the LoRA dtype and the result back.
    """
    config = peft_lora_config(cfg)
    module.requires_grad_(False)
    try:
        if hasattr(module, "add_adapter"):
            module.add_adapter(config, adapter_name=ADAPTER)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise FrameloomError(f"model.lora.target_modules: {exc}") from None
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
    return module


def get_lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights as ``{M.lora_A.weight, M.lora_B.weight}`` (adapter name removed), detached."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach() for k, v in state.items()}


def set_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``get_lora_state_dict``-form weights into the injected adapter; any missing or unexpected LoRA
    key is an error."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise FrameloomError(f"LoRA weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def to_diffusers_keys(state: dict[str, torch.Tensor], prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """``M.lora_A.weight`` -> ``<prefix>.M.lora_A.weight`` (what ``load_lora_weights`` reads)."""
    return {f"{prefix}.{k}": v for k, v in state.items()}


def module_path_map(
    family: str,
    blocks: tuple[str, str],
    inner: dict[str, str],
    top: dict[str, str],
    prefixes: dict[str, str] | None = None,
) -> Callable[[str], str]:
    """A ``comfyui_module`` map from tables: ``<blocks[0]>.N.<inner key>`` -> ``<blocks[1]>.N.<inner value>``,
    a whole top-level path through ``top``, a path starting with a ``prefixes`` key through its value; any
    other path is one clear error naming the ``family`` (its LoRA could not be loaded by name)."""

    def rename(path: str) -> str:
        head, _, rest = path.partition(".")
        number, _, inside = rest.partition(".")
        if head == blocks[0] and number.isdigit() and inside in inner:
            return f"{blocks[1]}.{number}.{inner[inside]}"
        if path in top:
            return top[path]
        for old, new in (prefixes or {}).items():
            if path == old or path.startswith(old + "."):
                return new + path[len(old) :]
        raise FrameloomError(
            f"no ComfyUI name for the {family} module {path!r} (choose other model.lora.target_modules)"
        )

    return rename


def _lora_keys(
    state: dict[str, torch.Tensor], alpha: float, name: Callable[[str], str]
) -> dict[str, torch.Tensor]:
    """PEFT keys -> ``<name(M)>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (fp32 scalar)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for peft_part, comfy_part in ((".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up")):
            if key.endswith(peft_part):
                prefix = name(key[: -len(peft_part)])
                out[f"{prefix}.{comfy_part}.weight"] = value
                out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise FrameloomError(f"not a LoRA weight key: {key}")
    return out


def to_comfyui_keys(
    state: dict[str, torch.Tensor], alpha: float, module_map: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT keys -> ComfyUI keys: ``diffusion_model.C.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    ``module_map`` turns a diffusers module path ``M`` into ComfyUI's ``C`` (identity when None).
    """
    return _lora_keys(state, alpha, lambda m: f"diffusion_model.{module_map(m) if module_map else m}")


def to_kohya_keys(
    state: dict[str, torch.Tensor], alpha: float, module_map: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT keys -> kohya keys: ``lora_unet_<C with "." -> "_">.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha`` (``C`` as in ``to_comfyui_keys``)."""
    return _lora_keys(
        state, alpha, lambda m: "lora_unet_" + (module_map(m) if module_map else m).replace(".", "_")
    )
