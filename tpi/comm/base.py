"""The small interface every communication backend implements, and the one-rank no-op.

Owns: the ``Communicator`` protocol (``all_reduce``, ``broadcast``, ``receive``, ``close``) and
the errors a backend raises. Does not know: sockets (each backend has its own file), the model.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tpi.comm.wire import Message, Tag


class CommError(RuntimeError):
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
    rank: int
    world_size: int
    allreduce_s: float  # time spent in all_reduce since start
    allreduce_calls: int

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        """Sum of every rank's `partial` for the collective `tag`; every rank gets the same bytes.
        The caller hands `partial` over: the sum may be `partial` itself, overwritten (SingleRank
        returns it; the star sums a float32 partial in its own memory)."""
        ...

    def broadcast(self, msg: Message, check: bool = True) -> None:
        """Master: send a control message (a step's hidden state, free, cancel) to every worker;
        `check=False` sends to the workers still there without raising for a lost one."""
        ...

    def receive(self, timeout: float | None = None) -> Message:
        """Worker: the next control message from the master."""
        ...

    def close(self) -> None: ...


class SingleRank:
    """World size 1: the sum of one partial is the partial; nothing to send."""

    rank, world_size = 0, 1
    allreduce_s = 0.0
    allreduce_calls = 0

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return partial

    def broadcast(self, msg: Message, check: bool = True) -> None:
        pass

    def receive(self, timeout: float | None = None) -> Message:
        raise CommError("a single rank receives nothing")

    def close(self) -> None:
        pass
