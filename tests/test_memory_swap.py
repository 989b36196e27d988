"""Block swapping (parallel.blocks_to_swap) on CPU: the schedule (every swapped block's weights are device
copies exactly while that block computes, forward and the backward recomputation, at most one more block
prefetched), outputs and gradients equal to no swapping, the trainer wiring, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch

from families import build_tiny_cogvideox, family_config
from frameloom.config import load_config
from frameloom.config.schema import ParallelConfig
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.memory.block_swap import place_on_device
from frameloom.models.cogvideox import family as cog
from frameloom.parallel.memory import apply_activation_checkpointing, transformer_blocks
from frameloom.train.trainer import train

SWAP = ParallelConfig(activation_checkpointing="full", blocks_to_swap=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    synthetic.write_synthetic_set(
        root / "d", num_clips=4, seed=0, height=16, width=16, num_frames=5, progress=False
    )
    return root, build_tiny_cogvideox(root / "cog", num_layers=4)


def _cfg(setup, *extra):
    root, pre = setup
    return load_config(
        None, family_config("cogvideox", pre, root / "d/manifest.parquet", root / "run", *extra)
    )


def _lora_model(setup):
    model = cog.build_denoiser(_cfg(setup, "model.lora.rank=4").model, 0, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial weights everywhere (the LoRA B starts at zero)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 3, 8, 8, generator=g),
        torch.tensor([100, 700]),
        torch.randn(2, 16, 32, generator=g),
        torch.ones(2, 16, dtype=torch.bool),
    )


def test_each_block_is_on_the_device_exactly_while_it_runs(setup):
    reference = _lora_model(setup)
    swapped = copy.deepcopy(reference)
    apply_activation_checkpointing(reference, SWAP)
    apply_activation_checkpointing(swapped, SWAP)
    trace: list = []
    swapper = place_on_device(swapped, "cpu", SWAP, trace=trace)
    blocks = transformer_blocks(swapped)[1:]  # the last 3 of 4
    assert swapper.blocks == blocks
    hosts = [{id(p): h.data_ptr() for p, h in w} for w in swapper.weights]
    violations = []

    def check(i):  # runs after the swapper's own pre-hook on every submodule owning swapped weights
        def hook(module, args):
            for j, weights in enumerate(swapper.weights):
                on_device = [p.data_ptr() != hosts[j][id(p)] for p, _ in weights]
                if on_device != [j == i] * len(weights):
                    violations.append((i, j))

        return hook

    for i, block in enumerate(blocks):
        for m in block.modules():
            if m is not block and any(not p.requires_grad for p in m.parameters(recurse=False)):
                m.register_forward_pre_hook(check(i))

    x, t, emb, mask = _inputs()
    out_ref = reference(x, t, emb, mask)
    out_ref.pow(2).mean().backward()
    out = swapped(x, t, emb, mask)
    assert not violations and swapper.device_bytes() <= 2 * sum(h.numel() * 4 for _, h in swapper.weights[0])
    out.pow(2).mean().backward()
    assert not violations
    # forward brings 0, 1, 2 in turn (each replacing the last); backward recomputes 2, 1, 0
    assert trace == [("in", 0), ("in", 1), ("out", 0), ("in", 2), ("out", 1), ("in", 1), ("out", 2), ("in", 0), ("out", 1)]  # fmt: skip
    assert torch.equal(out, out_ref)
    grads = {n: p.grad for n, p in swapped.named_parameters() if p.requires_grad}
    assert grads and all(torch.equal(g, dict(reference.named_parameters())[n].grad) for n, g in grads.items())
    # inference (no grad, no recomputation): block 0 is still resident from backward; forward only
    trace.clear()
    with torch.no_grad():
        assert torch.equal(swapped(x, t, emb, mask), out_ref.detach())
    assert trace == [("in", 1), ("out", 0), ("in", 2), ("out", 1)] and not violations


def test_refusals(setup):
    full = cog.build_denoiser(_cfg(setup).model, 0, 0)
    with pytest.raises(FrameloomError, match="needs a LoRA"):
        place_on_device(full, "cpu", SWAP)
    lora = _lora_model(setup)
    with pytest.raises(FrameloomError, match="activation_checkpointing: full"):
        place_on_device(lora, "cpu", ParallelConfig(blocks_to_swap=1))
    with pytest.raises(FrameloomError, match="fsdp"):
        place_on_device(
            lora,
            "cpu",
            ParallelConfig(blocks_to_swap=1, activation_checkpointing="full", data_parallel="fsdp"),
        )
    with pytest.raises(FrameloomError, match="has 4 blocks"):
        place_on_device(lora, "cpu", ParallelConfig(blocks_to_swap=5, activation_checkpointing="full"))


@pytest.mark.slow
def test_training_with_swapping_equals_without(setup):
    root, _ = setup
    extra = ("model.lora.rank=4", "optim.lr=1e-2", "parallel.activation_checkpointing=full")
    plain = train(_cfg(setup, *extra, f"run_dir={root / 'plain'}"))
    swapped = train(_cfg(setup, *extra, "parallel.blocks_to_swap=2", f"run_dir={root / 'swapped'}"))
    assert swapped.losses == plain.losses
