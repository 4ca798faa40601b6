"""Matmuls on quantized weights: the `linear` the model's math is handed for quantized splits.

Owns: ``QuantLinear``, a ``linear(x, w, name)`` for blocks whose projections may be quantized
(formats.py), in two modes. "exact": float32 activations; an int4 weight whose kernel applies
(groups of 32 to 256, a multiple of 16 output rows, on the CPU) goes through torch's int4 kernel
with float32 activations, scales and zeros (within a few 1e-6 of the dequantized product); any
other quantized weight is dequantized one projection at a time into a buffer this object reuses,
then multiplied in float32. "fast": the same int4 kernel with bfloat16 activations and scales
(several times a float32 matmul's speed), the rest as exact. A projection stored as floats is a
plain ``F.linear``. The kernel's packed form of a block that stays in memory is made once
(``prepare``, at load: the codes are replaced by it, and in fast mode the scales and minima by
the kernel's bfloat16 scales-and-zeros, the same bytes); a streamed block's is made at each use
(``repack``: a few element-wise passes, checked once against torch's own conversion). No
dequantized copy of a projection outlives the call that made it; ``transient_bytes`` bounds what
one call allocates. Does not know: files, which block comes next, the network, the offload.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, MutableMapping
from typing import Literal

import torch
import torch.nn.functional as F

from tpi.quant.formats import QuantTensor, dequantize, from_block, unpack_int4

Compute = Literal["exact", "fast"]
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernel takes
INNER_K_TILES = 8
TILE = 32  # output rows of one tile of the kernel's packed layout


def kernel_applies(rows: int, cols: int, group_size: int, int4: bool, device: torch.device) -> bool:
    return int4 and group_size in KERNEL_GROUPS and rows % 16 == 0 and cols % 2 == 0 and device.type == "cpu"


def _applies(qt: QuantTensor) -> bool:
    return kernel_applies(*qt.shape, qt.group_size, qt.format == "int4", qt.codes.device)


def repack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K / 2] (low nibble: the even column) -> torch's CPU int4 kernel layout: tiles
    of 32 rows, each [K, 16] bytes holding row d's code in the low nibble and row d + 16's in the
    high one. Rows not a multiple of 32, or a torch whose layout differs, go through torch's own
    conversion (slower)."""
    rows, half = codes.shape
    if rows % TILE or not _repack_matches_torch():
        return _torch_pack(codes)
    return _repack(codes)


def _repack(codes: torch.Tensor) -> torch.Tensor:
    """At most half the codes' bytes in temporaries beside the result."""
    rows, half = codes.shape
    tiles = codes.view(rows // TILE, 2, TILE // 2, half)
    lo, hi = tiles[:, 0], tiles[:, 1]  # rows d and d + 16 of each tile: [tiles, 16, K / 2]
    out = torch.empty((rows // TILE, half, 2, TILE // 2), dtype=torch.uint8)  # [tiles, K, 16]
    out[:, :, 0].copy_(((lo & 0x0F) | (hi << 4)).transpose(1, 2))  # column 2j of both rows
    out[:, :, 1].copy_(((lo >> 4) | (hi & 0xF0)).transpose(1, 2))  # column 2j + 1
    return out.view(rows, half)


def _torch_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(codes).to(torch.int32), INNER_K_TILES)


@functools.cache
def _repack_matches_torch() -> bool:
    """Whether this torch's CPU layout is the one ``_repack`` writes (checked once, on random codes)."""
    codes = torch.randint(0, 256, (2 * TILE, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.equal(_repack(codes), _torch_pack(codes))


def scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's [groups, N, 2] scales and zeros: it computes (q - 8) * scale + zero, so that
    zero = min + 8 * scale (symmetric codes: 8 * scale)."""
    s = scales.float()
    zero = s * 8 if mins is None else mins.float() + 8 * s
    return torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def transient_bytes(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], compute: Compute) -> int:
    """A bound on what one call allocates for the largest quantized projection among `tensors`
    ((name, dtype, shape) of a block's stored tensors): the packed codes and scales of a streamed
    int4 one, or the float32 buffer a dequantized one is written into."""
    tensors = list(tensors)
    shapes = {name: (dtype, shape) for name, dtype, shape in tensors}
    most = 0
    for name, (dtype, shape) in shapes.items():
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        rows, cols = shape[0], shape[1] * (2 if dtype == torch.uint8 else 1)
        groups = shapes[f"{base}.scales"][1][1]
        if kernel_applies(rows, cols, cols // groups, dtype == torch.uint8, torch.device("cpu")):
            most = max(most, 3 * rows * cols // 4 + 8 * rows * groups)  # repacked codes, temporaries, scales
        else:
            most = max(most, 4 * rows * cols)
    return most


class QuantLinear:
    """``linear(x, w, name)`` for blocks with quantized projections (float ones: F.linear)."""

    def __init__(self, compute: Compute = "fast"):
        if compute not in ("exact", "fast"):
            raise ValueError(f"compute={compute!r}: expected exact or fast")
        self.compute = compute
        self.kernel_dtype = torch.bfloat16 if compute == "fast" else torch.float32
        self._scratch = threading.local()  # each thread's reused dequantization buffer

    def prepare(self, w: MutableMapping[str, torch.Tensor], keep: Iterable[str] = ()) -> None:
        """Put a block that stays in memory into the int4 kernel's form once: codes repacked (and in
        fast mode bfloat16 scales-and-zeros in place of the scales and minima). The projections in
        `keep` keep their codes too (a tied embedding reads its rows from them)."""
        for key in [k for k in w if k.endswith(".qweight")]:
            name = key.removesuffix(".qweight")
            qt = from_block(w, name)
            if not _applies(qt):
                continue
            w[f"{name}.int4pack"] = repack(qt.codes)
            if name not in keep:
                del w[key]
            if self.compute == "fast":
                w[f"{name}.int4sz"] = scales_and_zeros(qt.scales, qt.mins, self.kernel_dtype)
                if name not in keep:
                    w.pop(f"{name}.scales"), w.pop(f"{name}.mins", None)

    def __call__(self, x: torch.Tensor, w: MutableMapping[str, torch.Tensor], name: str) -> torch.Tensor:
        pack = w.get(f"{name}.int4pack")
        if pack is not None:  # prepared at load
            sz = w.get(f"{name}.int4sz")
            if sz is None:
                sz = scales_and_zeros(w[f"{name}.scales"], w.get(f"{name}.mins"), self.kernel_dtype)
            y = self._kernel(x, pack, sz)
        elif f"{name}.qweight" not in w:
            return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))
        else:
            qt = from_block(w, name)
            if _applies(qt):
                y = self._kernel(x, repack(qt.codes), scales_and_zeros(qt.scales, qt.mins, self.kernel_dtype))
            else:
                y = F.linear(x, dequantize(qt, self._buffer(qt.shape, x.dtype, x.device)))
        bias = w.get(f"{name}.bias")
        return y if bias is None else y.add_(bias)

    def _kernel(self, x: torch.Tensor, pack: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        group = x.shape[-1] // sz.shape[0]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.kernel_dtype), pack, group, sz)
        return y.to(x.dtype)

    def _buffer(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This thread's scratch for one dequantized projection, grown to the largest asked for."""
        n = shape[0] * shape[1]
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._scratch.buf = torch.empty(max(n, 0 if buf is None else buf.numel()), dtype=dtype,
                                                  device=device)
        return buf[:n].view(shape)
