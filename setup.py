"""Packaging for the iMF training engine.

Installs two import packages:
  * ``imf``          -- the engine (model, losses, sampling, data, trainer, FLOP counter).
  * ``imf_kernels``  -- the Triton kernels from ``kernels/``. The bare name ``kernels`` is
                        taken on PyPI by a package that diffusers/transformers probe for, so
                        the folder is mapped to ``imf_kernels`` with ``package_dir``.
"""

from setuptools import setup

setup(
    name="imf-engine",
    version="0.1.0",
    description="Fused Triton kernels and a multi-GPU training engine for MeanFlow / improved MeanFlow",
    python_requires=">=3.10",
    packages=["imf", "imf_kernels", "bench"],
    package_dir={"imf": "imf", "imf_kernels": "kernels", "bench": "bench"},
    install_requires=[
        # torch 2.11 (GPU image) .. 2.14 (newest allowed here); 2.13.0 is the CPU test build.
        "torch>=2.6,<2.15",
        "triton>=3.6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "scikit-learn>=1.3",  # digits data set and classifier for the built-in demo
        "safetensors>=0.4",
        "pillow>=9.0",
        "pyyaml>=6.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.5", "scipy>=1.10", "matplotlib>=3.7"],
        "data": ["nvidia-dali-cuda130", "diffusers>=0.30"],
        "bench": ["matplotlib>=3.7"],
        # FID / IS; install next to the torchvision that matches your torch, or pip upgrades torch.
        "eval": ["torch-fidelity>=0.4"],
        # imf.convert: orbax (OCDBT) checkpoints of the official JAX code; flax msgpack needs nothing extra
        "flax": ["tensorstore>=0.1.60"],
    },
    entry_points={
        "console_scripts": [
            "imf-demo=imf.demo:main",
            "imf-train=imf.train:main",
            "imf-evaluate=imf.evaluate:main",
            "imf-convert=imf.convert.cli:entry",
            "imf-bench=bench.__main__:main",
        ],
    },
)
