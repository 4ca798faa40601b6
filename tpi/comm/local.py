"""Every rank in one process, one thread each: the allreduce and the control channel without sockets.

Owns: ``LocalGroup``, which gives rank 0 a ``LocalHub`` (a ``Communicator`` and ``ControlPlane``)
and each worker a ``LocalSpoke`` (a ``Communicator`` and the worker's side of the control
channel): control messages go through queues, and the allreduce meets at a barrier where the last
rank to arrive sums the partials in float32 in rank order, rank 0's first, as the star does, so
that every rank gets the same bytes and a star cluster's results are reproduced bit for bit. It
separates "the math is wrong" from "the transport is wrong", and costs no processes. Does not
know: sockets, the model (the caller runs the engine on rank 0 and ``worker.serve_one`` on the
others).
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from tpi.comm.base import CommError, Shutdown
from tpi.comm.trace import CallTimer
from tpi.comm.wire import Kind, Message, Tag
from tpi.stats import Health, RankStats


class _Barrier:
    """The ranks' partials of one allreduce, summed by the last to arrive."""

    def __init__(self, world_size: int, timeout: float):
        self.world_size, self.timeout = world_size, timeout
        self.cond = threading.Condition()
        self.parts: dict[int, tuple[Tag, torch.Tensor]] = {}
        self.sum: torch.Tensor | None = None
        self.round = 0
        self.broken: str | None = None

    def reduce(self, rank: int, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        with self.cond:
            if self.broken:
                raise CommError(self.broken)
            mine = self.round
            self.parts[rank] = (tag, partial)
            if len(self.parts) == self.world_size:
                self._sum()
            deadline = time.monotonic() + self.timeout
            while self.round == mine and not self.broken:
                if not self.cond.wait(deadline - time.monotonic()):
                    self.broken = f"rank {rank}: the other ranks did not reach the allreduce of {tag}"
                    self.cond.notify_all()
            if self.round == mine:  # this allreduce never completed (one that did counts, closed or not)
                raise CommError(self.broken)
            return self.sum

    def _sum(self) -> None:
        tags = {tag for tag, _ in self.parts.values()}
        if len(tags) != 1:
            self.broken = f"ranks reduced different collectives at once: {sorted(tags)}"
        else:
            first = self.parts[0][1]
            acc = first.to(torch.float32, copy=True)  # [L, D], rank 0 first
            for r in range(1, self.world_size):
                acc += self.parts[r][1].float()
            self.sum = acc.to(first.dtype)
        self.parts = {}
        self.round += 1
        self.cond.notify_all()

    def abort(self, why: str) -> None:
        with self.cond:
            self.broken = why
            self.cond.notify_all()


class LocalGroup:
    """The communicators of `world_size` ranks in this process: ``hub`` for rank 0, ``spoke(r)``."""

    def __init__(self, world_size: int, step_timeout: float = 60.0):
        self.world_size, self.step_timeout = world_size, step_timeout
        self.barrier = _Barrier(world_size, step_timeout)
        self.inboxes = [queue.Queue() for _ in range(world_size)]  # rank -> its control messages (0: replies)
        self.hub = LocalHub(self)
        self.spokes = {r: LocalSpoke(self, r) for r in range(1, world_size)}


class LocalHub:
    """Rank 0's end: the allreduce, and control messages to the workers' queues."""

    rank = 0
    address: str | None = None
    refused = 0

    def __init__(self, group: LocalGroup):
        self.group, self.world_size = group, group.world_size
        self.timing = CallTimer(0)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return self.timing.timed(lambda p, t: self.group.barrier.reduce(0, p, t), partial, tag)

    def broadcast(self, msg: Message, check: bool = True) -> None:
        for r in range(1, self.world_size):
            self.group.inboxes[r].put(msg)

    def wait_for_workers(self, timeout: float, check=None) -> None:
        pass  # the workers' threads are started with the group

    def poll_idle(self, timeout: float = 0.0) -> None:
        pass

    def health(self) -> Health:
        return Health(self.world_size)

    def gather_stats(self, timeout: float = 10.0) -> list[RankStats]:
        self.broadcast(Message(Kind.STATS))
        got = {}
        for _ in range(1, self.world_size):
            try:
                stats = self.group.inboxes[0].get(timeout=timeout)
            except queue.Empty:
                raise CommError(f"no statistics from the workers within {timeout:.0f}s") from None
            got[stats.rank] = stats
        return [got[r] for r in sorted(got)]

    def close(self) -> None:
        self.group.barrier.abort("the group is closed")
        self.broadcast(Message(Kind.SHUTDOWN))
        self.timing.save()


class LocalSpoke:
    """A worker's end: its queue of control messages, the allreduce, its replies to rank 0."""

    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size
        self.timing = CallTimer(rank)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return self.timing.timed(lambda p, t: self.group.barrier.reduce(self.rank, p, t), partial, tag)

    def receive(self, timeout: float | None = None) -> Message:
        try:
            msg = self.group.inboxes[self.rank].get(timeout=timeout)
        except queue.Empty:
            raise CommError(f"rank {self.rank}: nothing from the master within {timeout}s") from None
        if msg.kind == Kind.SHUTDOWN:
            raise Shutdown(f"rank {self.rank}: the master asked us to stop")
        return msg

    def send_stats(self, stats: RankStats) -> None:
        self.group.inboxes[0].put(stats)

    def send_error(self, text: str) -> None:
        self.group.barrier.abort(f"rank {self.rank} failed: {text}")

    def close(self) -> None:
        self.timing.save()
