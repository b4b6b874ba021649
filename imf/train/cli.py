"""``python -m imf.train``: train (options generated from the run schema) or ``export`` a checkpoint's EMA.

    python -m imf.train --preset demo --data digits            # one process (CPU or one GPU)
    python -m imf.train --config configs/imf_b2.yaml --data.source /data/in1k_latents --lr 2e-4
    torchrun --nproc_per_node=8 -m imf.train --config configs/imf_b2.yaml   # one node, 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=JOB \\
             --rdzv_endpoint=HOST:29500 -m imf.train --config configs/imf_b2.yaml   # 4 nodes
    python -m imf.train ... --resume                 # continue from <checkpoint dir>/latest
    python -m imf.train ... --resume DIR/step_N      # resume from an earlier step (newer ones moved aside)
    python -m imf.train export --ckpt runs/x/checkpoints/latest --out model.safetensors [--decay D]

Every node runs the same ``torchrun`` line; the process group is nccl on GPU, gloo on CPU; without
torchrun the run is one plain process. Settings: dataclass defaults, then the preset's, then
``--config FILE``, then the options below (validated before any work). A user error prints one line and
exits non-zero (2 config, 3 non-finite stop, 4 checkpoint); ``--debug`` or ``IMF_DEBUG=1`` adds the
traceback (same exit code). A run stopped by SIGTERM/SIGINT (Ctrl-C) writes a checkpoint and exits 128 +
signal (130 for Ctrl-C, 143 for SIGTERM); output that fails (``| head``, a closed terminal) never stops it.
A rerun into an existing run folder continues it with the settings that trained it (other settings are
refused; more steps are recorded in ``config_history.jsonl``).
"""

from __future__ import annotations

import os
import sys

import imf.train.export as export
from imf.cli import run_cli
from imf.train.args import load_config, preset_of, train_parser
from imf.train.loop import NonFiniteError, run
from imf.train.signals import exit_code


def _train(argv: list[str]) -> int:
    try:
        parser = train_parser(description=__doc__, preset=preset_of(argv))
        cfg = load_config(argv, int(os.environ.get("WORLD_SIZE", "1")), parser=parser)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run(cfg)
    except NonFiniteError:
        if rank != 0:  # every rank stops; rank 0 says why
            return NonFiniteError.exit_code
        raise
    if result.stopped is not None:
        if result.rank == 0:
            print(
                f"imf.train: stopped at step {result.step} ({result.stopped}); checkpoint {result.checkpoint}",
                file=sys.stderr,
            )
        return exit_code(result.stopped)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return run_cli("imf.train export", _export, argv[1:])
    return run_cli("imf.train", _train, argv)


def _export(argv: list[str]) -> int:
    try:
        return export.main(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)


__all__ = ["main"]
