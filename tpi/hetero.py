"""CPU/GPU split compute for a device that has a GPU smaller than its share of the model.

Owns: ``Splitter``, which runs host blocks' projections (and LM-head chunks) split by output rows
between the CPU and an accelerator, at one ratio or at a ratio per block: the CPU computes rows
[0, k) from host memory on a worker thread, the accelerator rows [k, out) from a copy that a side
stream brings over from pinned memory into a ring of device memory, each projection's rows in the
next free bytes, in order of use and as far ahead as the ring has room (the next blocks' while this
one computes). The block's activations stay on the accelerator: when a projection's input is new,
it is fetched to the host once and every projection that takes it (q/k/v, gate/up) starts at once,
both halves: their CPU rows back to back on the worker, their accelerator rows queued (so that the
ring frees up as soon as their copies land); each call then lands its CPU rows in the same output
(small asynchronous copies through pinned buffers: on an H200 host they wait ~3 us behind a weight
copy, so they need no path of their own). For the block split: ``plan_shares`` gives each block's
share (attention whole on the accelerator, the others shared at one share), ``split_block`` cuts a
shared block into its CPU part and its accelerator part (disjoint FFN columns, head rows; the
accelerator's part then runs here at ratio 1), ``measure_bandwidths`` the CPU's and the copy
engine's rates, running at once, ``balance_share`` the share of bytes they predict, and
``search_share`` the share at which a timing the caller gives (forward.py times the rank's own
step) is least, over a grid and then the best's neighbours. Also
``share_bytes`` (the largest projection share and the small tensors kept on the accelerator, for
the GPU budget) and ``calibrate`` (the row split's ratio: the split path itself timed on synthetic
blocks of the rank's shapes over a grid of ratios). With the accelerator set to the CPU the same
path runs entirely on the CPU, which is how CI tests it. Does not know: which blocks live where or
which comes next (forward.py decides), the model math (layers.py calls a ``SplitWeight`` like a
weight), the network.
"""

from __future__ import annotations

import glob
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# projections that take the same input, in order of use; the first one's output feeds the next group
STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",), ("lm_head",))
ALIGN = 256  # slot sizes are rounded up to this
# seconds: the worker computing CPU rows; the launching thread waiting for an input, for CPU rows
SPLIT_COUNTERS = ("cpu_s", "wait_input_s", "wait_cpu_s")
SHARE_GRID, SHARE_REFINE = 10, (0.05, 0.025)  # search_share: shares 0, 0.1, ..., 1, then the best's neighbours
HOST_BUFFERS = 8  # pinned buffers for the CPU's rows: a stage's (at most 3) and the next stage's


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def gpu_rows(out: int, ratio: float) -> int:
    """Rows of an [out, in] projection given to the accelerator: the last round(out * ratio)."""
    return int(round(out * ratio))


def is_projection(name: str) -> bool:
    """A projection's weight or bias ("q_proj.weight", "q_proj.bias"), as opposed to a norm."""
    return name.rsplit(".", 1)[0] in PROJECTIONS


def _stage(name: str) -> tuple[str, ...]:
    base = name.rsplit(".", 1)[0]
    return next(s for s in STAGES if base in s)


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
class _Span:
    """Bytes [start, end) of the copy ring, holding one projection's accelerator rows."""
    start: int
    end: int
    released: bool = False  # its read is queued on the compute stream: it may be overwritten after `free`
    free: torch.cuda.Event | None = None  # recorded on the compute stream after that read


@dataclass
class _Staged:
    item: tuple  # (block key, projection weight name)
    span: _Span
    view: torch.Tensor  # the accelerator's rows, in the ring
    ready: torch.cuda.Event | None  # recorded on the copy stream after the copy


class _HostRing:
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
            self._host[i] = torch.empty(_aligned(n), dtype=torch.uint8, pin_memory=self.cuda)
        return i, self._host[i][:n].view(dtype).view(shape)

    def used(self, i: int) -> None:
        """Entry i's accelerator read or write is queued on the compute stream."""
        if self.cuda:
            self._used[i].record(torch.cuda.current_stream(self.device))


@dataclass
class _Job:
    """One projection on one input, started: the accelerator's rows queued into out[:, k:], the
    CPU's on the worker into `host`, to land in out[:, :k]."""
    out: torch.Tensor  # [L, out] on the accelerator
    k: int
    future: Future | None  # the worker's seconds, once `host` holds the CPU's rows
    entry: int  # in the result ring
    host: torch.Tensor | None  # [L, k], pinned


def _order(w: Mapping[str, torch.Tensor]) -> list[str]:
    """A block's projection weights in the order layers.py uses them."""
    return [f"{p}.weight" for p in PROJECTIONS if f"{p}.weight" in w]


def _cpu_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> float:
    """x [L, in] @ w[k, in].T (+ b) into out [L, k]: the CPU's share, on the worker thread (in
    inference mode, which is per thread: `out` may have been made under it). Returns its seconds."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        if b is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(b, x, w.t(), out=out)
    return time.perf_counter() - t0


class Splitter:
    """Runs host blocks split between the CPU and `device` at `ratio` (the accelerator's share of
    every projection's output rows).

    The accelerator's rows of each projection travel through a ring of `slots` x `slot_bytes` bytes
    of device memory (`slot_bytes`: the largest projection share), each in the next free bytes, in
    the order they are used: ``weights(key, w)`` queues block `key`'s projections (unless
    ``upcoming`` queued them ahead) and gives its tensors for layers.py; ``upcoming(key, w)`` queues
    a later block's, so that their copies start while this block computes. Copies run on a side
    stream as far ahead as the ring has room; bytes are overwritten once the compute stream has read
    them (events, no host waits). `ratios` gives some blocks a ratio of their own (0: the caller
    computes that block on the CPU whole; nothing of it is queued). The CPU's rows run on one worker thread
    with `threads` torch threads (default: this thread's count, less one with an accelerator, whose
    launches need a core). Norms and biases are small: they stay on the accelerator after their
    first use. ``close`` (or ``with``) stops the worker."""

    def __init__(self, device: str | torch.device, ratio: float, slot_bytes: int, slots: int = 3,
                 threads: int | None = None, ratios: Mapping[Hashable, float] | None = None):
        for r in (ratio, *(ratios or {}).values()):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"split ratio={r}: expected a number in [0, 1]")
        self.ratios = dict(ratios or {})  # block key -> its own ratio (block split: 0 or 1); others: `ratio`
        self.copies = ratio > 0 or any(r > 0 for r in self.ratios.values())  # False: nothing is ever copied
        if slots < 1:
            raise ValueError(f"split slots={slots}: expected at least 1")
        self.device, self.ratio = torch.device(device), ratio
        self.cuda = self.device.type == "cuda"
        threads = threads or torch.get_num_threads()
        self.threads = max(1, threads - 1) if self.cuda and threads > 2 else threads
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slot_bytes = slot_bytes  # the largest projection share that must fit
        self.ring = torch.empty(slots * slot_bytes, dtype=torch.uint8, device=self.device)  # [slots * slot_bytes]
        self._spans: deque[_Span] = deque()  # allocated in the ring, oldest first: copied or copying, or read
        self._barrier: torch.cuda.Event | None = None  # after a restart: the newest read of the old spans
        self._blocks: deque[Hashable] = deque()  # blocks whose projections are queued, in order of use
        self._todo: deque[tuple[tuple, torch.Tensor]] = deque()  # (item, host rows) not yet copied
        self._staged: deque[_Staged] = deque()  # copied or copying, not yet used
        self._small: dict[tuple, torch.Tensor] = {}  # (block key, name) -> norm or bias share on device
        self._current: dict[str, SplitWeight] = {}  # the block weights() gave last, by projection name
        self._pool = ThreadPoolExecutor(1, "tpi-split-cpu", initializer=torch.set_num_threads,
                                        initargs=(self.threads,))
        self._inputs = _HostRing(2, self.device)  # a projection input fetched to the host
        self._results = _HostRing(HOST_BUFFERS, self.device)  # the CPU's rows
        self._fetched = torch.cuda.Event() if self.cuda else None
        self._x: torch.Tensor | None = None  # the input whose stage is under way
        self._xh: torch.Tensor | None = None  # its host copy
        self._jobs: dict[tuple, _Job] = {}  # item -> its projection on _x, started
        self.counters = dict.fromkeys(SPLIT_COUNTERS, 0.0)

    def ratio_of(self, key: Hashable) -> float:
        """The accelerator's share of block `key`'s rows."""
        return self.ratios.get(key, self.ratio)

    def on_cpu(self, key: Hashable) -> bool:
        """Block `key` is the CPU's whole (a block split's 0): the caller computes it unsplit, in host
        memory. (A row split at ratio 0 still runs here: its activations stay on the accelerator.)"""
        return self.ratios.get(key) == 0.0

    @property
    def nbytes(self) -> int:
        return self.ring.nbytes

    def set_threads(self, threads: int) -> None:
        """Torch threads of the worker that computes the CPU's rows (a new worker)."""
        self._drain()
        self._pool.shutdown(wait=True)
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(1, "tpi-split-cpu", initializer=torch.set_num_threads,
                                        initargs=(self.threads,))

    def close(self) -> None:
        """Stop the worker and let go of the copy ring and whatever refers back here (the
        SplitWeights given last): a closed Splitter holds no device memory."""
        self._drain()
        self._pool.shutdown(wait=True)
        for held in (self._current, self._jobs, self._staged, self._spans, self._todo, self._small, self._blocks):
            held.clear()
        self.ring = torch.empty(0, dtype=torch.uint8, device=self.device)

    def __enter__(self) -> Splitter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queueing and copies -----------------------------------------------------------------------
    def upcoming(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        """Block `key` runs after the queued ones: start copying its share when the ring has room."""
        if key not in self._blocks and not self.on_cpu(key):
            self._queue(key, w)

    def _queue(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        self._blocks.append(key)
        ratio = self.ratio_of(key)
        for name in _order(w):
            rows = gpu_rows(w[name].shape[0], ratio)
            if rows:
                self._todo.append(((key, name), w[name][w[name].shape[0] - rows:]))  # the last rows: contiguous
        self._top_up()

    def _reset(self) -> None:
        """Forget what was queued (an abandoned step, a block out of the expected order)."""
        self._drain()
        self._blocks.clear()
        self._restart()

    def _restart(self) -> None:
        """Drop every copy queued or made: the next copy starts the ring afresh at 0, after the
        newest read of what it overwrites (copies made and not read are ordered on the copy stream)."""
        reads = [s.free for s in self._spans if s.free is not None]
        self._barrier = reads[-1] if reads else self._barrier
        self._spans.clear()
        self._staged.clear()
        self._todo.clear()

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

    def _top_up(self) -> None:
        """Start copies into the ring, in order of use, as far ahead as its room allows."""
        while self._todo:
            item, rows = self._todo[0]
            n = rows.numel() * rows.dtype.itemsize
            if n > self.slot_bytes:
                raise ValueError(f"{item}: {n:,} bytes of GPU rows are more than a slot's {self.slot_bytes:,}")
            got = self._alloc(_aligned(n))
            if got is None:
                return
            start, wait = got
            self._todo.popleft()
            self._barrier = None
            span = _Span(start, start + _aligned(n))
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
            self._staged.append(_Staged(item, span, view, ready))

    def take(self, item: tuple, rows: torch.Tensor) -> tuple[torch.Tensor, _Span]:
        """The accelerator's `rows` of projection `item` (the compute stream waits for their copy)
        and their span of the ring, for ``release`` once the read is queued."""
        if not self._staged or self._staged[0].item != item:  # not the order queued: copy it now
            self._restart()
            self._todo.append((item, rows))
            self._top_up()
        staged = self._staged.popleft()
        if staged.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.ready)  # no host wait
        return staged.view, staged.span

    def release(self, span: _Span) -> None:
        """The read of `span` is queued on the compute stream: it may be overwritten after it."""
        if self.cuda:
            span.free = torch.cuda.Event()
            span.free.record(torch.cuda.current_stream(self.device))
        span.released = True
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
            rows = gpu_rows(t.shape[0], self.ratio_of(key))
            dev_bias = None
            if bias is not None and rows:
                dev_bias = self._resident(key, f"{base}.bias", bias[len(bias) - rows:])
            out[name] = SplitWeight(self, (key, name), t, bias, rows, dev_bias)
        self._current = {k: v for k, v in out.items() if isinstance(v, SplitWeight)}
        return out

    def finish(self, key: Hashable) -> None:
        """Block `key` is queued on the compute stream."""
        if self._blocks and self._blocks[0] == key:
            self._blocks.popleft()
        self._drain()

    # -- the CPU's half ----------------------------------------------------------------------------
    def _drain(self) -> None:
        """Let the worker finish what it was given (results nobody asked for are dropped)."""
        wait_all([j.future for j in self._jobs.values() if j.future is not None])
        self._jobs.clear()
        self._x = None

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        """x on the accelerator -> the same values in a pinned host buffer (waits for x only)."""
        if not self.cuda:
            return x
        _, host = self._inputs.get(tuple(x.shape), x.dtype)
        host.copy_(x, non_blocking=True)
        self._fetched.record(torch.cuda.current_stream(self.device))
        t0 = time.perf_counter()
        self._fetched.synchronize()
        self.counters["wait_input_s"] += time.perf_counter() - t0
        return host

    def _start(self, sw: SplitWeight, x: torch.Tensor, xh: torch.Tensor) -> _Job:
        """Projection `sw` on x (xh: its host copy): the CPU's rows to the worker, the
        accelerator's queued on the compute stream."""
        n, k = sw.weight.shape[0], sw.k
        out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        future, entry, host = None, -1, None
        if k:
            entry, host = self._results.get((x.shape[0], k), x.dtype)
            b = None if sw.bias is None else sw.bias[:k]
            future = self._pool.submit(_cpu_rows, xh, sw.weight[:k], b, host)
        if k < n:
            rows, slot = self.take(sw.item, sw.weight[k:])
            if sw.dev_bias is None:
                torch.mm(x, rows.t(), out=out[:, k:])
            else:
                torch.addmm(sw.dev_bias, x, rows.t(), out=out[:, k:])
            self.release(slot)
        return _Job(out, k, future, entry, host)

    def begin(self, sw: SplitWeight, x: torch.Tensor) -> _Job:
        """Projection `sw` on x, started. A new x is fetched to the host once, and every projection
        of the block that takes it (q/k/v, gate/up) starts at once, both halves: the worker gets
        all their CPU rows back to back, and their slots free up as soon as their copies land."""
        if self._x is not x:
            self._drain()
            self._x, self._xh = x, self._to_host(x)
            for p in _stage(sw.item[1]) if self._current.get(sw.item[1]) is sw else ():
                other = self._current.get(f"{p}.weight")
                if other is not None:
                    self._jobs[other.item] = self._start(other, x, self._xh)
        job = self._jobs.pop(sw.item, None)
        return job if job is not None else self._start(sw, x, self._xh)

    def started(self, item: tuple) -> bool:
        return item in self._jobs

    def land(self, job: _Job) -> torch.Tensor:
        """The projection's output [L, out] on the accelerator: waits for the CPU's rows and queues
        their copy into it on the compute stream."""
        if job.future is not None:
            t0 = time.perf_counter()
            self.counters["cpu_s"] += job.future.result()
            self.counters["wait_cpu_s"] += time.perf_counter() - t0
            job.out[:, :job.k].copy_(job.host, non_blocking=self.cuda)
            self._results.used(job.entry)
        return job.out


class SplitWeight:
    """A projection W [out, in] whose rows [0, k) are computed on the CPU from host memory and rows
    [k, out) on the accelerator from their copy in a slot; called like a weight by layers.py."""

    def __init__(self, sp: Splitter, item: tuple, weight: torch.Tensor, bias: torch.Tensor | None,
                 gpu_rows: int, dev_bias: torch.Tensor | None):
        self.sp, self.item, self.weight, self.bias, self.dev_bias = sp, item, weight, bias, dev_bias
        self.k = weight.shape[0] - gpu_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, in] on the accelerator -> [L, out] there."""
        if self.k == 0 and not self.sp.started(self.item):  # all on the accelerator (ratio 1)
            rows, slot = self.sp.take(self.item, self.weight)
            y = F.linear(x, rows, self.dev_bias)
            self.sp.release(slot)
            return y
        return self.sp.land(self.sp.begin(self, x))


def plan_shares(sizes: Sequence[int], fraction: float, cpu_ok: Sequence[bool] | None = None) -> list[float]:
    """The block split: for host blocks of these sizes (bytes, in order of use), the accelerator's
    share of each block, so that it computes `fraction` of all their bytes: a block whose `cpu_ok`
    is False (an attention block: its KV cache is on the accelerator) goes to the accelerator
    whole (1.0); every other block (FFN blocks, LM-head chunks) is shared at one common share, which
    may come out at 0 (the CPU's whole) or 1. Each shared block is computed by both at once, on
    disjoint columns (``split_block``), so neither waits for the other within a block, and the copy
    engine brings the next blocks' accelerator parts over while the CPU computes its part."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split fraction={fraction}: expected a number in [0, 1]")
    cpu_ok = [True] * len(sizes) if cpu_ok is None else list(cpu_ok)
    if len(cpu_ok) != len(sizes):
        raise ValueError(f"cpu_ok has {len(cpu_ok)} entries for {len(sizes)} blocks")
    for size in sizes:
        if size < 0:
            raise ValueError(f"block size {size}: expected a number of bytes >= 0")
    fixed = sum(s for s, movable in zip(sizes, cpu_ok, strict=True) if not movable)
    movable = sum(sizes) - fixed
    share = min(1.0, max(0.0, (fraction * sum(sizes) - fixed) / movable)) if movable else 0.0
    return [share if m else 1.0 for m in cpu_ok]


def balance_share(gpu_only: int, shared: int, cpu_Bps: float, copy_Bps: float, host_s: float = 0.0) -> float:
    """The block split's share of the host bytes for the accelerator, from measured rates: per
    token the copy engine brings over the `gpu_only` bytes (attention blocks) and a share s of the
    `shared` ones (FFN blocks, LM-head chunks), while the thread that runs the blocks computes the
    other 1 - s of them on the CPU and also spends `host_s` seconds on everything else (launching
    the accelerator's work, the blocks resident there, syncs). Both run at once, so a token takes
    the longer of the two: s is where they are equal,
    (gpu_only + s * shared) / copy_Bps == (1 - s) * shared / cpu_Bps + host_s, clamped to [0, 1].
    Returns (gpu_only + s * shared) / (gpu_only + shared), the fraction ``plan_shares`` takes.
    With host_s = 0 and no gpu_only bytes this is copy_Bps / (cpu_Bps + copy_Bps)."""
    for name, v in (("gpu_only", gpu_only), ("shared", shared), ("host_s", host_s)):
        if v < 0:
            raise ValueError(f"{name}={v}: expected a number >= 0")
    for name, v in (("cpu_Bps", cpu_Bps), ("copy_Bps", copy_Bps)):
        if not v > 0:
            raise ValueError(f"{name}={v}: expected a bandwidth > 0 bytes per second")
    if gpu_only + shared == 0:
        return 0.0
    if shared == 0:
        return 1.0
    s = (shared / cpu_Bps + host_s - gpu_only / copy_Bps) / (shared / cpu_Bps + shared / copy_Bps)
    s = min(1.0, max(0.0, s))
    return (gpu_only + s * shared) / (gpu_only + shared)


def search_share(time_at: Callable[[list[float]], list[float]], grid: int = SHARE_GRID,
                 refine: Sequence[float] = SHARE_REFINE) -> tuple[float, dict[float, float]]:
    """The share in [0, 1] at which `time_at` (seconds for each of a list of shares, timed
    together) is least: shares 0, 1/grid, ..., 1, then the best's neighbours at each step of
    `refine`. Returns (the best share, {share: seconds} for every share timed)."""
    if grid < 1:
        raise ValueError(f"grid={grid}: expected at least 1 step")
    timed: dict[float, float] = {}

    def at(shares: list[float]) -> None:
        shares = [s for s in dict.fromkeys(round(min(1.0, max(0.0, s)), 4) for s in shares) if s not in timed]
        if shares:
            seconds = time_at(shares)
            if len(seconds) != len(shares):
                raise ValueError(f"time_at gave {len(seconds)} times for {len(shares)} shares")
            timed.update(zip(shares, seconds, strict=True))

    at([i / grid for i in range(grid + 1)])
    for step in refine:
        best = min(timed, key=timed.get)
        at([best - step, best + step])
    return min(timed, key=timed.get), dict(sorted(timed.items()))


def split_block(w: Mapping[str, torch.Tensor], kind: str, cpu: int, rearrange: bool = True) -> tuple[dict, dict]:
    """Block `w` as two blocks whose results add up (FFN) or sit side by side (an LM-head chunk):
    (the CPU's: intermediate columns [0, cpu) of an FFN block, rows [0, cpu) of a head chunk; the
    accelerator's: the rest), each part's weights contiguous in memory, so that the accelerator's
    can be copied over as they are. An FFN block's down projection [D, I] is rearranged in place
    for that (its columns [0, cpu), then the others, each part row-major): `w`'s own
    down_proj.weight is scrambled afterwards and must not be used again. The norm goes to both
    parts, the down projection's bias to the CPU's alone (it is added once). `rearrange` False:
    parts of the same shapes over the same bytes, `w` left as it is, but the down projection's
    parts are not its columns: for timing the split at several shares, never for results."""
    if kind == "head":
        t = w["weight"]
        if not 0 < cpu < t.shape[0]:
            raise ValueError(f"split at row {cpu}: expected 0 < row < {t.shape[0]}")
        return {"weight": t[:cpu]}, {"weight": t[cpu:]}
    if kind != "ffn":
        raise ValueError(f"block kind {kind!r}: only FFN blocks and LM-head chunks are split by columns")
    down = w["down_proj.weight"]
    d, inter = down.shape
    if not 0 < cpu < inter:
        raise ValueError(f"split at column {cpu}: expected 0 < column < {inter}")
    flat = down.view(-1)
    if rearrange:
        gpu_cols = down[:, cpu:].clone()  # its place is overwritten by the CPU's columns first
        for a in range(0, d, 256):  # row chunks: their CPU columns land before their own start (cpu <= inter)
            b = min(d, a + 256)
            flat[a * cpu:b * cpu].view(b - a, cpu).copy_(down[a:b, :cpu].clone())
        flat[d * cpu:].view(d, inter - cpu).copy_(gpu_cols)
    halves: tuple[dict, dict] = ({}, {})
    for name, t in w.items():
        base = name.rsplit(".", 1)[0]
        if base in ("gate_proj", "up_proj"):  # rows (weight) or entries (bias) by intermediate column
            halves[0][name], halves[1][name] = t[:cpu], t[cpu:]
        elif name == "down_proj.weight":
            halves[0][name] = flat[:d * cpu].view(d, cpu)
            halves[1][name] = flat[d * cpu:].view(d, inter - cpu)
        elif name == "down_proj.bias":
            halves[0][name] = t
        else:  # the norm
            halves[0][name] = halves[1][name] = t
    return halves


def measure_bandwidths(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], threads: int | None = None,
                       nbytes: int | None = None, repeats: int = 5, ready: Callable[[], None] | None = None) -> dict:
    """Bytes per second of the two halves of the block split running at once, as they do: one-row
    CPU matmuls over host weights of `shape` ([out, in], past the CPU's caches) in this thread, and
    pinned host-to-device copies queued on a side stream (the copy engine needs no thread); each
    measured while the other runs, since both draw on the host's memory. Medians over `repeats`.
    `ready`, if given, is called once the buffers exist, just before the timing (where ranks that
    share the machine meet, so that they measure at once).
    Returns {"cpu_Bps", "copy_Bps", "fraction"}: the accelerator's share of the bytes at which both
    take equally long, copy_Bps / (cpu_Bps + copy_Bps) (``balance_share`` with nothing else to do)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device={device}: measuring copy bandwidth needs a CUDA device")
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        total = _past_caches() if nbytes is None else nbytes
        one = math.prod(shape) * dtype.itemsize
        weights = [torch.empty(shape, dtype=dtype).fill_(1.0 / shape[1]) for _ in range(max(1, total // one))]
        src = torch.empty(len(weights) * one, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(one, dtype=torch.uint8, device=device)
        x, stream = torch.ones(1, shape[1], dtype=dtype), torch.cuda.Stream(device)
        cpu, copy = [], []
        if ready is not None:
            ready()
        for _ in range(repeats + 1):  # the first: warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                for k in range(len(weights)):
                    dst.copy_(src[k * one:(k + 1) * one], non_blocking=True)
                end.record(stream)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for w in weights:
                    F.linear(x, w)
            cpu.append(len(weights) * one / (time.perf_counter() - t0))
            end.synchronize()
            copy.append(len(weights) * one / (start.elapsed_time(end) / 1000))
        cpu_bps, copy_bps = statistics.median(cpu[1:]), statistics.median(copy[1:])
        return {"cpu_Bps": cpu_bps, "copy_Bps": copy_bps, "fraction": copy_bps / (cpu_bps + copy_bps)}
    finally:
        torch.set_num_threads(old)
        weights = src = dst = None
        _give_back_cuda_memory()


def _give_back_cuda_memory() -> None:
    """Cached device memory and pinned host memory (torch keeps both for reuse) go back to the
    system: a start-up measurement's buffers must not count against the rank's budgets."""
    torch.cuda.empty_cache()
    getattr(torch._C, "_host_emptyCache", lambda: None)()


def _past_caches() -> int:
    """Bytes of weights that a walk must touch so that the CPU's caches cannot hold them: twice
    the largest cache Linux reports (hosts with a 300 MB L3 exist), at least 512 MB."""
    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(f) as fh:
            text = fh.read().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max([512 << 20, *(2 * s for s in sizes)])


def _synthetic_blocks(blocks: list[dict[str, tuple[int, int]]], dtype: torch.dtype, pin: bool,
                      min_bytes: int, max_copies: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Host blocks of these projection shapes, repeated until they hold `min_bytes` (more than the
    CPU's caches) or `max_copies` times (the model's layers: a small model's walk is as short as
    its own); weights 1/in, so that activations of ones stay ones."""
    unit = sum(math.prod(s) * dtype.itemsize for b in blocks for s in b.values())
    copies = max(1, math.ceil(min_bytes / max(unit, 1)))
    out = []
    for _ in range(copies if max_copies is None else max(1, min(copies, max_copies))):
        for b in blocks:
            out.append({n: torch.empty(s, dtype=dtype, pin_memory=pin).fill_(1.0 / s[1]) for n, s in b.items()})
    return out


def _synthetic_pass(sp: Splitter, blocks: list[dict[str, torch.Tensor]], x: torch.Tensor) -> float:
    """Seconds for one walk over `blocks` as forward.py walks host blocks: input from the host,
    next block queued, stages in order (each stage's first output is the next stage's input),
    output back to the host."""
    t0 = time.perf_counter()
    for i, w in enumerate(blocks):
        ws = sp.weights(i, w)
        sp.upcoming((i + 1) % len(blocks), blocks[(i + 1) % len(blocks)])
        h = x.to(sp.device)
        for stage in STAGES:
            names = [f"{p}.weight" for p in stage if f"{p}.weight" in ws]
            if names:
                h = [ws[n](h) for n in names][0]
        h.to("cpu")
        sp.finish(i)
    return time.perf_counter() - t0


def time_split(device: torch.device, dtype: torch.dtype, blocks: list[dict[str, torch.Tensor]], ratio: float,
               slots: int = 3, threads: int | None = None, passes: int = 3, counters: dict | None = None) -> float:
    """Median seconds per walk over host `blocks` split at `ratio` (after one warm-up walk);
    `counters`, if given, gets the Splitter's counters per walk."""
    slot = max(share_bytes([(n, tuple(t.shape), t.dtype) for n, t in b.items()], ratio)[0] for b in blocks)
    x = torch.ones(1, blocks[0][_order(blocks[0])[0]].shape[1], dtype=dtype)  # the residual stream's width
    with torch.inference_mode(), Splitter(device, ratio, slot, slots, threads) as sp:
        _synthetic_pass(sp, blocks, x)
        sp.counters = dict.fromkeys(SPLIT_COUNTERS, 0.0)
        seconds = statistics.median(_synthetic_pass(sp, blocks, x) for _ in range(passes))
        if counters is not None:
            counters.update({k: v / passes for k, v in sp.counters.items()})
        return seconds


def calibrate(device: torch.device, dtype: torch.dtype, blocks: list[dict[str, tuple[int, int]]],
              threads: int | None = None, slots: int = 3, min_bytes: int | None = None, passes: int = 3,
              max_copies: int | None = None) -> dict:
    """The ratio at which the split path runs fastest on this machine, found by timing it: host
    blocks of these projection shapes ({"q_proj.weight": (out, in), ...}: one attention and one FFN
    block of the rank), repeated past `min_bytes` (default: twice the largest CPU cache) but at most
    `max_copies` times (the rank's layers), walked at ratios 0, 0.1, ..., 1, then at
    +-0.05 and +-0.025 around the best. Returns {"ratio", "ms": {ratio: ms per walk}, "bytes"}."""
    device = torch.device(device)
    host = _synthetic_blocks(blocks, dtype, device.type == "cuda", _past_caches() if min_bytes is None else min_bytes,
                             max_copies)
    ms: dict[float, float] = {}

    def at(r: float) -> float:
        r = round(min(1.0, max(0.0, r)), 3)
        if r not in ms:
            ms[r] = 1000 * time_split(device, dtype, host, r, slots, threads, passes)
        return ms[r]

    for r in (i / 10 for i in range(11)):
        at(r)
    for step in (0.05, 0.025):
        best = min(ms, key=ms.get)
        at(best - step), at(best + step)
    nbytes = sum(t.nbytes for b in host for t in b.values())
    host.clear()
    if device.type == "cuda":  # the synthetic blocks' pinned memory and the ring go back
        _give_back_cuda_memory()
    return {"ratio": min(ms, key=ms.get), "ms": dict(sorted(ms.items())), "bytes": nbytes}
