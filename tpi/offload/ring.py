"""The offload's buffers: a ring of device memory the copies land in, and rings of host buffers.

Owns: ``CopyRing``, a ring of `slots` x `slot_bytes` bytes of device memory into which a side
stream copies projections' accelerator rows from pinned host memory, each in the next free bytes,
in order of use and as far ahead as the ring has room; bytes are overwritten once the compute
stream has read them (events, no host waits). ``HostRing``: host buffers (pinned with an
accelerator) handed out in turn, each again only after its last accelerator use. With the
accelerator set to the CPU the same code runs with plain copies (how CI tests it). Does not know:
which projection comes next (offloader.py queues them), the model, the CPU's share.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from tpi.offload.plan import aligned


@dataclass
class Span:
    """Bytes [start, end) of the copy ring, holding one projection's accelerator rows."""
    start: int
    end: int
    released: bool = False  # its read is queued on the compute stream: it may be overwritten after `free`
    free: torch.cuda.Event | None = None  # recorded on the compute stream after that read


@dataclass
class _Staged:
    item: tuple  # (block key, projection weight name)
    span: Span
    view: torch.Tensor  # the accelerator's rows, in the ring
    ready: torch.cuda.Event | None  # recorded on the copy stream after the copy


class CopyRing:
    """Device memory for the accelerator's rows of host projections, filled by a side stream."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int):
        if slots < 1:
            raise ValueError(f"offload slots={slots}: expected at least 1")
        self.device, self.cuda, self.slot_bytes = device, device.type == "cuda", slot_bytes
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ring = torch.empty(slots * slot_bytes, dtype=torch.uint8, device=device)  # [slots * slot_bytes]
        self._spans: deque[Span] = deque()  # allocated, oldest first: copied or copying, or read
        self._barrier: torch.cuda.Event | None = None  # after a restart: the newest read of the old spans
        self._todo: deque[tuple[tuple, torch.Tensor]] = deque()  # (item, host rows) not yet copied
        self.staged: deque[_Staged] = deque()  # copied or copying, not yet used

    @property
    def nbytes(self) -> int:
        return self.ring.nbytes

    def queue(self, item: tuple, rows: torch.Tensor) -> None:
        """Rows to copy after those queued; copies start as the ring has room."""
        self._todo.append((item, rows))
        self.top_up()

    def restart(self) -> None:
        """Drop every copy queued or made: the next copy starts the ring afresh at 0, after the
        newest read of what it overwrites (copies made and not read are ordered on the copy stream)."""
        reads = [s.free for s in self._spans if s.free is not None]
        self._barrier = reads[-1] if reads else self._barrier
        self._spans.clear()
        self.staged.clear()
        self._todo.clear()

    def close(self) -> None:
        """Let go of the device memory and of everything queued."""
        self.restart()
        self._barrier = None
        self.ring = torch.empty(0, dtype=torch.uint8, device=self.device)

    def _alloc(self, n: int) -> tuple[int, torch.cuda.Event | None] | None:
        """Where in the ring the next copy of `n` bytes goes (spans are allocated and read in order,
        so the room is between the newest span's end and the oldest's start, wrapping to 0), and
        the newest read of what it overwrites, for the copy stream to wait on; None: no room until
        a staged copy is read."""
        size, wait = self.ring.nbytes, self._barrier
        while self._spans:
            head, tail = self._spans[-1].end, self._spans[0].start
            if head > tail and n <= size - head:
                return head, wait
            if head > tail and n <= tail:
                return 0, wait
            if head <= tail and n <= tail - head:
                return head, wait
            oldest = self._spans[0]
            if not oldest.released:
                return None
            self._spans.popleft()
            wait = oldest.free if oldest.free is not None else wait  # reads are in order: the newest suffices
        return 0, wait

    def top_up(self) -> None:
        """Start copies into the ring, in order of use, as far ahead as its room allows."""
        while self._todo:
            item, rows = self._todo[0]
            n = rows.numel() * rows.dtype.itemsize
            if n > self.slot_bytes:
                raise ValueError(f"{item}: {n:,} bytes of GPU rows are more than a slot's {self.slot_bytes:,}")
            got = self._alloc(aligned(n))
            if got is None:
                return
            start, wait = got
            self._todo.popleft()
            self._barrier = None
            span = Span(start, start + aligned(n))
            self._spans.append(span)
            view = self.ring[start:start + n].view(rows.dtype).view(rows.shape)
            ready = None
            if self.cuda:
                with torch.cuda.stream(self.copy_stream):
                    if wait is not None:
                        self.copy_stream.wait_event(wait)  # the last reader of these bytes is done
                    view.copy_(rows, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(self.copy_stream)
            else:
                view.copy_(rows)
            self.staged.append(_Staged(item, span, view, ready))

    def take(self, item: tuple, rows: torch.Tensor) -> tuple[torch.Tensor, Span]:
        """The accelerator's `rows` of projection `item` (the compute stream waits for their copy)
        and their span of the ring, for ``release`` once the read is queued."""
        if not self.staged or self.staged[0].item != item:  # not the order queued: copy it now
            self.restart()
            self.queue(item, rows)
        staged = self.staged.popleft()
        if staged.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)  # no host wait
        return staged.view, staged.span

    def release(self, span: Span) -> None:
        """The read of `span` is queued on the compute stream: it may be overwritten after it."""
        if self.cuda:
            span.free = torch.cuda.Event()
            span.free.record(torch.cuda.current_stream(self.device))
        span.released = True
        self.top_up()


class HostRing:
    """Host buffers (pinned with an accelerator) handed out in turn; an entry is handed out again
    only after the event recorded at its last accelerator use."""

    def __init__(self, n: int, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None] * n
        self._used = [torch.cuda.Event() for _ in range(n)] if self.cuda else []
        self._next = 0

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """(entry, host buffer [shape])."""
        i, n = self._next, math.prod(shape) * dtype.itemsize
        self._next = (i + 1) % len(self._host)
        if self.cuda:
            self._used[i].synchronize()  # long done: the ring is a stage or two deep
        if self._host[i] is None or self._host[i].nbytes < n:
            self._host[i] = torch.empty(aligned(n), dtype=torch.uint8, pin_memory=self.cuda)
        return i, self._host[i][:n].view(dtype).view(shape)

    def used(self, i: int) -> None:
        """Entry i's accelerator read or write is queued on the compute stream."""
        if self.cuda:
            self._used[i].record(torch.cuda.current_stream(self.device))
