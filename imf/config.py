"""Configuration dataclasses and the published presets.

Every constant of the methods is a field here with the published default (official iMF / MF
configs; see the design document in docs/, sections 1, 2 and 5). Presets are plain ``ModelConfig`` values;
``imf.build_model(name, **overrides)`` applies keyword overrides on top of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _f(default, help: str):
    """A config field with its one line of ``help`` (what it is, and the published value), which
    ``python -m imf.train --help`` shows for ``--model.*`` / ``--loss.*`` (the key :func:`imf.train.config.opt`
    uses)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """Shape and conditioning of one network.

    ``arch="imf"``: in-context transformer; ``depth`` counts the inference blocks: ``depth -
    head_depth`` shared trunk blocks, then a ``head_depth``-block u-head (and, for training
    with ``v_head="aux"``, a second ``head_depth``-block v-head).
    ``arch="mf"``: the MeanFlow adaLN-zero DiT conditioned on ``(t, h = t - r)`` and the class.
    """

    arch: str = _f("imf", "network: 'imf' (in-context transformer) or 'mf' (MeanFlow's adaLN-zero DiT)")
    input_size: int = _f(32, "latent height = width (published: 32, ImageNet 256 through the SD VAE)")
    in_channels: int = _f(4, "latent channels (published: 4)")
    patch_size: int = _f(2, "patch side in latent pixels (published: 2; MF-B/4: 4)")
    dim: int = _f(768, "token width (published: B/M 768, L/XL 1024; MF: B 768, M/L 1024, XL 1152)")
    depth: int = _f(12, "inference blocks: trunk + u-head (published iMF: B 12, M 24, L 32, XL 48; MF: 12/16/24/28)")
    heads: int = _f(12, "attention heads (published: 12 at width 768, 16 at 1024 and 1152)")
    head_depth: int = _f(8, "iMF: blocks in each head, u and v (published: 8)")
    mlp_hidden: int | None = _f(
        None, "MLP hidden units (default: iMF SwiGLU int(8/3 dim), published; MF GELU 4 dim, published)"
    )
    num_classes: int = _f(1000, "classes; label num_classes is the null class (published: 1000)")
    v_head: str = _f("aux", "iMF: 'aux' (separate v-head, published training form) or 'boundary' (v := u at h = 0)")
    # condition tokens (iMF): class, omega, t_min, t_max, time (h)
    class_tokens: int = _f(8, "iMF: learned class tokens (published: 8)")
    omega_tokens: int = _f(4, "iMF: learned guidance-scale tokens (published: 4)")
    t_min_tokens: int = _f(2, "iMF: learned t_min tokens (published: 2)")
    t_max_tokens: int = _f(2, "iMF: learned t_max tokens (published: 2)")
    time_tokens: int = _f(4, "iMF: learned time (h = t - r) tokens (published: 4)")
    freq_dim: int = _f(256, "sinusoidal embedding width before each condition MLP (published: 256)")
    # Times enter the sinusoidal features unscaled. DiT's x1000 (integer-step) scaling makes the
    # tangent of the time embedding ~1000x larger: on the digits demo mse_V then diverged (1.5 -> 117
    # in 300 steps) while at 1.0 it fell 1.65 -> 0.77 (same seed, lr 1e-3).
    time_scale: float = _f(1.0, "factor on times before the sinusoid (published: 1.0, no DiT x1000)")
    rope_theta: float = _f(10000.0, "iMF: RoPE base over all tokens (published: 10000)")
    norm_eps: float = _f(1e-6, "RMSNorm / LayerNorm epsilon (published: 1e-6)")
    init: str = _f(
        "official",
        "initialisation: 'official' (the published training code's; docs/recipe.md) or 'xavier' (the "
        "engine's earlier Xavier-everywhere init; the CPU demo's measured departure)",
    )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_cond_tokens(self) -> int:
        """Condition tokens in front of the image tokens (iMF; 0 for the MF DiT)."""
        if self.arch != "imf":
            return 0
        return self.class_tokens + self.omega_tokens + self.t_min_tokens + self.t_max_tokens + self.time_tokens

    @property
    def seq_len(self) -> int:
        return self.num_cond_tokens + self.num_patches

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return int(8 * self.dim / 3) if self.arch == "imf" else 4 * self.dim

    @property
    def trunk_depth(self) -> int:
        return self.depth - self.head_depth if self.arch == "imf" else self.depth

    def validate(self) -> ModelConfig:
        if self.arch not in ("imf", "mf"):
            raise ValueError(f"arch must be 'imf' or 'mf', got {self.arch!r}")
        if self.init not in ("official", "xavier"):
            raise ValueError(f"init must be 'official' or 'xavier', got {self.init!r}")
        if self.v_head not in ("aux", "boundary"):
            raise ValueError(f"v_head must be 'aux' or 'boundary', got {self.v_head!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / heads must be even for RoPE, got {self.head_dim}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
        if self.arch == "imf" and not 0 < self.head_depth <= self.depth:
            raise ValueError(f"head_depth must be in [1, depth={self.depth}], got {self.head_depth}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        return self


PRESETS: dict[str, ModelConfig] = {
    "iMF-B/2": ModelConfig(dim=768, depth=12, heads=12),
    "iMF-M/2": ModelConfig(dim=768, depth=24, heads=12),
    "iMF-L/2": ModelConfig(dim=1024, depth=32, heads=16),
    "iMF-XL/2": ModelConfig(dim=1024, depth=48, heads=16),
    "MF-B/2": ModelConfig(arch="mf", dim=768, depth=12, heads=12),
    "MF-XL/2": ModelConfig(arch="mf", dim=1152, depth=28, heads=16),
    # Pixel-space 8x8 digits (scikit-learn) for the CPU demo: 16 image tokens + 7 condition tokens
    # (the same five groups, fewer tokens each), 3 trunk blocks + 1-block u- and v-heads. Its init is the
    # engine's earlier Xavier one, a measured departure (docs/recipe.md): with the official init the demo scored
    # 1-NFE Frechet 1.46 / 2-NFE 1.07 against 1.40 / 0.98 (seed 0, same code otherwise).
    "demo": ModelConfig(
        init="xavier",
        input_size=8,
        in_channels=1,
        patch_size=2,
        dim=96,
        depth=4,
        heads=4,
        head_depth=1,
        num_classes=10,
        freq_dim=64,
        class_tokens=2,
        omega_tokens=1,
        t_min_tokens=1,
        t_max_tokens=1,
        time_tokens=2,
    ),
}


# Fields that say how a network's weights start, not what it computes: loaded weights replace them, so a
# checkpoint of one init resumes or fine-tunes under another.
START_ONLY_FIELDS = frozenset({"init"})


def network_differences(stored: dict, ours: dict) -> list[str]:
    """``"field stored (checkpoint) vs ours"`` for each ModelConfig field (as ``dataclasses.asdict`` dicts) in
    which the two describe different networks; ``START_ONLY_FIELDS`` do not count."""
    return [
        f"{k} {stored.get(k)!r} (checkpoint) vs {v!r}"
        for k, v in ours.items()
        if k not in START_ONLY_FIELDS and stored.get(k) != v
    ]


def preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with keyword ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


@dataclass(frozen=True)
class LossConfig:
    """Training-input distributions and loss constants (published defaults).

    iMF: ``t, r ~ logit-normal(p_mean, p_std)`` sorted, ``r = t`` for a fixed ``fm_fraction`` of the
    batch; ``omega ~ omega^-beta`` on ``[1, 1 + s_max]``; ``t_min ~ U[t_min_range]``, ``t_max ~
    U[t_max_range]`` ([0, 1] for FM samples); class dropout ``class_drop``; adaptive weight
    ``adp(L) = L / sg(L + adp_eps)^adp_power``.
    MF: ``r != t`` for ``1 - fm_fraction`` of the batch (25%); fixed guidance ``omega``, ``kappa`` on
    ``[t_start, t_end]``.
    """

    method: str = _f("imf", "objective: 'imf' (v-loss, guidance as a condition) or 'mf' (u-loss, fixed guidance)")
    p_mean: float = _f(-0.4, "logit-normal location of the t and r draws (published: -0.4)")
    p_std: float = _f(1.0, "logit-normal scale of the t and r draws (published: 1.0)")
    fm_fraction: float = _f(
        0.5, "share of each rank batch with r = t, placed first (published: iMF 0.5, MF 0.75, i.e. 25% r != t)"
    )
    omega_beta: float = _f(1.0, "iMF: omega ~ omega^-beta on [1, 1 + omega_s_max] (published: 1.0)")
    omega_s_max: float = _f(7.0, "iMF: guidance scales drawn up to 1 + omega_s_max (published: 7.0)")
    t_min_range: tuple[float, float] = _f((0.0, 0.5), "iMF: t_min ~ U(range) for r != t samples (published: [0, 0.5])")
    t_max_range: tuple[float, float] = _f((0.5, 1.0), "iMF: t_max ~ U(range) for r != t samples (published: [0.5, 1])")
    class_drop: float = _f(
        0.1,
        "class-dropout rate: the first Binomial(B, p) samples of each rank batch get the null class (published: 0.1)",
    )
    adp_eps: float = _f(0.01, "adaptive weight L / sg(L + eps)^p: eps (published: 0.01)")
    adp_power: float = _f(1.0, "adaptive weight L / sg(L + eps)^p: p (published: 1.0)")
    # MF only
    omega: float = _f(1.0, "MF: guidance weight of v_t in the target (published: 1.0)")
    kappa: float = _f(
        0.5, "MF: weight of the conditional velocity (published: 0.5; effective scale omega / (1 - kappa) = 2)"
    )
    t_start: float = _f(0.0, "MF: guidance applies for t in [t_start, t_end] (published: 0.0)")
    t_end: float = _f(1.0, "MF: guidance applies for t in [t_start, t_end] (published: 1.0)")

    @classmethod
    def for_method(cls, method: str, **overrides) -> LossConfig:
        """Published defaults of ``method`` ("imf" or "mf") with ``overrides``."""
        if method == "imf":
            base = cls()
        elif method == "mf":
            base = cls(method="mf", fm_fraction=0.75)
        else:
            raise ValueError(f"loss method must be 'imf' or 'mf', got {method!r}")
        return dataclasses.replace(base, **overrides).validate()

    def fm_count(self, batch_size: int) -> int:
        """Samples with ``r = t`` in a rank batch of ``batch_size``: ``int(batch_size * fm_fraction)``, the
        official ``data_size`` (truncated, not rounded); first in the official order, last in the sampler's batch."""
        return int(batch_size * self.fm_fraction)

    def validate(self) -> LossConfig:
        if self.method not in ("imf", "mf"):
            raise ValueError(f"method must be 'imf' or 'mf', got {self.method!r}")
        if not 0.0 <= self.fm_fraction <= 1.0:
            raise ValueError(f"fm_fraction must be in [0, 1], got {self.fm_fraction}")
        if not 0.0 <= self.class_drop < 1.0:
            raise ValueError(f"class_drop must be in [0, 1), got {self.class_drop}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        if self.omega_s_max < 0:
            raise ValueError(f"omega_s_max must be >= 0, got {self.omega_s_max}")
        if self.adp_eps <= 0:
            raise ValueError(f"adp_eps must be > 0 (it keeps the adaptive weight finite), got {self.adp_eps}")
        if self.omega < 1.0:
            raise ValueError(f"omega must be >= 1, got {self.omega}")
        if not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"kappa must be in [0, 1), got {self.kappa}")
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={self.t_start}, t_end={self.t_end}")
        return self


@dataclass(frozen=True)
class EvalGuidance:
    """Published 1-NFE evaluation guidance per preset (omega on [t_min, t_max])."""

    omega: float
    t_min: float
    t_max: float
    steps: int = 1


EVAL_GUIDANCE: dict[str, EvalGuidance] = {
    "iMF-B/2": EvalGuidance(8.0, 0.4, 0.65),
    "iMF-M/2": EvalGuidance(10.5, 0.4, 0.6),
    "iMF-L/2": EvalGuidance(10.5, 0.4, 0.6),
    "iMF-XL/2": EvalGuidance(8.0, 0.42, 0.62),
    "iMF-XL/2@2": EvalGuidance(4.0, 0.36, 0.64, steps=2),
}

__all__ = [
    "ModelConfig",
    "LossConfig",
    "EvalGuidance",
    "PRESETS",
    "EVAL_GUIDANCE",
    "START_ONLY_FIELDS",
    "network_differences",
    "preset",
]
