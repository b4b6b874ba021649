"""Autotuning shared by the kernels: one ``@triton.autotune`` per kernel, built here.

Each kernel lists its candidate configs next to itself and says how much shared memory a
config needs; :func:`autotune` turns that into ``@triton.autotune`` with a shape key and an
``early_config_prune`` that drops the configs that cannot launch on the current device (too
much shared memory, e.g. ``BLOCK_D = 128`` with three pipeline stages of 128-row K/V tiles).
Under the Triton interpreter (``TRITON_INTERPRET=1``) every kernel gets a single small fixed
config instead: there is nothing to time on a CPU, and small tiles keep the tests fast while
still exercising several blocks and a ragged tail.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import triton

from ._checks import interpreting


def configs(
    *, num_warps: Iterable[int], num_stages: Iterable[int], **blocks: Iterable[int]
) -> list[triton.Config]:
    """The cross product of tile sizes (``BLOCK_M=(64, 128), ...``), warp counts and pipeline depths."""
    names = list(blocks)
    return [
        triton.Config(dict(zip(names, sizes, strict=True)), num_warps=w, num_stages=s)
        for *sizes, w, s in itertools.product(*blocks.values(), num_warps, num_stages)
    ]


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device`` (opt-in maximum: 227 KiB on H100)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def prune_by_shared_memory(
    candidates: list[triton.Config],
    meta: dict,
    smem_bytes: Callable[[dict, int], int],
    limit: int,
) -> list[triton.Config]:
    """The configs whose ``smem_bytes({**meta, **config.kwargs}, num_stages)`` fits in ``limit``.

    If none fits, the one needing the least is kept so the autotuner always has a candidate.
    """
    need = {c: smem_bytes({**meta, **c.kwargs}, c.num_stages) for c in candidates}
    kept = [c for c in candidates if need[c] <= limit]
    return kept or [min(candidates, key=need.get)]


def autotune(
    *,
    candidates: list[triton.Config],
    key: list[str],
    smem_bytes: Callable[[dict, int], int],
    tensor_arg: str,
    interpret_config: triton.Config,
):
    """``@triton.autotune`` over ``candidates`` keyed on ``key`` (argument names; dtypes are added
    by Triton), pruned by :func:`prune_by_shared_memory` on the device of argument ``tensor_arg``.
    Under the interpreter: the single ``interpret_config``.
    """
    if interpreting():
        return triton.autotune(configs=[interpret_config], key=key)

    def early_config_prune(configs_, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        limit = shared_memory_limit(meta[tensor_arg].device)
        return prune_by_shared_memory(configs_, meta, smem_bytes, limit)

    prune = {"early_config_prune": early_config_prune}
    return triton.autotune(configs=candidates, key=key, prune_configs_by=prune)
