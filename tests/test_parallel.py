"""Scale-out with 2 CPU processes (gloo) against single-process references on the same data.

One spawn of 2 processes (`launch`) runs every distributed check of this file and saves what it saw; the tests
compare that with references computed here in one process:
- DDP x 2 == 1 process with grad_accum 2 (losses and weights to 1e-6 relative);
- FSDP2 ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload == DDP (same tolerance);
- Ulysses sp 2 == sp 1: forward output and gradients of the DiT (1e-5 relative: the attention sums run in
  another order after the all-to-all), and 3 training steps (losses and weights, 1e-5);
- `frameloom cache` and `frameloom sample` work split over 2 processes == 1 process.
Activation checkpointing (full / selective / with activation offload) is checked in one process: it must leave
losses and gradients bit-identical.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open

from frameloom.checkpoint import io as ckpt
from frameloom.config import load_config
from frameloom.config.schema import ParallelConfig
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.parallel.memory import select_checkpointed
from frameloom.parallel.plan import check_sequence_split, plan_parallel
from frameloom.pipeline import run_cache
from frameloom.train.trainer import Trainer
from tiny import TINY

RTOL = 1e-6

# ---------------------------------------------------------------- a torchrun-like launcher for tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 processes on a small machine: no oversubscription
    from frameloom.parallel import destroy_distributed

    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        destroy_distributed()


def launch(fn, *args, world: int = 2) -> None:
    """Run `fn(rank, *args)` in `world` fresh processes with torchrun's environment variables."""
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, start_method="spawn")


# ---------------------------------------------------------------- shared data and configs


def make_dataset(root: Path) -> Path:
    """24 tiny clips in root/data with their cache, and the tiny text encoder beside root/runs/*."""
    data = root / "data"
    synthetic.write_synthetic_set(data, num_clips=24, seed=0, height=8, width=8, num_frames=4, progress=False)
    manifest = data / "manifest.parquet"
    run_cache(config(manifest, root / "runs" / "cache"), progress=False)
    return manifest


def config(manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        [
            *TINY,
            f"data.manifest={manifest}",
            f"run_dir={run_dir}",
            "train.ema_decay=0.9",
            "checkpoint.every=0",
            *extra,
        ],
    )


def weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, EMA) of the newest checkpoint, whole tensors whatever its layout."""
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    return loaded["model"], loaded["ema"]


def assert_close_dicts(a: dict, b: dict, rtol: float, atol: float = 1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


DP_RUNS = {
    "ddp": ["parallel.data_parallel=ddp"],
    "zero2": ["parallel.data_parallel=fsdp", "parallel.zero=2"],
    "zero3": ["parallel.data_parallel=fsdp", "parallel.zero=3"],
    "zero3_offload": ["parallel.data_parallel=fsdp", "parallel.zero=3", "parallel.cpu_offload=true"],
}
STEPS = 3


# ---------------------------------------------------------------- what the 2 processes do


def _sp_model_check(rank: int) -> dict:
    """Ulysses on the bare DiT: output and summed gradients vs the same model unsplit (same seed, both ranks)."""
    import torch.distributed as dist

    from frameloom.models.dit.model import VideoDiT
    from frameloom.parallel.sequence import apply_sequence_parallel

    def build():
        torch.manual_seed(0)
        m = VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=8,
                     positional_conditioning=True)  # fmt: skip
        for p in m.parameters():  # adaLN-Zero starts at exact zeros; make every path carry gradient
            torch.nn.init.normal_(p, std=0.05)
        return m

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 4, 4, generator=g)  # 2 x 2 x 2 = 8 tokens per sample
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref = build()
    out_ref = ref(x, t, text, mask)
    (out_ref.square().mean()).backward()
    sp = build()
    apply_sequence_parallel(sp, dist.new_group([0, 1]))
    out_sp = sp(x, t, text, mask)
    (out_sp.square().mean()).backward()
    grads = {}
    for (name, p_ref), (_, p_sp) in zip(ref.named_parameters(), sp.named_parameters()):
        gsum = p_sp.grad.clone()
        dist.all_reduce(gsum)  # each rank holds its tokens' share of the gradient
        grads[name] = (p_ref.grad, gsum)
    return {"out": (out_ref.detach(), out_sp.detach()), "grads": grads}


def _lora_check(rank: int) -> dict:
    """PEFT LoRA (frozen base, trainable adapters) under DDP and FSDP2 ZeRO-3: each rank one sample of a
    batch of 2, 2 SGD steps; the reference trains the same model on both samples in this process."""
    from frameloom.config.schema import LoraConfig
    from frameloom.models.dit.model import VideoDiT
    from frameloom.models.lora import apply_lora
    from frameloom.parallel import init_distributed, parallelize

    env = init_distributed("cpu")
    g = torch.Generator().manual_seed(2)
    x, t, text = (
        torch.randn(2, 3, 2, 4, 4, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 5, 8, generator=g),
    )

    def build():
        torch.manual_seed(0)
        m = VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=8)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return apply_lora(m, LoraConfig(rank=4, target_modules=["qkv", "proj", "q", "kv"]))

    def train(module, forward, rows) -> dict:
        # SGD: linear in the gradients, so rounding-level differences of the batch-of-2 reference stay at that
        # level (Adam's normalisation would amplify them on near-zero gradients)
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            forward(x[rows], t[rows], text[rows]).square().mean().backward()
            opt.step()
            opt.zero_grad()
        full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in module.named_parameters()}
        return {n: (p.detach().clone(), p.requires_grad) for n, p in full.items()}

    ref = build()
    out = {
        "init": {n: p.detach().clone() for n, p in ref.named_parameters()},
        "ref": train(ref, ref, slice(0, 2)),
    }
    for name, pc in {"ddp": ParallelConfig(), "fsdp": ParallelConfig(data_parallel="fsdp", zero=3)}.items():
        par = parallelize(build(), pc, env)
        out[name] = train(par.module, par.forward, slice(rank, rank + 1))
    return out


def _bf16_timestep_check(rank: int) -> dict:
    """FSDP2 bf16 mixed precision without autocast on the DiT with pooled text and per-token conditioning:
    what the timestep embedder receives, against the fp32 features rounded to bf16 once."""
    from frameloom.models.dit.model import VideoDiT, timestep_embedding
    from frameloom.parallel import init_distributed, parallelize

    env = init_distributed("cpu")
    torch.manual_seed(0)
    model = VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=8,
                     pooled_text=True, positional_conditioning=True)  # fmt: skip
    seen: list[torch.Tensor] = []
    model.t_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    par = parallelize(model, ParallelConfig(data_parallel="fsdp", mixed_precision="bf16"), env)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.7371, 0.2503])
    try:
        out = par.forward(torch.randn(2, 3, 2, 4, 4, generator=g), t, torch.randn(2, 5, 8, generator=g))
    except Exception as exc:  # before the fix: a dtype mismatch (fp32 pooled text meets bf16 weights)
        return {"error": repr(exc)}
    expected = timestep_embedding(t * model.timestep_scale, model.frequency_embedding_size).to(torch.bfloat16)
    return {
        "seen": seen[0],
        "expected": expected,
        "out_dtype": out.dtype,
        "finite": bool(out.isfinite().all()),
    }


def _nan_on_one_rank(rank: int, manifest: Path, run_dir: Path) -> dict:
    """DDP, 3 steps, NaN latents on rank 1 only at step 2: every rank skips step 2, AdamW steps twice."""
    trainer = Trainer(config(manifest, run_dir, f"train.steps={STEPS}", "train.log_every=1"))
    encode = trainer._encode

    def encode_nan(batch):
        latent, cond = encode(batch)
        return (latent * float("nan") if rank == 1 and trainer.step == 1 else latent), cond

    trainer._encode = encode_nan
    result = trainer.fit()
    steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    weights = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
    return {"losses": result.losses, "skipped": result.skipped_steps, "adam_steps": steps, "weights": weights}


def _instrumented(name: str, cfg) -> dict:
    """A DP run, counting VideoDiT builds and moves: FSDP must never move the whole model to the device (it
    shards from the CPU) and validation must build no second model."""
    from frameloom.models.dit.model import VideoDiT

    calls = {"init": 0, "to": 0}
    init, to = VideoDiT.__init__, VideoDiT.to

    def counting_init(self, *args, **kwargs):
        calls["init"] += 1
        init(self, *args, **kwargs)

    def counting_to(self, *args, **kwargs):
        calls["to"] += 1
        return to(self, *args, **kwargs)

    VideoDiT.__init__, VideoDiT.to = counting_init, counting_to
    try:
        trainer = Trainer(cfg)
        placed = dict(calls)
        params = list(trainer.module.parameters())
        local = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in params
        )
        total = sum(p.numel() * p.element_size() for p in params)
        losses = trainer.fit().losses
    finally:
        VideoDiT.__init__, VideoDiT.to = init, to
    return {"losses": losses, "kind": trainer.par.kind, "placed": placed, "during_fit": calls["init"] - 1,
            "local_bytes": local, "total_bytes": total}  # fmt: skip


VALIDATED = ("ddp", "zero3")  # runs that also validate at their last step (3 prompts over 2 ranks)
PROMPTS = ["a red square moving left", "a blue circle moving up", "a green star"]


def _worker(rank: int, root: str) -> None:
    import json

    from frameloom.sampling import video_io

    root = Path(root)
    manifest = root / "data" / "manifest.parquet"
    result: dict = {}
    written: list[str] = []
    write_mp4 = video_io.write_mp4

    def recording_write(video, path, *args, **kwargs):
        written.append(Path(path).name)
        return write_mp4(video, path, *args, **kwargs)

    video_io.write_mp4 = recording_write
    for name, extra in DP_RUNS.items():
        if name in VALIDATED:
            extra = [*extra, f"validation.every={STEPS}", f"validation.prompts={json.dumps(PROMPTS)}"]
        written.clear()
        cfg = config(manifest, root / "runs" / f"dp-{name}", f"train.steps={STEPS}", *extra)
        result[name] = {**_instrumented(name, cfg), "written": list(written)}
    video_io.write_mp4 = write_mp4
    result["bf16"] = _bf16_timestep_check(rank)
    result["nan"] = _nan_on_one_rank(rank, manifest, root / "runs" / "nan")
    try:  # no objective in frameloom uses it yet: refused before anything is built
        Trainer(config(manifest, root / "runs" / "vsg", "parallel.video_sync_group=2"))
        result["vsg"] = "accepted"
    except FrameloomError as exc:
        result["vsg"] = str(exc)
    trainer = Trainer(config(manifest, root / "runs" / "sp2", f"train.steps={STEPS}", "parallel.sp_size=2"))
    result["sp_train"] = {"losses": trainer.fit().losses, "data_world": trainer.data_world}
    result["sp_model"] = _sp_model_check(rank)
    result["lora"] = _lora_check(rank)
    # frameloom cache: each rank its rows, into a fresh store
    run_cache(config(manifest, root / "runs" / "x", f"data.cache_dir={root / 'cache2'}"), progress=False,
              shard=(rank, 2))  # fmt: skip
    # frameloom sample: each rank its (prompt, seed) pairs
    from frameloom.sampling.generate import sample_command

    result["sample"] = sample_command(
        str(root / "runs" / "dp-ddp"), prompts=["a red square", "a blue circle", "green"], seeds=[0, 1],
        out=str(root / "sample2"),
    )  # fmt: skip
    torch.save(result, root / f"result-{rank}.pt")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    make_dataset(root)
    return root


@pytest.fixture(scope="module")
def two_procs(data_root):
    root = data_root
    launch(_worker, str(root))
    return root, [torch.load(root / f"result-{r}.pt", weights_only=False) for r in range(2)]


def reference(root: Path, name: str, *extra: str):
    """A single-process run over the same data (run dirs share the parent of the tiny text encoder)."""
    trainer = Trainer(config(root / "data" / "manifest.parquet", root / "runs" / name, *extra))
    return trainer.fit().losses, root / "runs" / name


# ---------------------------------------------------------------- tests


def test_ddp_two_processes_equal_one_with_grad_accum(two_procs):
    root, results = two_procs
    losses, run = reference(root, "ref-accum2", f"train.steps={STEPS}", "train.grad_accum=2")
    assert results[0]["ddp"]["kind"] == "ddp"
    # the logged loss is the all-reduced mean: the same on both ranks, and the mean of the 2 micro-batches
    assert results[0]["ddp"]["losses"] == results[1]["ddp"]["losses"]
    torch.testing.assert_close(
        torch.tensor(results[0]["ddp"]["losses"]), torch.tensor(losses), rtol=RTOL, atol=0
    )
    model, ema = weights(root / "runs" / "dp-ddp")  # a sharded (dcp) checkpoint, read whole
    assert ckpt.read_meta(ckpt.latest_checkpoint(root / "runs" / "dp-ddp"))["format"] == "sharded"
    ref_model, ref_ema = weights(run)
    assert_close_dicts(model, ref_model, RTOL)
    assert_close_dicts(ema, ref_ema, RTOL)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_fsdp_equals_ddp(two_procs, name):
    root, results = two_procs
    assert results[0][name]["kind"] == "fsdp"
    torch.testing.assert_close(
        torch.tensor(results[0][name]["losses"]), torch.tensor(results[0]["ddp"]["losses"]), rtol=RTOL, atol=0
    )
    model, ema = weights(root / "runs" / f"dp-{name}")
    ddp_model, ddp_ema = weights(root / "runs" / "dp-ddp")
    assert_close_dicts(model, ddp_model, RTOL)
    assert_close_dicts(ema, ddp_ema, RTOL)


def test_fsdp_shards_from_the_cpu_and_holds_a_share_of_the_parameters(two_procs):
    """FSDP never moves the whole model to the device before sharding (cpu_offload: a model bigger than one
    GPU); after sharding each rank holds about 1/world of the parameter bytes (the rest is padding)."""
    _, results = two_procs
    for r in range(2):
        for name in ("zero2", "zero3", "zero3_offload"):
            got = results[r][name]
            assert got["placed"] == {"init": 1, "to": 0}, name  # built once, never moved whole
            assert got["local_bytes"] <= 0.5 * got["total_bytes"] * 1.02, (name, got)
        ddp = results[r]["ddp"]
        assert ddp["placed"]["to"] == 1 and ddp["local_bytes"] == ddp["total_bytes"]
    assert (
        results[0]["zero3_offload"]["local_bytes"] + results[1]["zero3_offload"]["local_bytes"]
        >= (results[0]["zero3_offload"]["total_bytes"])
    )


def test_fsdp_bf16_keeps_the_timestep_in_fp32(two_procs):
    """FSDP2 bf16 without autocast: the timestep embedder receives the fp32 timestep's features rounded once
    to bf16 (not features of a bf16-rounded timestep), and pooled text / per-token conditioning run."""
    _, results = two_procs
    for r in range(2):
        got = results[r]["bf16"]
        assert "error" not in got, got
        assert got["seen"].dtype == torch.bfloat16 and torch.equal(got["seen"], got["expected"])
        assert got["out_dtype"] == torch.bfloat16 and got["finite"]


def test_nan_on_one_rank_is_skipped_on_every_rank(two_procs):
    _, results = two_procs
    a, b = results[0]["nan"], results[1]["nan"]
    assert a["skipped"] == b["skipped"] == 1
    assert math.isnan(a["losses"][1]) and math.isnan(b["losses"][1])
    assert a["losses"][::2] == b["losses"][::2] and all(math.isfinite(x) for x in a["losses"][::2])
    assert a["adam_steps"] == b["adam_steps"] == {2.0}  # 3 steps, the NaN one left AdamW untouched
    assert torch.equal(a["weights"], b["weights"])  # the replicas stayed identical


def test_video_sync_group_is_refused_without_an_objective_that_uses_it(two_procs):
    _, results = two_procs
    for r in range(2):
        assert "parallel.video_sync_group=2 needs an objective" in results[r]["vsg"]
        assert "set parallel.video_sync_group: 1" in results[r]["vsg"]


@pytest.mark.parametrize("name", VALIDATED)
def test_validation_is_shared_over_ranks_on_the_live_model(two_procs, name):
    """3 prompts, 2 ranks: rank 0 writes prompts 0 and 2, rank 1 prompt 1, with the global names; no second
    model is built; the files equal sampling the run's checkpoint (its EMA) in one process, byte for byte."""
    from frameloom.sampling.generate import sample_command

    root, results = two_procs
    names = sorted(p.name for p in (root / "runs" / f"dp-{name}" / "samples" / "step-00000003").glob("*.mp4"))
    assert [n[:4] for n in names] == ["000-", "001-", "002-"]
    assert results[0][name]["written"] == [names[0], names[2]] and results[1][name]["written"] == [names[1]]
    assert results[0][name]["during_fit"] == results[1][name]["during_fit"] == 0
    again = sample_command(
        str(root / "runs" / f"dp-{name}"), prompts=PROMPTS, seeds=[0], out=str(root / name)
    )
    for path in again:
        made = root / "runs" / f"dp-{name}" / "samples" / "step-00000003" / path.name
        assert made.read_bytes() == path.read_bytes(), path.name


def test_sequence_parallel_model_output_and_grads(two_procs):
    """sp 2 vs sp 1 on the bare DiT (8 tokens, 2 heads, per-token adaLN): output and gradients to 1e-5."""
    _, results = two_procs
    for r in range(2):
        out_ref, out_sp = results[r]["sp_model"]["out"]
        torch.testing.assert_close(out_sp, out_ref, rtol=1e-5, atol=1e-6)
        for name, (g_ref, g_sp) in results[r]["sp_model"]["grads"].items():
            assert g_ref.abs().max() > 0, name  # every parameter gets a gradient: the check is not vacuous
            torch.testing.assert_close(g_sp, g_ref, rtol=1e-5, atol=1e-6, msg=name)


def test_sequence_parallel_training_equals_one_process(two_procs):
    """sp 2 (both ranks read the same batch) trains like one process with the same batch: 1e-5."""
    root, results = two_procs
    assert results[0]["sp_train"]["data_world"] == 1
    losses, run = reference(root, "ref-sp1", f"train.steps={STEPS}")
    torch.testing.assert_close(
        torch.tensor(results[0]["sp_train"]["losses"]), torch.tensor(losses), rtol=1e-5, atol=0
    )
    model, _ = weights(root / "runs" / "sp2")
    ref_model, _ = weights(run)
    assert_close_dicts(model, ref_model, 1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_lora_under_ddp_and_fsdp(two_procs, kind):
    _, results = two_procs
    lora = results[0]["lora"]
    ref, got, init = lora["ref"], lora[kind], lora["init"]
    assert got.keys() == ref.keys() and any("lora_A" in n for n in ref)
    for name, (value, trainable) in got.items():
        assert trainable == ("lora_" in name) == ref[name][1], name
        torch.testing.assert_close(value, ref[name][0], rtol=RTOL, atol=1e-7, msg=name)
        if "lora_B" in name:  # every adapter trained (B starts at 0; A moves only once B is non-zero) ...
            assert not torch.equal(value, init[name]), name
        elif not trainable:  # ... the frozen base did not move
            assert torch.equal(value, init[name]), name


def test_cache_two_processes_equal_one(two_procs):
    root, _ = two_procs
    from frameloom.cache.index import CacheIndex

    one, two = root / "data" / ".frameloom_cache", root / "cache2"

    def entries(store: Path) -> list[Path]:  # the key index is one part per build process: compared below
        return sorted(
            p.relative_to(store) for p in store.rglob("*") if p.is_file() and p.parts[-3] != "index"
        )

    files_one, files_two = entries(one), entries(two)
    assert files_one and files_one == files_two
    runs = sorted(p.name for p in (one / "index").iterdir())
    assert runs and runs == sorted(p.name for p in (two / "index").iterdir())
    for run in runs:  # 1 part vs 2 parts, the same (row, bucket) -> key table once loaded
        a, b = CacheIndex.load(one, run), CacheIndex.load(two, run)
        assert len(list((two / "index" / run).glob("rank*-of-00002.parquet"))) == 2
        for name in ("composite", "video", "has_video", "complete"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (run, name)
    for rel in files_one:  # same tensors and metadata (not bytes: safetensors orders metadata keys freely)
        with safe_open(str(one / rel), "pt") as f1, safe_open(str(two / rel), "pt") as f2:
            assert f1.metadata() == f2.metadata() and sorted(f1.keys()) == sorted(f2.keys()), rel
            for key in f1.keys():
                assert torch.equal(f1.get_tensor(key), f2.get_tensor(key)), (rel, key)


def test_sample_two_processes_equal_one(two_procs):
    from frameloom.data.video import decode_clip  # noqa: F401  (PyAV decoding below)
    from frameloom.sampling.generate import sample_command

    root, results = two_procs
    prompts, seeds = ["a red square", "a blue circle", "green"], [0, 1]
    paths = sample_command(
        str(root / "runs" / "dp-ddp"), prompts=prompts, seeds=seeds, out=str(root / "sample1")
    )
    assert (
        [p.name for p in results[0]["sample"]]
        == [p.name for p in paths]
        == [p.name for p in results[1]["sample"]]
    )
    assert len(paths) == 6
    for p in paths:
        assert (root / "sample2" / p.name).read_bytes() == p.read_bytes(), p.name


# ---------------------------------------------------------------- single process: memory savers, errors


def _grads_after_step(root: Path, name: str, *extra: str):
    trainer = Trainer(
        config(root / "data" / "manifest.parquet", root / "runs" / name, "train.steps=1", *extra)
    )
    batch = next(iter(trainer._loader()))
    loss = trainer._micro_step(batch, 0)
    return trainer, float(loss), {n: p.grad.clone() for n, p in trainer.module.named_parameters()}


@pytest.fixture(scope="module")
def ac_baseline(data_root):
    _, loss, grads = _grads_after_step(data_root, "ac-none")
    return loss, grads


@pytest.mark.parametrize(
    "extra,blocks",
    [
        (["parallel.activation_checkpointing=full"], 2),
        (["parallel.activation_checkpointing=selective", "parallel.checkpoint_blocks=1"], 1),
        (["parallel.activation_checkpointing=selective", "parallel.checkpoint_every=2"], 1),
        (["parallel.activation_checkpointing=selective", "parallel.opensora_grad_ckpt=[1, 0]"], 1),
        (["parallel.activation_checkpointing=selective", "parallel.checkpoint_blocks=1",
          "parallel.offload_activations=true"], 1),
    ],
    ids=["full", "first1", "every2", "opensora", "first1+offload"],
)  # fmt: skip
def test_activation_checkpointing_leaves_loss_and_grads_unchanged(data_root, ac_baseline, extra, blocks):
    loss, grads = ac_baseline
    ckpt_trainer, loss_ck, grads_ck = _grads_after_step(data_root, "ac-" + "-".join(extra), *extra)
    assert ckpt_trainer.par.checkpointed_blocks == blocks
    assert loss_ck == loss
    for name in grads:  # recomputation runs the same ops on the same inputs: bit-identical
        assert torch.equal(grads_ck[name], grads[name]), name
    # parameter names unchanged (checkpoints and EMA keys do not depend on the memory savers)
    assert list(dict(ckpt_trainer.module.named_parameters())) == list(grads)


def test_compile_over_checkpointing_keeps_output_grads_and_names():
    """The fixed order checkpoint -> compile (eager backend: dynamo tracing without a C++ toolchain)."""
    from frameloom.models.dit.model import VideoDiT
    from frameloom.parallel.memory import apply_activation_checkpointing, compile_blocks

    def build():
        torch.manual_seed(0)
        m = VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=8)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return m

    g = torch.Generator().manual_seed(1)
    x, t, text = (
        torch.randn(2, 3, 2, 4, 4, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 5, 8, generator=g),
    )
    ref, opt = build(), build()
    assert apply_activation_checkpointing(opt, ParallelConfig(activation_checkpointing="full")) == 2
    compile_blocks(opt, backend="eager")
    out_ref, out = ref(x, t, text), opt(x, t, text)
    out_ref.square().mean().backward()
    out.square().mean().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-7)
    names = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in opt.named_parameters()] == names and list(opt.state_dict()) == list(
        ref.state_dict()
    )
    for (n, p), q in zip(ref.named_parameters(), opt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    torch._dynamo.reset()


def test_select_checkpointed_blocks():
    def sel(counts, **kw):
        return select_checkpointed(counts, ParallelConfig(activation_checkpointing="selective", **kw))

    assert sel([5], checkpoint_blocks=2) == [[True, True, False, False, False]]
    assert sel([5], checkpoint_every=2) == [[False, True, False, True, False]]
    # Open-Sora (double, single) on a double/single model: first 1 of 3 double, first 2 of 4 single
    assert sel([3, 4], opensora_grad_ckpt=[1, 2]) == [[True, False, False], [True, True, False, False]]
    # first N counts over all lists in forward order
    assert sel([2, 3], checkpoint_blocks=3) == [[True, True], [True, False, False]]
    with pytest.raises(FrameloomError, match="one block list"):
        sel([4], opensora_grad_ckpt=[1, 1])
    full = select_checkpointed([2, 1], ParallelConfig(activation_checkpointing="full"))
    assert full == [[True, True], [True]]


def test_plan_layout_and_errors():
    plan = plan_parallel(ParallelConfig(data_parallel="fsdp", dp_replicate=2, sp_size=2), 16, 1)
    assert plan.mesh_shape == (2, 4, 2)
    # rank = (r * dp_shard + s) * sp + p: rank 13 = (1 * 4 + 2) * 2 + 1 -> dp index 6, sp rank 1
    assert (plan.dp_rank(13), plan.sp_rank(13), plan.data_rank(13), plan.data_world) == (6, 1, 6, 8)
    ddp = plan_parallel(ParallelConfig(sp_size=2, video_sync_group=2), 8, 4)
    assert ddp.mesh_shape == (4, 1, 2) and ddp.data_world == 2 and ddp.data_rank(7) == 1  # (7 // 2) // 2
    with pytest.raises(FrameloomError, match="sp_size=3 does not divide the world size 4"):
        plan_parallel(ParallelConfig(sp_size=3), 4, 1)
    with pytest.raises(FrameloomError, match="dp_replicate x parallel.sp_size = 3 x 1"):
        plan_parallel(ParallelConfig(data_parallel="fsdp", dp_replicate=3), 4, 1)
    with pytest.raises(FrameloomError, match="video_sync_group=3"):
        plan_parallel(ParallelConfig(video_sync_group=3), 4, 1)
    with pytest.raises(FrameloomError, match="parallel.zero must be 2 or 3"):
        plan_parallel(ParallelConfig(zero=1), 1, 1)
    with pytest.raises(FrameloomError, match="needs exactly one"):
        plan_parallel(ParallelConfig(activation_checkpointing="selective"), 1, 1)
    with pytest.raises(FrameloomError, match="fsdp only"):
        plan_parallel(ParallelConfig(cpu_offload=True), 2, 1)
    with pytest.raises(FrameloomError, match="does not divide the 15 video tokens"):
        check_sequence_split(15, 2, 2)
    with pytest.raises(FrameloomError, match="3 attention heads"):
        check_sequence_split(16, 3, 2)


@pytest.mark.slow
def test_commands_under_torchrun(data_root, tmp_path):
    """The real launcher and command paths: `torchrun --nproc_per_node 2 -m frameloom cache|train|sample`."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("")
    run_dir = data_root / "runs" / "cli"
    common = [*TINY, f"data.manifest={data_root / 'data' / 'manifest.parquet'}", f"run_dir={run_dir}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def frameloom(*args: str) -> str:
        proc = subprocess.run([*torchrun, "-m", "frameloom", *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = frameloom("cache", str(cfg), *common)
    assert out.count("cache: 24 clips encoded") == 1, out  # rank 0 prints the report summed over both
    out = frameloom("train", str(cfg), *common)
    assert out.count("trained to step 2") == 1, out
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["format"] == "sharded"
    out = frameloom("sample", str(run_dir), "--prompt", "a", "b", "c", "--out", str(tmp_path / "s"))
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 3 and all(p.stat().st_size > 0 for p in paths)


@pytest.mark.slow
def test_sigterm_to_torchrun_with_loader_workers_saves_and_resumes(data_root, tmp_path):
    """torchrun --nproc_per_node 2, 2 loader workers per rank, SIGTERM to the launcher mid-run: torchrun
    signals each rank's process group (workers included); the workers ignore it, the ranks agree, save and
    exit 0; the checkpoint resumes to the uninterrupted run's losses (one process with grad_accum 2 draws
    what 2 processes draw; 1e-5: DDP's reduction order)."""
    import signal
    import time

    from frameloom.train.trainer import train

    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text("")
    run = tmp_path / "run"
    manifest = data_root / "data" / "manifest.parquet"
    common = [*TINY, f"data.manifest={manifest}", "checkpoint.every=1000", "train.log_every=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*torchrun, "-m", "frameloom", "train", str(cfg_file), *common, f"run_dir={run}", "train.steps=400",
         "data.num_workers=2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert "DataLoader worker" not in out and "SIGTERM: saved" in out, out  # (killed by signal: Terminated)
    saved = ckpt.latest_checkpoint(run)
    assert saved is not None, out
    stopped_at = ckpt.read_meta(saved)["step"]
    assert 3 <= stopped_at < 400
    one = [*common, "train.grad_accum=2"]  # one process, the same global batch
    resumed = train(load_config(None, [*one, f"run_dir={run}", f"train.steps={stopped_at + 2}",
                                       "checkpoint.resume=latest"]))  # fmt: skip
    assert resumed.step == stopped_at + 2 and len(resumed.losses) == 2
    reference = train(
        load_config(None, [*one, f"run_dir={tmp_path / 'ref'}", f"train.steps={stopped_at + 2}"])
    )
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(reference.losses[-2:]), rtol=1e-5, atol=0
    )


def test_compile_falls_back_to_eager_with_a_warning_without_a_toolchain(monkeypatch, caplog):
    """A preset's `parallel.compile: true` on a machine without inductor's C++ compiler trains eagerly (one
    warning) instead of failing inside the first step; with a compiler on PATH every block is compiled."""
    from frameloom.models.dit.model import VideoDiT
    from frameloom.parallel.env import DistEnv
    from frameloom.parallel.memory import compile_unavailable, transformer_blocks
    from frameloom.parallel.parallelize import parallelize

    def build():
        return VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=16, depth=2, num_heads=2, text_dim=8)

    monkeypatch.setenv("CXX", "frameloom-no-such-compiler")
    assert "frameloom-no-such-compiler" in compile_unavailable("cpu")
    assert compile_unavailable("cpu", backend="eager") is None  # only inductor builds kernels
    with caplog.at_level("WARNING", logger="frameloom.parallel"):
        par = parallelize(build(), ParallelConfig(compile=True), DistEnv())
    assert [b._compiled_call_impl for b in transformer_blocks(par.module)] == [None, None]
    assert "training without torch.compile" in caplog.text

    monkeypatch.setenv(
        "CXX", "sh"
    )  # any executable on PATH stands in for the compiler (nothing is built here)
    assert compile_unavailable("cpu") is None
    par = parallelize(build(), ParallelConfig(compile=True), DistEnv())
    assert all(b._compiled_call_impl is not None for b in transformer_blocks(par.module))
    assert par.module._compiled_call_impl is None
    # `model`: the whole denoiser is one compiled module, its blocks are not compiled again inside it
    par = parallelize(build(), ParallelConfig(compile="model"), DistEnv())
    assert par.module._compiled_call_impl is not None
    assert [b._compiled_call_impl for b in transformer_blocks(par.module)] == [None, None]
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"compile": "graph"}, "must be false, true, blocks or model"),
        ({"compile": "model", "data_parallel": "fsdp"}, "use parallel.compile=blocks"),
        ({"compile": "model", "blocks_to_swap": 2}, "use parallel.compile=blocks"),
    ],
)
def test_compile_scope_is_checked(overrides, message):
    from frameloom.parallel.plan import validate_parallel_config

    with pytest.raises(FrameloomError, match=message):
        validate_parallel_config(ParallelConfig(**overrides))
    validate_parallel_config(ParallelConfig(compile="model"))
