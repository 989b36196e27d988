"""What a checkpoint of a LoRA run holds: the weights it trains, not the frozen base.

A LoRA run's denoiser says so with ``checkpoint_trainable_only = True`` (``DiffusersDenoiser`` sets it when
``model.lora.rank > 0``). The checkpoint writer (checkpoint/distributed.py) then saves only the parameters
with ``requires_grad`` (the adapter) and the module's buffers, with ``meta.json`` recording
``"trainable_only": true``: a CogVideoX-5B LoRA checkpoint shrinks from ~11 GB to the adapter's size (a few
hundred MB at rank 128 with its AdamW state), Wan 14B's from ~28 GB. The base is rebuilt from
``model.pretrained`` whenever the run is loaded (resume, ``frameloom sample``, ``frameloom export``), so
loading such a checkpoint may leave exactly the frozen parameters missing, and nothing else
(``check_loaded``). A full fine-tune (everything trainable) and frameloom's own DiT are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from frameloom.errors import FrameloomError

__all__ = ["check_loaded", "frozen_parameter_names", "load_weights", "trainable_only"]


def trainable_only(module: torch.nn.Module) -> bool:
    """Whether checkpoints of ``module`` hold only what it trains (``checkpoint_trainable_only``)."""
    return bool(getattr(module, "checkpoint_trainable_only", False))


def frozen_parameter_names(module: torch.nn.Module) -> set[str]:
    """Names of the parameters that do not train (``requires_grad`` False): the base of a LoRA run."""
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def check_loaded(
    module: torch.nn.Module, missing: Iterable[str], unexpected: Iterable[str], where: str
) -> None:
    """After a non-strict load into ``module``: nothing unexpected, and only frozen parameters missing (a
    trainable-only checkpoint); anything else is one clear error naming ``where`` the weights came from."""
    unexpected = sorted(unexpected)
    lost = sorted(set(missing) - frozen_parameter_names(module))
    if unexpected or lost:
        raise FrameloomError(
            f"checkpoint {where} does not fit the model: missing {lost[:3]}, unexpected {unexpected[:3]}"
        )


def load_weights(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(weights)`` that accepts a trainable-only checkpoint (the frozen base missing)
    and refuses anything else that does not fit."""
    missing, unexpected = module.load_state_dict(dict(weights), strict=False)
    check_loaded(module, missing, unexpected, where)
