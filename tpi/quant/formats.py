"""Group-wise quantized weights: int8 and int4 codes with a scale (and a minimum) per group of
input columns.

Owns: ``QuantTensor`` (one projection as codes, scales and optional minima: w = scale * q (+ min)
for each group of `group_size` consecutive input columns of a row), quantizing a float weight
(``quantize``: int8 symmetric, int4 asymmetric; scales float16 when every one is exactly float16,
else float32), dequantizing into a caller's buffer (``dequantize``), the int4 code layouts, and the
names and shapes a block file holds for a quantized projection (``<name>.qweight``, ``.scales``,
``.mins``). Does not know: files, GGUF (gguf.py maps its types into these), matmuls (kernels.py).

int4 codes are two to a byte. In memory while splitting ("rows" layout) byte j of a row holds
columns 2j (low nibble) and 2j + 1. Stored in a block file, a projection whose rows are a multiple
of 32 is in the "tiled" layout, which is what torch's CPU int4 kernel reads (kernels.py checks
that once): rows in tiles of 32, each tile [in, 16] bytes, byte (k, d) holding row d's column k
in its low nibble and row d + 16's in its high one; a tile's bytes are contiguous, so rows [a, b)
on tile boundaries are one byte range. Streamed blocks thus go to the kernel as they are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from tpi.config import ConfigError

QuantFormat = Literal["int8", "int4"]
SUFFIXES = ("qweight", "scales", "mins")  # a quantized projection's tensors in a block file
INT4_MAX, INT8_MAX = 15, 127
TILE = 32  # rows of one tile of the stored int4 layout


@dataclass
class QuantTensor:
    """A [out, in] weight as codes (int8 [out, in], or int4 two to a byte [out, in / 2], in the rows
    or the tiled layout), scales [out, in / group_size] and minima of the same shape (None:
    symmetric)."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    tiled: bool = False

    @property
    def format(self) -> QuantFormat:
        return "int8" if self.codes.dtype == torch.int8 else "int4"

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.codes.shape
        return out, cols * (2 if self.format == "int4" else 1)

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scales, self.mins) if t is not None)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """This projection's tensors as a block file stores them (`name`: e.g. "q_proj"): int4
        codes tiled where the rows allow."""
        codes = tile_int4(self.codes) if tileable(self.codes) and not self.tiled else self.codes
        out = {f"{name}.qweight": codes, f"{name}.scales": self.scales}
        if self.mins is not None:
            out[f"{name}.mins"] = self.mins
        return out

    def untiled(self) -> QuantTensor:
        return QuantTensor(untile_int4(self.codes), self.scales, self.mins) if self.tiled else self

    def rows(self, a: int, b: int) -> QuantTensor:
        """Output rows [a, b), in the rows layout (a view unless tiles must be undone)."""
        if not self.tiled:
            return QuantTensor(self.codes[a:b], self.scales[a:b], None if self.mins is None else self.mins[a:b])
        t0, t1 = a // TILE * TILE, -(-b // TILE) * TILE
        codes = untile_int4(self.codes[t0:t1])[a - t0:b - t0]
        return QuantTensor(codes, self.scales[a:b], None if self.mins is None else self.mins[a:b])


DEQUANT_ROWS = 8 * TILE  # rows dequantized at a time on the CPU (4 MB of float32 for 4096 columns)


def tileable(codes: torch.Tensor) -> bool:
    return codes.dtype == torch.uint8 and codes.shape[0] % TILE == 0


def tile_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K / 2] in the rows layout -> the tiled layout (N a multiple of 32)."""
    rows, half = codes.shape
    tiles = codes.view(rows // TILE, 2, TILE // 2, half)
    lo, hi = tiles[:, 0], tiles[:, 1]  # rows d and d + 16 of each tile: [tiles, 16, K / 2]
    out = torch.empty((rows // TILE, half, 2, TILE // 2), dtype=torch.uint8, device=codes.device)  # [tiles, K, 16]
    out[:, :, 0].copy_(((lo & 0x0F) | (hi << 4)).transpose(1, 2))  # column 2j of both rows
    out[:, :, 1].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))  # column 2j + 1
    return out.view(rows, half)


def untile_int4(tiled: torch.Tensor) -> torch.Tensor:
    """The tiled layout back to the rows layout."""
    rows, half = tiled.shape
    t = tiled.view(rows // TILE, half, 2, TILE // 2).permute(0, 3, 1, 2)  # [tiles, 16, K / 2, 2]: (row d, j, e)
    out = torch.empty((rows // TILE, 2, TILE // 2, half), dtype=torch.uint8, device=tiled.device)
    out[:, 0].copy_((t[..., 0] & 0x0F) | (t[..., 1] << 4))  # row d: columns 2j and 2j + 1
    out[:, 1].copy_((t[..., 0] >> 4) | (t[..., 1] & 0xF0))  # row d + 16
    return out.view(rows, half)


def is_quantized(w: Mapping[str, torch.Tensor], name: str) -> bool:
    return f"{name}.qweight" in w


def from_block(w: Mapping[str, torch.Tensor], name: str) -> QuantTensor:
    """Projection `name` of a block's tensors (as ``QuantTensor.tensors`` stored them)."""
    codes = w[f"{name}.qweight"]
    return QuantTensor(codes, w[f"{name}.scales"], w.get(f"{name}.mins"), tileable(codes))


def check_shapes(name: str, codes: tuple[int, ...], codes_dtype: torch.dtype, scales: tuple[int, ...],
                 scales_dtype: torch.dtype, mins: tuple[int, ...] | None, mins_dtype: torch.dtype | None,
                 rows: int, cols: int) -> None:
    """A quantized projection's tensors must describe an [rows, cols] weight with whole groups;
    the error names the tensor and what was expected."""
    packed = 2 if codes_dtype == torch.uint8 else 1
    if codes_dtype not in (torch.int8, torch.uint8) or tuple(codes) != (rows, cols // packed) or cols % packed:
        raise ConfigError(f"{name}.qweight is {codes_dtype} {list(codes)}; expected int8 {[rows, cols]} or "
                          f"uint8 (int4) {[rows, cols // 2]}")
    if scales_dtype not in (torch.float16, torch.float32) or len(scales) != 2 or scales[0] != rows or \
            not scales[1] or cols % scales[1]:
        raise ConfigError(f"{name}.scales is {scales_dtype} {list(scales)}; expected float16 or float32 "
                          f"[{rows}, {cols} / group size]")
    if mins is not None and (tuple(mins) != tuple(scales) or mins_dtype != scales_dtype):
        raise ConfigError(f"{name}.mins is {mins_dtype} {list(mins)}; expected {scales_dtype} {list(scales)}")


# -- quantizing ---------------------------------------------------------------------------------------
def _as_float16_if_exact(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in float16 if every value survives the round trip, else as they are (float32)."""
    halves = [t.half() for t in tensors]
    if all(torch.equal(h.float(), t) for h, t in zip(halves, tensors)):
        return halves
    return list(tensors)


def quantize(w: torch.Tensor, fmt: QuantFormat, group_size: int = 32) -> QuantTensor:
    """A float weight [out, in] quantized per group of `group_size` input columns: int8 symmetric
    (scale = absmax / 127), int4 asymmetric (scale = (max - min) / 15, minimum = min). Scales (and
    minima) are first rounded to float16 and the codes computed with the rounded values, so that
    float16 storage is exact; where float16 cannot hold them (out of its range) they stay float32."""
    out, cols = w.shape
    if cols % group_size:
        raise ConfigError(f"a weight of {cols} input columns cannot be quantized in groups of {group_size}")
    g = w.float().reshape(out, cols // group_size, group_size)  # [out, groups, g]
    if fmt == "int8":
        scales = g.abs().amax(-1) / INT8_MAX
        mins = None
    elif fmt == "int4":
        lo, hi = g.amin(-1), g.amax(-1)
        scales, mins = (hi - lo) / INT4_MAX, lo
    else:
        raise ConfigError(f"quant={fmt!r}: expected int8 or int4")
    stored = _as_float16_if_exact(*(_round_half(t) for t in (scales, mins) if t is not None))
    scales, mins = stored[0], stored[1] if mins is not None else None
    s = scales.float()[..., None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if fmt == "int8":
        codes = torch.round(g / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(out, cols)
    else:
        q = torch.round((g - mins.float()[..., None]) / safe).clamp_(0, INT4_MAX).to(torch.uint8).reshape(out, cols)
        codes = pack_int4(q)
    return QuantTensor(codes, scales, mins)


def _round_half(t: torch.Tensor) -> torch.Tensor:
    """t rounded to float16's values where float16 holds them (finite, not flushed to 0), float32."""
    h = t.half().float()
    ok = torch.isfinite(h) & ((h != 0) | (t == 0))
    return torch.where(ok, h, t)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [out, in] -> [out, in / 2], two to a byte (low nibble: the even column)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[out, in / 2] uint8 -> codes [out, in] (uint8), into `out` if given."""
    rows, half = packed.shape
    if out is None:
        out = torch.empty((rows, 2 * half), dtype=torch.uint8, device=packed.device)
    pairs = out.view(rows, half, 2)
    torch.bitwise_and(packed, 0x0F, out=pairs[..., 0])
    torch.bitwise_right_shift(packed, 4, out=pairs[..., 1])
    return out


# -- dequantizing -------------------------------------------------------------------------------------
def dequantize(qt: QuantTensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] as floats, into `out` (a reused buffer) if given: scale * q (+ min).
    On the CPU, DEQUANT_ROWS rows at a time, so that each step's data stays in the cache (about 4x
    faster than whole-tensor passes for a 7B-sized projection); tiled int4 codes are read as they
    are, with no untiled copy."""
    rows, cols = qt.shape
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=qt.codes.device)
    step = DEQUANT_ROWS if qt.codes.device.type == "cpu" else rows
    for a in range(0, rows, step):
        b = min(a + step, rows)
        _dequantize_rows(qt, a, b, out[a:b])
    return out


def _dequantize_rows(qt: QuantTensor, a: int, b: int, out: torch.Tensor) -> None:
    codes, n, cols = qt.codes[a:b], b - a, out.shape[1]
    if qt.format == "int8":
        out.copy_(codes)
    elif qt.tiled:  # a byte of [tile, column, d] holds row d (low nibble) and row d + 16 (high)
        tiles = n // TILE
        by_row = codes.view(tiles, cols, TILE // 2).transpose(1, 2).contiguous()  # [tile, d, column]
        o = out.view(tiles, 2, TILE // 2, cols)
        o[:, 0].copy_(torch.bitwise_and(by_row, 0x0F))
        o[:, 1].copy_(torch.bitwise_right_shift(by_row, 4))
    else:
        pairs = out.view(n, cols // 2, 2)
        pairs[..., 0].copy_(torch.bitwise_and(codes, 0x0F))
        pairs[..., 1].copy_(torch.bitwise_right_shift(codes, 4))
    g = out.view(n, qt.scales.shape[1], qt.group_size)  # [rows, groups, g]
    g.mul_(qt.scales[a:b].to(out.dtype)[..., None])
    if qt.mins is not None:
        g.add_(qt.mins[a:b].to(out.dtype)[..., None])
