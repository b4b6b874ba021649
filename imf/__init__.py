"""MeanFlow / improved MeanFlow training engine: models, losses, sampling, data, training."""

from imf.config import EVAL_GUIDANCE, PRESETS, LossConfig, ModelConfig, preset
from imf.model import build_model

__all__ = ["build_model", "preset", "PRESETS", "EVAL_GUIDANCE", "ModelConfig", "LossConfig"]
