"""Sliding-window weight scheduler: pinned blocks stay, the others stream from disk through a
fixed window of reusable buffers, loaded ahead by one background thread.

Owns: the order blocks are used in (a cycle: every step walks them all), which blocks are pinned
under a memory budget (``plan_residency``), the window's buffers (allocated once, reused for every
load), the loader thread, ``with sched.block(i) as w:``, and the counters (bytes read, stall time).
Reads are ``os.pread`` of each tensor's byte range straight into its place in a buffer; with
``drop_page_cache`` each streamed read is followed by ``posix_fadvise(DONTNEED)`` so the next read
comes from the disk. Does not know: what the tensors mean, the network, the model math.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tpi.config import ConfigError
from tpi.errors import TpiError
from tpi.safetensors_io import ShardFileError, pread_into

ALIGN = 64  # each tensor starts on a 64-byte boundary, as torch's own allocations do


class WeightScheduler:
    """`with sched.block(i) as w:` gives block i's tensors; blocks must be used in cyclic order
    0, 1, ..., n-1, 0, ... (pinned ones included) — every step of the model walks them all."""

    def __init__(self, blocks: list[BlockSpec], residency: Residency, drop_page_cache: bool = False,
                 threads: int = 1, pin_memory: bool = False):
        self.blocks, self.res, self.drop, self.pin_memory = blocks, residency, drop_page_cache, pin_memory
        self.counters = Counters()
        self._threads = threads
        self._fds: dict[str, int] = {}
        self._pinned: dict[int, dict[str, torch.Tensor]] = {}
        self._stream = [i for i in range(len(blocks)) if i not in residency.pinned]  # the streamed cycle
        self._slots = [_Slot(torch.empty(residency.slot_bytes, dtype=torch.uint8, pin_memory=pin_memory))
                       for _ in range(residency.window)]
        self._cv = threading.Condition()
        self._next_use = 0  # position in the full cycle of blocks
        self._next_load = 0  # ticket of the next streamed load
        self._next_stream_use = 0  # ticket the consumer will take next
        self._epoch = 0
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.on_load_start = None  # test hook: called with the block index before each streamed load

    # -- the consumer ------------------------------------------------------------------------------
    @contextmanager
    def block(self, index: int) -> Iterator[dict[str, torch.Tensor]]:
        expected = self._next_use % len(self.blocks)
        if index != expected:
            raise SchedulerError(f"block {index} asked for out of order; block {expected} comes next")
        if index in self._pinned:
            self._next_use += 1
            yield self._pinned[index]
            return
        slot = self._wait_for(self._next_stream_use)
        try:
            yield self._views(self.blocks[index], slot.buffer)
        finally:
            with self._cv:
                slot.ticket, slot.ready = None, False
                self._next_stream_use += 1
                self._next_use += 1
                self._cv.notify_all()

    def reset(self) -> None:
        """Start the cycle again at block 0 (after a step was abandoned half-way)."""
        with self._cv:
            self._epoch += 1
            for s in self._slots:
                s.ticket, s.ready = None, False
            self._next_use = self._next_load = self._next_stream_use = 0
            self._cv.notify_all()

    def _wait_for(self, ticket: int) -> _Slot:
        t0 = time.perf_counter()
        with self._cv:
            while True:
                if self._error is not None:
                    raise SchedulerError(f"loading weights failed: {self._error}") from self._error
                slot = next((s for s in self._slots if s.ticket == ticket and s.ready), None)
                if slot is not None:
                    break
                self._cv.wait(1.0)
        self.counters.stall_s += time.perf_counter() - t0
        return slot

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> WeightScheduler:
        for i in sorted(self.res.pinned):
            self._pinned[i] = self._read(self.blocks[i], None)
        if self._stream:
            self._thread = threading.Thread(target=self._loader, name="tpi-weight-loader", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> WeightScheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def pinned(self, index: int) -> dict[str, torch.Tensor]:
        """A pinned block's tensors (they stay for the scheduler's lifetime)."""
        return self._pinned[index]

    # -- the loader thread -------------------------------------------------------------------------
    def _loader(self) -> None:
        torch.set_num_threads(self._threads)  # the per-thread default would be every core
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._can_load():
                        self._cv.wait()
                    if self._closed:
                        return
                    ticket, epoch = self._next_load, self._epoch
                    slot = next(s for s in self._slots if s.ticket is None)
                    slot.ticket, slot.ready = ticket, False
                    self._next_load += 1
                    held = sum(s.ticket is not None for s in self._slots)
                    self.counters.max_streamed_held = max(self.counters.max_streamed_held, held)
                index = self._stream[ticket % len(self._stream)]
                if self.on_load_start is not None:
                    self.on_load_start(index)
                self._read(self.blocks[index], slot.buffer)
                with self._cv:
                    if epoch == self._epoch and slot.ticket == ticket:
                        slot.ready = True
                    self._cv.notify_all()
        except BaseException as e:  # reported to the consumer, which raises it
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _can_load(self) -> bool:
        free = any(s.ticket is None for s in self._slots)
        return free and self._next_load - self._next_stream_use < len(self._slots)

    # -- reading -----------------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _read(self, block: BlockSpec, buffer: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Read a block into `buffer` (streamed) or into fresh tensors (pinned)."""
        fd = self._fd(block.path)
        out = self._views(block, buffer) if buffer is not None else _fresh(block, self.pin_memory)
        _fill(fd, block, out)
        if buffer is None:  # a pinned block, read once at start: not the rank's work per token
            return out
        if self.drop:
            for t in block.tensors:
                os.posix_fadvise(fd, t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)
        self.counters.bytes_read += sum(t.nbytes for t in block.tensors)
        self.counters.loads += 1
        return out

    @staticmethod
    def _views(block: BlockSpec, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for t in block.tensors:
            out[t.name] = buffer[off:off + t.nbytes].view(t.dtype).view(t.shape)
            off += _aligned(t.nbytes)
        return out


@dataclass(frozen=True)
class TensorRange:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the file
    nbytes: int


@dataclass(frozen=True)
class BlockSpec:
    """One block: a file and the byte ranges of its tensors."""

    key: tuple  # e.g. (layer, "attn") or (None, "head", chunk)
    path: str
    tensors: tuple[TensorRange, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of buffer this block needs, tensors aligned."""
        return sum(_aligned(t.nbytes) for t in self.tensors)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Residency:
    pinned: frozenset[int]  # block indices kept in memory for good
    window: int  # streamed buffers (0 when everything is pinned)
    slot_bytes: int  # size of each window buffer
    needed_min: int  # the least budget that works: fixed + window x largest block
    planned_bytes: int  # fixed + pinned + window buffers


class SchedulerError(TpiError, RuntimeError):
    pass


def _fresh(block: BlockSpec, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin_memory) for t in block.tensors}


def _fill(fd: int, block: BlockSpec, out: dict[str, torch.Tensor]) -> None:
    """pread each tensor's byte range into its place in `out`; a file cut short since its header
    was checked is named in the error."""
    for t in block.tensors:
        try:
            pread_into(fd, out[t.name], t.offset)
        except ShardFileError as e:
            raise ShardFileError(f"{block.path}: tensor {t.name}: {e}; the file ends before its header says") from None


def read_block(block: BlockSpec) -> dict[str, torch.Tensor]:
    """A block's tensors read once into fresh host tensors (for placement elsewhere)."""
    fd = os.open(block.path, os.O_RDONLY)
    try:
        out = _fresh(block)
        _fill(fd, block, out)
        return out
    finally:
        os.close(fd)


def plan_residency(blocks: list[BlockSpec], budget: int | None, fixed: int, window: int | None) -> Residency:
    """Pin as many blocks as `budget` allows after `fixed` bytes (runtime, KV cache, activations)
    and the window of streamed buffers; the largest blocks first, since they save the most reads.

    budget None: everything pinned. window None: 2 (the smallest that overlaps), or 1 if only that fits.
    """
    total = sum(b.nbytes for b in blocks)
    if window is not None and window < 1:
        raise ConfigError(f"window={window}: expected an integer >= 1")
    if budget is None or fixed + total <= budget or not blocks:
        if budget is not None and fixed + total > budget:
            raise ConfigError(f"memory budget of {budget:,} bytes is too small: this rank needs at least "
                              f"{fixed:,} bytes for the runtime, KV cache and activations")
        return Residency(frozenset(range(len(blocks))), 0, 0, fixed + total, fixed + total)
    largest = max(b.nbytes for b in blocks)
    candidates = [window] if window is not None else [2, 1]
    for w in candidates:
        if fixed + w * largest <= budget:
            break
    else:
        w = candidates[-1]
        raise ConfigError(
            f"memory budget of {budget:,} bytes is too small: this rank needs at least "
            f"{fixed + w * largest:,} bytes ({fixed:,} for the runtime, KV cache and activations + "
            f"window {w} x {largest:,} for the largest block)")
    pinned: set[int] = set()
    used = fixed
    order = sorted(range(len(blocks)), key=lambda i: (-blocks[i].nbytes, i))
    for i in order:
        rest = [blocks[j].nbytes for j in range(len(blocks)) if j not in pinned and j != i]
        slot = max(rest, default=0)
        if used + blocks[i].nbytes + (w * slot if rest else 0) <= budget:
            pinned.add(i)
            used += blocks[i].nbytes
    streamed = [blocks[j].nbytes for j in range(len(blocks)) if j not in pinned]
    slot = max(streamed, default=0)
    win = w if streamed else 0
    return Residency(frozenset(pinned), win, slot, fixed + w * largest, used + win * slot)


@dataclass
class Counters:
    """What streaming cost since start (pinned blocks, read once at start, are not counted)."""
    bytes_read: int = 0
    stall_s: float = 0.0
    loads: int = 0
    max_streamed_held: int = 0  # the most window buffers ever holding or loading a block


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 [slot_bytes]
    ticket: int | None = None  # which load (a position in the stream) occupies it
    ready: bool = False
