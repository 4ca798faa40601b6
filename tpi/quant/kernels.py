"""Matmuls on quantized weights: the `linear` the model's math is handed for quantized splits.

Owns: ``QuantLinear``, a ``linear(x, w, name)`` for blocks whose projections may be quantized
(formats.py), in two modes. "exact": each quantized projection is dequantized into a float32
buffer this object reuses, then multiplied in float32: the product transformers computes on the
dequantized weights. (torch's int4 kernel with float32 activations is as close, but runs row by
row of x: 10-60x slower than this for a prompt.) "fast": int4 weights whose kernel applies
(groups of 32 to 256, whole 32-row tiles, on the CPU) go through torch's int4 kernel in
bfloat16 when x has at most ``KERNEL_ROWS`` rows (a decode step, a short prompt chunk; the kernel
too runs row by row), the rest as exact. A projection stored as floats is a plain ``F.linear``.

Stored int4 codes are in the kernel's own layout (formats.py: tiled), checked once against
torch's conversion, so a block goes to the kernel as it was read, streamed or not; under a torch
whose kernel reads another layout (2.11 does), fast dequantizes as exact does. The kernel's
scales-and-zeros are made per call into a reused buffer, or once for a block that stays in memory
(``prepare``: they replace its scales and minima, the same bytes; the dequantizing path then
reads them back). No dequantized copy of a projection outlives the call that made it: each is
written into a buffer reused for the next; ``transient_bytes`` gives what those buffers hold at
most. Does not know: files, which block comes next, the network, the offload.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, MutableMapping
from typing import Literal

import torch
import torch.nn.functional as F

from tpi.quant.formats import TILE, QuantTensor, dequantize, from_block, tile_int4, tileable, unpack_int4

Compute = Literal["exact", "fast"]
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernel takes
KERNEL_ROWS = 64  # rows of x up to which the fast mode uses the int4 kernel (beyond: dequantize, one GEMM)
INNER_K_TILES = 8
CPU = torch.device("cpu")


def kernel_applies(rows: int, cols: int, group_size: int, int4: bool, device: torch.device) -> bool:
    """Whether torch's int4 kernel takes a projection as it is stored: int4 in whole 32-row tiles
    (the tiled layout), groups of 32 to 256, on the CPU, under a torch whose kernel reads that
    layout (2.13 does; checked once). Otherwise the projection is dequantized, as in exact."""
    return (int4 and group_size in KERNEL_GROUPS and rows % TILE == 0 and cols % 2 == 0 and device.type == "cpu"
            and _layout_is_tiled())


def _applies(qt: QuantTensor) -> bool:
    return qt.tiled and kernel_applies(*qt.shape, qt.group_size, qt.format == "int4", qt.codes.device)


def _torch_pack(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes in the rows layout converted by torch into its CPU kernel's layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(codes).to(torch.int32), INNER_K_TILES)


@functools.cache
def _layout_is_tiled() -> bool:
    """Whether this torch's CPU int4 layout is formats.py's tiled one (checked once, on random codes)."""
    codes = torch.randint(0, 256, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(tile_int4(codes), _torch_pack(codes))
    except (AttributeError, RuntimeError, NotImplementedError):  # a torch without this kernel: dequantize
        return False


def scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor | None, out: torch.Tensor | None = None,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's bfloat16 [groups, N, 2] scales and zeros: it computes (q - 8) * scale + zero,
    so that zero = min + 8 * scale (symmetric codes: 8 * scale), computed in float32 (in `scratch`)
    and rounded once. Into `out` when given."""
    rows, groups = scales.shape
    n = 2 * rows * groups
    f32 = (torch.empty(n, dtype=torch.float32) if scratch is None else scratch[:n]).view(groups, rows, 2)
    f32[..., 0].copy_(scales.t())
    if mins is None:
        torch.mul(f32[..., 0], 8, out=f32[..., 1])
    else:
        f32[..., 1].copy_(mins.t())
        f32[..., 1].add_(f32[..., 0], alpha=8)
    return (torch.empty(n, dtype=torch.bfloat16) if out is None else out[:n]).view(groups, rows, 2).copy_(f32)


def _from_scales_and_zeros(codes: torch.Tensor, sz: torch.Tensor) -> QuantTensor:
    """A prepared projection back as a QuantTensor: scale and min = zero - 8 * scale (float32)."""
    scales = sz[..., 0].t().float()
    return QuantTensor(codes, scales, sz[..., 1].t().float() - 8 * scales, tileable(codes))


def transient_bytes(tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], compute: Compute,
                    prefill_chunk: int) -> int:
    """The buffers ``QuantLinear`` keeps for the largest quantized projection among `tensors`
    ((name, dtype, shape) of a block's stored tensors), with steps of at most `prefill_chunk` rows:
    an int4 one's scales-and-zeros (bfloat16, and float32 while making them) when the fast kernel
    takes every step, otherwise the float32 buffer a dequantized one is written into."""
    shapes = {name: (dtype, shape) for name, dtype, shape in tensors}
    dense = sz = 0
    for name, (dtype, shape) in shapes.items():
        if not name.endswith(".qweight"):
            continue
        rows, cols = shape[0], shape[1] * (2 if dtype == torch.uint8 else 1)
        groups = shapes[f"{name.removesuffix('.qweight')}.scales"][1][1]
        kernel = kernel_applies(rows, cols, cols // groups, dtype == torch.uint8, CPU) and compute == "fast"
        if kernel:
            sz = max(sz, 2 * rows * groups)
        if not kernel or prefill_chunk > KERNEL_ROWS:
            dense = max(dense, rows * cols)
    return 6 * sz + 4 * dense


class QuantLinear:
    """``linear(x, w, name)`` for blocks with quantized projections (float ones: F.linear)."""

    def __init__(self, compute: Compute = "fast"):
        if compute not in ("exact", "fast"):
            raise ValueError(f"compute={compute!r}: expected exact or fast")
        self.compute = compute
        self._scratch = threading.local()  # each thread's reused buffers, by purpose

    def prepare(self, w: MutableMapping[str, torch.Tensor]) -> None:
        """Fast mode, a block that stays in memory: its int4 projections' scales-and-zeros made once,
        in place of their scales and minima (the same bytes)."""
        if self.compute != "fast":
            return
        for key in [k for k in w if k.endswith(".qweight")]:
            name = key.removesuffix(".qweight")
            qt = from_block(w, name)
            if not _applies(qt):
                continue
            scratch = self._buffer("sz32", 2 * qt.scales.numel(), torch.float32)
            w[f"{name}.int4sz"] = scales_and_zeros(qt.scales, qt.mins, scratch=scratch)
            w.pop(f"{name}.scales"), w.pop(f"{name}.mins", None)

    def __call__(self, x: torch.Tensor, w: MutableMapping[str, torch.Tensor], name: str) -> torch.Tensor:
        codes = w.get(f"{name}.qweight")
        if codes is None:
            return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))
        sz = w.get(f"{name}.int4sz")  # prepared at load (fast mode)
        qt = from_block(w, name) if sz is None else None
        if self.compute == "fast" and x.shape[0] <= KERNEL_ROWS and (sz is not None or _applies(qt)):
            if sz is None:
                sz = scales_and_zeros(qt.scales, qt.mins, self._buffer("sz", 2 * qt.scales.numel(), torch.bfloat16),
                                      self._buffer("sz32", 2 * qt.scales.numel(), torch.float32))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), codes, x.shape[-1] // sz.shape[0], sz)
            y = y.to(x.dtype)
        else:
            if qt is None:
                qt = _from_scales_and_zeros(codes, sz)
            buf = self._buffer("dense", qt.shape[0] * qt.shape[1], x.dtype, x.device).view(qt.shape)
            y = F.linear(x, dequantize(qt, buf))
        bias = w.get(f"{name}.bias")
        return y if bias is None else y.add_(bias)

    def _buffer(self, purpose: str, n: int, dtype: torch.dtype, device: torch.device = CPU) -> torch.Tensor:
        """This thread's buffer for `purpose`, at least n elements, grown to the largest asked for."""
        buf = getattr(self._scratch, purpose, None)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            size = max(n, 0 if buf is None or buf.dtype != dtype else buf.numel())
            buf = torch.empty(size, dtype=dtype, device=device)
            setattr(self._scratch, purpose, buf)
        return buf[:n]
