"""CPU/GPU split compute for a device that has a GPU smaller than its share of the model.

Owns: ``Splitter``, which runs host blocks' projections (and LM-head chunks) split by output rows
between the CPU and an accelerator: the CPU computes rows [0, k) from host memory, the accelerator
rows [k, out) from a copy that a side stream brings over from pinned memory into a ring of
preallocated device slots, one projection per slot, in order of use and as far ahead as free slots
allow (the next block's while this one computes). The block's activations stay on the accelerator:
the CPU waits only for a projection's input, and the halves are joined there. Also
``share_bytes`` (a slot's size and the small tensors kept on the accelerator, for the GPU budget)
and ``measure_ratio`` (the ratio where CPU time equals copy time, both measured while the other
runs). With the accelerator set to the CPU the same path runs entirely on the CPU, which is how CI
tests it. Does not know: which blocks live where or which comes next (forward.py decides), the
model math (layers.py calls a ``SplitWeight`` like a weight), the network.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ALIGN = 256  # slot sizes are rounded up to this


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def gpu_rows(out: int, ratio: float) -> int:
    """Rows of an [out, in] projection given to the accelerator: the last round(out * ratio)."""
    return int(round(out * ratio))


def is_projection(name: str) -> bool:
    """A projection's weight or bias ("q_proj.weight", "q_proj.bias"), as opposed to a norm."""
    return name.rsplit(".", 1)[0] in PROJECTIONS


def _share_shape(name: str, shape: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """The accelerator's part of tensor `name`: the last rows of a projection, other tensors whole."""
    return (gpu_rows(shape[0], ratio), *shape[1:]) if is_projection(name) else tuple(shape)


def share_bytes(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], ratio: float) -> tuple[int, int]:
    """(a slot: the largest projection weight's accelerator rows, plus two rows of room so that an
    LM-head chunk no larger than that projection fits too; the norms and bias shares, which stay on
    the accelerator) in bytes, for a block's tensors (name, shape, dtype)."""
    slot, small = 0, 0
    for name, shape, dtype in tensors:
        n = _aligned(dtype.itemsize * math.prod(_share_shape(name, shape, ratio)))
        if is_projection(name) and name.endswith(".weight"):
            slot = max(slot, n + 2 * dtype.itemsize * math.prod(shape[1:]))
        else:
            small += n
    return slot, small


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 [slot_bytes] on the accelerator
    free: torch.cuda.Event | None  # recorded on the compute stream after the last read of its tensor


@dataclass
class _Staged:
    item: tuple  # (block key, projection weight name)
    slot: int
    view: torch.Tensor  # the accelerator's rows, in the slot
    ready: torch.cuda.Event | None  # recorded on the copy stream after the copy


def _order(w: Mapping[str, torch.Tensor]) -> list[str]:
    """A block's projection weights in the order layers.py uses them."""
    return [f"{p}.weight" for p in PROJECTIONS if f"{p}.weight" in w]


class Splitter:
    """Runs host blocks split between the CPU and `device` at `ratio` (the accelerator's share of
    every projection's output rows).

    The accelerator's rows of each projection travel through a ring of `slots` device buffers, one
    projection per slot, in the order they are used: ``weights(key, w)`` queues block `key`'s
    projections (unless ``upcoming`` queued them ahead) and gives its tensors for layers.py;
    ``upcoming(key, w)`` queues the next block's, so that their copies start while this block
    computes. Copies run on a side stream as far ahead as free slots allow; a slot is refilled once
    the compute stream has read it (events, no host waits). Norms and biases are small: they stay
    on the accelerator after their first use."""

    def __init__(self, device: str | torch.device, ratio: float, slot_bytes: int, slots: int = 3):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"split ratio={ratio}: expected a number in [0, 1]")
        if slots < 1:
            raise ValueError(f"split slots={slots}: expected at least 1")
        self.device, self.ratio = torch.device(device), ratio
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = [_Slot(torch.empty(slot_bytes, dtype=torch.uint8, device=self.device),
                            torch.cuda.Event() if self.cuda else None) for _ in range(slots)]
        self._next = 0  # the slot the next copy fills
        self._blocks: deque[Hashable] = deque()  # blocks whose projections are queued, in order of use
        self._todo: deque[tuple[tuple, torch.Tensor]] = deque()  # (item, host rows) not yet copied
        self._staged: deque[_Staged] = deque()  # copied or copying, not yet used
        self._small: dict[tuple, torch.Tensor] = {}  # (block key, name) -> norm or bias share on device
        self._input: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # (on device, host copy)

    @property
    def nbytes(self) -> int:
        return sum(s.buffer.nbytes for s in self.slots)

    # -- queueing and copies -----------------------------------------------------------------------
    def upcoming(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        """Block `key` runs after the queued ones: start copying its share when slots free up."""
        if key not in self._blocks:
            self._queue(key, w)

    def _queue(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        self._blocks.append(key)
        for name in _order(w):
            rows = gpu_rows(w[name].shape[0], self.ratio)
            if rows:
                self._todo.append(((key, name), w[name][w[name].shape[0] - rows:]))  # the last rows: contiguous
        self._top_up()

    def _reset(self) -> None:
        """Forget what was queued (an abandoned step, a block out of the expected order)."""
        self._blocks.clear()
        self._todo.clear()
        self._staged.clear()

    def _top_up(self) -> None:
        """Start copies into free slots, in order of use."""
        while self._todo and len(self._staged) < len(self.slots):
            item, rows = self._todo.popleft()
            slot = self.slots[self._next]
            n = rows.numel() * rows.dtype.itemsize
            if n > slot.buffer.nbytes:
                raise ValueError(f"{item}: {n:,} bytes of GPU rows are more than a slot's {slot.buffer.nbytes:,}")
            view = slot.buffer[:n].view(rows.dtype).view(rows.shape)
            ready = None
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(slot.free)  # the slot's last reader is done
                    view.copy_(rows, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(self.copy_stream)
            else:
                view.copy_(rows)
            self._staged.append(_Staged(item, self._next, view, ready))
            self._next = (self._next + 1) % len(self.slots)

    def take(self, item: tuple, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The accelerator's `rows` of projection `item` (the compute stream waits for their copy)
        and their slot, for ``release`` once the read is queued."""
        if not self._staged or self._staged[0].item != item:  # not the order queued: copy it now
            self._staged.clear()
            self._todo.clear()
            self._todo.append((item, rows))
            self._top_up()
        staged = self._staged.popleft()
        self.wait(staged.ready)
        return staged.view, staged.slot

    def release(self, slot: int) -> None:
        """The read of `slot` is queued on the compute stream: it may be refilled after it."""
        if self.cuda:
            self.slots[slot].free.record(torch.cuda.current_stream(self.device))
        self._top_up()

    def _resident(self, key: Hashable, name: str, t: torch.Tensor) -> torch.Tensor:
        """A norm or a bias share on the accelerator, copied at first use and kept (they are small)."""
        if (key, name) not in self._small:
            self._small[(key, name)] = t.to(self.device, non_blocking=True).clone()
        return self._small[(key, name)]

    def weights(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> dict:
        """Block `key`'s tensors for layers.py: projections as SplitWeight (bias folded in), the
        other tensors (norms) on the accelerator."""
        if not self._blocks or self._blocks[0] != key:
            self._reset()
            self._queue(key, w)
        out: dict = {}
        for name, t in w.items():
            base = name.rsplit(".", 1)[0]
            if name.endswith(".bias") and is_projection(name):
                continue
            if not is_projection(name):
                out[name] = self._resident(key, name, t)
                continue
            bias = w.get(f"{base}.bias")
            rows = gpu_rows(t.shape[0], self.ratio)
            dev_bias = None
            if bias is not None and rows:
                dev_bias = self._resident(key, f"{base}.bias", bias[len(bias) - rows:])
            out[name] = SplitWeight(self, (key, name), t, bias, rows, dev_bias)
        return out

    def finish(self, key: Hashable) -> None:
        """Block `key` is queued on the compute stream."""
        if self._blocks and self._blocks[0] == key:
            self._blocks.popleft()
        self._input = (None, None)

    # -- the two halves ----------------------------------------------------------------------------
    def wait(self, event: torch.cuda.Event | None) -> None:
        """Make the compute stream wait for a copy (no host wait)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def host_input(self, x: torch.Tensor) -> torch.Tensor:
        """x on the accelerator -> the same values in host memory (waits for them); q/k/v and
        gate/up share one input, which is fetched once."""
        if not self.cuda:
            return x
        if self._input[0] is x:
            return self._input[1]
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        self._input = (x, host)
        return host

    def host_linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The CPU's rows: x [L, in] (on the accelerator) -> [L, rows of w] on the accelerator."""
        xh = self.host_input(x)
        out = torch.empty((xh.shape[0], w.shape[0]), dtype=xh.dtype, pin_memory=self.cuda)
        if b is None:
            torch.mm(xh, w.t(), out=out)
        else:
            torch.addmm(b, xh, w.t(), out=out)
        return out.to(self.device, non_blocking=True) if self.cuda else out


class SplitWeight:
    """A projection W [out, in] whose rows [0, k) are computed on the CPU from host memory and rows
    [k, out) on the accelerator from their copy in a slot; called like a weight by layers.py."""

    def __init__(self, sp: Splitter, item: tuple, weight: torch.Tensor, bias: torch.Tensor | None,
                 gpu_rows: int, dev_bias: torch.Tensor | None):
        self.sp, self.item, self.weight, self.bias, self.dev_bias = sp, item, weight, bias, dev_bias
        self.k = weight.shape[0] - gpu_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, in] on the accelerator -> [L, out] there."""
        hi = None
        if self.k < self.weight.shape[0]:  # queued first, so that the accelerator works while the CPU does
            rows, slot = self.sp.take(self.item, self.weight[self.k:])
            hi = F.linear(x, rows, self.dev_bias)
            self.sp.release(slot)
        if self.k == 0:
            return hi
        b = None if self.bias is None else self.bias[:self.k]
        lo = self.sp.host_linear(x, self.weight[:self.k], b)
        return lo if hi is None else torch.cat([lo, hi], dim=-1)


def measure_ratio(device: torch.device, dtype: torch.dtype,
                  shapes: Iterable[tuple[int, int]] = ((5632, 2048), (2048, 5632), (2048, 2048)),
                  seconds: float = 0.3) -> dict:
    """Share of each projection to give the accelerator so that CPU time equals copy time.

    Both are measured at once, since they share the host's memory: the copy stream copies pinned
    weights of `shapes` over and over while this thread runs one-row F.linear over host weights of
    the same shapes (at the process's thread count); each rate is its bytes over the common time.
    The accelerator's own matmuls on a decode row are negligible beside both."""
    weights = [torch.randn(s).to(dtype) for s in shapes]
    x = {s[1]: torch.randn(1, s[1]).to(dtype) for s in shapes}
    nbytes = sum(w.nbytes for w in weights)

    def cpu_pass() -> None:
        for w in weights:
            F.linear(x[w.shape[1]], w)

    cpu_pass()
    if device.type != "cuda":  # no accelerator: both halves are the CPU
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            cpu_pass()
            n += 1
        cpu_bw = n * nbytes / (time.perf_counter() - t0)
        return {"cpu_bytes_per_s": cpu_bw, "copy_bytes_per_s": cpu_bw, "ratio": 0.5}
    pinned = [w.pin_memory() for w in weights]
    dev = [torch.empty_like(w, device=device) for w in weights]
    stream = torch.cuda.Stream(device)

    def copies(passes: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            for _ in range(passes):
                for d, p in zip(dev, pinned, strict=True):
                    d.copy_(p, non_blocking=True)
            end.record(stream)
        return start, end

    copies(1)[1].synchronize()  # warm-up
    start, end = copies(1)
    end.synchronize()
    passes = max(1, math.ceil(seconds / (start.elapsed_time(end) / 1000)))
    start, end = copies(passes)
    t0, n = time.perf_counter(), 0
    while n == 0 or not end.query():  # the CPU works for as long as the copies run
        cpu_pass()
        n += 1
    cpu_s = time.perf_counter() - t0
    end.synchronize()
    copy_s = start.elapsed_time(end) / 1000
    dev.clear()  # before empty_cache: the buffers go back to the device
    torch.cuda.empty_cache()
    cpu_bw, copy_bw = n * nbytes / cpu_s, passes * nbytes / copy_s
    return {"cpu_bytes_per_s": cpu_bw, "copy_bytes_per_s": copy_bw, "ratio": copy_bw / (cpu_bw + copy_bw)}
