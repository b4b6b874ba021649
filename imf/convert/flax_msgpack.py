"""Read a flax msgpack checkpoint (``flax.serialization.msgpack_serialize``) without JAX or the msgpack package.

The format: one msgpack document, nested maps of the state's fields (lists and tuples as maps with keys
``"0", "1", ...``), arrays as msgpack extension type 1 whose payload is itself msgpack ``[shape, dtype name,
raw bytes]`` (C order), numpy scalars as type 3 (same payload), complex numbers as type 2. Arrays of more
than 2^30 bytes are split into ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": {...}}``. This
module decodes exactly that subset of msgpack (every type of the msgpack spec except timestamps) and
returns nested ``dict``\\ s of torch tensors; ``bfloat16`` payloads become ``torch.bfloat16`` (numpy has no
such dtype).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from imf.convert.errors import ConvertError

EXT_NDARRAY, EXT_COMPLEX, EXT_SCALAR = 1, 2, 3
CHUNKED = "__msgpack_chunked_array__"
_FIXED = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q"}
_FIXED.update({0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"})


class _Reader:
    def __init__(self, data: bytes):
        self.buf, self.pos = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ConvertError(f"msgpack data ends after {len(self.buf)} bytes, {self.pos + n} needed (truncated?)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def num(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value(self):
        b = self.num(">B")
        if b <= 0x7F or b >= 0xE0:
            return b if b <= 0x7F else b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.mapping(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return str(self.take(b & 0x1F), "utf-8")
        if b in _FIXED:
            return self.num(_FIXED[b])
        if b in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[b]
        if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
            return bytes(self.take(self.num(">" + "BHI"[b - 0xC4])))
        if b in (0xD9, 0xDA, 0xDB):  # str 8/16/32
            return str(self.take(self.num(">" + "BHI"[b - 0xD9])), "utf-8")
        if b in (0xDC, 0xDD):
            return [self.value() for _ in range(self.num(">H" if b == 0xDC else ">I"))]
        if b in (0xDE, 0xDF):
            return self.mapping(self.num(">H" if b == 0xDE else ">I"))
        if b in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8):  # fixext 1/2/4/8/16
            code = self.num(">b")
            return self.ext(code, self.take(1 << (b - 0xD4)))
        if b in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
            size = self.num(">" + "BHI"[b - 0xC7])
            code = self.num(">b")
            return self.ext(code, self.take(size))
        raise ConvertError(f"byte 0x{b:02x} at offset {self.pos - 1} is not msgpack (not a flax checkpoint?)")

    def mapping(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            k = self.value()
            out[k] = self.value()
        return out

    def ext(self, code: int, payload: memoryview):
        if code == EXT_COMPLEX:
            return complex(*_Reader(bytes(payload)).value())
        if code not in (EXT_NDARRAY, EXT_SCALAR):
            raise ConvertError(f"msgpack extension type {code} is not one flax writes")
        shape, dtype, raw = _Reader(bytes(payload)).value()
        return _tensor(shape, dtype, raw)


def _tensor(shape, dtype: str, raw: bytes) -> torch.Tensor:
    shape = tuple(shape)
    if dtype == "bfloat16":
        flat = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
    else:
        try:
            flat = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype)).copy())
        except TypeError as e:
            raise ConvertError(f"array dtype {dtype!r} is not readable here ({e})") from None
    if flat.numel() != int(np.prod(shape, dtype=np.int64)):
        raise ConvertError(f"an array of shape {shape} holds {flat.numel()} values (truncated?)")
    return flat.reshape(shape)


def _unchunk(tree):
    if not isinstance(tree, dict):
        return tree
    if tree.get(CHUNKED):
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)].reshape(-1) for i in range(len(tree["chunks"]))]
        return torch.cat(chunks).reshape(shape)
    return {k: _unchunk(v) for k, v in tree.items()}


def loads(data: bytes) -> dict:
    """The nested state of a flax msgpack checkpoint's bytes (arrays as torch tensors)."""
    r = _Reader(data)
    tree = r.value()
    if r.pos != len(data):
        raise ConvertError(f"msgpack data has {len(data) - r.pos} bytes after the end of the document")
    if not isinstance(tree, dict):
        raise ConvertError(f"the msgpack document is a {type(tree).__name__}, not a flax state (a map)")
    return _unchunk(tree)


__all__ = ["loads"]
