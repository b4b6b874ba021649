"""Encode an image folder into latent shards with a diffusers ``AutoencoderKL`` (format: :mod:`imf.data.format`).

    python -m imf.prepare --images DIR --vae PATH --out DIR [--resolution 256] [--flip] [--batch-size 64]
                          [--shard-size 10000] [--device auto] [--num-workers 4] [--vae-dtype fp32]

``--images``: an ImageNet-style folder: one subfolder per class (labels = sorted subfolder names -> 0..K-1,
the names go into ``manifest.class_names``), images anywhere below each (sorted paths); a folder with no
subfolders is one class. ``--vae``: a local ``AutoencoderKL.from_pretrained`` directory (never downloaded).

Preprocessing is ADM's ``center_crop_arr`` (used by DiT, MeanFlow and iMF): BOX-halve while the short side is
>= 2 * resolution, BICUBIC-resize so the short side equals the resolution, center crop; RGB scaled to
[-1, 1]. Stored per image: the posterior ``latent_dist.mean`` and ``latent_dist.std`` *times the VAE's
``scaling_factor``* (SD-VAE: 0.18215; both moments scaled, so ``mean + std * eps`` is a sample of the scaled
latent; a VAE with a ``shift_factor`` stores ``(mean - shift) * scale``), float16; with ``--flip`` also the
moments of the horizontally flipped image (view 1). Encoding runs on the GPU when there is one
(``--device auto``), in batches, with a progress bar.

Resumable: shards are written atomically as they fill (temp file + rename, then a sidecar JSON marking the
shard complete); a rerun with the same inputs and settings keeps the complete shards, rewrites the partial
one and continues; a finished directory (manifest with the same fingerprint) is left as is. Different
settings or inputs in the same ``--out`` are refused.

Errors (a missing or empty image folder, a bad ``--vae`` directory, diffusers not installed, an ``--out`` that is
a file or holds other data, a resolution the VAE cannot encode) are one line on stderr and a non-zero exit code
(:func:`imf.cli.run_cli`; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imf.cli import ArgumentParser, check_out_dir, run_cli
from imf.data import MANIFEST, DataError, ShardWriter
from imf.vae import LatentEncoder, load_vae

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion ``image_datasets.center_crop_arr``): returns (S, S, C) uint8."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of an image folder, in a deterministic (sorted) order."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(f"--images {root} {what} (expected a folder of class subfolders of images)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    groups = [(root / c, i) for i, c in enumerate(classes)] if classes else [(root, 0)]
    files, labels = [], []
    for folder, label in groups:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"--images {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, labels, classes or [root.name]


class _Images(torch.utils.data.Dataset):
    """Preprocessed images in [-1, 1], (3, S, S) float32, with their labels."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int):
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        """``(image, label, "")``, or ``(zeros, label, reason)`` for a file that does not decode (so the main
        process reports it as one line instead of a worker traceback)."""
        try:
            with Image.open(self.files[i]) as im:
                arr = center_crop_arr(im.convert("RGB"), self.resolution)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            zeros = torch.zeros(3, self.resolution, self.resolution)
            return zeros, self.labels[i], f"image {self.files[i]} cannot be read: {' '.join(str(e).split())}"
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, self.labels[i], ""


def _fingerprint(files, labels, root, vae_path, resolution, flip, shard_size, scale, shift) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(Path(vae_path).resolve()), resolution, flip, shard_size, scale, shift]).encode())
    for f, y in zip(files, labels, strict=True):
        h.update(f"{f.relative_to(root)}\0{y}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``{}`` when it is missing or unreadable (then it is not ours to keep)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DataError(f"--device {device!r} is not a device (expected auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise DataError(f"--device {device!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return dev


def encode_folder(
    images: str | os.PathLike,
    vae: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution: int = 256,
    flip: bool = False,
    batch_size: int = 64,
    shard_size: int = 10000,
    device: str = "auto",
    num_workers: int = 4,
    vae_dtype: str = "fp32",
    progress: bool = True,
) -> dict:
    """Encode ``images`` into latent shards under ``out`` (see the module docstring); returns the manifest."""
    for name, v in (("--resolution", resolution), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if v <= 0:
            raise DataError(f"{name} must be positive, got {v}")
    if num_workers < 0:
        raise DataError(f"--num-workers must be >= 0, got {num_workers}")
    if vae_dtype not in _DTYPES:
        raise DataError(f"--vae-dtype must be one of {sorted(_DTYPES)}, got {vae_dtype!r}")
    root, out = Path(images), Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file (expected a new or resumable dataset directory)")
    files, labels, class_names = list_images(root)
    dev = _pick_device(device)
    dtype = _DTYPES[vae_dtype]
    encoder = LatentEncoder(load_vae(vae, device=dev, dtype=dtype))
    scale, shift = encoder.scale, encoder.shift
    latent_shape = encoder.latent_shape(resolution)
    fp = _fingerprint(files, labels, root, vae, resolution, flip, shard_size, scale, shift)

    done = _read_json(out / MANIFEST)
    if (done.get("metadata") or {}).get("fingerprint") == fp:
        print(f"imf.prepare: {out} is already complete ({done.get('count')} samples)", file=sys.stderr)
        return done
    if out.exists():
        for side in out.glob("shard-*.json"):
            if _read_json(side).get("fingerprint") != fp:
                raise DataError(
                    f"{out} holds shards made from other inputs/settings ({side.name}); use another --out or delete it"
                )
    metadata = {
        "vae": str(Path(vae).resolve()),
        "scaling_factor": scale,
        "shift_factor": shift,
        "resolution": resolution,
        "images": str(root.resolve()),
        "preprocessing": "adm_center_crop_arr",
        "moments": "posterior mean and std times scaling_factor (after subtracting shift_factor)",
        "fingerprint": fp,
    }
    writer = ShardWriter(
        out,
        latent_shape=latent_shape,
        num_classes=len(class_names),
        shard_size=shard_size,
        flipped=flip,
        class_names=class_names,
        metadata=metadata,
        fingerprint=fp,
        resume=True,
    )
    start = writer.count
    ds = torch.utils.data.Subset(_Images(files, labels, resolution), range(start, len(files)))
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), initial=start, desc="encode", unit="img", disable=None)  # on a terminal

    with torch.inference_mode():
        for x, y, errors in dl:
            bad = next((e for e in errors if e), None)
            if bad is not None:
                raise DataError(f"--images: {bad} (complete shards are kept: fix or remove it and rerun)")
            x = x.to(dev, dtype, non_blocking=True)
            m, s = encoder(x)
            if flip:
                mf, sf = encoder(torch.flip(x, dims=[3]))
                writer.add(m, s, y, mf, sf)
            else:
                writer.add(m, s, y)
            if bar is not None:
                bar.update(len(y))
    if bar is not None:
        bar.close()
    return writer.close()


def _prepare(argv: list[str]) -> int:
    ap = ArgumentParser(prog="python -m imf.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="image folder (class subfolders)")
    ap.add_argument("--vae", required=True, help="local AutoencoderKL directory (from_pretrained)")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--flip", action="store_true", help="also store the flipped images' moments")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--vae-dtype", default="fp32", choices=sorted(_DTYPES))
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    options = vars(ap.parse_args(argv))
    del options["debug"]  # run_cli's; every other option is the encode_folder argument of the same name
    check_out_dir(options["out"])
    man = encode_folder(**options)
    print(
        f"imf.prepare: wrote {man['count']} samples ({len(man['shards'])} shards, "
        f"latent {man['latent_shape']}, {man['num_classes']} classes) to {options['out']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m imf.prepare ...`` through :func:`imf.cli.run_cli` (returns the exit code)."""
    return run_cli("python -m imf.prepare", _prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
