"""Autotuning shared by the kernels: one autotuner per kernel, built here, with a reproducible choice.

Each kernel lists its candidate configs next to itself (its preferred config first) and says how
much shared memory a config needs; :func:`autotune` turns that into a :class:`Tuner` (Triton's
``Autotuner`` keyed on the shape arguments; Triton adds the dtypes) whose ``early_config_prune``
drops the configs that cannot launch on the current device (too much shared memory), then whatever
the kernel's own ``prune`` rule rejects.

How a config is chosen for a new key, in this order:

1. **Config cache** ``IMF_KERNELS_CONFIGS=path`` (JSON, read on first use): the entry for
   ``(kernel name, key)`` if there is one; no timing. A file that cannot be read, or an entry that
   is not one of the kernel's candidates, is a ``ValueError`` naming the path.
2. **Pinned mode** ``IMF_KERNELS_PINNED=1``: the kernel's pinned config (``autotune(pinned=...)``: a
   config, or a function of the launch arguments), or by default the first candidate that survives
   pruning; no timing. For tests and short GPU runs.
3. Otherwise Triton times every surviving candidate and keeps the fastest.

Every choice made in the process (by any of the three) is recorded; :func:`save_cache` writes them
in the format ``IMF_KERNELS_CONFIGS`` reads, so a tuned run can be replayed exactly.

Under the Triton interpreter (``TRITON_INTERPRET=1``) every kernel gets a single small fixed config
instead: there is nothing to time on a CPU, and small tiles keep the tests fast while still
exercising several blocks and a ragged tail.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable

import torch
import triton
from triton.runtime.autotuner import Autotuner

from ._checks import interpreting

CACHE_ENV, PINNED_ENV = "IMF_KERNELS_CONFIGS", "IMF_KERNELS_PINNED"
CACHE_FORMAT = "imf_kernels-configs/1"

_choices: dict[str, dict[str, dict]] = {}  # kernel name -> key -> config, every choice of this process
_loaded: dict[str, tuple[str, dict]] = {}  # "table": (path, kernel name -> key -> config) once read


def configs(*, num_warps: Iterable[int], num_stages: Iterable[int], **blocks: Iterable[int]) -> list[triton.Config]:
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


def config_to_json(config: triton.Config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def pinned_mode() -> bool:
    """True when ``IMF_KERNELS_PINNED=1``: one config per kernel and key, no timing."""
    return os.environ.get(PINNED_ENV, "0") == "1"


def load_cache(path: str | os.PathLike) -> int:
    """Read the config cache at ``path`` (replacing any read before); returns its number of entries."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{CACHE_ENV}={path}: cannot read the config cache ({err})") from err
    kernels = doc.get("kernels") if isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT else None
    entries = [e for table in kernels.values() for e in table.values()] if isinstance(kernels, dict) else None
    if entries is None or not all(
        isinstance(e, dict) and {"kwargs", "num_warps", "num_stages"} <= e.keys() for e in entries
    ):
        raise ValueError(
            f"{CACHE_ENV}={path}: not a config cache (expected {{'format': '{CACHE_FORMAT}', "
            "'kernels': {name: {key: {'kwargs', 'num_warps', 'num_stages'}}}} as save_cache writes)"
        )
    _loaded["table"] = (path, kernels)
    return len(entries)


def cache_document() -> dict:
    """Every config chosen in this process, as the JSON object ``IMF_KERNELS_CONFIGS`` reads."""
    return {"format": CACHE_FORMAT, "triton": triton.__version__, "kernels": choices()}


def save_cache(path: str | os.PathLike) -> int:
    """Write :func:`cache_document` to ``path`` (JSON for ``IMF_KERNELS_CONFIGS``); returns the number
    of entries."""
    doc = cache_document()
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    return sum(len(t) for t in doc["kernels"].values())


def choices() -> dict[str, dict[str, dict]]:
    """The configs chosen so far in this process: ``{kernel name: {key: config}}`` (a copy)."""
    return {name: dict(table) for name, table in _choices.items()}


def _cached_table() -> tuple[str, dict] | None:
    path = os.environ.get(CACHE_ENV)
    if not path:
        return _loaded.get("table")
    if _loaded.get("table", (None,))[0] != path:
        load_cache(path)
    return _loaded["table"]


def key_string(key: tuple) -> str:
    """The JSON key of an autotuning key: its parts joined by ``|`` (``276|64|torch.bfloat16``)."""
    return "|".join(map(str, key))


class Tuner(Autotuner):
    """Triton's ``Autotuner`` whose choice for a new key may come from the config cache or the
    pinned rule (see the module docstring); every choice is recorded for :func:`save_cache`."""

    def __init__(self, fn, *, name: str, candidates, key, prune=None, pinned=None):
        """``prune(configs, meta)``: the configs worth trying for the launch arguments ``meta`` (at least
        one is always kept); ``pinned``: see :func:`autotune`."""

        def early_config_prune(configs_, named_args, **kwargs):
            return prune(configs_, {**named_args, **kwargs}) or configs_[:1]

        super().__init__(
            fn,
            fn.arg_names,
            candidates,
            key,
            None,
            None,
            prune_configs_by={"early_config_prune": early_config_prune} if prune else None,
        )
        self.name, self.pinned = name, pinned

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key ``Autotuner.run`` caches under: the ``key`` arguments, then every tensor's dtype."""
        named = {
            k: v for k, v in {**dict(zip(self.arg_names, args, strict=False)), **kwargs}.items() if k in self.arg_names
        }
        return (
            *(named[k] for k in self.keys if k in named),
            *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")),
        )

    def pinned_config(self, args: tuple, kwargs: dict) -> triton.Config:
        """The pinned rule's config if it survives pruning, else the first surviving candidate."""
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        try:
            considered = self.prune_configs(kwargs)
        finally:
            self.nargs = None
        rule = (
            self.pinned({**dict(zip(self.arg_names, args, strict=False)), **kwargs})
            if callable(self.pinned)
            else self.pinned
        )
        return rule if rule is not None and rule in considered else considered[0]

    def _from_cache(self, key: str) -> triton.Config | None:
        table = _cached_table()
        entry = table[1].get(self.name, {}).get(key) if table else None
        if entry is None:
            return None
        found = [c for c in self.configs if config_to_json(c) == entry]
        if not found:
            raise ValueError(
                f"{CACHE_ENV}={table[0]}: kernel {self.name}, key {key}: {entry} is not one of its "
                f"{len(self.configs)} candidate configs (the config list changed?); re-tune and save"
            )
        return found[0]

    def run(self, *args, **kwargs):
        if len(self.configs) == 1:
            return super().run(*args, **kwargs)
        key = self.tuning_key(args, kwargs)
        if key not in self.cache:
            chosen = self._from_cache(key_string(key))
            if chosen is None and pinned_mode():
                chosen = self.pinned_config(args, kwargs)
            if chosen is not None:
                self.cache[key] = chosen
        out = super().run(*args, **kwargs)
        _choices.setdefault(self.name, {})[key_string(key)] = config_to_json(self.cache[key])
        return out


def kernel_name(fn) -> str:
    """``module.function`` of a (possibly wrapped) ``@triton.jit`` function, e.g. ``attention_op._attn_fwd``."""
    while hasattr(fn, "fn"):
        fn = fn.fn
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def autotune(
    *,
    candidates: list[triton.Config],
    key: list[str],
    interpret_config: triton.Config,
    smem_bytes: Callable[[dict, int], int] | None = None,
    tensor_arg: str | None = None,
    prune: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None,
    pinned: triton.Config | Callable[[dict], triton.Config] | None = None,
    name: str | None = None,
):
    """A :class:`Tuner` over ``candidates`` keyed on ``key`` (argument names).

    Pruning: :func:`prune_by_shared_memory` with ``smem_bytes`` on the device of argument ``tensor_arg``
    (if given), then ``prune(configs, meta)`` (the kernel's own rule, optional; it sees only configs
    that fit, so a fallback it picks can launch). ``pinned``: the config ``IMF_KERNELS_PINNED=1`` uses
    (one of ``candidates``, or a function of the launch arguments returning one); default the first
    candidate surviving pruning. ``name``: the kernel's name in the config cache (default
    ``module.function``). Under the interpreter: the single ``interpret_config``.
    """
    if interpreting():
        return triton.autotune(configs=[interpret_config], key=key)
    if isinstance(pinned, triton.Config) and pinned not in candidates:
        raise ValueError(f"pinned config {pinned} is not one of the candidates")
    if (smem_bytes is None) != (tensor_arg is None):
        raise ValueError("autotune: give smem_bytes and tensor_arg together (or neither)")

    def prune_all(configs_, meta):
        if smem_bytes is not None:
            configs_ = prune_by_shared_memory(configs_, meta, smem_bytes, shared_memory_limit(meta[tensor_arg].device))
        return (prune(configs_, meta) or configs_[:1]) if prune is not None else configs_

    def decorator(fn):
        return Tuner(
            fn,
            name=name or kernel_name(fn),
            candidates=candidates,
            key=key,
            prune=prune_all if prune is not None or smem_bytes is not None else None,
            pinned=pinned,
        )

    return decorator
