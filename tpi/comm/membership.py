"""Who is in the cluster: joining, leaving, being lost, rejoining.

Owns: the master's ``Members`` (each joined worker's connection identity, host and pid, the ranks
lost and why, the collective address each gave in its HELLO) with the join handshake's rules
(protocol version, rank, identity, manifest digest; a repeated HELLO of the same process, and a
new process taking a rank over), and the worker's side of it (``hello`` and ``join``: HELLO,
repeated with back-off, until the master welcomes or refuses). Does not know: sockets (the ends
that own them, hub.py and spoke.py, send what these decide), the allreduce, the model.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from tpi.comm.base import CommError, PeerLost
from tpi.comm.wire import PROTOCOL_VERSION, Kind, Message
from tpi.stats import Health

log = logging.getLogger("tpi.comm")


class Answer(NamedTuple):
    """What a HELLO gets: the reply to send (None: none yet), why it was refused, whether a
    worker joined or rejoined with it."""
    reply: Message | None
    refused: str | None = None
    joined: bool = False


def identity(rank: int) -> bytes:
    """A worker's connection identity on the master's socket."""
    return b"rank%d" % rank


class Members:
    """The workers of a cluster of `world_size` ranks, as the master sees them."""

    def __init__(self, world_size: int, digest: str, compute: str = "", prefill_chunk: int = 512):
        self.world_size, self.digest, self.compute, self.prefill_chunk = world_size, digest, compute, prefill_chunk
        self.peers: dict[bytes, int] = {}  # identity -> rank, after a valid HELLO
        self.hosts: dict[int, str] = {}
        self.pids: dict[int, object] = {}
        self.lost: dict[int, str] = {}  # rank -> why
        self.addresses: dict[int, str] = {}  # worker rank -> its collective address (HELLO "coll")

    def rank_of(self, ident: bytes) -> int | None:
        return self.peers.get(ident)

    def is_lost(self, rank: int) -> bool:
        return rank in self.lost

    def live(self) -> Iterator[tuple[bytes, int]]:
        """(identity, rank) of every joined worker not lost."""
        return ((ident, rank) for ident, rank in list(self.peers.items()) if rank not in self.lost)

    @property
    def joined(self) -> int:
        return len(self.peers)

    @property
    def missing(self) -> list[int]:
        """Worker ranks not connected now: never joined, or lost."""
        joined = set(self.peers.values()) - set(self.lost)
        return sorted(set(range(1, self.world_size)) - joined)

    def health(self) -> Health:
        missing = self.missing
        return Health(self.world_size, tuple(missing), {r: self.lost.get(r, "not joined") for r in missing},
                      {r: pid for r, pid in self.pids.items() if r not in missing and isinstance(pid, int)},
                      dict(self.hosts))

    def welcome(self, ident: bytes, msg: Message) -> Answer:
        """A HELLO from `ident`, answered. A worker that joins (or rejoins) is a member from now on."""
        rank, info = msg.info.get("rank"), msg.info
        reason = None
        if info.get("protocol") != PROTOCOL_VERSION:
            reason = f"protocol version {info.get('protocol')} does not match the master's {PROTOCOL_VERSION}"
        elif not isinstance(rank, int) or not 1 <= rank < self.world_size:
            reason = f"rank {rank!r} is not a worker rank of this cluster (1..{self.world_size - 1})"
        elif ident != identity(rank):
            reason = f"identity {ident!r} does not match rank {rank}"
        elif info.get("digest") != self.digest:
            reason = f"manifest digest {str(info.get('digest'))[:12]} does not match the master's {self.digest[:12]}"
        elif info.get("compute", "") != self.compute:
            reason = (f"rank {rank} computes {info.get('compute')!r} on the quantized weights, the master "
                      f"{self.compute!r}: give every rank the same --compute")
        elif info.get("chunk", 512) != self.prefill_chunk:
            reason = (f"rank {rank} keeps memory for prefill chunks of {info.get('chunk')!r} tokens, the master "
                      f"sends {self.prefill_chunk}: give every rank the same --prefill-chunk")
        if reason:
            return Answer(Message(Kind.REFUSE, info={"reason": reason}), refused=reason)
        if rank in self.peers.values() and rank not in self.lost:
            if self.pids.get(rank) == info.get("pid"):
                return Answer(Message(Kind.WELCOME))  # a repeated HELLO of the same process
            # a new process took the rank over before its predecessor was noticed gone: fail what the
            # old one was part of; the newcomer's next HELLO (it repeats them) finds the rank free
            self.lost[rank] = f"restarted as pid {info.get('pid')}"
            log.warning("rank %d came back as a new process (pid %s); the old one is lost", rank, info.get("pid"))
            return Answer(None)
        self.peers[ident] = rank
        self.hosts[rank] = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
        self.pids[rank] = info.get("pid")
        self.addresses[rank] = str(info.get("coll", ""))
        rejoined = self.lost.pop(rank, None) is not None
        log.log(logging.WARNING if rejoined else logging.INFO, "rank %d %s from %s", rank,
                "rejoined" if rejoined else "joined", self.hosts[rank])
        return Answer(Message(Kind.WELCOME), joined=True)

    def leave(self, rank: int, why: str) -> None:
        """Rank `rank` said BYE."""
        self.lost.setdefault(rank, why)
        log.warning("rank %d (%s) left: %s", rank, self.hosts.get(rank, "?"), why)

    def mark_lost(self, rank: int, why: str) -> None:
        self.lost.setdefault(rank, why)

    def lose(self, rank: int, why: str) -> PeerLost:
        """Mark `rank` lost; the error to raise, naming it and its host."""
        self.lost.setdefault(rank, why)
        return PeerLost(rank, f"worker rank {rank} ({self.hosts.get(rank, '?')}) is lost: {why}")

    def check_alive(self) -> None:
        """Raise PeerLost for the lowest lost rank, if any."""
        if self.lost:
            rank = min(self.lost)
            raise PeerLost(rank, f"worker rank {rank} ({self.hosts.get(rank, '?')}) is lost: {self.lost[rank]}")


def hello(rank: int, digest: str, address: str = "", compute: str = "", prefill_chunk: int = 512) -> Message:
    """A worker's HELLO: its rank, protocol, manifest digest, pid, host, collective address,
    compute mode on quantized weights ("" on floats) and prefill chunk: the last two must be the
    master's."""
    return Message(Kind.HELLO, info={"rank": rank, "protocol": PROTOCOL_VERSION, "digest": digest,
                                     "pid": os.getpid(), "host": socket.gethostname(), "coll": address,
                                     "compute": compute, "chunk": prefill_chunk})


def join(rank: int, master: str, send_hello: Callable[[], None], recv: Callable[[float], Message | None],
         timeout: float | None) -> None:
    """Say HELLO until the master answers (it may start after us, or be restarting); repeated with
    back-off, a note every 10 s; `timeout` None: keep trying until it comes. Returns on WELCOME,
    raises CommError on REFUSE (with the master's reason) or after `timeout`."""
    start = time.monotonic()
    next_hello, pause, note = start, 0.25, start + 10
    while True:
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            raise CommError(f"rank {rank}: no answer from the master at {master} within {timeout:.0f}s")
        if now >= next_hello:
            send_hello()
            next_hello, pause = now + pause, min(pause * 2, 4.0)
        if now >= note:
            log.warning("rank %d: waiting for the master at %s", rank, master)
            note = now + 10
        msg = recv(min(0.25, max(0.0, next_hello - now)))
        if msg is None or msg.kind == Kind.PING:
            continue
        if msg.kind == Kind.REFUSE:
            reason = msg.info.get("reason")
            log.error("rank %d: the master refused us: %s", rank, reason)
            raise CommError(f"rank {rank}: the master refused us: {reason}")
        if msg.kind == Kind.WELCOME:
            return
