"""What ``python -m imf.convert IN`` reads: the official file formats, found by content, as a :class:`Source`.

* a torch ``.pth`` / ``.pt`` (``torch.save`` of the official state dict, e.g. ``iMF-B-2.pth``);
* a flax checkpoint: a ``checkpoint_<step>`` msgpack file (``flax.training.checkpoints`` without orbax; read by
  :mod:`imf.convert.flax_msgpack`, no JAX needed), or an orbax checkpoint directory (``_METADATA``,
  ``manifest.ocdbt``: arrays in tensorstore's OCDBT/zarr format, read with the optional ``tensorstore``
  package: ``pip install -e ".[flax]"``); a directory holding several ``checkpoint_<step>`` takes the newest;
* a ``.zip`` of either (the official ``iMF-*-2.zip`` / ``iMF-*-2-full.zip`` and the MF-B/4 release),
  extracted to a temporary directory first.

A flax state is a ``TrainState``: ``params`` and ``ema_params`` (``{"net": ...}``), ``opt_state`` (optax AdamW:
``{"0": {"count", "mu", "nu"}, ...}``), ``step``. Anything else is a :class:`ConvertError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from imf.cli import require
from imf.convert.errors import ConvertError
from imf.convert.flax_msgpack import loads

CKPT_FILE = re.compile(r"^checkpoint_(\d+)$")


@dataclasses.dataclass
class Source:
    """Official weights read from ``path``: ``weights`` (EMA where the file has both), the raw ``params`` and
    optimizer moments of a full training state (None otherwise), its ``step``, and the ``format``."""

    path: str
    format: str
    weights: dict
    params: dict | None = None
    adam_mu: dict | None = None
    adam_nu: dict | None = None
    adam_count: int | None = None
    step: int | None = None


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def read_torch(path: Path) -> Source:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        raise ConvertError(f"{path} is not a readable torch checkpoint ({_first_line(e)})") from None
    if not isinstance(sd, dict) or not sd:
        raise ConvertError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return Source(str(path), "torch", sd)


def _scalar(v) -> int | None:
    if v is None:
        return None
    return int(v.item()) if isinstance(v, torch.Tensor) else int(v)


def from_flax_state(path: str, fmt: str, state: dict) -> Source:
    """A :class:`Source` of a flax ``TrainState`` dict (or a bare ``{"net": ...}`` / ``{"params": ...}`` tree)."""
    if "net" in state and isinstance(state["net"], dict):
        return Source(path, fmt, {"net": state["net"]})
    params, ema = state.get("params"), state.get("ema_params")
    weights = ema if isinstance(ema, dict) and ema else params
    if not isinstance(weights, dict) or not weights:
        raise ConvertError(f"{path}: the flax state has no params or ema_params (top-level keys {sorted(state)[:6]})")
    mu = nu = count = None
    opt = state.get("opt_state")
    for part in (opt or {}).values() if isinstance(opt, dict) else ():
        if isinstance(part, dict) and "mu" in part and "nu" in part:
            mu, nu, count = part["mu"], part["nu"], _scalar(part.get("count"))
    return Source(path, fmt, weights, params if ema else None, mu, nu, count, _scalar(state.get("step")))


def read_msgpack(path: Path) -> Source:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path} cannot be read ({e})") from None
    try:
        state = loads(data)
    except ConvertError as e:
        raise ConvertError(f"{path} is not a flax msgpack checkpoint ({e})") from None
    return from_flax_state(str(path), "flax-msgpack", state)


def read_orbax(path: Path) -> Source:
    """An orbax (``PyTreeCheckpointHandler``) directory through tensorstore: ``_METADATA`` lists the tree paths
    (``tree_metadata``: each leaf's ``key_metadata`` and ``value_metadata``; ``use_zarr3``), each array or scalar
    is the zarr array named by its ``.``-joined path, inside the OCDBT store (``manifest.ocdbt``) when there is
    one. Checked against checkpoints written by flax 0.8.5 ``save_checkpoint_multiprocess`` with orbax-checkpoint
    0.6.4 and tensorstore 0.1.67 (the official iMF install)."""
    ts = require("tensorstore", extra="flax", purpose=f"reading the orbax checkpoint {path}")
    try:
        meta = json.loads((path / "_METADATA").read_text())
        leaves = meta["tree_metadata"].values()
        # optax's EmptyState entries are recorded with value_type "None" and nothing stored
        keys = [[k["key"] for k in v["key_metadata"]] for v in leaves if not v["value_metadata"]["skip_deserialize"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{path}/_METADATA is not an orbax tree metadata file ({_first_line(e)})") from None
    ocdbt = (path / "manifest.ocdbt").is_file()
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    state: dict = {}
    for key in keys:
        name = ".".join(map(str, key))
        store = (
            {"driver": "ocdbt", "base": f"file://{path.resolve()}/", "path": name}
            if ocdbt
            else {"driver": "file", "path": str(path / name)}
        )
        arr = _read_array(ts, driver, store, f"{path}: array {name}")
        node = state
        for k in key[:-1]:
            node = node.setdefault(str(k), {})
        node[str(key[-1])] = (
            torch.from_numpy(arr.copy()) if arr.dtype.name != "bfloat16" else torch.from_numpy(arr.astype("float32"))
        )
    return from_flax_state(str(path), "flax-orbax", state)


def _read_array(ts, driver: str, store: dict, what: str):
    """The ``driver`` (zarr or zarr3) array at tensorstore kvstore ``store``, as numpy."""
    try:
        return ts.open({"driver": driver, "kvstore": store}, open=True).result().read().result()
    except Exception as e:  # tensorstore raises ValueError subclasses with long text
        raise ConvertError(f"{what} cannot be read ({_first_line(e)})") from None


def read_dir(path: Path, shown: str) -> Source:
    if (path / "_METADATA").is_file() or (path / "manifest.ocdbt").is_file():
        return read_orbax(path)
    found = sorted(
        (p for p in path.rglob("checkpoint_*") if CKPT_FILE.match(p.name)),
        key=lambda p: int(CKPT_FILE.match(p.name).group(1)),
    )
    if not found:
        raise ConvertError(f"{shown} is not a checkpoint: no checkpoint_<step>, _METADATA or .pth inside")
    newest = found[-1]
    src = read_dir(newest, shown) if newest.is_dir() else read_msgpack(newest)
    src.path = shown
    if src.step is None:
        src.step = int(CKPT_FILE.match(newest.name).group(1))
    return src


def read_zip(path: Path) -> Source:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(n.endswith("data.pkl") for n in names):  # torch.save's zip format under another name
                return read_torch(path)
            torch_files = [n for n in names if n.endswith((".pth", ".pt"))]
            with tempfile.TemporaryDirectory(prefix="imf-convert-") as tmp:
                z.extractall(tmp)
                if torch_files and len(torch_files) == 1:
                    src = read_torch(Path(tmp) / torch_files[0])
                else:
                    src = read_dir(Path(tmp), str(path))
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ConvertError(f"{path} is not a readable zip archive ({_first_line(e)}; truncated?)") from None
    src.path = str(path)
    return src


def read_official(path) -> Source:
    """The official weights in ``path`` (torch ``.pth``, flax msgpack or orbax, a ``.zip`` of those)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_dir():
        return read_dir(path, str(path))
    if zipfile.is_zipfile(path):
        return read_zip(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        return read_torch(path)
    if path.suffix == ".zip":
        raise ConvertError(f"{path} is not a readable zip archive (no central directory; truncated?)")
    with open(path, "rb") as f:
        head = f.read(1)
    if head and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return read_msgpack(path)
    raise ConvertError(
        f"{path} is not a checkpoint: not a torch file, a zip archive, a flax msgpack state or a checkpoint directory"
    )


__all__ = ["Source", "from_flax_state", "read_official"]
