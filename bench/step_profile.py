"""``python -m bench step --profile``: the benchmark's training step under torch.profiler, phase by phase.

Library only (the CLI lives in ``bench/__main__.py``). Each variant of :data:`PROFILED` (the engine, the
plain ``torch.func.jvp`` step eager and compiled, and the flow-matching floor; built exactly as
:func:`bench.step_bench.run_variant` builds them) runs ``warmup`` steps that the profiler traces and
discards (compilation falls there) and ``active`` profiled ones, through a
:class:`imf.train.profile.ProfileSession`. The step is labelled as
the trainer's is: ``imf.loss`` (with ``imf.guidance`` and ``imf.dual_forward`` inside it for the eager
variants: :mod:`imf.loss` and :mod:`imf.baseline` carry the labels; a compiled loss is one region),
``imf.backward`` and ``imf.optimizer`` (fused AdamW step and ``zero_grad``); there is no data phase (the
inputs are made in advance). Per variant the session writes a Chrome/Perfetto trace and its own phase
table (top ops per phase) under ``<out>/profile/<preset>_<variant>/``; :func:`side_by_side` puts the
variants' phase times next to each other, per preset. The FSDP2 variant is not profiled here
(``python -m imf.train --profile.active N`` profiles the sharded trainer).

The timings of a profiled step are not the benchmark's numbers (the profiler adds host overhead per op);
``python -m bench step`` without ``--profile`` measures those.
"""

from __future__ import annotations

import torch

from bench.common import is_cuda, one_cpu_thread
from bench.step_bench import build, make_inputs, smoke_overrides, variant_parts
from imf.config import LossConfig, preset
from imf.markdown import markdown_table
from imf.phases import PHASES, phase
from imf.train.config import ProfileConfig
from imf.train.profile import ProfileSession
from imf.train.profile_table import UNLABELLED

PROFILED = ("engine", "baseline_eager", "baseline_compiled", "fm_compiled")


def profile_variant(
    variant: str,
    preset_name: str,
    batch: int,
    *,
    dtype: torch.dtype,
    device,
    folder,
    warmup: int = 2,
    active: int = 3,
    overrides: dict | None = None,
    engine_backend: str = "triton",
    compile_backend: str = "inductor",
) -> dict:
    """One variant's profiled window: ``{"preset", "variant", "steps", "step_ms", "rows", "trace"}``, or
    ``{"preset", "variant", "error"}`` when it cannot run here."""
    overrides = dict(overrides or {})
    model_cfg = preset(preset_name, **overrides)
    lc = LossConfig.for_method(model_cfg.arch)
    head = {"preset": preset_name, "variant": variant}
    backend, loss_fn = variant_parts(variant, engine_backend, compile_backend)
    try:
        model = build(preset_name, backend, device, overrides)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        inputs = make_inputs(model_cfg, lc, batch, device, rotations=2)
        autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
        cfg = ProfileConfig(active=active, warmup=warmup, wait=0, repeat=1)
        session = ProfileSession(cfg, folder, rank=0, device=torch.device(device), echo=False)
        with session:
            for i in range(warmup + active):
                with phase("imf.loss"), autocast:
                    loss = loss_fn(model, lc, *inputs[i % len(inputs)])
                with phase("imf.backward"):
                    loss.backward()
                with phase("imf.optimizer"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                session.step(i + 1)
        (summary,) = session.summaries
    except Exception as err:  # a variant that cannot run here is a row, not a crash
        return {**head, "error": f"{type(err).__name__}: {err}"[:400]}
    finally:
        if is_cuda(device):
            torch.cuda.empty_cache()
    return {**head, **{k: summary[k] for k in ("steps", "step_ms", "rows", "trace")}}


def run(presets, *, batch: int, dtype, device, out_dir, smoke: bool = False, **kw) -> list[dict]:
    """:func:`profile_variant` of every variant of :data:`PROFILED` for every preset, traces under
    ``<out_dir>/profile/``; ``smoke``: the tiny CPU shapes of :func:`bench.step_bench.smoke_overrides`."""
    results = []
    for name in presets:
        overrides = smoke_overrides(name) if smoke else {}
        for variant in PROFILED:
            folder = f"{out_dir}/profile/{name.replace('/', '_')}_{variant}"
            results.append(
                profile_variant(
                    variant, name, batch, dtype=dtype, device=device, folder=folder, overrides=overrides, **kw
                )
            )
    return results


def smoke(presets=("iMF-B/2", "MF-B/2"), *, out_dir) -> list[dict]:
    """Tiny CPU run (fp32, reference backend, ``torch.compile(backend="eager")``): checks the harness."""
    with one_cpu_thread():
        return run(
            presets,
            batch=4,
            dtype=torch.float32,
            device="cpu",
            out_dir=out_dir,
            smoke=True,
            engine_backend="reference",
            compile_backend="eager",
        )


def side_by_side(results: list[dict], cuda: bool) -> tuple[list[dict], str]:
    """Rows ``{preset, phase, <variant>: "ms (share)" ...}`` (plus ``gpu ms`` on CUDA) and their markdown,
    one table per preset; a variant that failed shows its error under ``step``."""
    rows = []
    for name in dict.fromkeys(r["preset"] for r in results):
        mine = [r for r in results if r["preset"] == name]
        table = {p: {"preset": name, "phase": p} for p in (*PHASES, UNLABELLED, "step")}
        for r in mine:
            if "error" in r:
                table["step"][r["variant"]] = r["error"][:80]
                continue
            table["step"][r["variant"]] = f"{r['step_ms']:.3g}"
            for p in r["rows"]:
                cell = f"{p['ms']:.3g} ({100 * p['share']:.0f}%)"
                if cuda and p.get("gpu_ms") is not None:
                    cell += f", gpu {p['gpu_ms']:.3g}"
                table[p["phase"]][r["variant"]] = cell
        rows += [row for row in table.values() if len(row) > 2]
    columns = ["preset", "phase", *[v for v in PROFILED if any(v in row for row in rows)]]
    note = "ms per step, host wall time exclusive of nested phases (share of the step)"
    return rows, f"{note}{'; gpu: device ms of the kernels launched' if cuda else ''}\n\n" + markdown_table(
        rows, columns
    )


__all__ = ["PROFILED", "profile_variant", "run", "side_by_side", "smoke"]
