"""Per-call timing of a rank's allreduces, for measuring communication apart from compute.

Owns: ``CallTimer``, which every rank's communicator runs each allreduce through (its count and
seconds, whatever the collective), and ``CommTrace``, a bounded in-memory record of every
allreduce a rank makes (the collective's tag, the rows reduced, and when the call began and
returned, on ``time.perf_counter``: the system's monotonic clock, the same for every process of
one machine and its network namespaces), written to ``<dir>/rank<R>.npy`` when the rank's
communicator closes; ``from_env`` turns it on for every rank a process starts when
``TPI_COMM_TRACE=<dir>`` is set; ``load`` and ``per_call`` read the files back. ``per_call``
gives each allreduce's communication time as the time from the moment the last rank entered it
until the last rank had the sum: what the collective adds to the critical path, whatever the
ranks' compute skew. Off (``None``) by default: nothing is recorded. Does not know: sockets,
which collective ran, the model.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("tpi.comm")
ENV = "TPI_COMM_TRACE"
FIELDS = ("seq", "step", "layer", "phase", "rows", "t_enter", "t_exit")


class CommTrace:
    """Up to `capacity` calls of one rank; later calls are counted in `dropped`, not kept."""

    def __init__(self, rank: int, directory: str | os.PathLike, capacity: int = 1 << 18):
        self.rank, self.path = rank, Path(directory) / f"rank{rank}.npy"
        self.rows = np.zeros((capacity, len(FIELDS)), dtype=np.float64)
        self.n = self.dropped = 0

    def add(self, tag: tuple, rows: int, t_enter: float, t_exit: float) -> None:
        if self.n < len(self.rows):
            self.rows[self.n] = (*tag, rows, t_enter, t_exit)
            self.n += 1
        else:
            self.dropped += 1

    def save(self) -> Path | None:
        """Write the record; a folder that cannot be written is logged, never raised (this runs
        while a communicator closes, which must finish)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.save(self.path, self.rows[:self.n])
        except OSError as e:
            log.warning("rank %d: could not write its allreduce trace to %s: %s", self.rank, self.path, e)
            return None
        if self.dropped:
            log.warning("rank %d: its allreduce trace kept the first %d calls and dropped %d", self.rank, self.n,
                        self.dropped)
        return self.path


def from_env(rank: int) -> CommTrace | None:
    directory = os.environ.get(ENV)
    return CommTrace(rank, directory) if directory else None


class CallTimer:
    """Every allreduce of one rank, whatever collective runs it: the count and the seconds spent,
    and with ``TPI_COMM_TRACE`` set each call's tag, rows, entry and exit (``save`` writes them).
    ``timed(reduce, partial, tag)`` runs one call and counts it."""

    def __init__(self, rank: int):
        self.seconds, self.calls = 0.0, 0
        self.trace = from_env(rank)

    def timed(self, reduce, partial, tag: tuple):
        t0 = time.perf_counter()
        try:
            return reduce(partial, tag)
        finally:
            t1 = time.perf_counter()
            self.seconds += t1 - t0
            self.calls += 1
            if self.trace is not None:
                self.trace.add(tag, partial.shape[0], t0, t1)

    def save(self) -> None:
        if self.trace is not None:
            self.trace.save()


def load(directory: str | os.PathLike, world_size: int) -> list[np.ndarray]:
    """Every rank's record, [calls, len(FIELDS)] each; a missing file names the rank."""
    out = []
    for rank in range(world_size):
        path = Path(directory) / f"rank{rank}.npy"
        if not path.exists():
            raise FileNotFoundError(f"no allreduce trace of rank {rank} at {path}")
        out.append(np.load(path))
    return out


def per_call(traces: list[np.ndarray]) -> dict[tuple[int, int, int, int], tuple[int, float, float]]:
    """(seq, step, layer, phase) -> (rows, when the last rank entered, seconds from then until the
    last rank returned) for every allreduce that all ranks recorded."""
    keyed = []
    for t in traces:
        keyed.append({tuple(int(v) for v in row[:4]): row for row in t})
    common = set(keyed[0]).intersection(*keyed[1:])
    out = {}
    for key in common:
        rows = [k[key] for k in keyed]
        last_in = max(r[5] for r in rows)
        out[key] = (int(rows[0][4]), last_in, max(r[6] for r in rows) - last_in)
    return out


def per_token(calls: dict[tuple[int, int, int, int], tuple[int, float, float]], start: float = float("-inf"),
              end: float = float("inf")) -> list[float]:
    """Seconds of communication of each decode step (one row) that began in [start, end): the sum
    of its allreduces' `per_call` times."""
    steps: dict[tuple[int, int], float] = {}
    for (seq, step, _, _), (rows, last_in, secs) in calls.items():
        if rows == 1 and start <= last_in < end:
            steps[seq, step] = steps.get((seq, step), 0.0) + secs
    return list(steps.values())
