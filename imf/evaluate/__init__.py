"""Evaluation at scale: 1-/2-NFE sampling with guidance sweeps, VAE decode, FID / IS (or digits metrics).

    torchrun --nproc_per_node=8 -m imf.evaluate --ckpt runs/b2/model.safetensors --num-samples 50000 --steps 1 \\
        --omega 6.0,8.0,10.0 --interval 0.4:0.65,0.0:1.0 --vae /models/sd-vae-ft-ema \\
        --ref-stats /data/VIRTUAL_imagenet256_labeled.npz --inception /models/weights-inception-2015-12-05-6726825d.pth
    python -m imf.evaluate --ckpt runs/demo/model.safetensors --num 10000 --steps 1,2 --omega 1,2,3   # digits, CPU

Under torchrun write ``--num-samples`` (``--num`` is the same option, but torchrun's parser rejects it as an
ambiguous abbreviation of its own ``--numa-binding``).

Modules, in the order a run uses them:

* :mod:`~imf.evaluate.cli`: the options and ``main`` (one error path, :func:`imf.cli.run_cli`);
  :mod:`~imf.evaluate.options`: parsing and checks of the option values, :class:`EvalError`;
* :mod:`~imf.evaluate.loading`: ``--ckpt`` (EMA export, DCP checkpoint, checkpoint root or ``latest``);
* :mod:`~imf.evaluate.sampling`: the reproducible, class-balanced sample set and the sampling loop;
* :mod:`~imf.evaluate.run`: one evaluation over every sweep cell and rank, with VAE decoding;
* :mod:`~imf.evaluate.scorers`: Inception (FID / IS / precision-recall, torch-fidelity) and digits metrics;
* :mod:`~imf.evaluate.report`: the ``.npz`` sample sets, ``results.json`` and ``results.md``.

**Injection point.** :func:`run` takes ``scorer=``: any object with ``name``, ``features(images)`` and
``score(features, labels)`` (see :mod:`imf.evaluate.scorers`); tests pass a tiny network.

Tested here (CPU): the digits path on a trained demo checkpoint, the latent path with a tiny random
``AutoencoderKL`` and a stand-in feature network, world sizes 1 and 2 (gloo). Not run here: the
torch-fidelity path (no torchvision for the CPU torch), nccl, CUDA.
"""

from imf.evaluate.cli import main, parse_args
from imf.evaluate.loading import Loaded, check_preset, load_checkpoint
from imf.evaluate.options import (
    EvalError,
    check_num,
    parse_intervals,
    parse_omegas,
    parse_steps,
    sweep_cells,
)
from imf.evaluate.report import report_markdown, write_npz
from imf.evaluate.run import make_decoder, run
from imf.evaluate.sampling import labels_of, noise_of, sample_batches, shard, to_uint8
from imf.evaluate.scorers import DigitsScorer, InceptionScorer, load_reference

__all__ = [
    "run",
    "main",
    "parse_args",
    "load_checkpoint",
    "check_preset",
    "check_num",
    "shard",
    "labels_of",
    "noise_of",
    "sample_batches",
    "to_uint8",
    "make_decoder",
    "DigitsScorer",
    "InceptionScorer",
    "load_reference",
    "write_npz",
    "report_markdown",
    "parse_omegas",
    "parse_intervals",
    "parse_steps",
    "sweep_cells",
    "EvalError",
    "Loaded",
]
