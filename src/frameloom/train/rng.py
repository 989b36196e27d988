"""Keyed random streams of the training loop: a generator per micro-step that is a pure function of its keys.

A stream's seed is a hash of its keys into 63 bits (BLAKE2b of their decimal text), so every seed the config
accepts, however large or negative, gives a valid `manual_seed` argument, and neighbouring keys give unrelated
streams (a product such as ``(seed * p + step) * q + slot`` overflows 64 bits for seeds above ~1.4e5 and makes
streams of nearby keys collide).
"""

from __future__ import annotations

import hashlib

import torch

_MASK_63 = (1 << 63) - 1


def stream_seed(*keys: int) -> int:
    """A seed in [0, 2**63) for the integer keys, e.g. (seed, step, slot): BLAKE2b-64 of "k1:k2:...", top bit
    cleared."""
    text = ":".join(str(int(k)) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK_63


def step_generator(
    seed: int,
    step: int,
    slot: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Generator:
    """The generator of one micro-step, seeded by (seed, step, slot) (slot = micro * data_world + data_rank).

    On `device` (a CUDA generator draws noise where the latents are, without a host copy); `generator` is
    reseeded and returned when given (one generator object for the whole run instead of one per step)."""
    g = generator if generator is not None else torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, step, slot))
    return g
