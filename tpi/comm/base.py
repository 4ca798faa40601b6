"""The small interface every communication backend implements, and the one-rank no-op.

Owns: the ``Communicator`` protocol (``all_reduce``, ``close``: what the layer loop needs), the
``ControlPlane`` protocol (the master's side beside it: ``broadcast``, ``wait_for_workers``,
``poll_idle``, ``health``, ``gather_stats``), ``WorkerChannel`` (a worker's side: ``receive``,
``send_stats``, ``send_error``), ``SingleRank`` (a world of one) and the errors a backend
raises. Does not know: sockets (each backend has its own file), the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from tpi.comm.trace import CallTimer
from tpi.comm.wire import Message, Tag
from tpi.errors import TpiError
from tpi.stats import Health, RankStats


class CommError(TpiError, RuntimeError):
    """Communication failed: a peer is lost, silent past the timeout, or broke the protocol."""


class PeerLost(CommError):
    """A specific rank disconnected or stopped answering; the message names it and its host."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


class StepAborted(CommError):
    """The master cancelled the step in flight (worker side)."""


class MasterLost(CommError):
    """The connection to the master broke (worker side): it died, hung, or the network went."""


class Shutdown(CommError):
    """The master asked this worker to exit (worker side)."""


class Communicator(Protocol):
    """What the layer loop needs: the allreduce. Every call is counted by `timing`."""

    rank: int
    world_size: int
    timing: CallTimer  # every allreduce's count and seconds (and its trace with TPI_COMM_TRACE)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        """Sum of every rank's `partial` for the collective `tag`; every rank gets the same bytes.
        The caller hands `partial` over: the sum may be `partial` itself, overwritten (SingleRank
        returns it; the star sums a float32 partial in its own memory)."""
        ...

    def close(self) -> None: ...


class ControlPlane(Protocol):
    """The master's hold on its workers, beside the allreduce: steps and cancellations out,
    joins, health and statistics in."""

    address: str | None  # where workers connect (None: no workers)
    refused: int  # messages refused and logged: malformed, from strangers, bad joins or shard requests

    def broadcast(self, msg: Message, check: bool = True) -> None:
        """Send a control message (a step's hidden state, free, cancel) to every worker; `check`
        False sends to the workers still there without raising for a lost one."""
        ...

    def wait_for_workers(self, timeout: float, check: Callable[[], None] | None = None) -> None:
        """Block until every worker has joined; `check` is called while waiting."""
        ...

    def poll_idle(self, timeout: float = 0.0) -> None:
        """Between requests: answer joins, rejoins and shard requests, notice lost workers."""
        ...

    def health(self) -> Health: ...

    def gather_stats(self, timeout: float = 10.0) -> list[RankStats]:
        """Each worker's statistics, in rank order, asked for and awaited with a timeout."""
        ...


class WorkerChannel(Protocol):
    """A worker's side beside the allreduce: control messages in, statistics and errors out."""

    rank: int
    timing: CallTimer

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor: ...

    def receive(self, timeout: float | None = None) -> Message:
        """The next STEP, FREE, CANCEL or STATS; CommError when none came within `timeout`,
        Shutdown when the master asked this worker to stop."""
        ...

    def send_stats(self, stats: RankStats) -> None: ...

    def send_error(self, text: str) -> None: ...


class SingleRank:
    """World size 1: the sum of one partial is the partial; nothing to send, nobody to wait for."""

    rank, world_size = 0, 1
    address: str | None = None
    refused = 0

    def __init__(self) -> None:
        self.timing = CallTimer(0)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return partial

    def broadcast(self, msg: Message, check: bool = True) -> None:
        pass

    def wait_for_workers(self, timeout: float, check: Callable[[], None] | None = None) -> None:
        pass

    def poll_idle(self, timeout: float = 0.0) -> None:
        pass

    def health(self) -> Health:
        return Health(1)

    def gather_stats(self, timeout: float = 10.0) -> list[RankStats]:
        return []

    def close(self) -> None:
        self.timing.save()
