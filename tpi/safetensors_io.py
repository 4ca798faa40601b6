"""Byte-range access to safetensors files, without memory-mapping or reading whole files.

Owns: parsing a safetensors header, reading a tensor (or a run of its rows) with ``os.pread`` into
a tensor we allocate, and writing a safetensors file whose header is known up front while its data
is streamed in afterwards. Does not know: model layouts, shards, the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import torch

from tpi.errors import TpiError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class ShardFileError(TpiError, ValueError):
    """A safetensors file that is malformed, truncated or lacks a tensor; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // max(rows, 1)


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse the header of a safetensors file; checks that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ShardFileError(f"{path}: too short for a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise ShardFileError(f"{path}: header length {hlen} does not fit the file size {size}")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ShardFileError(f"{path}: header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ShardFileError(f"{path}: header is not a JSON object")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _entry(path, name, meta)
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize or base + end > size:
            raise ShardFileError(f"{path}: tensor {name} has offsets {begin}..{end} that do not match "
                                 f"shape {shape} of {NAMES[dtype]} or the file size {size}")
        out[name] = TensorInfo(dtype, shape, base + begin, end - begin)
    return out


def _entry(path: str, name: str, meta) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """One header entry's dtype, shape and offsets; plain non-negative integers only."""
    def ints(key: str) -> tuple[int, ...]:
        value = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise ShardFileError(f"{path}: tensor {name} has {key}={str(value)[:100]}; expected a list of "
                                 "non-negative integers")
        return tuple(value)

    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str):
        raise ShardFileError(f"{path}: tensor {name} has a malformed entry {str(meta)[:100]}")
    dtype = DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ShardFileError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']!r}")
    shape, offsets = ints("shape"), ints("data_offsets")
    if len(offsets) != 2:
        raise ShardFileError(f"{path}: tensor {name} has data_offsets={list(offsets)}; expected [begin, end]")
    return dtype, shape, (offsets[0], offsets[1])


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor `out` with bytes from `fd` at `offset`; loops on short reads."""
    view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ShardFileError(f"unexpected end of file at byte {offset + done}")
        done += n


def read_rows(fd: int, info: TensorInfo, row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) of a tensor (the whole tensor for 0-d/1-d with full range)."""
    shape = (row_end - row_start, *info.shape[1:]) if info.shape else ()
    out = torch.empty(shape, dtype=info.dtype)
    pread_into(fd, out, info.start + row_start * info.row_bytes)
    return out


class StreamingWriter:
    """Writes a safetensors file tensor by tensor, in order, from chunks of rows.

    The header (names, dtypes, shapes) is fixed at construction, so no tensor is ever held whole.
    """

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        self._sizes = []
        for name, dtype, shape in specs:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, dtype, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._f: BinaryIO = open(path + ".part", "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._index, self._written = 0, 0
        self._skip_empty()

    def _emit(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def _skip_empty(self) -> None:
        while self._index < len(self._sizes) and self._sizes[self._index][2] == 0:
            self._index += 1

    def write(self, chunk: torch.Tensor) -> None:
        """Append rows of the current tensor; moves to the next tensor when this one is full."""
        name, dtype, nbytes = self._sizes[self._index]
        if chunk.dtype != dtype:
            raise ShardFileError(f"{self.path}: chunk for {name} is {chunk.dtype}, expected {dtype}")
        data = memoryview(chunk.contiguous().view(torch.uint8).numpy()).cast("B") if chunk.numel() else b""
        if self._written + len(data) > nbytes:
            raise ShardFileError(f"{self.path}: too many bytes for tensor {name}")
        self._emit(data)
        self._written += len(data)
        if self._written == nbytes:
            self._index, self._written = self._index + 1, 0
            self._skip_empty()

    def close(self) -> None:
        """Finish the file; it appears under its name only when complete."""
        if self._index != len(self._sizes):
            self._f.close()
            raise ShardFileError(f"{self.path}: closed after {self._index} of {len(self._sizes)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.path + ".part", self.path)
