"""A worker's end of the cluster: one socket to the master, and its side of the control channel.

Owns: ``Spoke``, a worker's ``Communicator``: one DEALER connected to the master (CURVE when keys
are given; libzmq heartbeats notice a silent master; reconnects with back-off while the master is
away), joining (membership.join), the control messages a worker receives (``receive``: steps,
frees, cancels, statistics requests; PEERS builds the collective the master chose and ECHO is sent
straight back, both handled here), what it sends besides partials (statistics, errors, goodbye),
and the collective: the star's worker side (star.py) or the ring, tree or gloo that PEERS named.
Every allreduce goes through one ``CallTimer``. Does not know: the model, tokenizers.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from tpi.comm import collectives, membership
from tpi.comm.base import CommError, MasterLost, Shutdown, StepAborted
from tpi.comm.links import Links
from tpi.comm.security import secure_client
from tpi.comm.star import SpokeStar, heartbeat_socket
from tpi.comm.trace import CallTimer
from tpi.comm.wire import Expect, Kind, Message, Tag, WireError, decode, encode
from tpi.options import CommOptions
from tpi.stats import RankStats

log = logging.getLogger("tpi.comm")


class Spoke:
    """A worker's side of the star: one DEALER connected to the master."""

    def __init__(self, master: str, rank: int, world_size: int, digest: str, hidden: int, dtype: torch.dtype,
                 num_layers: int, opts: CommOptions | None = None, links: Links | None = None, compute: str = "",
                 prefill_chunk: int = 512):
        """`links`: this rank's bound point-to-point link, its address sent in HELLO, for a ring or
        tree collective should the master choose one (tpi/comm/collectives.py); `compute`: this
        rank's compute mode on quantized weights and `prefill_chunk`, which must be the master's."""
        opts = opts or CommOptions()
        self.rank, self.world_size, self.step_timeout = rank, world_size, opts.step_timeout
        self.links, self.collective, self.payload = links, None, None
        self.require = opts.collective  # a collective this worker insists on (None: the master's choice)
        self._tag: Tag | None = None  # the collective in flight, for `_watch`
        self._pending: deque[Message] = deque()  # control messages that came while a collective waited
        self.master, self.digest, self.compute, self.prefill_chunk = master, digest, compute, prefill_chunk
        self.star = SpokeStar(self)
        self.timing = CallTimer(rank)
        self.ctx = zmq.Context()
        self.sock = heartbeat_socket(self.ctx, zmq.DEALER, opts.lost_timeout)
        self.sock.setsockopt(zmq.IDENTITY, membership.identity(rank))
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 31)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # back off up to 2 s while the master is away
        if opts.curve is not None:
            secure_client(self.sock, opts.curve)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(master)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.expect = Expect(frozenset({Kind.WELCOME, Kind.REFUSE, Kind.STEP, Kind.REDUCED, Kind.FREE,
                                        Kind.CANCEL, Kind.SHUTDOWN, Kind.PING, Kind.STATS, Kind.PEERS,
                                        Kind.ECHO}), hidden, dtype, max_layer=num_layers)

    def join(self, timeout: float | None) -> None:
        """Say HELLO until the master welcomes us (membership.join); disconnects from before that
        welcome are history."""
        hello = encode(membership.hello(self.rank, self.digest, self.links.address if self.links else "",
                                        self.compute, self.prefill_chunk))
        membership.join(self.rank, self.master, lambda: self.sock.send_multipart(hello),
                        lambda timeout: self.recv(timeout, joined=False), timeout)
        while self.monitor.poll(0):
            self.monitor.recv_multipart()

    # -- receiving ----------------------------------------------------------------------------------
    def recv(self, timeout: float, joined: bool = True) -> Message | None:
        """The next message within `timeout` (None: nothing, or something refused); once joined,
        a disconnect raises MasterLost."""
        events = dict(self.poller.poll(int(min(timeout, 1.0) * 1000) + 1))
        if self.monitor in events:
            parse_monitor_message(self.monitor.recv_multipart())
            if joined:
                self._shutdown_sent()
                raise MasterLost(f"rank {self.rank}: lost the connection to the master at {self.master}")
        if self.sock not in events:
            return None
        return self.decode(self.sock.recv_multipart(copy=False))

    def decode(self, frames: list) -> Message | None:
        try:
            return decode(frames, self.expect)
        except WireError as e:
            log.warning("rank %d refused a message from the master: %s", self.rank, e)
            return None

    def _shutdown_sent(self) -> None:
        """After a disconnect: a SHUTDOWN the master sent just before it closed may still wait in the
        socket, seen in the same poll as the disconnect; it counts (the worker exits rather than
        waiting to rejoin a master that stopped on purpose)."""
        while self.sock.poll(0):
            msg = self.decode(self.sock.recv_multipart(copy=False))
            if msg is not None and msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")

    def receive(self, timeout: float | None = None) -> Message:
        """Next control message (STEP, FREE, CANCEL, STATS); raises CommError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise CommError(f"rank {self.rank}: nothing from the master within {timeout:.0f}s")
            msg = self._pending.popleft() if self._pending else self.recv(left)
            if msg is not None and msg.kind in (Kind.PEERS, Kind.ECHO):
                self._control(msg)
                continue
            if msg is None or msg.kind in (Kind.PING, Kind.WELCOME, Kind.REDUCED):
                continue  # a REDUCED here is left over from a cancelled step
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")
            return msg

    # -- the allreduce ------------------------------------------------------------------------------
    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        return self.timing.timed(self._reduce, partial, tag)

    def _reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        if self.collective is None:
            return self.star.reduce(partial, tag)
        self._tag = tag
        try:
            return self.collective.all_reduce(partial, tag)
        except (StepAborted, Shutdown, MasterLost):
            raise
        except CommError as e:  # a peer failed: the master fails the step, then sets the collective up anew
            raise StepAborted(f"rank {self.rank}: {e}") from None

    def _control(self, msg: Message) -> None:
        """ECHO: send it straight back. PEERS: build and connect the collective the master chose."""
        if msg.kind == Kind.ECHO:
            self.sock.send_multipart(encode(Message(Kind.ECHO, length=msg.length, tensor=msg.tensor)))
            return
        name, self.payload, addresses = collectives.parse_peers(msg.info, self.world_size)
        collectives.check_choice(self.require, name)
        if self.collective is not None:
            self.collective.close()
        master_host = collectives.host_of(self.master)
        addresses = [collectives.resolve(a, master_host) for a in addresses]
        host = collectives.host_of(self.links.address) if self.links else collectives.route_to(master_host)
        self.collective = collectives.build(name, self.rank, self.world_size, self.payload, self.links, host,
                                           self.step_timeout, self._watch)
        if self.collective is not None:
            self._tag = None
            self.collective.connect(addresses)

    def _watch(self) -> None:
        """Called while a collective waits: the master may cancel the step, stop us, or be gone;
        other control messages wait in `_pending` for `receive`."""
        while True:
            if self.monitor.poll(0):
                parse_monitor_message(self.monitor.recv_multipart())
                self._shutdown_sent()
                raise MasterLost(f"rank {self.rank}: lost the connection to the master at {self.master}")
            if not self.sock.poll(0):
                return
            msg = self.decode(self.sock.recv_multipart(copy=False))
            if msg is None or msg.kind == Kind.PING:
                continue
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")
            if msg.kind in (Kind.CANCEL, Kind.FREE) and self._tag is not None and msg.seq == self._tag.seq:
                raise StepAborted(f"rank {self.rank}: sequence {msg.seq} was cancelled")
            if msg.kind == Kind.ECHO:
                self._control(msg)
            else:
                self._pending.append(msg)

    # -- sending ------------------------------------------------------------------------------------
    def send_stats(self, stats: RankStats) -> None:
        self.sock.send_multipart(encode(Message(Kind.STATS_REPLY, info=stats.to_wire())))

    def send_error(self, text: str) -> None:
        self.sock.send_multipart(encode(Message(Kind.ERROR, info={"message": text[:1000]})))

    def send_bye(self, reason: str) -> None:
        """Tell the master we are leaving, so it fails what we were part of at once."""
        try:
            self.sock.send_multipart(encode(Message(Kind.BYE, info={"reason": reason[:1000]})), zmq.NOBLOCK)
            time.sleep(0.05)  # LINGER is 0: give the I/O thread a moment to write it
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        self.timing.save()
        if self.collective is not None:
            self.collective.close()
        if self.links is not None:
            self.links.close()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()
