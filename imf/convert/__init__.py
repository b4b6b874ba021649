"""Official iMF / MF checkpoints in and out (see docs/checkpoints.md).

::

    cfg, weights = from_official(state_dict, arch="imf", preset=None, **config_overrides)
    model = imf.build_model(cfg); model.load_state_dict(weights)
    official = to_official(model)                 # loads into the official iMeanFlow with strict=True

``python -m imf.convert IN --out OUT`` converts files (:mod:`imf.convert.cli`).
"""

from imf.convert.errors import ConvertError
from imf.convert.official import from_official, to_official

__all__ = ["ConvertError", "from_official", "to_official"]
