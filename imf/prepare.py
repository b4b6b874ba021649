"""Encode an image folder into latent shards with a diffusers ``AutoencoderKL`` (:mod:`imf.data_format`).

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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imf.data_format import MANIFEST, DataError, ShardWriter

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
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    groups = [(root / c, i) for i, c in enumerate(classes)] if classes else [(root, 0)]
    files, labels = [], []
    for folder, label in groups:
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files, labels, classes or [root.name]


class _Images(torch.utils.data.Dataset):
    """Preprocessed images in [-1, 1], (3, S, S) float32, with their labels."""

    def __init__(self, files: list[Path], labels: list[int], resolution: int):
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            arr = center_crop_arr(im.convert("RGB"), self.resolution)
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, self.labels[i]


def _fingerprint(files, labels, root, vae_path, resolution, flip, shard_size, scale, shift) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(Path(vae_path).resolve()), resolution, flip, shard_size, scale, shift]).encode())
    for f, y in zip(files, labels, strict=True):
        h.update(f"{f.relative_to(root)}\0{y}\n".encode())
    return h.hexdigest()


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    from diffusers import AutoencoderKL

    if resolution <= 0 or batch_size <= 0 or shard_size <= 0:
        raise ValueError("resolution, batch_size and shard_size must be positive")
    root, out = Path(images), Path(out)
    files, labels, class_names = list_images(root)
    if not Path(vae).is_dir():
        raise DataError(
            f"VAE directory {vae} does not exist (AutoencoderKL.from_pretrained needs a local path)"
        )
    dev = _pick_device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[vae_dtype]
    model = AutoencoderKL.from_pretrained(str(vae), local_files_only=True).to(dev, dtype).eval()
    cfg = model.config
    scale = float(cfg.scaling_factor)
    shift = getattr(cfg, "shift_factor", None)
    shift = float(shift) if shift is not None else None
    down = 2 ** (len(cfg.block_out_channels) - 1)
    if resolution % down:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling factor {down}")
    latent_shape = (int(cfg.latent_channels), resolution // down, resolution // down)
    fp = _fingerprint(files, labels, root, vae, resolution, flip, shard_size, scale, shift)

    man_path = out / MANIFEST
    if man_path.exists():
        try:
            done = json.loads(man_path.read_text())
        except json.JSONDecodeError:
            done = {}
        if done.get("metadata", {}).get("fingerprint") == fp:
            print(f"imf.prepare: {out} is already complete ({done['count']} samples)", file=sys.stderr)
            return done
    if out.exists():
        for side in out.glob("shard-*.json"):
            if json.loads(side.read_text()).get("fingerprint") != fp:
                raise DataError(
                    f"{out} holds shards made from other inputs/settings ({side.name}); "
                    "use another --out or delete it"
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

        bar = tqdm(total=len(files), initial=start, desc="encode", unit="img")

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = model.encode(x).latent_dist
        m = dist.mean.float()
        if shift is not None:
            m = m - shift
        return m * scale, dist.std.float() * scale

    with torch.inference_mode():
        for x, y in dl:
            x = x.to(dev, dtype, non_blocking=True)
            m, s = moments(x)
            if flip:
                mf, sf = moments(torch.flip(x, dims=[3]))
                writer.add(m, s, y, mf, sf)
            else:
                writer.add(m, s, y)
            if bar is not None:
                bar.update(len(y))
    if bar is not None:
        bar.close()
    return writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imf.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="image folder (class subfolders)")
    ap.add_argument("--vae", required=True, help="local AutoencoderKL directory (from_pretrained)")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--flip", action="store_true", help="also store the flipped images' moments")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--vae-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    a = ap.parse_args(argv)
    try:
        man = encode_folder(
            a.images,
            a.vae,
            a.out,
            resolution=a.resolution,
            flip=a.flip,
            batch_size=a.batch_size,
            shard_size=a.shard_size,
            device=a.device,
            num_workers=a.num_workers,
            vae_dtype=a.vae_dtype,
        )
    except DataError as e:
        print(f"imf.prepare: error: {e}", file=sys.stderr)
        return 1
    print(
        f"imf.prepare: wrote {man['count']} samples ({len(man['shards'])} shards, "
        f"latent {man['latent_shape']}, "
        f"{man['num_classes']} classes) to {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
