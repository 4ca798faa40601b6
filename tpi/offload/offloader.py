"""Host blocks computed on the accelerator from copies, and divided with the CPU by rows.

Owns: ``Offloader``, which runs host blocks' projections (and LM-head chunks) at a share per
block: the CPU computes rows [0, k) from host memory on a worker thread, the accelerator rows
[k, out) from their copy in the ``CopyRing`` (the next blocks' copies run while this one
computes). The block's activations stay on the accelerator: when a projection's input is new, it
is fetched to the host once and every projection that takes it (q/k/v, gate/up) starts at once,
both halves: their CPU rows back to back on the worker, their accelerator rows queued (so that
the ring frees up as soon as their copies land); each call then lands its CPU rows in the same
output (small asynchronous copies through pinned buffers: on an H200 host they wait ~3 us
behind a weight copy, so they need no path of their own). Its ``linear`` is the matmul the
model's math is handed for an offloaded block (layers.py takes a ``linear``), and
``offload_step`` is the one step of an offloaded block. With the accelerator set to the CPU the
same path runs on the CPU, which is how CI tests it. Does not know: which blocks live where or
which comes next (blocks.py decides), the model math, the network.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tpi.offload.plan import PROJECTIONS, gpu_rows, is_projection
from tpi.offload.ring import CopyRing, HostRing

# projections that take the same input, in order of use; the first one's output feeds the next group
STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",), ("lm_head",))
# seconds: the worker computing CPU rows; the launching thread waiting for an input, for CPU rows
OFFLOAD_COUNTERS = ("cpu_s", "wait_input_s", "wait_cpu_s")
HOST_BUFFERS = 8  # pinned buffers for the CPU's rows: a stage's (at most 3) and the next stage's


def _stage(name: str) -> tuple[str, ...]:
    base = name.rsplit(".", 1)[0]
    return next(s for s in STAGES if base in s)


def _order(w: Mapping[str, torch.Tensor]) -> list[str]:
    """A block's projection weights in the order layers.py uses them."""
    return [f"{p}.weight" for p in PROJECTIONS if f"{p}.weight" in w]


@dataclass
class _RowSplit:
    """A projection W [out, in] whose rows [0, k) the CPU computes from host memory and rows
    [k, out) the accelerator, from their copy in the ring."""
    item: tuple  # (block key, weight name)
    weight: torch.Tensor  # host memory
    bias: torch.Tensor | None
    k: int
    dev_bias: torch.Tensor | None  # the accelerator's rows of the bias, kept there


@dataclass
class _Job:
    """One projection on one input, started: the accelerator's rows queued into out[:, k:], the
    CPU's on the worker into `host`, to land in out[:, :k]."""
    out: torch.Tensor  # [L, out] on the accelerator
    k: int
    future: Future | None  # the worker's seconds, once `host` holds the CPU's rows
    entry: int  # in the result ring
    host: torch.Tensor | None  # [L, k], pinned


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


class Offloader:
    """Runs host blocks on `device` at `share` (the accelerator's share of every projection's
    output rows), or at a share of their own (`shares`: 0, the caller computes that block on the
    CPU whole and nothing of it is queued; 1, all of it from the copy).

    ``weights(key, w)`` queues block `key`'s copies (unless ``upcoming`` queued them ahead) and
    gives its tensors for the model's math: norms and bias shares on the accelerator (small: they
    stay after their first use), projections as they are, computed by ``linear``;
    ``upcoming(key, w)`` queues a later block's copies, so that they start while this block
    computes; ``finish(key)`` says the block is queued on the compute stream. The CPU's rows run
    on one worker thread with `threads` torch threads (default: this thread's count, less one with
    an accelerator, whose launches need a core). ``close`` (or ``with``) stops the worker and lets
    go of the ring."""

    def __init__(self, device: str | torch.device, share: float, slot_bytes: int, slots: int = 3,
                 threads: int | None = None, shares: Mapping[Hashable, float] | None = None):
        for r in (share, *(shares or {}).values()):
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"offload share={r}: expected a number in [0, 1]")
        self.shares = dict(shares or {})  # block key -> its own share (blocks mode: 0 or 1); others: `share`
        self.copies = share > 0 or any(r > 0 for r in self.shares.values())  # False: nothing is ever copied
        self.device, self.share = torch.device(device), share
        self.cuda = self.device.type == "cuda"
        threads = threads or torch.get_num_threads()
        self.threads = max(1, threads - 1) if self.cuda and threads > 2 else threads
        self.ring = CopyRing(self.device, slot_bytes, slots)
        self._blocks: deque[Hashable] = deque()  # blocks whose projections are queued, in order of use
        self._small: dict[tuple, torch.Tensor] = {}  # (block key, name) -> norm or bias share on device
        self._current: dict[str, _RowSplit] = {}  # the block weights() gave last, by weight name
        self._pool = self._worker()
        self._inputs = HostRing(2, self.device)  # a projection input fetched to the host
        self._results = HostRing(HOST_BUFFERS, self.device)  # the CPU's rows
        self._fetched = torch.cuda.Event() if self.cuda else None
        self._x: torch.Tensor | None = None  # the input whose stage is under way
        self._xh: torch.Tensor | None = None  # its host copy
        self._jobs: dict[tuple, _Job] = {}  # item -> its projection on _x, started
        self.counters = dict.fromkeys(OFFLOAD_COUNTERS, 0.0)

    def _worker(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, "tpi-offload-cpu", initializer=torch.set_num_threads, initargs=(self.threads,))

    def share_of(self, key: Hashable) -> float:
        """The accelerator's share of block `key`'s rows."""
        return self.shares.get(key, self.share)

    def on_cpu(self, key: Hashable) -> bool:
        """Block `key` is the CPU's whole (a blocks plan's 0): the caller computes it unsplit, in
        host memory. (The rows mode at share 0 still runs here: its activations stay on the
        accelerator.)"""
        return self.shares.get(key) == 0.0

    @property
    def slot_bytes(self) -> int:
        return self.ring.slot_bytes

    @property
    def nbytes(self) -> int:
        return self.ring.nbytes

    def set_threads(self, threads: int) -> None:
        """Torch threads of the worker that computes the CPU's rows (a new worker)."""
        self._drain()
        self._pool.shutdown(wait=True)
        self.threads = max(1, threads)
        self._pool = self._worker()

    def close(self) -> None:
        """Stop the worker and let go of the copy ring and of the blocks it was given: a closed
        Offloader holds no device memory."""
        self._drain()
        self._pool.shutdown(wait=True)
        for held in (self._current, self._jobs, self._small, self._blocks):
            held.clear()
        self.ring.close()

    def __enter__(self) -> Offloader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queueing ----------------------------------------------------------------------------------
    def upcoming(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        """Block `key` runs after the queued ones: start copying its share when the ring has room."""
        if key not in self._blocks and not self.on_cpu(key):
            self._queue(key, w)

    def _queue(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> None:
        self._blocks.append(key)
        share = self.share_of(key)
        for name in _order(w):
            rows = gpu_rows(w[name].shape[0], share)
            if rows:
                self.ring.queue((key, name), w[name][w[name].shape[0] - rows:])  # the last rows: contiguous

    def _reset(self) -> None:
        """Forget what was queued (an abandoned step, a block out of the expected order)."""
        self._drain()
        self._blocks.clear()
        self.ring.restart()

    def _resident(self, key: Hashable, name: str, t: torch.Tensor) -> torch.Tensor:
        """A norm or a bias share on the accelerator, copied at first use and kept (they are small)."""
        if (key, name) not in self._small:
            self._small[(key, name)] = t.to(self.device, non_blocking=True).clone()
        return self._small[(key, name)]

    def weights(self, key: Hashable, w: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block `key`'s tensors for the model's math with ``linear``: its copies queued, norms on
        the accelerator, projection weights as given (``linear`` adds their biases)."""
        if not self._blocks or self._blocks[0] != key:
            self._reset()
            self._queue(key, w)
        out: dict[str, torch.Tensor] = {}
        self._current = {}
        for name, t in w.items():
            if not is_projection(name):
                out[name] = self._resident(key, name, t)
                continue
            if not name.endswith(".weight"):
                continue  # a bias: its rows go with the weight's, in ``linear``
            out[name] = t
            base = name.rsplit(".", 1)[0]
            bias = w.get(f"{base}.bias")
            rows = gpu_rows(t.shape[0], self.share_of(key))
            dev_bias = None
            if bias is not None and rows:
                dev_bias = self._resident(key, f"{base}.bias", bias[len(bias) - rows:])
            self._current[name] = _RowSplit((key, name), t, bias, t.shape[0] - rows, dev_bias)
        return out

    def linear(self, x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """Projection `name` of the block ``weights`` gave last, on x [L, in] on the accelerator
        -> [L, out] there (bias included)."""
        sw = self._current[f"{name}.weight"]
        if sw.k == 0 and sw.item not in self._jobs:  # all on the accelerator (share 1)
            rows, span = self.ring.take(sw.item, sw.weight)
            y = F.linear(x, rows, sw.dev_bias)
            self.ring.release(span)
            return y
        return self._land(self._begin(sw, x))

    def finish(self, key: Hashable) -> None:
        """Block `key` is queued on the compute stream."""
        if self._blocks and self._blocks[0] == key:
            self._blocks.popleft()
        self._drain()

    # -- the CPU's rows ----------------------------------------------------------------------------
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

    def _start(self, sw: _RowSplit, x: torch.Tensor, xh: torch.Tensor) -> _Job:
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
            rows, span = self.ring.take(sw.item, sw.weight[k:])
            if sw.dev_bias is None:
                torch.mm(x, rows.t(), out=out[:, k:])
            else:
                torch.addmm(sw.dev_bias, x, rows.t(), out=out[:, k:])
            self.ring.release(span)
        return _Job(out, k, future, entry, host)

    def _begin(self, sw: _RowSplit, x: torch.Tensor) -> _Job:
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

    def _land(self, job: _Job) -> torch.Tensor:
        """The projection's output [L, out] on the accelerator: waits for the CPU's rows and queues
        their copy into it on the compute stream."""
        if job.future is not None:
            t0 = time.perf_counter()
            self.counters["cpu_s"] += job.future.result()
            self.counters["wait_cpu_s"] += time.perf_counter() - t0
            job.out[:, :job.k].copy_(job.host, non_blocking=self.cuda)
            self._results.used(job.entry)
        return job.out


def offload_step(off: Offloader, key: Hashable, x: torch.Tensor, cpu_w: Mapping | None, gpu_w: Mapping,
                 run: Callable, join: Callable, prefetch: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One host block through the offload, x and the result on the CPU: the accelerator's part
    (`gpu_w`) queued first (`prefetch` then queues the next blocks' copies), then the CPU's part
    (`cpu_w`, if any: a block the blocks mode divides by columns) computed here from host memory
    while the accelerator computes, and the two joined. `run(x, w, linear)` is the block's math."""
    weights = off.weights(key, gpu_w)  # queues the copies, unless already queued
    prefetch()
    y = run(x.to(off.device), weights, off.linear)  # activations stay on the GPU; only the CPU's rows travel
    c = None if cpu_w is None else run(x, cpu_w)  # while the GPU computes its part
    y = y.to(x.device)
    off.finish(key)
    return y if c is None else join(c, y)
