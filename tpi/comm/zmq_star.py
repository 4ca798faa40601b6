"""Star allreduce over ZeroMQ: workers send partials to the master, which sums and sends back.

Owns: the master's ROUTER socket and each worker's DEALER socket, the join handshake (rank,
protocol version, manifest digest), the star allreduce (sum in float32 in fixed rank order, rank
0's partial first, then one tensor back to everyone), receive timeouts, and noticing a lost peer
(a disconnect seen by the socket monitor is traced to a rank by probing each worker). Does not
know: the model, generation, tokenizers. Messages are checked by ``wire.decode``; anything that
fails is logged and dropped, never raised into the model from a stranger's frame. The allreduce's
hot path checks a partial or a sum by comparing its binary header with the exact bytes expected
(kind, tag, dtype, shape: one comparison) and its frame's size, and reads the tensor where ZeroMQ
put it; anything else still goes through ``wire.decode``. Every call's time is counted
(``allreduce_s``) and, with ``TPI_COMM_TRACE`` set, recorded (trace.py). With a ring, tree or gloo
collective (see collectives.py, set up by a PEERS message before the first step) the star carries
the control messages only and hands ``all_reduce`` to that collective.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from tpi.comm import collectives, trace, wire
from tpi.comm.base import CommError, MasterLost, PeerLost, Shutdown, StepAborted
from tpi.comm.cost import Link, choose, measure_link
from tpi.comm.links import Links
from tpi.comm.payload import Payload
from tpi.comm.security import Curve, secure_client, secure_server
from tpi.comm.wire import PROTOCOL_VERSION, Expect, Kind, Message, Tag, WireError, decode, encode
from tpi.config import ConfigError


class FileServer(Protocol):
    def answer(self, msg: Message) -> Message: ...


log = logging.getLogger("tpi.comm")
HOT_WAIT_MS = 200  # the allreduce blocks in recv this long before it looks at disconnects and deadlines
RCVMORE, SNDMORE = int(zmq.RCVMORE), int(zmq.SNDMORE)  # plain ints: no enum arithmetic per call
PARTIAL, REDUCED = int(Kind.PARTIAL), int(Kind.REDUCED)


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


def _drain(sock: zmq.Socket) -> list[zmq.Frame]:
    """The rest of a multipart message whose first frames were read."""
    rest = []
    while sock.getsockopt(RCVMORE):
        rest.append(sock.recv(copy=False))
    return rest


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (any dtype; numpy has no bfloat16)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def _tensor_from(data: np.ndarray, payload: Payload | None, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Received bytes (a fresh or a kept buffer, uint8) as a tensor of `dtype` and `shape`."""
    raw = torch.from_numpy(data)
    if payload is None:
        return raw.view(dtype).view(shape)
    return payload.decode(raw, shape.numel()).view(shape).to(dtype)


class _F32Views:
    """numpy views [L, D] of contiguous float32 CPU tensors' memory, kept by address and shape.

    The star's float32 hot path sends a partial from, and receives the sum into, the partial's
    own memory. ``Tensor.numpy()`` would give that memory too, but at the cold-cache cost of every
    Python operation between two allreduces (the model's compute in between evicts everything)
    it was the largest part of what the star spent beyond a bare pyzmq star: ~50 µs a call on this
    machine, against ~25 µs for the few attribute reads below. A view does not keep its memory
    alive: it is only used while the caller's tensor, which owns that memory, is in the call (the
    model's partials come from the allocator's same few addresses, so the dict stays small)."""

    def __init__(self, capacity: int = 64):
        self._views: dict[tuple[int, int, int], np.ndarray] = {}
        self.capacity = capacity

    def get(self, t: torch.Tensor) -> np.ndarray | None:
        """t's memory, or None when t is not a contiguous 2-d float32 CPU tensor."""
        if t.dtype is not torch.float32 or not t.is_cpu or t.dim() != 2 or not t.is_contiguous():
            return None
        rows, cols = t.shape
        key = (t.data_ptr(), rows, cols)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.capacity:
                self._views.clear()
            n = rows * cols
            view = np.ctypeslib.as_array((ctypes.c_float * n).from_address(key[0])).reshape(rows, cols) if n else \
                np.empty((rows, cols), dtype=np.float32)
            self._views[key] = view
        return view


def _to_wire(acc: torch.Tensor, payload: Payload | None, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """The sum as every rank will have it (the payload's rounding included) and its bytes."""
    if payload is None:
        out = acc.to(dtype)
        return out, _bytes_of(out)
    data = payload.encode(acc.reshape(-1))
    return payload.decode(data, acc.numel()).view(acc.shape).to(dtype), data.numpy()


class StarMaster:
    """Rank 0's side of the star. `bind` may name port 0; `address` gives the port chosen."""

    rank = 0

    def __init__(self, bind: str, world_size: int, digest: str, hidden: int, dtype: torch.dtype,
                 num_layers: int, step_timeout: float = 60.0, files: FileServer | None = None,
                 lost_timeout: float = 3.0, curve: Curve | None = None, collective: str = "star",
                 payload: str | None = None):
        self.world_size, self.digest, self.step_timeout = world_size, digest, step_timeout
        self.payload = collectives.check_options(collective, payload)  # None: partials in the model's dtype
        if curve is not None and collective != "star":
            raise ConfigError(f"collective {collective!r} runs over links without CURVE: use the star with keys")
        self.collective_name, self.chosen, self.collective = collective, "star", None
        self.hidden, self.dtype = hidden, dtype
        self._coll_links: Links | None = None
        self._coll_addr: dict[int, str] = {}  # worker rank -> its collective address (HELLO "coll")
        self._coll_stale = collective != "star" or payload is not None  # set up before the next step
        self._rx_store: dict[int, np.ndarray] = {}  # worker rank -> receive buffer for its partials
        self._rx: dict[int, np.ndarray] = {}
        self._rx32: dict[int, np.ndarray] = {}
        self._rx_key: tuple = ()
        self._f32 = _F32Views()  # float32 partials are summed in place, in their own memory
        self.files = files  # answers workers that fetch their shards before joining
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.ROUTER, lost_timeout)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises, not drops
        # a frame is at most a prefill chunk's partial (512 rows; 1024 rows of 8 bytes leaves room):
        # a stranger cannot make the master buffer gigabytes before anything checks them. Below
        # 64 MiB frames reach tpi, which refuses and logs them; above, libzmq drops the connection
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(64 << 20, 1024 * hidden * 8))
        self.sock.setsockopt(zmq.RCVTIMEO, HOT_WAIT_MS)  # only the allreduce's hot path blocks in recv
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
        self.trace = trace.from_env(self.rank)  # TPI_COMM_TRACE=<dir>: every call's timing, saved at close
        self.expect = Expect(frozenset({Kind.HELLO, Kind.PARTIAL, Kind.ERROR, Kind.STATS_REPLY, Kind.GET_MANIFEST,
                                        Kind.GET_CHUNK, Kind.BYE, Kind.ECHO}), hidden, dtype, max_layer=num_layers)

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
        self._coll_addr[rank] = str(info.get("coll", ""))
        self._coll_stale = self.collective_name != "star" or self.payload is not None
        rejoined = self.lost.pop(rank, None) is not None
        self._send(ident, Message(Kind.WELCOME))
        log.log(logging.WARNING if rejoined else logging.INFO, "rank %d %s from %s", rank,
                "rejoined" if rejoined else "joined", self.hosts[rank])

    # -- the collective ------------------------------------------------------------------------
    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            if self.collective is not None:
                try:
                    return self.collective.all_reduce(partial, tag)
                except CommError:
                    self._coll_stale = True  # set it up anew before the next step
                    self._blame()
                    raise
            return self._star_all_reduce(partial, tag)
        finally:
            t1 = time.perf_counter()
            self.allreduce_s += t1 - t0
            self.allreduce_calls += 1
            if self.trace is not None:
                self.trace.add(tag, partial.shape[0], t0, t1)

    def _star_all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        """Sum in float32 in fixed rank order, rank 0 first, each worker's partial added as soon as
        it and every lower rank's are in; then the sum, encoded once, to every worker. A float32
        partial is summed in place: the sum is `partial` itself (no copy, no new tensor)."""
        self._check_alive()
        sink = self._f32.get(partial) if self.payload is None else None  # [L, D], partial's own memory
        in_place = sink is not None
        if in_place:
            label, length, hidden = "float32", *sink.shape
        else:
            label = self.payload.label if self.payload else wire.DTYPE_NAMES[partial.dtype]
            length, hidden = partial.shape
            sink = partial.to(torch.float32, memory_format=torch.contiguous_format, copy=True).numpy()  # [L, D]
        want = wire.tensor_header(PARTIAL, tag, length, label, hidden)  # kind, tag, dtype, shape
        nbytes = sink.nbytes if in_place else self.payload.nbytes(sink.size) if self.payload else partial.nbytes
        rx, rx32 = self._rx_buffers(nbytes, length, hidden)
        header = wire.tensor_header(REDUCED, tag, length, label, hidden)
        arrived: set[int] = set()
        nxt, deadline = 1, time.monotonic() + self.step_timeout
        while nxt < self.world_size:
            rank = self._recv_partial(want, rx, nxt, arrived, tag, deadline)
            if rank is not None:
                arrived.add(rank)
            while nxt in arrived:  # fixed rank order: deterministic bytes
                if label == "float32":
                    np.add(sink, rx32[nxt], out=sink)
                else:
                    np.add(sink, _tensor_from(rx[nxt], self.payload, partial.dtype, partial.shape).float().numpy(),
                           out=sink)
                nxt += 1
        if label != "float32":
            out, body = _to_wire(torch.from_numpy(sink), self.payload, partial.dtype)
        elif in_place:
            out, body = partial, sink
        else:  # a non-contiguous float32 partial, or a 16-bit model with float32 partials on the wire
            out, body = torch.from_numpy(sink).to(partial.dtype), sink
        self._send_sum(header, body)
        self._check_alive()
        return out

    def _send_sum(self, header: bytes, body: np.ndarray) -> None:
        """The sum to every worker still here: identity, header, tensor. The tensor is one ZeroMQ
        message that every send shares (ZeroMQ counts references): copied once (the sum is the
        caller's tensor now), not once per worker."""
        sock, frame = self.sock, zmq.Frame(body, copy=True)
        for ident, rank in self.peers.items():
            if rank not in self.lost:
                try:
                    sock.send(ident, SNDMORE)  # ROUTER_MANDATORY: a gone peer raises here, nothing is sent
                    sock.send(header, SNDMORE)
                    sock.send(frame)
                except zmq.ZMQError as e:
                    self.lost.setdefault(rank, f"connection closed ({e.strerror})")

    def _recv_partial(self, want: bytes, rx: dict[int, np.ndarray], nxt: int, arrived: set[int], tag: Tag,
                      deadline: float) -> int | None:
        """Receive one message. A partial of this step from a worker still awaited lands in that
        rank's buffer and its rank is returned; anything else is handled off the hot path."""
        sock = self.sock
        try:
            ident = sock.recv()
        except zmq.Again:  # quiet for HOT_WAIT_MS: disconnects, probes, the deadline
            self._off_path(None, tag, rx, nxt, arrived, deadline)
            return None
        rank, head = self.peers.get(ident), None
        if rank is not None and nxt <= rank and rank not in arrived:  # ROUTER: an identity has a frame after it
            head = sock.recv()
            if head == want and sock.getsockopt(RCVMORE) and rank not in self.lost:
                got = sock.recv_into(rx[rank])  # a third frame, if any, is refused as a message of its own
                if got == len(rx[rank]):
                    return rank
                self.refused += 1
                log.warning("refused a partial from rank %d: %d bytes, expected %d", rank, got, len(rx[rank]))
                return None
        frames = [zmq.Frame(ident), *([] if head is None else [zmq.Frame(head)]), *_drain(sock)]
        self._off_path(frames, tag, rx, nxt, arrived, deadline)
        return None

    def _off_path(self, frames: list | None, tag: Tag, rx: dict[int, np.ndarray], nxt: int, arrived: set[int],
                  deadline: float) -> None:
        """Anything but a well-formed partial of this step, or a quiet spell: the full decode,
        disconnects and probes, the deadline."""
        got: dict[int, torch.Tensor] = {}
        if frames:
            self._dispatch(frames, tag, got)
        else:
            self._poll_once(0, tag, got)
        for r, t in got.items():  # a partial that only the full decode accepted
            if r >= nxt and r not in arrived:
                rx[r][:] = _bytes_of(t)
                arrived.add(r)
        self._check_alive()
        if time.monotonic() > deadline:
            silent = sorted(set(range(nxt, self.world_size)) - arrived)
            raise self._lose(silent[0], f"sent no partial for layer {tag.layer} within {self.step_timeout:.0f}s")

    def _rx_buffers(self, nbytes: int, length: int, hidden: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Each worker's receive buffer of `nbytes` (uint8) and, for float32, the same memory as
        [length, hidden]; kept between calls, grown when a step needs more."""
        key = (nbytes, length, hidden)
        if self._rx_key != key:
            if not self._rx_store or any(len(b) < nbytes for b in self._rx_store.values()):
                self._rx_store = {r: np.empty(nbytes, dtype=np.uint8) for r in range(1, self.world_size)}
            self._rx = {r: b[:nbytes] for r, b in self._rx_store.items()}
            whole = nbytes == 4 * length * hidden
            self._rx32 = {r: b.view(np.float32).reshape(length, hidden) for r, b in self._rx.items()} if whole else {}
            self._rx_key = key
        return self._rx, self._rx32

    # -- a collective other than the star, or a payload other than the model's dtype -------------
    def _setup_collective(self) -> None:
        """Before the first step after a (re)join: choose the collective (`auto`: by the cost model
        from measured links), send every worker PEERS (the choice, the payload, each rank's address
        for it), and connect. Workers build theirs on PEERS, before the STEP that follows."""
        self._close_collective()
        name, n = self.collective_name, self.hidden
        if name == "auto":
            link = self._measure()
            nbytes = self.payload.nbytes(n) if self.payload else n * self.dtype.itemsize  # one token's hidden state
            name = choose(self.world_size, nbytes, link)
            log.warning("collective auto: %s for links of %.0f us and %.3g GB/s", name, link.alpha_s * 1e6,
                        link.bandwidth / 1e9)
        addresses = [""] * self.world_size
        if name in collectives.LINKED:
            missing = [r for r in range(1, self.world_size) if not self._coll_addr.get(r)]
            if missing:
                raise CommError(f"worker rank(s) {missing} have no link for the {name} collective "
                                "(started with --collective star?)")
            if self._coll_links is None:
                host = collectives.host_of(self.address)
                wild = host in ("0.0.0.0", "*", "::")
                self._coll_links = Links(0, self.world_size, host, self.step_timeout,
                                         advertise=collectives.ANY_HOST if wild else None,
                                         max_frame=collectives.max_frame(self.hidden))
            addresses = [self._coll_links.address] + [self._coll_addr[r] for r in range(1, self.world_size)]
        peer = collectives.host_of(self._coll_addr.get(1, "")) if self._coll_addr.get(1) else ""
        host = collectives.route_to(peer) if peer else collectives.host_of(self.address)
        self.collective = collectives.build(name, 0, self.world_size, self.payload, self._coll_links, host,
                                           self.step_timeout, self._watch)
        if name == "gloo":
            addresses = [self.collective.address] * self.world_size
        self.broadcast(Message(Kind.PEERS, info=collectives.peers_info(name, self.payload, addresses)))
        if self.collective is not None:
            self.collective.connect(addresses)
        self.chosen, self._coll_stale = name, False

    def _blame(self) -> None:
        """A collective failed: if the star notices a lost worker within a second, raise that (it names
        the rank and its host) rather than the collective's own error."""
        deadline = time.monotonic() + 1.0
        while not self.lost and time.monotonic() < deadline:
            self._poll_once(0.05, None, {})
        self._check_alive()

    def _watch(self) -> None:
        """Called while a collective waits: notice lost workers and their errors."""
        self._poll_once(0, None, {})
        self._check_alive()

    def _measure(self) -> Link:
        """The slowest worker link: alpha and bandwidth fitted from ECHO round trips of one hidden
        row and of about 512 KiB (tpi/comm/cost.py)."""
        row = self.hidden * self.dtype.itemsize
        large = max(2, (1 << 19) // row)
        alpha, bandwidth = 0.0, float("inf")
        for ident, rank in list(self.peers.items()):
            if rank not in self.lost:
                link = measure_link(lambda k, i=ident, r=rank: self._echo(i, r, max(1, k // row)), small=row,
                                    large=large * row, repeats=10)
                alpha, bandwidth = max(alpha, link.alpha_s), min(bandwidth, link.bandwidth)
        return Link(alpha, bandwidth)

    def _echo(self, ident: bytes, rank: int, rows: int) -> float:
        """Seconds for `rows` hidden rows to go to worker `rank` and come back."""
        msg = Message(Kind.ECHO, length=rows, tensor=torch.zeros(rows, self.hidden, dtype=self.dtype))
        t0 = time.perf_counter()
        self._send(ident, msg)
        deadline = time.monotonic() + self.step_timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                self._check_alive()
                continue
            frames = self.sock.recv_multipart(copy=False)
            if self.peers.get(frames[0].bytes) == rank:
                try:
                    msg = decode(frames[1:], self.expect)
                    if msg.kind == Kind.ECHO and msg.length == rows:
                        return time.perf_counter() - t0
                except WireError:
                    pass
            self._dispatch(frames, None, {}, idle=True)
        raise self._lose(rank, f"did not answer a link measurement within {self.step_timeout:.0f}s")

    def _close_collective(self) -> None:
        if self.collective is not None:
            self.collective.close()
            self.collective = None

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
        self._dispatch(self.sock.recv_multipart(copy=False), tag, parts, idle)
        return True

    def _dispatch(self, frames: list, tag: Tag | None, parts: dict[int, torch.Tensor], idle: bool = False) -> None:
        """Handle one message of any kind, decoded and checked in full."""
        ident, body = frames[0].bytes, frames[1:]
        try:
            msg = decode(body, self.expect)
        except WireError as e:
            self.refused += 1
            log.warning("refused a message from %r: %s", ident[:32], e)
            return
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
        elif msg.kind == Kind.ECHO:
            log.info("dropped a late link measurement from rank %d", rank)
        elif tag is None or msg.tag != tag or rank in parts:
            log.log(logging.INFO if idle else logging.WARNING, "dropped a stale or out-of-order partial from rank "
                    "%d: %s, expected %s", rank, msg.tag, tag)
        else:
            parts[rank] = msg.tensor

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

    def _send(self, ident: bytes, msg: Message | list, quiet: bool = False) -> None:
        try:
            self.sock.send_multipart([ident, *(encode(msg) if isinstance(msg, Message) else msg)], copy=False)
        except zmq.ZMQError as e:
            rank = self.peers.get(ident)
            if rank is not None:
                self.lost.setdefault(rank, f"connection closed ({e.strerror})")
            if not quiet:
                self._check_alive()

    def broadcast(self, msg: Message, check: bool = True) -> None:
        """Send to every worker; with `check`, raise PeerLost first if one is lost (a step cannot run),
        without it send to those still there (a CANCEL after a failure)."""
        if msg.kind == Kind.STEP and self._coll_stale:
            self._setup_collective()
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
        if self.trace is not None:
            self.trace.save()
        for ident in list(self.peers):
            self._send(ident, Message(Kind.SHUTDOWN), quiet=True)
        self._close_collective()
        if self._coll_links is not None:
            self._coll_links.close()
        self.monitor.close(0)
        self.sock.close(500 if self.peers else 0)  # let the SHUTDOWNs out: else a worker sees a lost master
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class StarWorker:
    """A worker's side of the star: one DEALER connected to the master."""

    def __init__(self, master: str, rank: int, world_size: int, digest: str, hidden: int,
                 dtype: torch.dtype, num_layers: int, step_timeout: float = 60.0, lost_timeout: float = 3.0,
                 curve: Curve | None = None, links: Links | None = None):
        """`links`: this rank's bound point-to-point link, its address sent in HELLO, for a ring or
        tree collective should the master choose one (tpi/comm/collectives.py)."""
        self.rank, self.world_size, self.step_timeout = rank, world_size, step_timeout
        self.links, self.collective, self.payload = links, None, None
        self._f32 = _F32Views()  # a float32 partial is sent from, and its sum received into, its own memory
        self.require: str | None = None  # a collective this worker insists on (None: the master's choice)
        self._tag: Tag | None = None  # the collective in flight, for `_watch`
        self._pending: deque[Message] = deque()  # control messages that came while a collective waited
        self.master, self.digest = master, digest
        self.ctx = zmq.Context()
        self.sock = _socket(self.ctx, zmq.DEALER, lost_timeout)
        self.sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 31)
        self.sock.setsockopt(zmq.RCVTIMEO, HOT_WAIT_MS)  # only the allreduce's hot path blocks in recv
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # back off up to 2 s while the master is away
        if curve is not None:
            secure_client(self.sock, curve)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(master)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.expect = Expect(frozenset({Kind.WELCOME, Kind.REFUSE, Kind.STEP, Kind.REDUCED, Kind.FREE,
                                        Kind.CANCEL, Kind.SHUTDOWN, Kind.PING, Kind.STATS, Kind.PEERS,
                                        Kind.ECHO}), hidden, dtype,
                             max_layer=num_layers)
        self.allreduce_s, self.allreduce_calls = 0.0, 0
        self.trace = trace.from_env(self.rank)  # TPI_COMM_TRACE=<dir>: every call's timing, saved at close

    def join(self, timeout: float | None) -> None:
        """Say HELLO until the master answers (it may start after us, or be restarting); repeated
        with back-off, a note every 10 s; `timeout` None: keep trying until it comes."""
        info = {"rank": self.rank, "protocol": PROTOCOL_VERSION, "digest": self.digest,
                "pid": os.getpid(), "host": socket.gethostname(),
                "coll": self.links.address if self.links else ""}
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
                self._shutdown_sent()
                raise MasterLost(f"rank {self.rank}: lost the connection to the master at {self.master}")
        if self.sock not in events:
            return None
        try:
            return decode(self.sock.recv_multipart(copy=False), self.expect)
        except WireError as e:
            log.warning("rank %d refused a message from the master: %s", self.rank, e)
            return None

    def _shutdown_sent(self) -> None:
        """After a disconnect: a SHUTDOWN the master sent just before it closed may still wait in the
        socket, seen in the same poll as the disconnect; it counts (the worker exits rather than
        waiting to rejoin a master that stopped on purpose)."""
        while self.sock.poll(0):
            msg = self._decode(self.sock.recv_multipart(copy=False))
            if msg is not None and msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")

    def receive(self, timeout: float | None = None) -> Message:
        """Next control message (STEP, FREE, CANCEL, SHUTDOWN); raises CommError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise CommError(f"rank {self.rank}: nothing from the master within {timeout:.0f}s")
            msg = self._pending.popleft() if self._pending else self._recv(left)
            if msg is not None and msg.kind in (Kind.PEERS, Kind.ECHO):
                self._control(msg)
                continue
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
            t1 = time.perf_counter()
            self.allreduce_s += t1 - t0
            self.allreduce_calls += 1
            if self.trace is not None:
                self.trace.add(tag, partial.shape[0], t0, t1)

    def _all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        if self.collective is not None:
            self._tag = tag
            try:
                return self.collective.all_reduce(partial, tag)
            except (StepAborted, Shutdown, MasterLost):
                raise
            except CommError as e:  # a peer failed: the master fails the step, then sets the collective up anew
                raise StepAborted(f"rank {self.rank}: {e}") from None
        body = self._f32.get(partial) if self.payload is None else None  # [L, D]: the sum comes back into it
        in_place = body is not None
        if in_place:
            label, (length, hidden) = "float32", body.shape
        else:
            length, hidden = partial.shape
            label = self.payload.label if self.payload else wire.DTYPE_NAMES[partial.dtype]
            if self.payload is not None and label != wire.DTYPE_NAMES[partial.dtype]:
                body = self.payload.encode(partial.reshape(-1).to(torch.float32)).numpy()
            else:
                body = _bytes_of(partial)
        sock = self.sock
        sock.send(wire.tensor_header(PARTIAL, tag, length, label, hidden), SNDMORE)
        sock.send(body, copy=in_place)  # in place, the sum lands in body: ZeroMQ must have its own copy
        want = wire.tensor_header(REDUCED, tag, length, label, hidden)  # the sum comes back the same way
        nbytes = body.nbytes
        out = body if in_place else np.empty(nbytes, dtype=np.uint8)  # in place: partial is sent, not needed
        deadline = time.monotonic() + self.step_timeout
        while True:
            msg = None
            try:
                head = sock.recv()
            except zmq.Again:  # quiet for HOT_WAIT_MS: the master may be gone
                msg = self._recv(0)
            else:
                if head == want:  # only the master reaches this DEALER, and it sends header + tensor
                    got = sock.recv_into(out)
                    if got == nbytes:
                        return partial if in_place else _tensor_from(out, self.payload, partial.dtype, partial.shape)
                    log.warning("rank %d refused a sum of %d bytes, expected %d", self.rank, got, nbytes)
                else:
                    msg = self._decode([zmq.Frame(head), *_drain(sock)])
            if time.monotonic() > deadline:
                raise CommError(f"rank {self.rank}: no sum from the master for layer {tag.layer} "
                                f"within {self.step_timeout:.0f}s")
            if msg is None or msg.kind == Kind.PING:
                continue
            if msg.kind == Kind.REDUCED and msg.tag == tag:
                return msg.tensor
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {self.rank}: the master asked us to stop")
            if msg.kind in (Kind.CANCEL, Kind.FREE) and msg.seq == tag.seq:
                raise StepAborted(f"rank {self.rank}: sequence {tag.seq} was cancelled")
            log.warning("rank %d dropped an unexpected %s during %s", self.rank, msg.kind.name, tag)

    def _decode(self, frames: list) -> Message | None:
        try:
            return decode(frames, self.expect)
        except WireError as e:
            log.warning("rank %d refused a message from the master: %s", self.rank, e)
            return None

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
            msg = self._decode(self.sock.recv_multipart(copy=False))
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
        if self.trace is not None:
            self.trace.save()
        if self.collective is not None:
            self.collective.close()
        if self.links is not None:
            self.links.close()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()
