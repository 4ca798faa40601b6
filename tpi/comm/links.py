"""Point-to-point links between ranks, for the collectives that are not a star (ring, tree).

Owns: each rank's one bound PULL socket (port 0 allowed: ``address`` says which port it got),
PUSH sockets to the peers it sends to, the joining handshake (every rank says HELLO to the
peers it sends to and waits for HELLO from the peers it receives from), and the data message:
a fixed 40-byte binary header (magic and version, kind, payload code, sender, receiver, world
size, the collective's tag, its round, the byte count) followed by one raw frame. Nothing is
pickled. A receive names what it expects and checks it by comparing the header's bytes with the
expected header's bytes (one comparison refuses any wrong kind, sender, tag, round, payload or
size); the frame lands in a caller's preallocated buffer (``recv_into``), and its size is checked
too. A message from a step abandoned earlier is dropped; anything malformed is logged and dropped.
Every receive and send has a timeout; a `check` callback runs while waiting so that an owner can
notice a lost peer. Does not know: the reduction, the model, payload layouts.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable

import torch
import zmq

from tpi.comm.base import CommError, PeerLost
from tpi.comm.wire import Tag

log = logging.getLogger("tpi.comm")

MAGIC = b"TPL1"
HEADER = struct.Struct("<4sBBHHHQQIBBHI")  # magic kind payload src dst world seq step layer phase - round nbytes
HELLO, DATA = 1, 2
RCVMORE = zmq.RCVMORE
SLICE_S = 0.2  # a wait longer than this calls `check` between slices
FIELDS = ("magic", "kind", "payload", "src", "dst", "world", "seq", "step", "layer", "phase", "pad", "round",
          "nbytes")


class Links:
    """One rank's end of its point-to-point links. `connect` takes every rank's `address`."""

    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", timeout: float = 60.0,
                 check: Callable[[], None] | None = None, advertise: str | None = None, max_frame: int = 1 << 31):
        """Bind on `host` (an interface, 0.0.0.0 for all) at a port the OS picks; `address` names
        `advertise` (the host peers reach us at) instead of `host` when given. A frame over
        `max_frame` bytes closes its connection before anything is buffered."""
        if not 0 <= rank < world_size:
            raise CommError(f"rank {rank} is outside the world of {world_size} ranks")
        self.rank, self.world_size, self.timeout, self.check = rank, world_size, timeout, check
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVTIMEO, int(SLICE_S * 1000))
        self.pull.setsockopt(zmq.MAXMSGSIZE, max_frame)
        self.pull.bind(f"tcp://{host}:0")
        self.address = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
        if advertise is not None:
            self.address = f"tcp://{advertise}:{self.address.rsplit(':', 1)[1]}"
        self.push: dict[int, zmq.Socket] = {}
        self._hdr = bytearray(HEADER.size + 1)  # one byte more: a longer header shows as a size mismatch
        self._hdr_view = memoryview(self._hdr)
        self._size = 0
        self._stash: deque[tuple[bytes, bytes]] = deque()  # data that came while joining

    # -- joining -------------------------------------------------------------------------------
    def connect(self, addresses: list[str], send_to: Iterable[int], receive_from: Iterable[int],
                timeout: float | None = None) -> None:
        """Connect to the peers in `send_to` and wait until every rank in `receive_from` has said HELLO."""
        if len(addresses) != self.world_size:
            raise CommError(f"got {len(addresses)} addresses for a world of {self.world_size} ranks")
        for s in self.push.values():  # a new set-up (a rank rejoined): new connections
            s.close(0)
        self.push, self._stash = {}, deque()
        for peer in send_to:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            s.connect(addresses[peer])
            self.push[peer] = s
        for peer in self.push:
            self._send_header(peer, HELLO, 0, Tag(0, 0, 0, 0), 0, 0)
        waiting = set(receive_from)
        deadline = time.monotonic() + (timeout or self.timeout)
        while waiting:
            src = self._next_header(deadline, "HELLO", waiting)
            raw = HEADER.unpack_from(self._hdr)
            if raw[0] == MAGIC and raw[1] == HELLO and raw[4] == self.rank and raw[5] == self.world_size:
                waiting.discard(src)
            elif raw[0] == MAGIC and raw[1] == DATA and self.pull.getsockopt(RCVMORE):
                # a peer that finished joining already sent the first collective's data: keep it
                self._stash.append((bytes(self._hdr_view[:self._size]), self.pull.recv()))
            else:
                log.warning("rank %d dropped a message while joining: %s", self.rank, _describe(raw))
            self._drain()

    # -- data ----------------------------------------------------------------------------------
    def expected(self, src: int, payload: int, tag: Tag, rnd: int, nbytes: int) -> bytes:
        """The exact header bytes of the data message `src` must send us for (tag, round)."""
        return HEADER.pack(MAGIC, DATA, payload, src, self.rank, self.world_size, tag.seq, tag.step, tag.layer,
                           tag.phase, 0, rnd, nbytes)

    def send(self, dst: int, payload: int, tag: Tag, rnd: int, data: torch.Tensor | memoryview) -> None:
        """Send one data message (header + raw bytes of `data`) to rank `dst`."""
        buf = data if isinstance(data, memoryview) else _memory(data)
        self._send_header(dst, DATA, payload, tag, rnd, len(buf), more=True)
        try:
            self.push[dst].send(buf)  # copied: the caller may reuse its buffer at once
        except zmq.Again:
            raise PeerLost(dst, f"rank {self.rank}: rank {dst} took no data for {self.timeout:.0f}s") from None

    def recv(self, expect: dict[int, bytes], into: dict[int, memoryview]) -> int:
        """Receive the next valid data message from one of the ranks in `expect` (rank -> expected
        header) into `into[rank]`; return that rank. Stale or malformed messages are dropped."""
        while self._stash:
            src = self._from_stash(expect, into)
            if src is not None:
                return src
        deadline = time.monotonic() + self.timeout
        while True:
            src = self._next_header(deadline, "data", expect)
            want = expect.get(src)
            n = len(want) if want is not None else -1
            more = self.pull.getsockopt(RCVMORE)
            if want is not None and self._size == n and self._hdr_view[:n] == want and more:
                got = self.pull.recv_into(into[src])
                if got == len(into[src]) and not self.pull.getsockopt(RCVMORE):
                    return src
                log.warning("rank %d dropped a %d-byte frame from rank %d: expected %d bytes", self.rank, got,
                            src, len(into[src]))
            else:
                self._refuse(want)
            self._drain()

    # -- internals -----------------------------------------------------------------------------
    def _send_header(self, dst: int, kind: int, payload: int, tag: Tag, rnd: int, nbytes: int,
                     more: bool = False) -> None:
        header = HEADER.pack(MAGIC, kind, payload, self.rank, dst, self.world_size, tag.seq, tag.step, tag.layer,
                             tag.phase, 0, rnd, nbytes)
        try:
            self.push[dst].send(header, zmq.SNDMORE if more else 0)
        except zmq.Again:
            raise PeerLost(dst, f"rank {self.rank}: rank {dst} took nothing for {self.timeout:.0f}s") from None

    def _from_stash(self, expect: dict[int, bytes], into: dict[int, memoryview]) -> int | None:
        header, data = self._stash.popleft()
        src = int.from_bytes(header[6:8], "little")
        if expect.get(src) == header and len(data) == len(into[src]):
            into[src][:] = data
            return src
        self._hdr_view[:len(header)] = header
        self._size = len(header)
        self._refuse(expect.get(src))
        return None

    def _next_header(self, deadline: float, what: str, peers: Iterable[int]) -> int:
        """Block until a message starts; read its header frame into self._hdr; return its sender
        field (-1 if the header is too short to have one)."""
        while True:
            try:
                self._size = self.pull.recv_into(self._hdr_view)
                break
            except zmq.Again:
                if self.check is not None:
                    self.check()
                if time.monotonic() > deadline:
                    peers = sorted(peers)
                    raise PeerLost(peers[0], f"rank {self.rank}: no {what} from rank(s) {peers} "
                                            f"within {self.timeout:.0f}s") from None
        if self._size < 8:
            return -1
        return int.from_bytes(self._hdr[6:8], "little")

    def _refuse(self, want: bytes | None) -> None:
        if self._size != HEADER.size:
            log.warning("rank %d dropped a message with a %d-byte header", self.rank, self._size)
            return
        raw = HEADER.unpack_from(self._hdr)
        if want is not None and raw[0] == MAGIC and raw[1] == DATA:
            exp = HEADER.unpack(want)
            if raw[6:10] != exp[6:10]:
                log.debug("rank %d dropped a stale message (tag %s)", self.rank, raw[6:10])
                return
            diff = [f"{f}={raw[i]!r} (expected {exp[i]!r})" for i, f in enumerate(FIELDS) if raw[i] != exp[i]]
            log.warning("rank %d refused a message: %s", self.rank, ", ".join(diff) or "no data frame")
            return
        log.warning("rank %d refused a message: %s", self.rank, _describe(raw))

    def _drain(self) -> None:
        while self.pull.getsockopt(RCVMORE):
            self.pull.recv(copy=False)

    def close(self) -> None:
        for s in self.push.values():
            s.close(0)
        self.pull.close(0)
        self.ctx.term()


def _memory(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _describe(raw: tuple) -> str:
    return ", ".join(f"{f}={v!r}" for f, v in zip(FIELDS, raw) if f != "pad")
