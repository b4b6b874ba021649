"""What a run folder says trained it: ``config.yaml`` and ``config_history.jsonl``.

A checkpoint's ``meta.json`` holds the full configuration of the session that wrote it. Resuming it
with settings that change what is trained (the optimizer, schedule, loss, seed, batch, precision,
preset, data flips) is refused with one line that names the differing fields, the options that
continue the run as it was and how to start a new one; the model and the EMA decays are checked when
the checkpoint is loaded (:func:`imf.train.checkpoint.load`). Settings that may change on resume
(:data:`RESUMABLE`: the run length, logging, checkpointing, profiling, parallelism, threads, device,
kernel backend, data location and loader tuning) are accepted, and each session appends one entry to
``config_history.jsonl``: the step it started from, the checkpoint it resumed and what it changed. So
``config.yaml`` (the current session's settings) together with the history never claims a setting
that the checkpoints were not trained with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from imf.train.config import ConfigError, TrainConfig

HISTORY = "config_history.jsonl"
# Dotted config names (a trailing "." covers a whole section) that may change when a run is resumed.
RESUMABLE = (
    "steps",
    "epochs",
    "out_dir",
    "threads",
    "device",
    "backend",
    "max_nonfinite",
    "checkpoint.",
    "log.",
    "parallel.",
    "debug.",
    "profile.",
    "data.source",
    "data.grad_accum",
    "data.backend",
    "data.num_workers",
    "data.prefetch",
    "data.dali_threads",
    "data.verify_checksums",
)
CHECKED_ON_LOAD = ("model.", "ema_decays")  # refused by checkpoint.load with their own message (exit 4)
OVERRIDE_SECTIONS = ("model.", "loss.")  # dicts of overrides: a missing key means the preset's value


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (lists and tuples stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def changes(trained: dict, now: dict) -> dict[str, tuple]:
    """``{name: (trained value, new value)}`` of every differing field of two ``TrainConfig.to_dict()``;
    ``None`` for a model/loss override that one side does not set. Fields that the checkpoint's (older)
    schema lacks are skipped."""
    old, new = flatten(trained), flatten(json.loads(json.dumps(now)))
    diff = {}
    for key in sorted(set(old) | set(new)):
        if key not in old and not _matches(key, OVERRIDE_SECTIONS):
            continue
        if old.get(key) != new.get(key):
            diff[key] = (old.get(key), new.get(key))
    return diff


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def check_resume(cfg: TrainConfig, trained: dict, where: str) -> dict[str, tuple]:
    """Refuse (:class:`ConfigError`) to resume a run trained with ``trained`` (its checkpoint's config) under
    ``cfg`` when a field outside :data:`RESUMABLE` differs; returns the accepted changes. ``where`` names the
    run or checkpoint in the message."""
    diff = changes(trained, cfg.to_dict())
    refused = {k: v for k, v in diff.items() if not _matches(k, RESUMABLE + CHECKED_ON_LOAD)}
    if refused:
        was = ", ".join(f"{k} {_value(old) if old is not None else '(preset)'}" for k, (old, _) in refused.items())
        now = ", ".join(f"{k} {_value(new) if new is not None else '(preset)'}" for k, (_, new) in refused.items())
        keep = " ".join(f"--{k} {_value(old)}" if old is not None else f"(no --{k})" for k, (old, _) in refused.items())
        raise ConfigError(
            f"{where} was trained with {was}; this command asks for {now}. To continue that run, drop those "
            f"options or pass {keep}; to start a new run, use another --out"
        )
    return {k: v for k, v in diff.items() if k != "checkpoint.resume" and not _matches(k, CHECKED_ON_LOAD)}


def write(out_dir: str | Path, text: str, *, step: int, resumed_from: Path | None, changed: dict) -> None:
    """Write the session's ``config.yaml`` (``text``) and append its entry to ``config_history.jsonl``."""
    out = Path(out_dir)
    (out / "config.yaml").write_text(text)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_step": step,
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
        "changed": {k: {"was": old, "now": new} for k, (old, new) in changed.items()},
    }
    with open(out / HISTORY, "a") as f:
        f.write(json.dumps(entry) + "\n")


def describe(changed: dict) -> str:
    """``steps 5000 -> 6000, log.every_steps 20 -> 10``."""
    return ", ".join(f"{k} {_value(old)} -> {_value(new)}" for k, (old, new) in changed.items())


__all__ = ["HISTORY", "RESUMABLE", "changes", "check_resume", "describe", "flatten", "write"]
