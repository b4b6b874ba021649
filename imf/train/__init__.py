"""The distributed trainer: FSDP2 + bf16, fused AdamW, EMAs, DCP checkpoints with resume, NaN guard, logging.

Modules, each with one job (the design: ``docs/design.md``, section "Training"):

    config      the run schema (dataclasses; each field's help), validation, the presets' training defaults
    args        the one path from a config file and the command line to a TrainConfig (and --help)
    trainer     Trainer (Stateful): model, optimizer, schedule, EMAs, input stream; train_step, state_dict
    loop        run(cfg) -> TrainResult: resume, metrics, sample grids, checkpoints, signals, NaN stop
    parallel    build (meta -> parallelize -> to_empty -> init_weights -> rank 0's weights), parallelize
    checkpoint  DCP save/load, the latest pointer, recovery after a crash, resolve_checkpoint
    export      EMA weights to safetensors (``python -m imf.train export``), load_exported, load_ema
    metrics     metrics.jsonl (each step once after a resume), throughput record, progress bar fields
    profile     --profile.*: torch.profiler windows, CUDA memory snapshots; profile_table: the phase table
    ema, schedule, signals, grids, cli (``python -m imf.train``)

Verified here: CPU/gloo with 1 and 2 processes (fp32 and bf16 parameters). Not verified here: nccl,
CUDA, multi-node, ``torch.compile``.
"""

from imf.train.cli import main
from imf.train.loop import NonFiniteError, TrainResult, run
from imf.train.schedule import lr_factor

__all__ = ["NonFiniteError", "TrainResult", "lr_factor", "main", "run"]
