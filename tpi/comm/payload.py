"""How a partial sum travels: float32, float16, bfloat16, or 8-bit blockwise (``q8``).

Owns: the byte layout of each payload type, its exact size for n values, and encode/decode
between a flat float32 vector and those bytes. ``q8`` is distributed-llama's q80 idea: blocks of
32 (or 64) values, each stored as int8 with one float32 scale per block (scale = max|x| / 127,
values rounded half to even); bytes = [scales: float32 x blocks][values: int8 x n], the last
block may be short. Every decode checks the byte count first. Does not know: sockets, ranks,
which collective carries the bytes, or the order of the sum.

Errors: a float16 payload refuses values beyond its range (|x| > 65504) rather than sending inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from tpi.errors import TpiError

PayloadName = Literal["float32", "float16", "bfloat16", "q8"]
NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "q8")
CODES = {name: i + 1 for i, name in enumerate(NAMES)}  # one byte on the wire
_CASTS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Q8_BLOCKS = (32, 64)


class PayloadError(TpiError, ValueError):
    """Bytes that are not a payload of the expected type and size, or values it cannot carry."""


@dataclass(frozen=True)
class Payload:
    """One payload type. `encode(x)` -> uint8 bytes; `decode(data, n)` -> float32 [n]."""

    name: PayloadName = "float32"
    block: int = 32  # q8 only: values per scale

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise PayloadError(f"payload {self.name!r}: expected one of {', '.join(NAMES)}")
        if self.name == "q8" and self.block not in Q8_BLOCKS:
            raise PayloadError(f"q8 block size {self.block}: expected 32 or 64")

    @property
    def code(self) -> int:
        return CODES[self.name] | (0x10 if self.name == "q8" and self.block == 64 else 0)

    @property
    def label(self) -> str:
        """The name on the wire and in options: 'q8_64' for q8 in blocks of 64; `parse` reads it back."""
        return "q8_64" if self.name == "q8" and self.block == 64 else self.name

    def nbytes(self, n: int) -> int:
        """Exact size on the wire of n values."""
        if self.name == "q8":
            return n + 4 * -(-n // self.block)
        return n * _CASTS[self.name].itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [n] -> uint8 [nbytes(n)]. float32 is a view of x (no copy); the others are new tensors."""
        if x.dtype != torch.float32 or x.dim() != 1:
            raise PayloadError(f"encode takes a flat float32 vector, got {x.dtype} of shape {list(x.shape)}")
        if self.name == "float32":
            return x.contiguous().view(torch.uint8)
        if self.name == "q8":
            return self._encode_q8(x)
        if self.name == "float16" and x.numel():
            lo, hi = torch.aminmax(x)
            top = max(hi.item(), -lo.item())
            if not top <= 65504:  # also catches nan
                raise PayloadError(f"a float16 payload cannot carry |x| = {top:.4g} (> 65504); "
                                   "use bfloat16 or float32")
        return x.to(_CASTS[self.name]).view(torch.uint8)

    def decode(self, data: torch.Tensor, n: int) -> torch.Tensor:
        """uint8 [nbytes(n)] -> float32 [n]. float32 returns a view of `data` when it is 4-byte aligned."""
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != self.nbytes(n):
            raise PayloadError(f"a {self.name} payload of {n} values needs {self.nbytes(n)} bytes, "
                               f"got {data.numel()} ({data.dtype})")
        if self.name == "q8":
            return self._decode_q8(data, n)
        if n == 0:
            return torch.empty(0, dtype=torch.float32)
        return _view(data, _CASTS[self.name]).to(torch.float32)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """What the receiver sees of x: decode(encode(x)); float32 comes back as x itself."""
        return x if self.name == "float32" else self.decode(self.encode(x), x.numel())

    def _encode_q8(self, x: torch.Tensor) -> torch.Tensor:
        n, b = x.numel(), self.block
        blocks = -(-n // b)
        out = torch.empty(4 * blocks + n, dtype=torch.uint8)
        if n == 0:
            return out
        xb = _blocks(x, b)  # [blocks, b]
        amax = xb.abs().amax(dim=1)  # [blocks]
        top = amax.max().item()
        if not math.isfinite(top):
            raise PayloadError(f"a q8 payload cannot carry {top}")
        torch.div(amax, 127.0, out=out[:4 * blocks].view(torch.float32))  # the scales
        q = xb * (127.0 / amax.clamp_min(1e-30))[:, None]  # |q| <= 127 by construction
        q.round_()  # half to even
        out[4 * blocks:].view(torch.int8).copy_(q.view(-1)[:n])
        return out

    def _decode_q8(self, data: torch.Tensor, n: int) -> torch.Tensor:
        b = self.block
        blocks = -(-n // b)
        scale = _view(data[:4 * blocks], torch.float32)  # [blocks]
        q = data[4 * blocks:].view(torch.int8)  # [n]
        if n % b == 0:
            return torch.mul(q.view(blocks, b), scale[:, None]).view(-1)
        out = torch.zeros(blocks * b, dtype=torch.float32)
        out[:n] = q
        return out.view(blocks, b).mul_(scale[:, None]).view(-1)[:n]


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """x [n] as [ceil(n/b), b], zero-padded at the end when b does not divide n."""
    n = x.numel()
    if n % b == 0:
        return x.view(-1, b)
    padded = torch.zeros(-(-n // b) * b, dtype=torch.float32)
    padded[:n] = x
    return padded.view(-1, b)


def _view(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as `dtype`, copying only when they are not aligned for it."""
    if data.numel() == 0:
        return torch.empty(0, dtype=dtype)
    if data.storage_offset() % dtype.itemsize or data.data_ptr() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


LABELS = (*NAMES, "q8_64")


def parse(name: str | Payload) -> Payload:
    """'float32', 'float16', 'bfloat16', 'q8' (blocks of 32) or 'q8_64' -> Payload."""
    if isinstance(name, Payload):
        return name
    if name == "q8_64":
        return Payload("q8", 64)
    if name not in NAMES:
        raise PayloadError(f"payload {name!r}: expected one of {', '.join(LABELS)}")
    return Payload(name)  # type: ignore[arg-type]
