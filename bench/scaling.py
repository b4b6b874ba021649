"""Multi-GPU scaling projection for FSDP2 training: a written model, not a measurement.

**Inputs.** The measured single-GPU step time ``t_c`` of the engine at per-GPU batch ``B`` (from the
``step`` benchmark; the per-GPU batch is held fixed, i.e. weak scaling), and the parameter count
of the preset (counted on the meta device). With ``t_c`` absent the table shows only the
communication side and the compute time needed to hide it.

**Communication per step and GPU** (FSDP2 as :func:`imf.train.parallel.parallelize` applies it: one
``fully_shard`` unit per transformer block plus the root, ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``, ``reshard_after_forward=True``). Ring collectives over ``G`` GPUs move
``(G - 1) / G`` of the full tensor through every GPU's link::

    all-gather (bf16, 2 bytes/param) of every unit a forward uses, once per forward call:
        iMF   guidance forward (model.velocity: trunk + v-head + root)
              + dual forward (all parameters)
        MF    dual forward (all); plus one whole-net forward when guidance is on (omega != 1)
    all-gather again in backward of every block unit (resharded after forward; the root is kept)
    reduce-scatter (fp32, 4 bytes/param) of every gradient, once

    t_comm = (G - 1) / G * bytes / busbw(G)

**Bandwidth assumptions** (datasheet figures derated to an assumed 80% achievable; replace them with
``nccl-tests`` all_gather / reduce_scatter bus bandwidths measured on the target cluster):

* within a node (H100 SXM, NVLink 4: 450 GB/s per direction per GPU): ``busbw = 360 GB/s``;
* across nodes (one 400 Gb/s NDR InfiniBand NIC per GPU, 8 per node: 50 GB/s per direction
  each): NCCL runs one ring per NIC, each crossing the node boundary once, so a node's rings share
  ``8 x 40 = 320 GB/s``; ``busbw = min(360, 320) = 320 GB/s``.

Per-collective latency is neglected: at 64 GPUs a B/2 block (~7 M parameters, 14 MB in bf16) moves
~0.2 MB per ring step, close to the latency-bound regime, so the model is optimistic at many nodes.

**Step time bounds.** FSDP2 prefetches the next unit's all-gather during the current unit's compute
and overlaps reduce-scatter with backward: with perfect overlap ``t = max(t_c, t_comm)``, with none
``t = t_c + t_comm``. Efficiency = ``t_c / t``; images/s per GPU = ``B / t``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from imf import build_model
from imf.config import preset

GPU_COUNTS = ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8))  # (nodes, GPUs per node)


@dataclass(frozen=True)
class Links:
    """Assumed achievable bus bandwidths in GB/s (see the module docstring)."""

    nvlink_busbw: float = 360.0
    nic_busbw: float = 40.0
    nics_per_node: int = 8

    def busbw(self, nodes: int) -> float:
        if nodes == 1:
            return self.nvlink_busbw
        return min(self.nvlink_busbw, self.nics_per_node * self.nic_busbw)


def param_counts(preset_name: str) -> dict[str, int]:
    """Parameters of the trained network: ``total``, ``blocks`` (resharded units), ``guidance`` (what the
    guidance forward gathers) and ``guidance_calls`` (no-grad forward calls per step besides the dual one)."""
    cfg = preset(preset_name)
    with torch.device("meta"):
        model = build_model(preset_name)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    total = count(model)
    if cfg.arch == "imf":
        blocks = sum(count(getattr(model, k)) for k in ("trunk", "u_blocks", "v_blocks") if hasattr(model, k))
        # the guidance forward (model.velocity) skips the u-head when there is a separate v-head
        guidance = total - count(model.u_blocks) - count(model.u_out) if cfg.v_head == "aux" else total
        return {"total": total, "blocks": blocks, "guidance": guidance, "guidance_calls": 1}
    return {"total": total, "blocks": count(model.blocks), "guidance": total, "guidance_calls": 0}


def comm_bytes(preset_name: str, mf_guidance: bool = False) -> dict[str, float]:
    """Full-tensor bytes per step: ``allgather`` (bf16) and ``reduce_scatter`` (fp32), before the ring factor."""
    n = param_counts(preset_name)
    gathered = n["total"] + n["blocks"]  # dual forward + backward re-gather
    if n["guidance_calls"] or mf_guidance:
        gathered += n["guidance"]
    return {"allgather": 2.0 * gathered, "reduce_scatter": 4.0 * n["total"], "params": float(n["total"])}


def project(
    preset_name: str,
    *,
    step_ms: float | None = None,
    batch: int | None = None,
    links: Links = Links(),
    counts=GPU_COUNTS,
    mf_guidance: bool = False,
) -> list[dict]:
    """One row per ``(nodes, GPUs per node)``: communication per GPU and, with ``step_ms`` and ``batch``,
    the step-time bounds, efficiency and images/s."""
    if (step_ms is None) != (batch is None):
        raise ValueError("give both step_ms and batch (the measured single-GPU step), or neither")
    vol = comm_bytes(preset_name, mf_guidance)
    rows = []
    for nodes, per_node in counts:
        g = nodes * per_node
        ring = (g - 1) / g
        wire = ring * (vol["allgather"] + vol["reduce_scatter"])
        bw = links.busbw(nodes)
        t_comm = 1e3 * wire / (bw * 1e9)
        row = {
            "preset": preset_name,
            "nodes": nodes,
            "gpus_per_node": per_node,
            "gpus": g,
            "busbw_GBps": bw,
            "comm_GB_per_gpu": wire / 1e9,
            "t_comm_ms": t_comm,
        }
        if step_ms is not None:
            best, worst = max(step_ms, t_comm), step_ms + t_comm
            row.update(
                t_compute_ms=step_ms,
                step_ms_overlap=best,
                step_ms_serial=worst,
                efficiency_overlap=step_ms / best,
                efficiency_serial=step_ms / worst,
                images_per_s_per_gpu=f"{batch / worst * 1e3:.0f} - {batch / best * 1e3:.0f}",
                images_per_s_total=f"{g * batch / worst * 1e3:.0f} - {g * batch / best * 1e3:.0f}",
            )
        rows.append(row)
    return rows


def report(
    preset_name: str,
    *,
    step_ms: float | None = None,
    batch: int | None = None,
    source: str = "",
    links: Links = Links(),
) -> tuple[list[dict], str]:
    """Rows of :func:`project` and markdown notes stating the model's inputs and assumptions."""
    rows = project(preset_name, step_ms=step_ms, batch=batch, links=links)
    vol = comm_bytes(preset_name)
    lines = [
        f"## FSDP2 scaling projection: {preset_name} (a model, not a measurement)",
        "",
        f"Parameters: {vol['params'] / 1e6:.1f} M; per step, full-tensor bytes all-gathered (bf16): "
        f"{vol['allgather'] / 1e9:.3f} GB, reduce-scattered (fp32): {vol['reduce_scatter'] / 1e9:.3f} GB.",
        f"Assumed bus bandwidths: {asdict(links)} (GB/s; see bench/scaling.py).",
        "",
    ]
    if step_ms is None:
        lines.append(
            "No measured step time was given: only the communication side is shown; the step hides it "
            "fully when its compute time per GPU exceeds t_comm_ms."
        )
    else:
        lines.append(
            f"Measured single-GPU compute: {step_ms:.2f} ms per step at batch {batch} per GPU ({source}); "
            "per-GPU batch held fixed."
        )
    return rows, "\n".join(lines)
