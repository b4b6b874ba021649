"""The built-in data set: scikit-learn's 8x8 ``digits`` (1797 images, 10 classes), and its metrics.

The training source over it is :class:`imf.data.DigitsLoader`.

Pixels are scaled from [0, 16] to [-1, 1]. Sample quality is measured without downloads:

* **class accuracy**: an RBF-SVM trained on all real digits labels the generated samples; the
  fraction that gets the class they were generated for (alone it rewards collapse to prototypes);
* **Frechet distance** in the 64-d pixel space between generated and real digits
  (for scale: two random halves of the real set are 0.26 apart; class-mean images plus a
  little noise (std 0.05) score 5.8).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: images ``(1797, 1, 8, 8)`` in [-1, 1] (fp32) and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return x, torch.from_numpy(d.target.astype(np.int64))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` of two sample sets ``(n, d)``.

    The cross term uses the symmetric form, whose eigenvalues are those of ``S_a S_b``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, d) with the same d, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_cross)


class DigitsJudge:
    """Classifier and reference statistics of the real digits, built once."""

    def __init__(self):
        from sklearn.svm import SVC

        x, y = load_digits_tensors()
        self.real = x.flatten(1).numpy()
        self.classifier = SVC(gamma="scale", C=10.0).fit(self.real, y.numpy())

    def score(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Class accuracy and Frechet distance of generated ``samples`` (N, 1, 8, 8) in [-1, 1]."""
        flat = samples.detach().float().cpu().clamp(-1, 1).flatten(1).numpy()
        if not np.isfinite(flat).all():
            return {"accuracy": 0.0, "frechet": float("inf")}
        pred = self.classifier.predict(flat)
        return {"accuracy": float((pred == labels.cpu().numpy()).mean()), "frechet": frechet_distance(flat, self.real)}
