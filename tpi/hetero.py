"""CPU/GPU split compute for a device that has a GPU smaller than its share of the model.

Owns: ``SplitWeight`` — a linear layer's weight whose output rows are divided at a ratio between
the CPU (computed from host memory) and an accelerator (its slice copied host-to-device on a side
stream from pinned memory, then computed), the two halves joined in order; the measurement that
picks the ratio where CPU time equals copy-plus-GPU time; and wrapping a block's projection
weights. With the accelerator set to the CPU the same path runs entirely on the CPU, which is how
CI tests it. Does not know: which blocks live where (forward.py decides), the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SplitContext:
    """Where the second part runs, and the stream it uses (None on the CPU)."""

    device: torch.device
    ratio: float  # share of output rows computed on `device`
    stream: object = None

    @classmethod
    def create(cls, device: str | torch.device, ratio: float) -> SplitContext:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"split ratio={ratio}: expected a number in [0, 1]")
        dev = torch.device(device)
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        return cls(dev, ratio, stream)


class SplitWeight:
    """W [out, in] on the host; rows [0, k) computed on the CPU, rows [k, out) on ctx.device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, ctx: SplitContext):
        self.weight, self.bias, self.ctx = weight, bias, ctx
        self.k = weight.shape[0] - int(round(weight.shape[0] * ctx.ratio))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, in] on the CPU -> [L, out] on the CPU."""
        w, b, k, ctx = self.weight, self.bias, self.k, self.ctx
        if k == w.shape[0] or ctx.ratio == 0:
            return F.linear(x, w, b)
        if ctx.device.type == "cpu":  # the test path: both parts on the CPU, same arithmetic layout
            hi = F.linear(x, w[k:], None if b is None else b[k:])
            return torch.cat([F.linear(x, w[:k], None if b is None else b[:k]), hi], dim=-1) if k else hi
        event = torch.cuda.Event()
        with torch.cuda.stream(ctx.stream):  # copy and compute the GPU slice while the CPU works
            # x first: a copy from pageable memory blocks the host until the stream reaches it, so
            # queued behind the weight it would hold the CPU's half back for the whole transfer
            x_dev = x.to(ctx.device, non_blocking=True)
            w_dev = w[k:].to(ctx.device, non_blocking=True)  # pinned host memory: truly asynchronous
            b_dev = None if b is None else b[k:].to(ctx.device, non_blocking=True)
            y_dev = F.linear(x_dev, w_dev, b_dev)
            out_hi = torch.empty(y_dev.shape, dtype=y_dev.dtype, pin_memory=True)
            out_hi.copy_(y_dev, non_blocking=True)
            event.record(ctx.stream)
        lo = F.linear(x, w[:k], None if b is None else b[:k]) if k else None
        event.synchronize()
        return out_hi if lo is None else torch.cat([lo, out_hi], dim=-1)


def split_block(w: dict[str, torch.Tensor], ctx: SplitContext) -> dict:
    """The block's projection weights wrapped as SplitWeight (bias folded in); norms unchanged."""
    out = dict(w)
    for name in PROJECTIONS:
        if f"{name}.weight" in w:
            out[f"{name}.weight"] = SplitWeight(w[f"{name}.weight"], w.get(f"{name}.bias"), ctx)
            out.pop(f"{name}.bias", None)
    return out


def measure_ratio(device: torch.device, dtype: torch.dtype, nbytes: int = 64 << 20, repeats: int = 3) -> dict:
    """Share of a weight matrix to give the GPU so that CPU time equals copy + GPU time.

    CPU: bytes of weight a one-row F.linear consumes per second; copy: pinned host-to-device
    bytes per second (the GPU's own compute on a decode row is negligible beside both)."""
    cols = 4096
    rows = max(1, nbytes // (cols * dtype.itemsize))
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(1, cols).to(dtype)
    F.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, w)
    cpu_bw = repeats * w.nbytes / (time.perf_counter() - t0)
    if device.type != "cuda":
        return {"cpu_bytes_per_s": cpu_bw, "copy_bytes_per_s": cpu_bw, "ratio": 0.5}
    pinned = w.pin_memory()
    dev = torch.empty_like(w, device=device)
    dev.copy_(pinned, non_blocking=True)
    F.linear(x.to(device), dev)  # warm-up: the first GPU matmul creates cuBLAS's handle
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(pinned, non_blocking=True)
        F.linear(x.to(device), dev)
    torch.cuda.synchronize(device)
    copy_bw = repeats * w.nbytes / (time.perf_counter() - t0)
    return {"cpu_bytes_per_s": cpu_bw, "copy_bytes_per_s": copy_bw, "ratio": copy_bw / (cpu_bw + copy_bw)}
