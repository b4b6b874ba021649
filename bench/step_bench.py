"""Full training step: our engine vs the plain-PyTorch reference step, and the flow-matching floor.

Library only (the CLI lives in ``bench/__main__.py``). Variants, each a complete step (loss, backward,
fused AdamW with the published lr 1e-4, betas (0.9, 0.95), no weight decay) on the same random data:

* ``engine``             :func:`imf.loss.imf_loss` / :func:`imf.loss.mf_loss` on the ``"triton"``
                         backend (explicit dual forward, tangent only for ``r < t`` samples, ``v_u`` only
                         where its weight is non-zero), fp32 parameters under bf16 autocast (what
                         the trainer runs on one process).
* ``engine_fsdp2``       the same model wrapped by ``imf.train.parallel.parallelize(model, mesh=<1 GPU>,
                         param_dtype=bf16, reduce_dtype=fp32)`` (FSDP2, what the trainer runs on
                         several GPUs), when that module is importable (a ``skipped`` row otherwise);
                         a one-rank process group is created for it.
* ``baseline_eager``     :func:`imf.baseline.imf_loss_func_jvp` / ``mf_loss_func_jvp`` on the
                         ``"reference"`` backend: ``torch.func.jvp`` over math attention, every sample
                         with a tangent, both guidance forwards for every sample, bf16 autocast.
* ``baseline_compiled``  the same loss function under ``torch.compile`` (``torch._dynamo`` reset first).
* ``fm_compiled``        the efficiency floor: plain flow matching of the same network, one forward of
                         the inference path at ``h = 0`` (``model(z, t, t, ...)``) with
                         ``F.scaled_dot_product_attention`` and its backward, under ``torch.compile``.

A variant that fails (compilation error, out of memory, an unsupported dtype) becomes a row with
``error`` instead of numbers; the run goes on.

**Numbers per row.** ``ms`` (median step time; ``ms_min``, ``ms_max``; every step in ``times_ms``),
phases from CUDA events at their boundaries: ``ms_guidance`` (start of the loss to the end of the
last no-grad ``model.velocity`` call), ``ms_dual_forward`` (from there to the loss value),
``ms_forward`` (their sum; the only forward figure for compiled variants, where events cannot be
placed inside the graph), ``ms_backward``, ``ms_optimizer``; ``images_per_s`` (per GPU);
``peak_mem_gb`` (``max_memory_allocated`` over the timed steps: weights, AdamW state, activations);
``flops_per_step`` = :func:`imf.flops.train_step_flops` (the work the step needs; baselines that do
more, e.g. tangents for ``r = t`` samples, are charged the same, so ``tflops`` and ``mfu`` compare
speed), ``fm_step_flops`` for the FM row; ``mfu`` = FLOPs / time / the bf16 matmul peak measured in
the same run (:func:`bench.common.matmul_peak`), ``mfu_datasheet`` against
:func:`imf.flops.peak_flops`; ``compile_s``: the first warm-up step (compilation, autotuning).

**Summary** (first preset, main batch; the ``engine`` row, or ``engine_fsdp2`` if the former
failed): the engine's images/s, MFU, its speedup over both baselines (at the largest common batch
of the batch sweep if a baseline failed at the main batch, e.g. out of memory), and the efficiency
ratio ``(engine step time / FM step time) / (step FLOPs / FM FLOPs)`` (docs/design.md section 7:
<= 1.1).

**Sweeps** (first preset, ``sweep_variants``): batch size, and sequence length through the latent
size ``input_size`` at a constant token count per step (``batch * seq_len``); plotted by the CLI.

``smoke()`` runs tiny models on the CPU in fp32 with the ``"reference"`` backend for the engine
(the Triton interpreter takes tens of seconds per step; the kernels have their own tests and smoke
benchmarks) and ``torch.compile(backend="eager")`` (graph capture without code generation): it
checks the harness, not speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import is_cuda, matmul_peak, one_cpu_thread, summarize, time_steps
from imf import build_model, flops
from imf.baseline import imf_loss_func_jvp, mf_loss_func_jvp
from imf.config import LossConfig, preset
from imf.dist import free_port
from imf.loss import imf_loss, mf_loss, sample_training_inputs
from imf.model.layers import DualModule
from imf.ops import ReferenceOps

VARIANTS = ("engine", "engine_fsdp2", "baseline_eager", "baseline_compiled", "fm_compiled")
PHASES = ("start", "guidance", "forward", "backward", "optimizer")

# Tiny shapes for CPU smoke runs, applied on top of any preset.
SMOKE_OVERRIDES = {
    "imf": {
        "input_size": 4,
        "in_channels": 4,
        "dim": 32,
        "heads": 2,
        "depth": 2,
        "head_depth": 1,
        "num_classes": 10,
        "freq_dim": 16,
        "class_tokens": 1,
        "omega_tokens": 1,
        "t_min_tokens": 1,
        "t_max_tokens": 1,
        "time_tokens": 1,
    },
    "mf": {"input_size": 4, "in_channels": 4, "dim": 32, "heads": 2, "depth": 2, "num_classes": 10, "freq_dim": 16},
}


def smoke_overrides(name: str) -> dict:
    return dict(SMOKE_OVERRIDES[preset(name).arch])


class SDPAOps(ReferenceOps):
    """Reference ops with ``F.scaled_dot_product_attention`` (flash / cuDNN on a GPU): primal only."""

    name = "sdpa"

    def attention(self, q, k, v, q_t=None, k_t=None, v_t=None):
        if q_t is not None:
            raise ValueError("SDPA has no forward-mode derivative; the sdpa backend is for primal-only steps")
        return F.scaled_dot_product_attention(q, k, v), None


def build(preset_name: str, backend: str, device, overrides: dict, seed: int = 0) -> torch.nn.Module:
    """The preset on ``backend`` ("triton", "reference" or "sdpa"), built on the meta device and
    initialised on ``device`` itself (``init_weights``: iMF-XL/2 takes seconds on a GPU, not half a
    minute on the CPU), parameters randomised there so that the zero-initialised gates and output heads
    do not make the step trivial."""
    model = build_model(preset_name, backend="reference" if backend == "sdpa" else backend, device=device, **overrides)
    if backend == "sdpa":
        ops = SDPAOps()
        for m in model.modules():
            if isinstance(m, DualModule):
                m.ops = ops
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
    return model


def make_inputs(model_cfg, loss_cfg: LossConfig, batch: int, device, rotations: int, seed: int = 0) -> list[tuple]:
    """``rotations`` sets of ``(x, y, e, t, r, omega, t_min, t_max, drop)`` drawn as a training step does."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    sets = []
    for _ in range(rotations):
        t, r, omega, t_min, t_max, drop = sample_training_inputs(batch, loss_cfg, gen, device)
        x = torch.randn(shape, generator=gen, device=device)
        e = torch.randn(shape, generator=gen, device=device)
        y = torch.randint(0, model_cfg.num_classes, (batch,), generator=gen, device=device)
        sets.append((x, y, e, t, r, omega, t_min, t_max, drop))
    return sets


def _engine_loss(model, lc: LossConfig, x, y, e, t, r, omega, t_min, t_max, drop):
    if lc.method == "imf":
        return imf_loss(model, x, y, e, t, r, omega, t_min, t_max, drop, cfg=lc)[0]
    return mf_loss(model, x, y, e, t, r, drop=drop, cfg=lc)[0]


def _baseline_loss(model, lc: LossConfig, x, y, e, t, r, omega, t_min, t_max, drop):
    if lc.method == "imf":
        return imf_loss_func_jvp(model, x, y, e, t, r, omega, t_min, t_max, drop, eps=lc.adp_eps)[0]
    return mf_loss_func_jvp(model, x, y, e, t, r, lc.omega, lc.kappa, lc.t_start, lc.t_end, drop, eps=lc.adp_eps)[0]


def _fm_loss(model, lc: LossConfig, x, y, e, t, r, omega, t_min, t_max, drop):
    """Plain flow matching: ``|u(z_t | h = 0) - (e - x)|^2`` through the inference path."""
    tb = t.view(-1, 1, 1, 1)
    u = model((1 - tb) * x + tb * e, t, t, y, omega, t_min, t_max)
    return (u.float() - (e - x)).pow(2).mean()


def variant_parts(variant: str, engine_backend: str = "triton", compile_backend: str = "inductor"):
    """``(model backend, loss function)`` of ``variant``; a ``*_compiled`` variant's loss function goes
    through ``torch.compile`` (``torch._dynamo`` reset first)."""
    backend = {"engine": engine_backend, "engine_fsdp2": engine_backend, "fm_compiled": "sdpa"}.get(
        variant, "reference"
    )
    loss_fn = {
        "engine": _engine_loss,
        "engine_fsdp2": _engine_loss,
        "baseline_eager": _baseline_loss,
        "baseline_compiled": _baseline_loss,
        "fm_compiled": _fm_loss,
    }[variant]
    if variant.endswith("_compiled"):
        torch._dynamo.reset()  # fresh caches: no recompile limit carried over from earlier variants
        loss_fn = torch.compile(loss_fn, backend=compile_backend)
    return backend, loss_fn


@contextlib.contextmanager
def _single_rank_group(device):
    """A one-process group (NCCL on a GPU, gloo on a CPU) unless one exists already."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    if is_cuda(device):
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if is_cuda(device) else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mark_guidance(model, timer_ref: list):
    """Wrap ``model.velocity`` so each no-grad call (the guidance forwards) marks ``guidance`` when done."""
    velocity = model.velocity

    def timed(*args, **kwargs):
        out = velocity(*args, **kwargs)
        if not torch.is_grad_enabled():
            timer_ref[0].mark("guidance")
        return out

    model.velocity = timed


def _row_from_timing(row: dict, timing: dict, compiled: bool, fm: bool) -> None:
    """Step-time statistics and per-phase medians into ``row``."""
    ph = {k: statistics.median(v) for k, v in timing["phases"].items()}
    total = summarize(timing["total"])
    row.update(ms=total["ms"], ms_min=total["ms_min"], ms_max=total["ms_max"])
    if compiled or fm:
        row.update(ms_guidance=None, ms_dual_forward=None)
    else:  # no guidance mark: the step ran no guidance forward (MF with omega = 1, kappa = 0)
        row.update(ms_guidance=ph.get("guidance", 0.0), ms_dual_forward=ph.get("forward"))
    row.update(
        ms_forward=ph.get("forward", 0.0) + ph.get("guidance", 0.0),
        ms_backward=ph.get("backward"),
        ms_optimizer=ph.get("optimizer"),
        peak_mem_gb=timing["peak_mem_gb"],
        compile_s=timing["warmup_s"][0] if timing["warmup_s"] else None,
        times_ms=timing["total"],
    )


def _time_train_steps(
    model, loss_fn, lc: LossConfig, inputs: list[tuple], *, dtype, device, warmup: int, iters: int, mark_guidance: bool
) -> dict:
    """:func:`bench.common.time_steps` of ``loss_fn`` + backward + fused AdamW, rotating ``inputs``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    timer_ref = [None]
    if mark_guidance:
        _mark_guidance(model, timer_ref)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def step(i, timer):
        timer_ref[0] = timer
        timer.mark("start")
        with autocast:
            loss = loss_fn(model, lc, *inputs[i % len(inputs)])
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.mark("optimizer")

    return time_steps(step, device, warmup=warmup, iters=iters, order=PHASES)


def run_variant(
    variant: str,
    preset_name: str,
    batch: int,
    *,
    dtype: torch.dtype,
    device,
    warmup: int,
    iters: int,
    rotations: int = 4,
    overrides: dict | None = None,
    engine_backend: str = "triton",
    compile_backend: str = "inductor",
    peak_measured: float | None = None,
) -> dict:
    """One row: ``variant`` (one of :data:`VARIANTS`) of ``preset_name`` at ``batch``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    overrides = dict(overrides or {})
    model_cfg = preset(preset_name, **overrides)
    lc = LossConfig.for_method(model_cfg.arch)
    fm = variant == "fm_compiled"
    compiled = variant.endswith("_compiled")
    backend, loss_fn = variant_parts(variant, engine_backend, compile_backend)
    row = {
        "preset": preset_name,
        "method": "fm" if fm else lc.method,
        "variant": variant,
        "backend": backend,
        "compiled": compile_backend if compiled else None,
        "batch": batch,
        "input_size": model_cfg.input_size,
        "seq_len": model_cfg.seq_len,
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_step": flops.fm_step_flops(model_cfg, batch) if fm else flops.train_step_flops(model_cfg, lc, batch),
    }
    parallelize = None
    if variant == "engine_fsdp2":
        try:
            from imf.train.parallel import parallelize
        except ImportError as err:
            return {**row, "skipped": f"imf.train.parallel.parallelize not importable ({err}); no FSDP2 row"}
    try:
        with _single_rank_group(device) if parallelize else contextlib.nullcontext():
            model = build(preset_name, backend, device, overrides)
            if parallelize:
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh(torch.device(device).type, (1,))
                model = parallelize(
                    model, mesh=mesh, param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
                )
            timing = _time_train_steps(
                model,
                loss_fn,
                lc,
                make_inputs(model_cfg, lc, batch, device, rotations),
                dtype=dtype,
                device=device,
                warmup=warmup,
                iters=iters,
                mark_guidance=not (compiled or fm),
            )
        _row_from_timing(row, timing, compiled, fm)
    except Exception as err:  # a variant that cannot run here is a row, not a crash
        row["error"] = f"{type(err).__name__}: {err}"[:400]
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()
    if "ms" in row:
        row["images_per_s"] = batch / (row["ms"] * 1e-3)
        row["tflops"] = row["flops_per_step"] / (row["ms"] * 1e-3) / 1e12
        row["mfu"] = row["tflops"] * 1e12 / peak_measured if peak_measured else None
        datasheet = flops.peak_flops(device)
        row["mfu_datasheet"] = row["tflops"] * 1e12 / datasheet if datasheet else None
    return row


def fit_batch(per_sample_gb: float, fixed_gb: float, free_gb: float, choices, headroom: float = 0.85) -> int:
    """The largest of ``choices`` whose memory, ``fixed_gb + batch * per_sample_gb``, stays within
    ``headroom`` of ``free_gb``; the smallest choice when none does (its row then says out of memory)."""
    fitting = [b for b in choices if fixed_gb + b * per_sample_gb <= headroom * free_gb]
    return max(fitting) if fitting else min(choices)


def fit_shared_batch(preset_name: str, choices, *, variant: str = "baseline_eager", probes=(2, 4), **kw) -> dict:
    """The batch at which the engine and both baselines of ``preset_name`` can all run on this GPU:
    one timed step of ``variant`` (the eager baseline: every sample with a tangent, math attention, the
    most memory per sample) at each of the two ``probes`` batches gives its peak memory as
    ``fixed + batch * per_sample`` (a line through the two points); :func:`fit_batch` then picks from
    ``choices`` against ``torch.cuda.mem_get_info`` measured after the probes. Returns the fit and the
    probe numbers."""
    peaks = []
    for b in probes:
        row = run_variant(variant, preset_name, b, warmup=0, iters=1, rotations=1, **kw)
        if row.get("peak_mem_gb") is None:
            raise RuntimeError(f"probe step {variant} batch {b} gave no peak memory: {row.get('error')}")
        peaks.append(row["peak_mem_gb"])
    per_sample = max((peaks[1] - peaks[0]) / (probes[1] - probes[0]), 1e-3)
    fixed = max(peaks[0] - probes[0] * per_sample, 0.0)
    free_gb = torch.cuda.mem_get_info(kw["device"])[0] / 2**30
    batch = fit_batch(per_sample, fixed, free_gb, choices)
    return {
        "batch": batch,
        "probe_variant": variant,
        "probe_batches": list(probes),
        "probe_peak_gb": peaks,
        "per_sample_gb": per_sample,
        "fixed_gb": fixed,
        "free_gb": free_gb,
        "choices": list(choices),
    }


def _summary(rows: list[dict], batch: int) -> dict:
    """Headline numbers for the first preset at the main ``batch``: the ``engine`` row, or ``engine_fsdp2``
    when the plain engine has no timing. A baseline that failed at ``batch`` (e.g. out of memory) is
    compared at the largest batch-sweep point where it and the engine both ran (``*_batch`` says which)."""
    timed = [r for r in rows if "ms" in r and r["sweep"] in ("main", "batch")]
    at = lambda variant, b: next((r for r in timed if r["variant"] == variant and r["batch"] == b), None)
    out = {"preset": rows[0]["preset"], "batch": batch}
    name = next((v for v in ("engine", "engine_fsdp2") if at(v, batch)), None)
    if name is None:
        return {**out, "engine": "no engine timing (see the rows' errors)"}
    eng = at(name, batch)
    out.update(
        engine_variant=name,
        engine_images_per_s=eng["images_per_s"],
        engine_mfu=eng["mfu"],
        engine_mfu_datasheet=eng["mfu_datasheet"],
        engine_peak_mem_gb=eng["peak_mem_gb"],
    )
    for other in ("baseline_eager", "baseline_compiled"):
        both = sorted(r["batch"] for r in timed if r["variant"] == other and at(name, r["batch"]))
        if both:
            b = batch if batch in both else both[-1]
            out[f"speedup_vs_{other}"] = at(other, b)["ms"] / at(name, b)["ms"]
            out[f"speedup_vs_{other}_batch"] = b
    fm = at("fm_compiled", batch)
    if fm is not None:
        time_ratio = eng["ms"] / fm["ms"]
        flop_ratio = eng["flops_per_step"] / fm["flops_per_step"]
        out.update(
            step_time_over_fm=time_ratio, step_flops_over_fm=flop_ratio, efficiency_ratio=time_ratio / flop_ratio
        )
    return out


def run(
    presets=("iMF-B/2", "MF-B/2"),
    *,
    batch: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    warmup: int = 5,
    iters: int = 20,
    rotations: int = 4,
    variants=VARIANTS,
    batch_sweep=(32, 64, 128, 512),
    input_sizes=(16, 24, 48, 64),
    sweep_variants=("engine", "baseline_eager"),
    engine_backend: str = "triton",
    compile_backend: str = "inductor",
    smoke: bool = False,
) -> dict:
    """Every variant for every preset at ``batch``, then the sweeps for the first preset.

    Returns ``{"rows", "summary", "matmul_peak", "config"}``; each row carries ``sweep`` ("main",
    "batch" or "seq"). Sweep points equal to the main point are not re-run (the plots reuse it).
    ``smoke``: apply :data:`SMOKE_OVERRIDES` to every preset."""
    peak = matmul_peak(
        device, dtype=torch.bfloat16 if is_cuda(device) else torch.float32, n=8192 if is_cuda(device) else 256
    )
    kw = {
        "dtype": dtype,
        "device": device,
        "warmup": warmup,
        "iters": iters,
        "rotations": rotations,
        "engine_backend": engine_backend,
        "compile_backend": compile_backend,
        "peak_measured": peak["tflops"] * 1e12,
    }
    rows = []
    for name in presets:
        ov = smoke_overrides(name) if smoke else {}
        for variant in variants:
            rows.append({"sweep": "main", **run_variant(variant, name, batch, overrides=ov, **kw)})
    first = presets[0]
    ov = smoke_overrides(first) if smoke else {}
    main_size = preset(first, **ov).input_size
    main_seq = preset(first, **ov).seq_len
    for b in batch_sweep:
        if b != batch:
            rows += [{"sweep": "batch", **run_variant(v, first, b, overrides=ov, **kw)} for v in sweep_variants]
    for size in input_sizes:
        if size != main_size:
            seq = preset(first, **{**ov, "input_size": size}).seq_len
            b = max(1, round(batch * main_seq / seq))
            rows += [
                {"sweep": "seq", **run_variant(v, first, b, overrides={**ov, "input_size": size}, **kw)}
                for v in sweep_variants
            ]
    summary = _summary([r for r in rows if r["preset"] == first], batch)
    config = {
        "presets": list(presets),
        "batch": batch,
        "dtype": str(dtype),
        "device": str(device),
        "warmup": warmup,
        "iters": iters,
        "rotations": rotations,
        "variants": list(variants),
        "batch_sweep": list(batch_sweep),
        "input_sizes": list(input_sizes),
        "sweep_variants": list(sweep_variants),
        "engine_backend": engine_backend,
        "compile_backend": compile_backend,
        "smoke": smoke,
        "optimizer": "AdamW(lr=1e-4, betas=(0.9, 0.95), weight_decay=0, fused=True)",
        "loss_configs": {m: dataclasses.asdict(LossConfig.for_method(m)) for m in ("imf", "mf")},
    }
    return {"rows": rows, "summary": summary, "matmul_peak": peak, "config": config}


def smoke(presets=("iMF-B/2", "MF-B/2")) -> dict:
    """Tiny CPU run of every variant and both sweeps (harness check, see the module docstring)."""
    t0 = time.perf_counter()
    with one_cpu_thread():
        out = run(
            tuple(presets),
            batch=4,
            dtype=torch.float32,
            device="cpu",
            warmup=1,
            iters=2,
            rotations=2,
            batch_sweep=(2,),
            input_sizes=(8,),
            engine_backend="reference",
            compile_backend="eager",
            smoke=True,
        )
    out["config"]["wall_s"] = time.perf_counter() - t0
    return out
