"""The shape classes the compile report covers, and the drivers that launch the real code for each.

``preset:<name>``  one training step of a model preset at 256x256 latents (32x32x4, patch 2: 256
                   image tokens, +20 condition tokens for iMF): the guidance forward (no grad), the
                   dual forward with a tangent prefix of half the batch, and the backward, exactly as
                   the model calls the kernels (fused-projection views, (B, L, H, D) layouts).
``attn:<dtype>:s<seq>:d<head_dim>``  (any seq) ``attention_jvp`` with a tangent prefix (so the plain forward runs
                   on the rest of the batch) and the backward, on q/k/v viewed out of one fused
                   ``(B, L, 3, H, D)`` projection, as the MF DiT block does.

Each shape runs twice, once per attention backward (``IMF_KERNELS_ATTN_BWD`` = ``deterministic``,
``atomic``), so the report covers both; the launches they share are compiled once.

Per-GPU batch 32 (prefix 16): the batch only enters integer arguments (row counts), whose
divisibility by 16 it keeps as at the training batch sizes (multiples of 16).
"""

from __future__ import annotations

import os
from unittest import mock

import torch

from .capture import Launch, Recorder, mock_device

PRESETS = ("iMF-B/2", "iMF-M/2", "iMF-L/2", "iMF-XL/2", "MF-B/2", "MF-XL/2")
DEFAULT_SEQS = (256, 1024, 4096, 8192)
HEAD_DIMS = (64, 72, 128)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BATCH, PREFIX = 32, 16
ATTN_BATCH, ATTN_PREFIX, ATTN_HEADS = 4, 2, 16


def default_shapes() -> list[str]:
    """Every preset, and attention at seq 256 / 1024 / 4096 / 8192 x head_dim 64 / 72 / 128 in bf16 (fp16 at
    seq 4096). ``SEQ`` is a compile-time constant of the attention kernels, so each length is its own
    compile; other lengths (e.g. ``attn:bf16:s2048:d64``) via ``--shapes``."""
    attn = [f"attn:bf16:s{s}:d{d}" for s in DEFAULT_SEQS for d in HEAD_DIMS]
    attn += [f"attn:fp16:s4096:d{d}" for d in HEAD_DIMS]
    return [f"preset:{p}" for p in PRESETS] + attn


# The head-dim sweep (``--shapes head-dims``, committed as ``bench/results/compile/head_dims``): every
# head_dim the launchers take in whole 16-byte rows (a multiple of 8, up to 128) at a length that is a
# multiple of every block (4096) and at one that is ragged for every block (1000 = 62 x 16 + 8). A head
# dim maps to one of 7 head-tile widths (16, 32, 48 = 32 + 16, 64, 80 = 64 + 16, 96 = 64 + 32, 128;
# :func:`imf_kernels.attention_common.split_meta`), each either full or masked.
SWEEP_SEQS = (1000, 4096)
SWEEP_HEAD_DIMS = tuple(range(8, 129, 8))
# The CI gate's sample of that sweep (why it suffices: docs/compile.md): the masked head dim of each width
# above 64 columns, where the prune rules draw their lines (80 / 96 / 128) and every spill the sweep found
# lies, at the ragged length (masked columns and ragged rows add predicates: the sweep's worst case).
GATE_HEAD_DIMS = (72, 88, 120)


def head_dim_sweep() -> list[str]:
    return [f"attn:bf16:s{s}:d{d}" for d in SWEEP_HEAD_DIMS for s in SWEEP_SEQS]


def gate_head_dims() -> list[str]:
    return [f"attn:bf16:s{SWEEP_SEQS[0]}:d{d}" for d in GATE_HEAD_DIMS]


def expand(shapes: list[str]) -> list[str]:
    """``shapes`` with ``head-dims`` replaced by :func:`head_dim_sweep`."""
    return [s for shape in shapes for s in (head_dim_sweep() if shape == "head-dims" else [shape])]


def parse(shape: str) -> tuple[str, dict]:
    """``("preset", {"name": ...})`` or ``("attn", {"dtype", "seq", "head_dim"})``; ValueError otherwise."""
    kind, _, rest = shape.partition(":")
    if kind == "preset" and rest in PRESETS:
        return kind, {"name": rest}
    parts = rest.split(":")
    if kind == "attn" and len(parts) == 3 and parts[0] in DTYPES and parts[1][:1] == "s" and parts[2][:1] == "d":
        try:
            seq, head_dim = int(parts[1][1:]), int(parts[2][1:])
        except ValueError:
            pass
        else:
            return kind, {"dtype": parts[0], "seq": seq, "head_dim": head_dim}
    raise ValueError(f"--shapes: {shape!r} is not preset:<{'|'.join(PRESETS)}> or attn:<bf16|fp16>:s<seq>:d<head_dim>")


def capture(shape: str, archs: tuple[int, ...]) -> list[Launch]:
    """The launches of ``shape`` with, per arch, the configs the autotuner may consider."""
    kind, spec = parse(shape)
    recorder = Recorder(archs, shape)
    with mock_device(archs[0]), recorder.active():
        for path in ("deterministic", "atomic"):  # both attention backwards; the repeated launches dedupe in plan
            with mock.patch.dict(os.environ, {"IMF_KERNELS_ATTN_BWD": path}):
                if kind == "preset":
                    _model_step(spec["name"])
                else:
                    _attention_step(DTYPES[spec["dtype"]], spec["seq"], spec["head_dim"])
    return recorder.launches


def _model_step(name: str) -> None:
    import imf

    with torch.device("meta"):
        model = imf.build_model(name, backend="triton")
    model = model.to(torch.bfloat16)  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16)
    cfg = model.cfg
    z = torch.empty(BATCH, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda", dtype=torch.bfloat16)
    z_t = torch.empty(PREFIX, *z.shape[1:], device="cuda", dtype=torch.bfloat16)
    t = torch.empty(BATCH, device="cuda")
    y = torch.zeros(BATCH, dtype=torch.long, device="cuda")
    cond = (t, t, t) if cfg.arch == "imf" else ()
    with torch.no_grad():
        model.velocity(z, t, t, y, *cond, check_values=False)  # guidance pass: primal only; meta: no values
    if cfg.arch == "imf" and model.has_v_head:
        u, _u_t, v = model.forward_with_tangent(z, z_t, t, t, y, *cond, with_velocity=True, check_values=False)
        loss = u.float().sum() + v.float().sum()
    else:
        u, _u_t = model.forward_with_tangent(z, z_t, t, t, y, *cond, check_values=False)
        loss = u.float().sum()
    loss.backward()


def _attention_step(dtype: torch.dtype, seq: int, head_dim: int) -> None:
    import imf_kernels

    def split(t):
        return t.permute(2, 0, 3, 1, 4).unbind(0)

    qkv = torch.empty(ATTN_BATCH, seq, 3, ATTN_HEADS, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    qkv_t = torch.empty(ATTN_PREFIX, seq, 3, ATTN_HEADS, head_dim, device="cuda", dtype=dtype)
    o, _o_t = imf_kernels.attention_jvp(*split(qkv), *split(qkv_t))
    o.float().sum().backward()
