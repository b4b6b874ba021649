"""Scorers: what an evaluation measures on the decoded samples.

A scorer has ``name``, ``features(images) -> dict[str, Tensor]`` (images ``(B, C, H, W)`` float in
``[-1, 1]`` on the sampling device; per-sample rows, returned on the CPU; every rank calls it on its
share) and ``score(features, labels) -> dict[str, float]`` (rank 0, all ``num`` rows in index order).

* :class:`InceptionScorer`: FID against ``--ref-stats`` (``mu``, ``sigma`` of Inception pool features,
  e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``; with ``--prc`` its ``arr_0`` images give
  precision/recall, k = 3) and Inception Score (10 splits), by **torch-fidelity** (the ``eval`` extra).
  Chosen over clean-fid because (a) its Inception takes a local weights file, while clean-fid fetches
  its network from a URL or a fixed ``/tmp`` path; (b) its Inception is the TF-compatible port (TF1
  bilinear resize, the 2015-12-05 graph) that ADM's evaluator and the published FIDs use; (c) it has IS
  and precision/recall on features, so features computed on every rank and ADM's ``mu``/``sigma`` go
  straight in; (d) it is maintained. Both need torchvision, whose PyPI wheels are CUDA builds. Weights:
  ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity v0.2.0 release) via ``--inception PATH``
  or in ``$TORCH_HOME/hub/checkpoints/``; never downloaded.
* :class:`DigitsScorer`: class accuracy and pixel-space Frechet distance of
  :class:`imf.data.digits.DigitsJudge` (the digits demo; no VAE, CPU).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from imf.cli import MissingDependencyError, require
from imf.evaluate.options import EvalError
from imf.evaluate.sampling import to_uint8

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


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
    """``mu`` and ``sigma`` (float64) of a reference ``.npz`` (and its ``arr_0`` images with ``images``).

    Both official evaluations' files are accepted: ``mu``/``sigma`` (the PyTorch one's JiT ``jit_in256_stats.npz``,
    ``imagenet_256_fid_stats_torch.npz``; ADM's files) and ``ref_mu``/``ref_sigma`` (the JAX one's
    ``imagenet_256_fid_stats.npz``, ``Lyy-iiis/imeanflow@main`` ``utils/fid_util.py``)."""
    if path is None:
        raise EvalError(
            "FID needs --ref-stats PATH: an .npz with 'mu' and 'sigma' of Inception pool features "
            "(e.g. ADM's VIRTUAL_imagenet256_labeled.npz)"
        )
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--ref-stats {path} does not exist")
    try:
        with np.load(path) as f:
            prefix = "ref_" if "ref_mu" in f.files and "mu" not in f.files else ""
            want = (f"{prefix}mu", f"{prefix}sigma") + (("arr_0",) if images else ())
            missing = [k for k in want if k not in f.files]
            if missing:
                raise EvalError(f"--ref-stats {path} lacks {missing} (it has {f.files})")
            ref = {"mu": f[f"{prefix}mu"].astype(np.float64), "sigma": f[f"{prefix}sigma"].astype(np.float64)}
            if images:
                ref["images"] = f["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, EvalError):
            raise
        raise EvalError(f"--ref-stats {path} is not a readable .npz ({type(e).__name__}: {e})") from None
    d = ref["mu"].shape
    if len(d) != 1 or ref["sigma"].shape != (d[0], d[0]):
        raise EvalError(
            f"--ref-stats {path}: mu {ref['mu'].shape} and sigma {ref['sigma'].shape} are not (d,) and (d, d)"
        )
    return ref


def require_fidelity():
    """Import torch-fidelity or raise :class:`imf.cli.MissingDependencyError` with the install command."""
    purpose = "FID / Inception Score (--metrics inception)"
    try:
        return require("torch_fidelity", extra="eval", package="torch-fidelity", purpose=purpose)
    except RuntimeError as e:  # a torchvision build that does not match the installed torch
        raise MissingDependencyError(
            f"{purpose} needs torch-fidelity, which failed to import ({type(e).__name__}: {e}); it needs a "
            'torchvision matching the installed torch: pip install -e ".[eval]"'
        ) from e


def inception_weights(path) -> Path:
    """The torch-fidelity Inception weights file: ``path``, else in the torch hub cache (never downloaded)."""
    p = Path(path) if path is not None else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not p.is_file():
        raise EvalError(
            f"Inception weights {p} not found: download {INCEPTION_WEIGHTS} (torch-fidelity v0.2.0 "
            "release assets) on a machine with internet and pass --inception PATH or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}"
        )
    return p


class InceptionScorer:
    """FID against reference statistics, Inception Score and optionally precision/recall, via torch-fidelity."""

    name = "inception"

    def __init__(self, ref_stats, weights, device: torch.device, prc: bool = False, batch: int = 250, uint8=to_uint8):
        """``uint8``: images in ``[-1, 1]`` -> uint8 (the evaluation convention's, :mod:`imf.evaluate.sampling`)."""
        self.ref = load_reference(ref_stats, images=prc)
        self.uint8 = uint8
        require_fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(inception_weights(weights)),
        )
        self.net.to(device)
        self.device, self.prc, self.batch = device, prc, batch
        if self.ref["mu"].shape[0] != 2048:
            raise EvalError(f"--ref-stats mu has {self.ref['mu'].shape[0]} dimensions; Inception pool features 2048")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(self.uint8(images))
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
            prc = prc_features_to_metric(
                features["pool"].to(self.device),
                self._reference_pool(),
                prc_neighborhood=3,
                prc_batch_size=10000,
                save_cpu_ram=True,
                verbose=False,
            )
            out.update(precision=prc[KEY_METRIC_PRECISION], recall=prc[KEY_METRIC_RECALL])
        return out

    @torch.no_grad()
    def _reference_pool(self) -> torch.Tensor:
        if "pool" not in self.ref:
            imgs = torch.from_numpy(self.ref["images"]).permute(0, 3, 1, 2)
            self.ref["pool"] = torch.cat([self.net(b.to(self.device))[0] for b in imgs.split(self.batch)])
        return self.ref["pool"]


__all__ = [
    "INCEPTION_WEIGHTS",
    "DigitsScorer",
    "InceptionScorer",
    "inception_weights",
    "load_reference",
    "require_fidelity",
]
