"""Trainer with 2 processes (gloo, CPU): FSDP2 equals one process fed the same two micro-batches, loss goes
down, a non-finite loss on one rank skips the step on all, resume is bitwise, a 2-rank checkpoint exports;
``parallel.build`` gives every world size the eager weights of the seed; ``parallelize``: bf16 parameters
inside forward (fp32 master weights and gradients), and activation checkpointing gives the same gradients."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize_, run_torchrun
from test_train import TINY, tiny_config

from imf import build_model
from imf.config import LossConfig, preset
from imf.dist import describe, free_port
from imf.loss import imf_loss, sample_training_inputs
from imf.train.checkpoint import latest, read_meta
from imf.train.export import export_ema
from imf.train.parallel import build, parallelize, transformer_blocks
from imf.train.trainer import Trainer, input_stream

STEPS = 30


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "demo",
        "--model.dim",
        str(TINY["dim"]),
        "--model.heads",
        str(TINY["heads"]),
        "--batch",
        "32",
        "--steps",
        str(STEPS),
        "--schedule.warmup_steps",
        "5",
        "--lr",
        "1e-3",
        "--schedule.decay",
        "constant",
        "--debug.nan_steps",
        "[5]",
        "--log.every_steps",
        "1",
        "--log.progress",
        "false",
        "--checkpoint.every_steps",
        "0",
        "--threads",
        "1",
        "--out",
        str(out),
        *extra,
    ]


class _Interleaved:
    """The micro-batches of ranks 0 and 1 of a 2-process run, alternately (one process, grad_accum 2)."""

    def __init__(self, streams):
        self.streams, self.k = streams, 0

    def next(self):
        self.k += 1
        return self.streams[(self.k - 1) % 2].next()

    def close(self):
        for s in self.streams:
            s.close()


def _one_process_replay(tmp_path: Path) -> tuple[list[float], Trainer]:
    """One process, grad_accum 2, fed rank 0's and rank 1's input streams of the 2-process run."""
    cfg = tiny_config(
        tmp_path / "one",
        steps=STEPS,
        schedule={"warmup_steps": 5},
        debug={"nan_steps": [5]},
        data={"batch_size": 32, "grad_accum": 2},
    ).validate()
    trainer = Trainer(cfg, describe("cpu"))
    trainer.inputs.close()
    trainer.inputs = _Interleaved(
        [
            input_stream(
                cfg, trainer.model_cfg, trainer.loss_cfg, rank=r, world=2, batch_size=16, device=torch.device("cpu")
            )
            for r in range(2)
        ]
    )
    losses = [trainer.train_step().metrics["loss"] for _ in range(STEPS)]
    return losses, trainer


def _torchrun(out: Path, *extra: str) -> tuple[list[dict], str]:
    proc = run_torchrun("imf.train", *_cli(out, "--debug.nan_rank", "1", *extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stderr


@pytest.mark.slow  # torchrun, 2 processes, several runs
def test_fsdp_two_processes(tmp_path):
    torch.set_num_threads(1)
    two, _ = _torchrun(tmp_path / "two")
    losses, one = _one_process_replay(tmp_path)

    # the same samples on 1 and 2 processes: the same losses (to fp32 reduction order)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert two[4]["loss"] is None and math.isnan(losses[4])  # NaN on rank 1 only: skipped on both
    assert two[4]["skipped_total"] == 1 and two[-1]["skipped_total"] == 1 and one.skipped == 1
    for k in range(STEPS):
        if k != 4:
            assert two[k]["loss"] == pytest.approx(losses[k], rel=1e-5, abs=1e-6), k + 1
    # it learns: the (un-normalised) mean squared error of the main term goes down
    first, last = (sum(r["mse_V"] for r in rows) / 5 for rows in (two[:5], two[-5:]))
    assert last < 0.9 * first, (first, last)
    assert two[-1]["img_per_s"] == pytest.approx(2 * two[-1]["img_per_s_per_device"])

    # the 2-rank (sharded) checkpoint exports to the same EMA weights as the 1-process run
    root = tmp_path / "two" / "checkpoints"
    assert read_meta(latest(root))["world_size"] == 2
    weights = export_ema(latest(root), tmp_path / "two.safetensors")
    from safetensors.torch import load_file

    exported = load_file(str(weights))
    for name, value in one.ema.full_tensors().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # interrupted at step 15 and resumed: bitwise the same metrics as the uninterrupted run
    cut, err = _torchrun(tmp_path / "cut", "--debug.interrupt_at_step", "15")
    assert [r["step"] for r in cut] == list(range(1, 16))
    assert err.count("stopped at step 15") == 1, err[-2000:]  # rank 0 reports it, rank 1 does not
    resumed, _ = _torchrun(tmp_path / "cut", "--resume")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(two, resumed, strict=True):
        assert (a["loss"], a["mse_V"], a["grad_norm"]) == (b["loss"], b["mse_V"], b["grad_norm"]), a["step"]


def _parallel_worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        # meta -> fully_shard -> to_empty -> init_weights -> rank 0's weights: the eager weights of the seed
        built = build(preset("demo", **TINY), backend="reference", env=describe("cpu"), seed=7)
        torch.manual_seed(7)
        eager = build_model("demo", **TINY)
        for n, p in built.named_parameters():
            assert type(p).__name__ == "DTensor" and torch.equal(p.full_tensor(), eager.state_dict()[n]), n
        assert torch.equal(built.rope_cos, eager.rope_cos)

        base = randomize_(build_model("demo", **TINY), std=0.05, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
        x, e = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        inputs = sample_training_inputs(8, LossConfig(), g)

        def grads(model, dtype=torch.float32):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss, metrics = imf_loss(model, x, y, e, *inputs)
            loss.backward()
            return metrics["mse_V"].item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}

        plain = parallelize(copy.deepcopy(base), mesh=mesh)
        mse, ref = grads(plain)
        ckpt = parallelize(copy.deepcopy(base), mesh=mesh, activation_checkpointing=True)
        mse_ckpt, got = grads(ckpt)
        assert mse_ckpt == mse
        for n, v in ref.items():
            torch.testing.assert_close(got[n], v, rtol=1e-6, atol=1e-7, msg=n)

        bf16 = parallelize(copy.deepcopy(base), mesh=mesh, param_dtype=torch.bfloat16)
        seen = []
        for blk in transformer_blocks(bf16):
            blk.register_forward_pre_hook(lambda m, args: seen.append(m.qkv.weight.dtype))
        mse_bf16, got = grads(bf16, torch.bfloat16)
        assert seen and set(seen) == {torch.bfloat16}, seen  # gathered parameters are bf16 in forward
        for n, p in bf16.named_parameters():  # sharded master weights and their gradients stay fp32
            assert type(p).__name__ == "DTensor" and p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
            assert p.to_local().shape[0] <= (p.shape[0] + 1) // 2, n  # dim-0 shard
        assert math.isfinite(mse_bf16) and abs(mse_bf16 - mse) < 0.05 * mse, (mse_bf16, mse)
        num = sum(((got[n] - v).norm() ** 2).item() for n, v in ref.items())
        den = sum((v.norm() ** 2).item() for v in ref.values())
        assert num < 0.1**2 * den, (num, den)  # bf16 gradients follow the fp32 ones
    finally:
        dist.destroy_process_group()


def test_parallelize_bf16_and_activation_checkpointing():
    mp.spawn(_parallel_worker, args=(2, free_port()), nprocs=2, join=True)
