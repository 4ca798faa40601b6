"""Star allreduce over ZeroMQ: workers send partials to the master, which sums and sends back.

Owns: the master's ROUTER socket and each worker's DEALER socket, the join handshake (rank,
protocol version, manifest digest), the star allreduce (sum in float32 in fixed rank order, rank
0's partial first, then one tensor back to everyone), receive timeouts, and noticing a lost peer
(a disconnect seen by the socket monitor is traced to a rank by probing each worker). Does not
know: the model, generation, tokenizers. Messages are checked by ``wire.decode``; anything that
fails is logged and dropped, never raised into the model from a stranger's frame.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol

import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from tpi.comm.base import CommError, MasterLost, PeerLost, Shutdown, StepAborted
from tpi.comm.security import Curve, secure_client, secure_server
from tpi.comm.wire import PROTOCOL_VERSION, Expect, Kind, Message, Tag, WireError, decode, encode


class FileServer(Protocol):
    def answer(self, msg: Message) -> Message: ...


log = logging.getLogger("tpi.comm")


def _identity(rank: int) -> bytes:
    return b"rank%d" % rank


def _socket(ctx: zmq.Context, kind: int, lost_timeout: float) -> zmq.Socket:
    """A socket whose connections libzmq's own I/O thread keeps alive with ZMTP heartbeats: a peer
    silent for `lost_timeout` seconds (dead, hung, unplugged) is disconnected, whatever Python is
    busy with (a long step, a weight load)."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    ms = max(1, int(lost_timeout * 1000))
    s.setsockopt(zmq.HEARTBEAT_IVL, max(1, ms // 4))
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
    s.setsockopt(zmq.HEARTBEAT_TTL, ms)
    return s


class StarMaster:
    """Rank 0's side of the star. `bind` may name port 0; `address` gives the port chosen."""

    rank = 0

    def __init__(self, bind: str, world_size: int, digest: str, hidden: int, dtype: torch.dtype,
                 num_layers: int, step_timeout: float = 60.0, files: FileServer | None = None,
                 lost_timeout: float = 3.0, curve: Curve | None = None):
        self.world_size, self.digest, self.step_timeout = world_size, digest, step_timeout
        self.files = files  # answers workers that fetch their shards before joining
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.ROUTER, lost_timeout)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises, not drops
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 31)
        self.auth = secure_server(self.ctx, self.sock, curve) if curve else None
        self.sock.bind(bind)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.peers: dict[bytes, int] = {}  # identity -> rank, after a valid HELLO
        self.hosts: dict[int, str] = {}
        self.pids: dict[int, object] = {}
        self.lost: dict[int, str] = {}
        self._probe_until = 0.0  # after a disconnect, probe the workers until this time
        self._stats: dict[int, dict] = {}
        self.refused = 0  # messages refused and logged: malformed, from strangers, bad joins or shard requests
        self.allreduce_s, self.allreduce_calls = 0.0, 0
        self.expect = Expect(frozenset({Kind.HELLO, Kind.PARTIAL, Kind.ERROR, Kind.STATS_REPLY, Kind.GET_MANIFEST,
                                        Kind.GET_CHUNK, Kind.BYE}), hidden, dtype, max_layer=num_layers)

    # -- joining -------------------------------------------------------------------------------
    def wait_for_workers(self, timeout: float, check: Callable[[], None] | None = None) -> None:
        """Block until ranks 1..N-1 have joined; the error names the ranks still missing.
        `check` is called while waiting (e.g. to notice a local worker process that died)."""
        deadline = time.monotonic() + timeout
        note = time.monotonic() + 10
        while len(self.peers) < self.world_size - 1:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            missing = sorted(set(range(1, self.world_size)) - set(self.peers.values()))
            if left <= 0:
                raise CommError(f"timed out after {timeout:.0f}s waiting for worker rank(s) {missing} "
                                f"to join at {self.address}")
            if time.monotonic() > note:
                log.warning("waiting for worker rank(s) %s to join at %s (%.0fs left)", missing, self.address, left)
                note = time.monotonic() + 10
            self._poll_once(left, None, {})

    def _welcome(self, ident: bytes, msg: Message) -> None:
        rank, info = msg.info.get("rank"), msg.info
        reason = None
        if info.get("protocol") != PROTOCOL_VERSION:
            reason = f"protocol version {info.get('protocol')} does not match the master's {PROTOCOL_VERSION}"
        elif not isinstance(rank, int) or not 1 <= rank < self.world_size:
            reason = f"rank {rank!r} is not a worker rank of this cluster (1..{self.world_size - 1})"
        elif ident != _identity(rank):
            reason = f"identity {ident!r} does not match rank {rank}"
        elif info.get("digest") != self.digest:
            reason = f"manifest digest {str(info.get('digest'))[:12]} does not match the master's {self.digest[:12]}"
        if reason:
            self.refused += 1
            log.warning("refused a worker: %s", reason)
            self._send(ident, Message(Kind.REFUSE, info={"reason": reason}), quiet=True)
            return
        if rank in self.peers.values() and rank not in self.lost:
            if self.pids.get(rank) == info.get("pid"):
                self._send(ident, Message(Kind.WELCOME), quiet=True)  # a repeated HELLO of the same process
                return
            # a new process took the rank over before its predecessor was noticed gone: fail what the
            # old one was part of; the newcomer's next HELLO (it repeats them) finds the rank free
            self.lost[rank] = f"restarted as pid {info.get('pid')}"
            log.warning("rank %d came back as a new process (pid %s); the old one is lost", rank, info.get("pid"))
            return
        self.peers[ident] = rank
        self.hosts[rank] = f"{info.get('host', '?')} pid {info.get('pid', '?')}"
        self.pids[rank] = info.get("pid")
        rejoined = self.lost.pop(rank, None) is not None
        self._send(ident, Message(Kind.WELCOME))
        log.log(logging.WARNING if rejoined else logging.INFO, "rank %d %s from %s", rank,
                "rejoined" if rejoined else "joined", self.hosts[rank])

    # -- the collective ------------------------------------------------------------------------
    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        t0 = time.perf_counter()
        parts: dict[int, torch.Tensor] = {0: partial}
        deadline = time.monotonic() + self.step_timeout
        while len(parts) < self.world_size:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                silent = sorted(set(range(1, self.world_size)) - set(parts))
                raise self._lose(silent[0], f"sent no partial for layer {tag.layer} within {self.step_timeout:.0f}s")
            self._poll_once(left, tag, parts)
        acc = parts[0].to(torch.float32, copy=True)
        for r in range(1, self.world_size):  # fixed rank order: deterministic bytes
            acc += parts[r]
        out = acc.to(partial.dtype)
        self.broadcast(Message(Kind.REDUCED, tag.seq, tag.step, tag.layer, tag.phase, length=out.shape[0],
                               tensor=out))
        self.allreduce_s += time.perf_counter() - t0
        self.allreduce_calls += 1
        return out

    def gather_stats(self, timeout: float = 10.0) -> dict[int, dict]:
        """Each worker's counters (rank -> info), asked for and awaited with a timeout."""
        self._stats = {}
        self.broadcast(Message(Kind.STATS))
        deadline = time.monotonic() + timeout
        while len(self._stats) < self.world_size - 1:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.world_size)) - set(self._stats))
                raise CommError(f"no statistics from rank(s) {missing} within {timeout:.0f}s")
            self._poll_once(left, None, {})
        return dict(self._stats)

    def _poll_once(self, timeout: float, tag: Tag | None, parts: dict[int, torch.Tensor], idle: bool = False
                   ) -> bool:
        """Handle at most one message (and any disconnect events); False when nothing came."""
        wait = min(timeout, 0.1 if self._probe_until else 1.0)
        events = dict(self.poller.poll(int(wait * 1000) + 1))
        if self.monitor in events:
            while self.monitor.poll(0):
                parse_monitor_message(self.monitor.recv_multipart())
            self._probe_until = time.monotonic() + 2.0
        if self._probe_until:
            self._probe()
        if self.sock not in events:
            return bool(events)
        frames = self.sock.recv_multipart(copy=False)
        ident, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, self.expect)
        except WireError as e:
            self.refused += 1
            log.warning("refused a message from %r: %s", ident[:32], e)
            return True
        rank = self.peers.get(ident)
        if msg.kind == Kind.HELLO:
            self._welcome(ident, msg)
        elif msg.kind in (Kind.GET_MANIFEST, Kind.GET_CHUNK):
            reply = self.files.answer(msg) if self.files else Message(
                Kind.REFUSE, info={"reason": "this master serves no shard files"})
            if reply.kind == Kind.REFUSE:
                self.refused += 1
                log.warning("refused a shard request from %r: %s", ident[:32], reply.info["reason"])
            self._send(ident, reply, quiet=True)
        elif rank is None:
            self.refused += 1
            log.warning("refused a %s from an unknown peer %r", msg.kind.name, ident[:32])
        elif msg.kind == Kind.BYE:
            why = str(msg.info.get("reason", "left"))
            self.lost.setdefault(rank, why)
            log.warning("rank %d (%s) left: %s", rank, self.hosts[rank], why)
        elif msg.kind == Kind.ERROR and idle:
            log.warning("rank %d (%s) reported: %s", rank, self.hosts[rank], msg.info.get("message", "?"))
        elif msg.kind == Kind.ERROR:
            raise CommError(f"rank {rank} ({self.hosts[rank]}) failed: {msg.info.get('message', '?')}")
        elif msg.kind == Kind.STATS_REPLY:
            self._stats[rank] = msg.info
        elif tag is None or msg.tag != tag or rank in parts:
            log.log(logging.INFO if idle else logging.WARNING, "dropped a stale or out-of-order partial from rank "
                    "%d: %s, expected %s", rank, msg.tag, tag)
        else:
            parts[rank] = msg.tensor
        return True

    def _probe(self) -> None:
        """A connection closed: find out whether it was a worker's. Sending to a peer whose pipe
        libzmq has retired raises (ROUTER_MANDATORY), which marks that rank lost."""
        if time.monotonic() > self._probe_until:
            self._probe_until = 0.0
            return
        for ident, rank in list(self.peers.items()):
            if rank not in self.lost:
                self._send(ident, Message(Kind.PING), quiet=True)

    def _check_alive(self) -> None:
        if self.lost:
            rank = min(self.lost)
            raise PeerLost(rank, f"worker rank {rank} ({self.hosts.get(rank, '?')}) is lost: {self.lost[rank]}")

    def _lose(self, rank: int, why: str) -> PeerLost:
        self.lost.setdefault(rank, why)
        return PeerLost(rank, f"worker rank {rank} ({self.hosts.get(rank, '?')}) is lost: {why}")

    def _send(self, ident: bytes, msg: Message, quiet: bool = False) -> None:
        try:
            self.sock.send_multipart([ident, *encode(msg)], copy=False)
        except zmq.ZMQError as e:
            rank = self.peers.get(ident)
            if rank is not None:
                self.lost.setdefault(rank, f"connection closed ({e.strerror})")
            if not quiet:
                self._check_alive()

    def broadcast(self, msg: Message, check: bool = True) -> None:
        """Send to every worker; with `check`, raise PeerLost first if one is lost (a step cannot run),
        without it send to those still there (a CANCEL after a failure)."""
        if check:
            self._check_alive()
        for ident, rank in self.peers.items():
            if rank not in self.lost:
                self._send(ident, msg, quiet=True)
        if check:
            self._check_alive()

    def poll_idle(self, timeout: float = 0.0) -> None:
        """Between requests: answer joins, rejoins and shard requests, notice lost workers."""
        deadline = time.monotonic() + timeout
        for _ in range(256):
            if not self._poll_once(max(0.0, deadline - time.monotonic()), None, {}, idle=True):
                return

    @property
    def missing(self) -> list[int]:
        """Worker ranks not connected now: never joined, or lost."""
        joined = set(self.peers.values()) - set(self.lost)
        return sorted(set(range(1, self.world_size)) - joined)

    def receive(self, timeout: float | None = None) -> Message:
        raise CommError("the master receives partials only inside all_reduce")

    def close(self) -> None:
        for ident in list(self.peers):
            self._send(ident, Message(Kind.SHUTDOWN), quiet=True)
        self.monitor.close(0)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class StarWorker:
    """A worker's side of the star: one DEALER connected to the master."""

    def __init__(self, master: str, rank: int, world_size: int, digest: str, hidden: int,
                 dtype: torch.dtype, num_layers: int, step_timeout: float = 60.0, lost_timeout: float = 3.0,
                 curve: Curve | None = None):
        self.rank, self.world_size, self.step_timeout = rank, world_size, step_timeout
        self.master, self.digest = master, digest
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.DEALER, lost_timeout)
        self.sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 31)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # back off up to 2 s while the master is away
        if curve is not None:
            secure_client(self.sock, curve)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(master)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.expect = Expect(frozenset({Kind.WELCOME, Kind.REFUSE, Kind.STEP, Kind.REDUCED, Kind.FREE,
                                        Kind.CANCEL, Kind.SHUTDOWN, Kind.PING, Kind.STATS}), hidden, dtype,
                             max_layer=num_layers)
        self.allreduce_s, self.allreduce_calls = 0.0, 0

    def join(self, timeout: float | None) -> None:
        """Say HELLO until the master answers (it may start after us, or be restarting); repeated
        with back-off, a note every 10 s; `timeout` None: keep trying until it comes."""
        info = {"rank": self.rank, "protocol": PROTOCOL_VERSION, "digest": self.digest,
                "pid": os.getpid(), "host": socket.gethostname()}
        start = time.monotonic()
        next_hello, pause, note = start, 0.25, start + 10
        while True:
            now = time.monotonic()
            if timeout is not None and now - start > timeout:
                raise CommError(f"rank {self.rank}: no answer from the master at {self.master} within {timeout:.0f}s")
            if now >= next_hello:
                self.sock.send_multipart(encode(Message(Kind.HELLO, info=info)))
                next_hello, pause = now + pause, min(pause * 2, 4.0)
            if now >= note:
                log.warning("rank %d: waiting for the master at %s", self.rank, self.master)
                note = now + 10
            msg = self._recv(min(0.25, max(0.0, next_hello - now)), joined=False)
            if msg is None or msg.kind == Kind.PING:
                continue
            if msg.kind == Kind.REFUSE:
                reason = msg.info.get("reason")
                log.error("rank %d: the master refused us: %s", self.rank, reason)
                raise CommError(f"rank {self.rank}: the master refused us: {reason}")
            if msg.kind == Kind.WELCOME:
                while self.monitor.poll(0):  # disconnects from before this welcome are history
                    self.monitor.recv_multipart()
                return

    def _recv(self, timeout: float, joined: bool = True) -> Message | None:
        events = dict(self.poller.poll(int(min(timeout, 1.0) * 1000) + 1))
        if self.monitor in events:
            parse_monitor_message(self.monitor.recv_multipart())
            if joined:
                raise MasterLost(f"rank {self.rank}: lost the connection to the master at {self.master}")
        if self.sock not in events:
            return None
        try:
            return decode(self.sock.recv_multipart(copy=False), self.expect)
        except WireError as e:
            log.warning("rank %d refused a message from the master: %s", self.rank, e)
            return None

    def receive(self, timeout: float | None = None) -> Message:
        """Next control message (STEP, FREE, CANCEL, SHUTDOWN); raises CommError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise CommError(f"rank {self.rank}: nothing from the master within {timeout:.0f}s")
            msg = self._recv(left)
            if msg is None or msg.kind in (Kind.PING, Kind.WELCOME, Kind.REDUCED):
                continue  # a REDUCED here is left over from a cancelled step
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")
            return msg

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._all_reduce(partial, tag)
        finally:
            self.allreduce_s += time.perf_counter() - t0
            self.allreduce_calls += 1

    def _all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        self.sock.send_multipart(encode(Message(Kind.PARTIAL, tag.seq, tag.step, tag.layer, tag.phase,
                                                length=partial.shape[0], tensor=partial)), copy=False)
        deadline = time.monotonic() + self.step_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommError(f"rank {self.rank}: no sum from the master for layer {tag.layer} "
                                f"within {self.step_timeout:.0f}s")
            msg = self._recv(left)
            if msg is None or msg.kind == Kind.PING:
                continue
            if msg.kind == Kind.REDUCED and msg.tag == tag:
                return msg.tensor
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")
            if msg.kind in (Kind.CANCEL, Kind.FREE) and msg.seq == tag.seq:
                raise StepAborted(f"rank {self.rank}: sequence {tag.seq} was cancelled")
            log.warning("rank %d dropped an unexpected %s during %s", self.rank, msg.kind.name, tag)

    def broadcast(self, msg: Message) -> None:
        raise CommError("only the master broadcasts")

    def send_stats(self, info: dict) -> None:
        self.sock.send_multipart(encode(Message(Kind.STATS_REPLY, info=info)))

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
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()
