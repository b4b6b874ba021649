"""Evaluation at scale: 1-/2-NFE sampling with guidance sweeps, VAE decode, FID / IS (or digits metrics).

    torchrun --nproc_per_node=8 -m imf.evaluate --ckpt runs/b2/model.safetensors --num-samples 50000 --steps 1 \\
        --omega 6.0,8.0,10.0 --interval 0.4:0.65,0.0:1.0 --vae /models/sd-vae-ft-ema \\
        --ref-stats /data/VIRTUAL_imagenet256_labeled.npz --inception /models/weights-inception-2015-12-05-6726825d.pth
    python -m imf.evaluate --ckpt runs/demo/model.safetensors --num 10000 --steps 1,2 --omega 1,2,3   # digits, CPU

Under torchrun write ``--num-samples`` (``--num`` is the same option, but torchrun's parser rejects it as an
ambiguous abbreviation of its own ``--numa-binding``).

``--ckpt``: the EMA export of the trainer (``python -m imf.train export``: one safetensors file whose metadata
holds the model config, preset, EMA decay, step and training config), or a DCP checkpoint directory
(``step_...``) or checkpoint root (with ``latest``), whose EMA (``--decay``, default the run's first) is
exported through :func:`imf.checkpoint.export_ema` into a temporary file and loaded from there.

**The sample set.** Global sample ``i`` in ``[0, num)`` has label ``i mod num_classes`` (``num`` must be a
multiple of ``num_classes``: class-balanced) and noise drawn from its own generator seeded by ``(seed, i)``;
rank ``r`` of ``W`` takes the contiguous block ``[r num/W, (r+1) num/W)`` (``num`` must be a multiple of
``W``), so the set is the same for any world size and the ``.npz`` lists it in index order. Every sweep
cell (NFE, omega, interval) reuses the same noise and labels. Sampling runs under bf16 autocast on CUDA
(``--precision auto``), fp32 on a CPU.

**Decoding.** Latent models: the trainer's latents are ``(z - channel_mean) / channel_std`` of the scaled
VAE latent ``z = (latent - shift_factor) * scaling_factor`` (:mod:`imf.prepare`, :mod:`imf.data.format`), so
``latent = (x * channel_std + channel_mean) / scaling_factor + shift_factor`` (channel statistics and factors
from the dataset's manifest: ``--data``, default the checkpoint's ``data.source``), decoded with the diffusers
``AutoencoderKL`` at ``--vae`` (local directory, never downloaded). Images in ``[-1, 1]`` become uint8 as
``clamp(127.5 x + 128, 0, 255)`` (DiT / ADM sampling scripts).

**Metrics.** ImageNet (latent models): FID against ``--ref-stats`` (an ``.npz`` with ``mu`` and ``sigma`` of
Inception pool features, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``; with ``--prc`` its ``arr_0`` images
are also needed for precision/recall, k = 3) and Inception Score (10 splits), by **torch-fidelity**
(``pip install torch-fidelity``). Chosen over clean-fid because (a) its Inception takes a local weights file
(``feature_extractor_weights_path``), while clean-fid fetches its network from a URL or a fixed ``/tmp``
path; (b) its Inception is the TF-compatible port (TF1 bilinear resize, the 2015-12-05 graph) that ADM's
evaluator and the published FIDs use, where clean-fid's default resize deliberately differs; (c) it has IS
and precision/recall and exposes them on features, so features computed here on every rank and ADM's
``mu``/``sigma`` go straight in; (d) it is maintained (0.4.0, 2026; clean-fid 0.1.35, 2022). Both need
torchvision, whose PyPI wheels are CUDA builds: they install beside a CUDA torch, not beside a CPU one.
Inception weights: ``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity v0.2.0 release,
passed as ``--inception PATH`` or placed in ``$TORCH_HOME/hub/checkpoints/`` (default
``~/.cache/torch/hub/checkpoints/``, where torch-fidelity caches it when it may download).
Digits demo (auto-detected from the checkpoint's training data, or ``--metrics digits``): class accuracy and
pixel-space Frechet distance of :class:`imf.data.digits.DigitsJudge`, no VAE, runs on a CPU.

**Injection point.** :func:`run` takes ``scorer=``: any object with ``name``, ``features(images) ->
dict[str, Tensor]`` (images ``(B, C, H, W)`` float in ``[-1, 1]`` on the sampling device; per-sample rows,
returned on the CPU) and ``score(features, labels) -> dict[str, float]`` (rank 0, all ``num`` rows in index
order). The built-ins are :class:`InceptionScorer` and :class:`DigitsScorer`; tests pass a tiny network.

**Outputs** under ``--out``: per cell ``<cell>.npz`` (ADM layout: uint8 NHWC under ``arr_0``, index order;
``--no-npz`` skips it) and with ``--png`` ``png/<cell>/<index>.png``; ``results.json`` (every cell's metrics,
sampling and decoding images/s over all ranks, the configuration, checkpoint metadata, device and git
commit) and ``results.md`` (the sweep table).

Tested here (CPU): the digits path on a trained demo checkpoint, the latent path with a tiny random
``AutoencoderKL`` and a stand-in feature network, world sizes 1 and 2 (gloo). Not run here: the
torch-fidelity path (no torchvision for the CPU torch), nccl, CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from imf import checkpoint
from imf.config import EVAL_GUIDANCE, PRESETS, ModelConfig
from imf.sample import generate

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class EvalError(ValueError):
    """A bad argument or a missing/mismatched input, raised before any sampling."""


# ---------------------------------------------------------------------------------------------------------
# Argument parsing


def parse_floats(text: str, name: str) -> list[float]:
    """``"1.0,2.0"`` -> ``[1.0, 2.0]``."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"{name} must be comma-separated numbers (e.g. 1.0,2.0), got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise EvalError(f"{name} must be finite numbers, got {text!r}")
    return values


def parse_omegas(text: str) -> list[float]:
    values = parse_floats(text, "--omega")
    bad = [v for v in values if v < 1.0]
    if bad:
        raise EvalError(f"--omega values must be >= 1 (1 = no guidance), got {bad}")
    return values


def parse_intervals(text: str) -> list[tuple[float, float]]:
    """``"0.0:1.0,0.4:0.65"`` -> ``[(0.0, 1.0), (0.4, 0.65)]``; each needs ``0 <= t_min <= t_max <= 1``."""
    out = []
    for part in text.split(","):
        pieces = part.split(":")
        if len(pieces) != 2:
            raise EvalError(f"--interval entries are t_min:t_max (e.g. 0.4:0.65), got {part!r} in {text!r}")
        lo, hi = parse_floats(",".join(pieces), "--interval")
        if not 0.0 <= lo <= hi <= 1.0:
            raise EvalError(f"--interval {part!r}: need 0 <= t_min <= t_max <= 1")
        out.append((lo, hi))
    return out


def parse_steps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EvalError(f"--steps must be comma-separated integers (e.g. 1 or 1,2), got {text!r}") from None
    if any(v < 1 for v in values):
        raise EvalError(f"--steps values must be >= 1, got {values}")
    return values


def check_num(num: int, num_classes: int, world: int) -> None:
    """``num`` must be a multiple of ``num_classes`` (balanced labels) and of the world size (equal shares)."""
    need = math.lcm(num_classes, world)
    if num <= 0 or num % need:
        lower, upper = max(need, num // need * need), (num // need + 1) * need
        raise EvalError(
            f"--num {num} must be a positive multiple of {need} = lcm(num_classes {num_classes}, world size "
            f"{world}): every class gets num / num_classes samples and every rank num / world; "
            f"e.g. --num {lower} or --num {upper}")


# ---------------------------------------------------------------------------------------------------------
# The sample set


def shard(num: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous block of the global sample indices ``[0, num)``."""
    per = num // world
    return range(rank * per, (rank + 1) * per)


def labels_of(indices, num_classes: int) -> torch.Tensor:
    """Class-balanced labels: sample ``i`` has class ``i mod num_classes``."""
    return torch.as_tensor(list(indices), dtype=torch.int64) % num_classes


def noise_of(indices, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``(len(indices), *shape)`` fp32 noise; sample ``i``'s from a generator seeded by ``(seed, i)`` only."""
    out, gen = torch.empty((len(indices), *shape)), torch.Generator()
    for row, i in enumerate(indices):
        gen.manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> 1))
        out[row] = torch.randn(shape, generator=gen)
    return out


def sample_batches(model, indices: range, *, seed: int, steps: int, omega: float, t_min: float, t_max: float,
                   batch: int, autocast_dtype: torch.dtype | None, device: torch.device):
    """Yield ``(indices, labels, latents, seconds)`` per batch of ``indices`` (``seconds``: the network time)."""
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        y = labels_of(idx, cfg.num_classes).to(device)
        noise = noise_of(idx, seed, shape).to(device)
        _sync(device)
        t0 = time.perf_counter()
        x = generate(model, y, omega, t_min, t_max, steps=steps, noise=noise, autocast_dtype=autocast_dtype)
        _sync(device)
        yield idx, y, x, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` floats -> uint8 ``clamp(127.5 x + 128, 0, 255)`` (same layout)."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Model and decoder


@dataclasses.dataclass
class Loaded:
    """An EMA model in eval mode and what its checkpoint says about it."""

    model: torch.nn.Module
    preset: str | None
    train_config: dict
    step: int | None
    decay: float | None
    source: str


def _read_safetensors_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_checkpoint(path, *, decay: float | None = None, backend: str = "reference",
                    device: str | torch.device = "cpu") -> Loaded:
    """The EMA model of an exported safetensors file or of a DCP checkpoint (directory), in eval mode."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"--ckpt {path} does not exist")
    if path.is_dir():
        step_dir = path if (path / checkpoint.META).is_file() else checkpoint.latest(path)
        if step_dir is None:
            raise EvalError(f"--ckpt {path} is a directory but neither a checkpoint (no {checkpoint.META}) nor a "
                            f"checkpoint root (no '{checkpoint.LATEST}' file); for a run directory pass "
                            "its model.safetensors or checkpoints/")
        with tempfile.TemporaryDirectory() as tmp:
            exported = checkpoint.export_ema(step_dir, Path(tmp) / "model.safetensors", decay)
            return _load_export(exported, None, backend, device, str(step_dir))
    if path.suffix != ".safetensors":
        raise EvalError(f"--ckpt {path}: expected the trainer's EMA export (.safetensors, python -m imf.train "
                        "export) or a DCP checkpoint directory")
    return _load_export(path, decay, backend, device, str(path))


def _load_export(path: Path, decay, backend, device, source: str) -> Loaded:
    meta = _read_safetensors_meta(path)
    model = checkpoint.load_exported(path, backend=backend, device=device)
    file_decay = float(meta["imf.ema_decay"]) if "imf.ema_decay" in meta else None
    if decay is not None and file_decay is not None and decay != file_decay:
        raise EvalError(f"--decay {decay}: {path} holds the EMA with decay {file_decay}")
    return Loaded(model=model, preset=meta.get("imf.preset"), train_config=json.loads(meta.get("imf.train_config",
                  "{}")), step=int(meta["imf.step"]) if "imf.step" in meta else None, decay=file_decay,
                  source=source)


def check_preset(loaded: Loaded, preset: str | None) -> None:
    """``--preset`` must name the preset the checkpoint was trained as."""
    if preset is None:
        return
    if preset not in PRESETS:
        raise EvalError(f"unknown --preset {preset!r}; choose one of {sorted(PRESETS)}")
    if loaded.preset is not None and loaded.preset != preset:
        raise EvalError(f"checkpoint {loaded.source} is a {loaded.preset!r} model, not --preset {preset!r}")
    cfg, ref = loaded.model.cfg, PRESETS[preset]
    shape = ("arch", "in_channels", "input_size", "num_classes")
    if loaded.preset is None and any(getattr(cfg, f) != getattr(ref, f) for f in shape):
        raise EvalError(f"checkpoint {loaded.source} ({', '.join(f'{f}={getattr(cfg, f)}' for f in shape)}) does "
                        f"not match --preset {preset!r} ({', '.join(f'{f}={getattr(ref, f)}' for f in shape)})")


class LatentDecoder:
    """Model latents -> images in ``[-1, 1]`` with a diffusers ``AutoencoderKL`` and the dataset's statistics."""

    def __init__(self, vae_path, data_dir, model_cfg: ModelConfig, device: torch.device,
                 dtype: torch.dtype = torch.float32, batch: int = 64):
        if vae_path is None:
            raise EvalError(f"a latent model ({model_cfg.in_channels}x{model_cfg.input_size}x{model_cfg.input_size})"
                            " needs --vae PATH (a local diffusers AutoencoderKL directory) to decode images")
        if not Path(vae_path).is_dir():
            raise EvalError(f"--vae {vae_path} is not a directory (AutoencoderKL.from_pretrained needs a local "
                            "path; nothing is downloaded)")
        if data_dir is None:
            raise EvalError("decoding needs the dataset's channel statistics: pass --data DIR (the latent dataset "
                            "with manifest.json; the checkpoint's training data.source is not a dataset directory)")
        from diffusers import AutoencoderKL

        from imf.data import DataError, load_manifest

        try:
            man = load_manifest(data_dir)
        except DataError as e:
            raise EvalError(f"--data: {e}") from None
        want = [model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size]
        if list(man["latent_shape"]) != want:
            raise EvalError(f"dataset {data_dir} holds latents {man['latent_shape']}, the checkpoint's model "
                            f"expects {want}")
        self.vae = AutoencoderKL.from_pretrained(str(vae_path), local_files_only=True).to(device, dtype).eval()
        if self.vae.config.latent_channels != model_cfg.in_channels:
            raise EvalError(f"--vae {vae_path} has {self.vae.config.latent_channels} latent channels, the model "
                            f"{model_cfg.in_channels}")
        meta = man.get("metadata", {})
        # the factors imf.prepare encoded with (as the trainer's sample grids read them), else the VAE's own
        self.scale = float(meta.get("scaling_factor", self.vae.config.scaling_factor))
        self.shift = float(meta.get("shift_factor", getattr(self.vae.config, "shift_factor", None)) or 0.0)
        self.mean = torch.tensor(man["channel_mean"], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(man["channel_std"], device=device).view(1, -1, 1, 1)
        self.dtype, self.batch = dtype, batch

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() * self.std + self.mean) / self.scale + self.shift
        return torch.cat([self.vae.decode(c.to(self.dtype)).sample.float() for c in z.split(self.batch)])


# ---------------------------------------------------------------------------------------------------------
# Scorers


class DigitsScorer:
    """Class accuracy and pixel-space Frechet distance of digits samples (:class:`imf.data.digits.DigitsJudge`, built on
    rank 0 at the first score)."""

    name = "digits"
    judge = None

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": images.detach().float().cpu().flatten(1)}

    def score(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
        if self.judge is None:
            from imf.data.digits import DigitsJudge

            self.judge = DigitsJudge()
        return self.judge.score(features["pixels"].view(-1, 1, 8, 8), labels)


def load_reference(path, *, images: bool = False) -> dict[str, np.ndarray]:
    """``mu`` and ``sigma`` (float64) of a reference ``.npz`` (and its ``arr_0`` images with ``images``)."""
    if path is None:
        raise EvalError("FID needs --ref-stats PATH: an .npz with 'mu' and 'sigma' of Inception pool features "
                        "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--ref-stats {path} does not exist")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") + (("arr_0",) if images else ()) if k not in f.files]
        if missing:
            raise EvalError(f"--ref-stats {path} lacks {missing} (it has {f.files})")
        ref = {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64)}
        if images:
            ref["images"] = f["arr_0"]
    d = ref["mu"].shape
    if len(d) != 1 or ref["sigma"].shape != (d[0], d[0]):
        raise EvalError(f"--ref-stats {path}: mu {ref['mu'].shape} and sigma {ref['sigma'].shape} are not (d,) and "
                        "(d, d)")
    return ref


def _require_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision build that does not match torch
        raise EvalError(
            f"FID/IS need torch-fidelity, which failed to import ({type(e).__name__}: {e}). Install it with "
            "`pip install torch-fidelity` (or `pip install -e .[eval]`); it needs a torchvision matching the "
            "installed torch") from None


def inception_weights(path) -> Path:
    """The torch-fidelity Inception weights file: ``path``, else in the torch hub cache (never downloaded)."""
    p = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not p.is_file():
        raise EvalError(f"Inception weights {p} not found: download {INCEPTION_WEIGHTS} (torch-fidelity v0.2.0 "
                        "release assets) on a machine with internet and pass --inception PATH or put it in "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'}")
    return p


class InceptionScorer:
    """FID against reference statistics, Inception Score and optionally precision/recall, via torch-fidelity."""

    name = "inception"

    def __init__(self, ref_stats, weights, device: torch.device, prc: bool = False, batch: int = 250):
        self.ref = load_reference(ref_stats, images=prc)
        _require_fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(inception_weights(weights)))
        self.net.to(device)
        self.device, self.prc, self.batch = device, prc, batch
        if self.ref["mu"].shape[0] != 2048:
            raise EvalError(f"--ref-stats mu has {self.ref['mu'].shape[0]} dimensions; Inception pool features 2048")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(to_uint8(images))
        return {"pool": pool.cpu(), "logits": logits.cpu()}

    def score(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        stats = fid_features_to_statistics(features["pool"].double())
        out = {"fid": fid_statistics_to_metric(stats, self.ref, verbose=False)[KEY_METRIC_FID]}
        isc = isc_features_to_metric(features["logits"], splits=10)
        out.update(inception_score=isc[KEY_METRIC_ISC_MEAN], inception_score_std=isc[KEY_METRIC_ISC_STD])
        if self.prc:
            prc = prc_features_to_metric(features["pool"].to(self.device), self._reference_pool(), prc_neighborhood=3,
                                         prc_batch_size=10000, save_cpu_ram=True, verbose=False)
            out.update(precision=prc[KEY_METRIC_PRECISION], recall=prc[KEY_METRIC_RECALL])
        return out

    @torch.no_grad()
    def _reference_pool(self) -> torch.Tensor:
        if "pool" not in self.ref:
            imgs = torch.from_numpy(self.ref["images"]).permute(0, 3, 1, 2)
            self.ref["pool"] = torch.cat([self.net(b.to(self.device))[0] for b in imgs.split(self.batch)])
        return self.ref["pool"]


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclasses.dataclass
class _Env:
    rank: int
    world: int
    device: torch.device
    owns_group: bool


def _setup(device_arg: str) -> _Env:
    use_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise EvalError(f"--device {device_arg} requested but CUDA is not available")
    if "RANK" not in os.environ:
        device = torch.device(device_arg if device_arg.startswith("cuda") else ("cuda" if use_cuda else "cpu"))
        return _Env(0, 1, device, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return _Env(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, not dist.is_initialized())


def _init_group(env: _Env) -> None:
    if env.owns_group:
        cuda = env.device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=env.device if cuda else None)


def _gather(obj, env: _Env) -> list | None:
    """``obj`` of every rank on rank 0 (rank order), None elsewhere."""
    if env.world == 1:
        return [obj]
    out = [None] * env.world if env.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier(env: _Env) -> None:
    if env.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# Outputs


def write_npz(path: Path, parts: list[Path], chunk: int = 1024) -> Path:
    """Concatenate ``.npy`` parts (uint8, same trailing shape) into ``path`` as ``arr_0``, streaming."""
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    shape = (sum(len(a) for a in arrays), *arrays[0].shape[1:])
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for a in arrays:
                for s in range(0, len(a), chunk):
                    f.write(np.ascontiguousarray(a[s:s + chunk]).tobytes())
    del arrays
    os.replace(tmp, path)
    return path


def git_commit() -> dict:
    """Commit and dirty flag of the checkout this module lives in (None outside git)."""
    here = Path(__file__).resolve().parent

    def git(*cmd):
        r = subprocess.run(["git", *cmd], cwd=here, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(report: dict) -> str:
    """The sweep as a markdown table (one row per cell), with a header naming the run."""
    cells = report["cells"]
    metric_keys = list(cells[0]["metrics"]) if cells else []
    cfg = report["config"]
    lines = [f"# Evaluation of `{report['checkpoint']['source']}`", "",
             f"preset {report['checkpoint']['preset']}, step {report['checkpoint']['step']}, EMA "
             f"{report['checkpoint']['decay']}; {cfg['num']} samples per cell (seed {cfg['seed']}), "
             f"{report['world_size']} x {report['device']}, {report['precision']}, backend {report['backend']}; "
             f"commit {report['git']['commit']}{' (dirty)' if report['git']['dirty'] else ''}; {report['created']}",
             "", "| NFE | omega | interval | " + " | ".join(metric_keys) + " | sample img/s | decode img/s |",
             "|---" * (len(metric_keys) + 5) + "|"]
    for c in cells:
        row = [c["steps"], c["omega"], f"[{c['t_min']:g}, {c['t_max']:g}]", *(c["metrics"][k] for k in metric_keys),
               c["sample_img_per_s"], c["decode_img_per_s"]]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m imf.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="EMA export (.safetensors) or DCP checkpoint directory")
    p.add_argument("--decay", type=float, default=None, help="EMA decay to export from a DCP checkpoint")
    p.add_argument("--preset", default=None, help="the preset the checkpoint must be (checked; default: its own)")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=50000,
                   help="samples per cell (multiple of num_classes and world; under torchrun write --num-samples)")
    p.add_argument("--steps", default="1", help="NFE list, e.g. 1 or 1,2")
    p.add_argument("--omega", default=None, help="guidance scales, e.g. 1.0,2.0 (default: the published one)")
    p.add_argument("--interval", default=None, help="guidance intervals t_min:t_max, e.g. 0.0:1.0,0.4:0.65 "
                   "(default: the published one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250, help="samples per forward on each rank")
    p.add_argument("--metrics", default="auto", choices=("auto", "inception", "digits"),
                   help="auto: digits if the checkpoint was trained on digits, else inception")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory (latent models)")
    p.add_argument("--vae-batch", type=int, default=64, help="images per VAE decode call")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--data", default=None, help="latent dataset directory with manifest.json (channel statistics; "
                   "default: the checkpoint's data.source)")
    p.add_argument("--ref-stats", default=None, help="reference .npz with mu, sigma (and arr_0 for --prc)")
    p.add_argument("--inception", default=None, help=f"torch-fidelity Inception weights ({INCEPTION_WEIGHTS}; "
                   "default: the torch hub cache)")
    p.add_argument("--prc", action="store_true", help="also precision/recall (needs arr_0 images in --ref-stats)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="sampling autocast: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                   help="model op backend: auto = triton on CUDA, reference on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--png", action="store_true", help="also write every sample as a PNG")
    p.add_argument("--npz", action=argparse.BooleanOptionalAction, default=True,
                   help="write each cell's samples as an ADM .npz (uint8 NHWC, arr_0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def sweep_cells(steps: list[int], omegas: list[float] | None, intervals: list[tuple[float, float]] | None,
                preset: str | None) -> list[tuple[int, float, float, float]]:
    """``(steps, omega, t_min, t_max)`` per cell; a missing omega or interval list is the published evaluation
    setting of ``preset`` at that NFE (:data:`imf.config.EVAL_GUIDANCE`), else no guidance on ``[0, 1]``."""
    cells = []
    for n in steps:
        published = EVAL_GUIDANCE.get(f"{preset}@{n}" if n > 1 else preset)
        ws = omegas or [published.omega if published else 1.0]
        ts = intervals or [(published.t_min, published.t_max) if published else (0.0, 1.0)]
        cells += [(n, w, lo, hi) for lo, hi in ts for w in ws]
    return cells


def _data_dir(args, loaded: Loaded) -> str | None:
    if args.data is not None:
        return args.data
    source = loaded.train_config.get("data", {}).get("source")
    return source if source is not None and Path(source).is_dir() else None


def run(args: argparse.Namespace, scorer=None) -> dict | None:
    """Evaluate per ``args`` (see :func:`parse_args`); collective under torchrun. Returns the report on rank 0
    (None on other ranks). ``scorer``: see the module docstring (default: by ``--metrics``)."""
    env = _setup(args.device)
    if args.batch <= 0 or args.vae_batch <= 0:
        raise EvalError("--batch and --vae-batch must be positive")
    steps = parse_steps(args.steps)  # bad strings fail before the model loads
    omegas = parse_omegas(args.omega) if args.omega else None
    intervals = parse_intervals(args.interval) if args.interval else None
    backend = args.backend if args.backend != "auto" else ("triton" if env.device.type == "cuda" else "reference")
    loaded = load_checkpoint(args.ckpt, decay=args.decay, backend=backend, device=env.device)
    check_preset(loaded, args.preset)
    cfg = loaded.model.cfg
    check_num(args.num, cfg.num_classes, env.world)
    cells = sweep_cells(steps, omegas, intervals, loaded.preset)
    digits = (args.metrics == "digits" or args.metrics == "auto" and (
        loaded.train_config.get("data", {}).get("source") == "digits" or loaded.preset == "demo"))
    if digits:
        if (cfg.in_channels, cfg.input_size, cfg.num_classes) != (1, 8, 10):
            raise EvalError(f"digits metrics need an 8x8, 1-channel, 10-class model (the demo preset); the checkpoint "
                            f"is {cfg.in_channels}x{cfg.input_size}x{cfg.input_size}, {cfg.num_classes} classes")
        if args.vae or args.ref_stats or args.prc:
            raise EvalError("the digits demo is in pixel space: --vae, --ref-stats and --prc do not apply")
        decode = None
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.vae_dtype]
        decode = LatentDecoder(args.vae, _data_dir(args, loaded), cfg, env.device, dtype, args.vae_batch)
    if scorer is None:
        scorer = DigitsScorer() if digits else InceptionScorer(args.ref_stats, args.inception, env.device,
                                                                prc=args.prc, batch=args.batch)
    precision = args.precision if args.precision != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None

    _init_group(env)
    try:
        return _sweep(args, env, loaded, cells, decode, scorer, autocast, precision, backend)
    finally:
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _sweep(args, env: _Env, loaded: Loaded, cells, decode, scorer, autocast, precision: str, backend: str) -> dict:
    out = Path(args.out)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(env)
    model = loaded.model
    indices = shard(args.num, env.rank, env.world)
    labels = labels_of(range(args.num), model.cfg.num_classes)
    results = []
    for steps, omega, t_min, t_max in cells:
        name = f"nfe{steps}_w{omega:g}_t{t_min:g}-{t_max:g}"
        parts = out / f".parts-{name}"
        if args.npz and env.rank == 0:
            parts.mkdir(exist_ok=True)
        _barrier(env)
        memmap = None
        feats: dict[str, list[torch.Tensor]] = {}
        t_gen = t_dec = 0.0
        start = time.perf_counter()
        bar = tqdm(total=len(indices) * env.world, desc=name, unit="img", dynamic_ncols=True,
                   disable=env.rank != 0 or not args.progress)
        for idx, _, x, seconds in sample_batches(model, indices, seed=args.seed, steps=steps, omega=omega,
                                                 t_min=t_min, t_max=t_max, batch=args.batch,
                                                 autocast_dtype=autocast, device=env.device):
            t_gen += seconds
            t0 = time.perf_counter()
            images = decode(x) if decode is not None else x
            _sync(env.device)
            t_dec += time.perf_counter() - t0
            u8 = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
            if args.npz:
                if memmap is None:
                    memmap = np.lib.format.open_memmap(parts / f"rank{env.rank:05d}.npy", mode="w+", dtype=np.uint8,
                                                       shape=(len(indices), *u8.shape[1:]))
                memmap[idx.start - indices.start:idx.stop - indices.start] = u8
            if args.png:
                _write_pngs(out / "png" / name, idx, u8)
            for k, v in scorer.features(images).items():
                feats.setdefault(k, []).append(v)
            bar.update(len(idx) * env.world)
        bar.close()
        if memmap is not None:
            memmap.flush()
            del memmap
        gathered = _gather(({k: torch.cat(v) for k, v in feats.items()}, t_gen, t_dec), env)
        _barrier(env)
        if env.rank == 0:
            full = {k: torch.cat([g[0][k] for g in gathered]) for k in gathered[0][0]}
            metrics = scorer.score(full, labels)
            npz = None
            if args.npz:
                npz = str(write_npz(out / f"{name}.npz", [parts / f"rank{r:05d}.npy" for r in range(env.world)]))
                shutil.rmtree(parts)
            gen_s, dec_s = max(g[1] for g in gathered), max(g[2] for g in gathered)
            cell = {"name": name, "steps": steps, "omega": omega, "t_min": t_min, "t_max": t_max, "metrics": metrics,
                    "sample_img_per_s": args.num / gen_s, "decode_img_per_s": args.num / dec_s if decode else None,
                    "sample_seconds": gen_s, "wall_seconds": time.perf_counter() - start, "npz": npz}
            results.append(cell)
            print(f"imf.evaluate: {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
                  + f"; {cell['sample_img_per_s']:.1f} img/s sampling", file=sys.stderr)
    if env.rank != 0:
        return None
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    report = {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "git": git_commit(), "torch": torch.__version__, "device": device_name, "world_size": env.world,
              "precision": precision, "backend": backend, "scorer": scorer.name,
              "checkpoint": {"source": loaded.source, "preset": loaded.preset, "step": loaded.step,
                             "decay": loaded.decay},
              "model_config": dataclasses.asdict(model.cfg), "train_config": loaded.train_config,
              "config": vars(args), "cells": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown_table(report))
    return report


def _write_pngs(folder: Path, idx: range, u8: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(idx, u8, strict=True):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (EvalError, checkpoint.CheckpointError) as e:
        print(f"imf.evaluate: error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        print(markdown_table(report))
    return 0


__all__ = ["run", "main", "parse_args", "load_checkpoint", "check_preset", "check_num", "shard", "labels_of",
           "noise_of", "sample_batches", "to_uint8", "LatentDecoder", "DigitsScorer", "InceptionScorer",
           "load_reference", "write_npz", "markdown_table", "parse_omegas", "parse_intervals", "parse_steps",
           "sweep_cells", "EvalError"]

if __name__ == "__main__":
    sys.exit(main())
