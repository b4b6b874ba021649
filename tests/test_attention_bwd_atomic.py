"""The opt-in atomic flash-attention backward (``IMF_KERNELS_ATTN_BWD=atomic``,
:mod:`imf_kernels.attention_bwd_atomic_op`): gradients against fp64 autograd of math attention (the
bound of :func:`numerics.assert_bound`, through :func:`test_attention.check_attention_grads`) and
against the deterministic path, the variable's errors and the deterministic-algorithms refusal.
CPU cases run under ``TRITON_INTERPRET=1`` in fp32/fp16 on small odd shapes (seq 1 / 17 / 33,
head_dim 16 / 64 / 72 = 64 + 16 split, model-layout ``(B, L, H, D)`` views); every buffer allocated
while a test runs is NaN-filled, so an unwritten or un-zeroed element fails the bound. bf16 and the
training / long shapes, with real atomics, are in the GPU-marked test (not yet run on a GPU)."""

from __future__ import annotations

import pytest
import torch
from imf_kernels import _tuning, attention, attention_bwd, attention_bwd_atomic_op, attention_common
from numerics import rel_err
from test_attention import F16, F32, H100_SMEM, check_attention_grads, make

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("poisoned", "seeded")]
ENV = attention_bwd.BWD_ENV

ATOMIC_CASES = [
    (F32, (2, 3, 17, 72), "blhd"),
    (F16, (2, 3, 17, 72), "blhd"),
    (F32, (1, 2, 33, 64), "bhld"),
    (F16, (1, 2, 33, 64), "blhd"),
    (F32, (2, 2, 1, 64), "blhd"),
    (F16, (2, 1, 1, 72), "blhd"),
    (F32, (1, 2, 33, 16), "blhd"),
    (F16, (2, 1, 17, 16), "bhld"),
]


@pytest.mark.parametrize("dtype, shape, layout", ATOMIC_CASES)
def test_atomic_backward_matches_reference(monkeypatch, dtype, shape, layout):
    monkeypatch.setenv(ENV, "atomic")
    q, k, v = (make(shape, dtype, layout, grad=True) for _ in range(3))
    check_attention_grads(attention(q, k, v), q, k, v, dtype)


def _grads(path: str, monkeypatch, q, k, v, do):
    monkeypatch.setenv(ENV, path)
    return torch.autograd.grad(attention(q, k, v), (q, k, v), do)


# Interpreter, 6 seeds: dq differs by at most 0.52 fp32 eps (fp32) and 0.009 fp16 eps (fp16; an fp16
# rounding flip now and then), dk and dv not at all; a GPU's other tiles and add order get headroom.
AGREE = {F32: 4 * torch.finfo(F32).eps, F16: 0.25 * torch.finfo(F16).eps}


@pytest.mark.parametrize("dtype", [F32, F16])
def test_atomic_matches_deterministic(monkeypatch, dtype):
    """Same gradients, layout and dtype as the two-kernel path, up to the fp32 order of the ``dq`` adds
    (and, in fp16, the rounding of ``dS`` recomputed from ``k q^T`` instead of ``q k^T``)."""
    shape = (2, 2, 33, 72)
    q, k, v = (make(shape, dtype, grad=True) for _ in range(3))
    do = make(shape, dtype)
    det = _grads("deterministic", monkeypatch, q, k, v, do)
    atomic = _grads("atomic", monkeypatch, q, k, v, do)
    norm = torch.cat([g.double().flatten() for g in det]).norm()
    for name, a, d in zip(("dq", "dk", "dv"), atomic, det, strict=True):
        assert a.dtype == d.dtype == dtype and a.shape == d.shape and a.stride() == d.stride(), name
        err = rel_err(a, d, norm)
        assert err <= AGREE[dtype], f"{name}: atomic vs deterministic rel err {err:.3g} > {AGREE[dtype]:.3g}"


def test_default_is_deterministic(monkeypatch):
    """Unset or empty runs the two deterministic kernels, never the atomic one."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the atomic backward ran")

    monkeypatch.setattr(attention_bwd, "atomic_backward", refuse)
    q, k, v = (make((1, 2, 17, 16), F32, grad=True) for _ in range(3))
    for value in (None, "", "deterministic"):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
        assert attention_bwd.backward_path() == "deterministic"
        torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))


@pytest.mark.parametrize("value", ["Atomic", "fast", " atomic", "1"])
def test_bad_value_raises(monkeypatch, value):
    """Read at each backward call: the error names the variable, what it got and what is allowed."""
    q, k, v = (make((1, 1, 17, 16), F32, grad=True) for _ in range(3))
    o = attention(q, k, v)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=rf"^{ENV}: got {value!r}, expected one of 'deterministic', 'atomic'$"):
        o.sum().backward()


@pytest.fixture
def deterministic_algorithms():
    """Restores torch's deterministic-algorithms setting after the test."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_deterministic_algorithms_refuse_atomic(monkeypatch, deterministic_algorithms):
    q, k, v = (make((1, 1, 17, 16), F32, grad=True) for _ in range(3))
    monkeypatch.setenv(ENV, "atomic")
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match=rf"^{ENV}=atomic: .* not deterministic.*use_deterministic_algorithms"):
        attention(q, k, v).sum().backward()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match=rf"^{ENV}=atomic: "):
        grads = torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))
    assert all(g.isfinite().all() for g in grads)
    monkeypatch.setenv(ENV, "deterministic")
    torch.use_deterministic_algorithms(True)
    torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))  # the default path is allowed


def test_configs_follow_their_rule(monkeypatch):
    """8 warps, 2-3 stages; the 64x128 tile only up to 80 head-dim columns, 32x128 not at 96 (sm_90); every
    kept config's shared-memory estimate fits an H100 at d128 in fp16 (and the pruner keeps exactly the
    fitting ones)."""
    monkeypatch.setattr(attention_common, "device_arch", lambda _t: 90)
    configs = attention_bwd_atomic_op.ATOMIC_CONFIGS
    assert 6 <= len(configs) <= 12 and all(c.num_warps == 8 and c.num_stages in (2, 3) for c in configs)
    prune, smem = attention_bwd_atomic_op._prune, attention_bwd_atomic_op._atomic_smem
    q = torch.empty(0, dtype=F16)
    d72 = {"BLOCK_D": 64, "BLOCK_D2": 16, "SPLIT": True, "Q": q}
    d128 = {"BLOCK_D": 128, "BLOCK_D2": 16, "SPLIT": False, "Q": q}
    assert prune(configs, d72) == configs
    d96 = {"BLOCK_D": 64, "BLOCK_D2": 32, "SPLIT": True, "Q": q}  # d88, d96
    assert prune(configs, d96) == [c for c in configs if c.kwargs["BLOCK_N"] == 64]
    wide = prune(configs, d128)
    assert wide == [c for c in configs if c.kwargs != {"BLOCK_M": 64, "BLOCK_N": 128}] and wide
    meta = {**d128, "Q": torch.empty(0, dtype=F16)}
    assert all(smem({**meta, **c.kwargs}, c.num_stages) <= H100_SMEM for c in wide)
    assert _tuning.prune_by_shared_memory(wide, meta, smem, H100_SMEM) == wide


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq, head_dim", [(276, 64), (256, 72), (1024, 128), (4096, 64)])
def test_atomic_backward_gpu(monkeypatch, dtype, seq, head_dim):
    """Real atomics on the GPU: bf16 (wrong under the interpreter) and the training / long shapes."""
    monkeypatch.setenv(ENV, "atomic")
    batch, heads = (4, 6) if seq <= 1024 else (1, 4)
    q, k, v = (make((batch, heads, seq, head_dim), dtype, grad=True, device="cuda") for _ in range(3))
    check_attention_grads(attention(q, k, v), q, k, v, dtype)
