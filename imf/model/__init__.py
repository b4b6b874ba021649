"""The networks: the iMF in-context transformer and the MF adaLN-zero DiT baseline.

Modules: :mod:`~imf.model.base` (the shared interface and input checks), :mod:`~imf.model.transformer`
(iMF), :mod:`~imf.model.dit` (MF), :mod:`~imf.model.layers` (dual-forward layers),
:mod:`~imf.model.checks` (value checks, one host sync), :mod:`~imf.model.build` (``build_model``,
meta-device construction and ``init_weights``).

The ``"reference"`` backend is plain PyTorch with math attention, so ``torch.func.jvp`` runs
through the plain forward; ``"triton"`` uses the fused kernels of ``imf_kernels``. Both have the
same parameters and state_dict. Design: docs/ (the repository's design document).
"""

from imf.model.base import MeanFlowNet, patchify, unpatchify
from imf.model.build import build_model
from imf.model.dit import MFDiT
from imf.model.transformer import IMFTransformer

__all__ = ["build_model", "MeanFlowNet", "IMFTransformer", "MFDiT", "patchify", "unpatchify"]
