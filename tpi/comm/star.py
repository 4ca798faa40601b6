"""The star allreduce's hot path: workers send partials to the master, which sums and sends back.

Owns: the sum at the master (``HubStar``: float32, in fixed rank order, rank 0's partial first,
each worker's added as soon as it and every lower rank's are in, then one tensor back to every
worker) and a worker's side (``SpokeStar``: its partial out, the sum back into the same memory).
A partial or a sum is checked by comparing its binary header with the exact bytes expected (kind,
tag, dtype, shape: one comparison) and its frame's size, and the tensor is read where ZeroMQ put
it; a float32 partial is sent from, and summed into, its own memory (``F32Views``). Anything else
that arrives during the call goes to the end that owns the socket (hub.py, spoke.py: ``HubEnd``
and ``SpokeEnd`` say what the star needs of them), which decodes it in full. Also the sockets both ends
use (``heartbeat_socket``: heartbeats, and the receive timeout the hot path wakes up at). Does
not know: who may be a member (membership.py), control messages, the model.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Protocol

import numpy as np
import torch
import zmq

from tpi.comm import wire
from tpi.comm.base import CommError, Shutdown, StepAborted
from tpi.comm.membership import Members
from tpi.comm.payload import Payload
from tpi.comm.wire import Kind, Message, Tag

log = logging.getLogger("tpi.comm")
RCVMORE, SNDMORE = int(zmq.RCVMORE), int(zmq.SNDMORE)  # plain ints: no enum arithmetic per call
PARTIAL, REDUCED = int(Kind.PARTIAL), int(Kind.REDUCED)


HOT_WAIT_MS = 200  # the allreduce blocks in recv this long before it looks at disconnects and deadlines


def heartbeat_socket(ctx: zmq.Context, kind: int, lost_timeout: float) -> zmq.Socket:
    """A socket whose connections libzmq's own I/O thread keeps alive with ZMTP heartbeats: a peer
    silent for `lost_timeout` seconds (dead, hung, unplugged) is disconnected, whatever Python is
    busy with (a long step, a weight load)."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    ms = max(1, int(lost_timeout * 1000))
    s.setsockopt(zmq.HEARTBEAT_IVL, max(1, ms // 4))
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
    s.setsockopt(zmq.HEARTBEAT_TTL, ms)
    s.setsockopt(zmq.RCVTIMEO, HOT_WAIT_MS)  # only the allreduce's hot path blocks in recv
    return s


class HubEnd(Protocol):
    """What the master's end of the star needs of the end that owns its socket (hub.py)."""
    sock: zmq.Socket
    members: Members
    payload: Payload | None
    world_size: int
    step_timeout: float

    def handle(self, frames: list | None, tag: Tag | None) -> dict[int, torch.Tensor]: ...

    def refuse(self, what: str) -> None: ...


class SpokeEnd(Protocol):
    """What a worker's end of the star needs of the end that owns its socket (spoke.py)."""
    sock: zmq.Socket
    rank: int
    payload: Payload | None
    step_timeout: float

    def recv(self, timeout: float, joined: bool = True) -> Message | None: ...

    def decode(self, frames: list) -> Message | None: ...


def bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (any dtype; numpy has no bfloat16)."""
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def tensor_from(data: np.ndarray, payload: Payload | None, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """Received bytes (a fresh or a kept buffer, uint8) as a tensor of `dtype` and `shape`."""
    raw = torch.from_numpy(data)
    if payload is None:
        return raw.view(dtype).view(shape)
    return payload.decode(raw, shape.numel()).view(shape).to(dtype)


def drain(sock: zmq.Socket) -> list[zmq.Frame]:
    """The rest of a multipart message whose first frames were read."""
    rest = []
    while sock.getsockopt(RCVMORE):
        rest.append(sock.recv(copy=False))
    return rest


class F32Views:
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
        return out, bytes_of(out)
    data = payload.encode(acc.reshape(-1))
    return payload.decode(data, acc.numel()).view(acc.shape).to(dtype), data.numpy()


class HubStar:
    """The master's end of the star, on the hub's socket."""

    def __init__(self, hub: HubEnd):
        self.hub = hub
        self._rx_store: dict[int, np.ndarray] = {}  # worker rank -> receive buffer for its partials
        self._rx: dict[int, np.ndarray] = {}
        self._rx32: dict[int, np.ndarray] = {}
        self._rx_key: tuple = ()
        self._f32 = F32Views()  # float32 partials are summed in place, in their own memory

    def reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        """Sum in float32 in fixed rank order, rank 0 first, each worker's partial added as soon as
        it and every lower rank's are in; then the sum, encoded once, to every worker. A float32
        partial is summed in place: the sum is `partial` itself (no copy, no new tensor)."""
        hub, payload = self.hub, self.hub.payload
        hub.members.check_alive()
        sink = self._f32.get(partial) if payload is None else None  # [L, D], partial's own memory
        in_place = sink is not None
        if in_place:
            label, length, hidden = "float32", *sink.shape
        else:
            label = payload.label if payload else wire.DTYPE_NAMES[partial.dtype]
            length, hidden = partial.shape
            sink = partial.to(torch.float32, memory_format=torch.contiguous_format, copy=True).numpy()  # [L, D]
        want = wire.tensor_header(PARTIAL, tag, length, label, hidden)  # kind, tag, dtype, shape
        nbytes = sink.nbytes if in_place else payload.nbytes(sink.size) if payload else partial.nbytes
        rx, rx32 = self._buffers(nbytes, length, hidden)
        header = wire.tensor_header(REDUCED, tag, length, label, hidden)
        arrived: set[int] = set()
        nxt, deadline = 1, time.monotonic() + hub.step_timeout
        while nxt < hub.world_size:
            rank = self._recv_partial(want, rx, nxt, arrived, tag, deadline)
            if rank is not None:
                arrived.add(rank)
            while nxt in arrived:  # fixed rank order: deterministic bytes
                if label == "float32":
                    np.add(sink, rx32[nxt], out=sink)
                else:
                    np.add(sink, tensor_from(rx[nxt], payload, partial.dtype, partial.shape).float().numpy(), out=sink)
                nxt += 1
        if label != "float32":
            out, body = _to_wire(torch.from_numpy(sink), payload, partial.dtype)
        elif in_place:
            out, body = partial, sink
        else:  # a non-contiguous float32 partial, or a 16-bit model with float32 partials on the wire
            out, body = torch.from_numpy(sink).to(partial.dtype), sink
        self._send_sum(header, body)
        hub.members.check_alive()
        return out

    def _send_sum(self, header: bytes, body: np.ndarray) -> None:
        """The sum to every worker still here: identity, header, tensor. The tensor is one ZeroMQ
        message that every send shares (ZeroMQ counts references): copied once (the sum is the
        caller's tensor now), not once per worker."""
        sock, frame, members = self.hub.sock, zmq.Frame(body, copy=True), self.hub.members
        for ident, rank in members.live():
            try:
                sock.send(ident, SNDMORE)  # ROUTER_MANDATORY: a gone peer raises here, nothing is sent
                sock.send(header, SNDMORE)
                sock.send(frame)
            except zmq.ZMQError as e:
                members.mark_lost(rank, f"connection closed ({e.strerror})")

    def _recv_partial(self, want: bytes, rx: dict[int, np.ndarray], nxt: int, arrived: set[int], tag: Tag,
                      deadline: float) -> int | None:
        """Receive one message. A partial of this step from a worker still awaited lands in that
        rank's buffer and its rank is returned; anything else is handled off the hot path."""
        hub = self.hub
        sock = hub.sock
        try:
            ident = sock.recv()
        except zmq.Again:  # quiet for the socket's receive timeout: disconnects, probes, the deadline
            self._off_path(None, tag, rx, nxt, arrived, deadline)
            return None
        rank, head = hub.members.rank_of(ident), None
        if rank is not None and nxt <= rank and rank not in arrived:  # ROUTER: an identity has a frame after it
            head = sock.recv()
            if head == want and sock.getsockopt(RCVMORE) and not hub.members.is_lost(rank):
                got = sock.recv_into(rx[rank])  # a third frame, if any, is refused as a message of its own
                if got == len(rx[rank]):
                    return rank
                hub.refuse(f"a partial from rank {rank}: {got} bytes, expected {len(rx[rank])}")
                return None
        frames = [zmq.Frame(ident), *([] if head is None else [zmq.Frame(head)]), *drain(sock)]
        self._off_path(frames, tag, rx, nxt, arrived, deadline)
        return None

    def _off_path(self, frames: list | None, tag: Tag, rx: dict[int, np.ndarray], nxt: int, arrived: set[int],
                  deadline: float) -> None:
        """Anything but a well-formed partial of this step, or a quiet spell: the full decode,
        disconnects and probes, the deadline."""
        hub = self.hub
        for r, t in hub.handle(frames, tag).items():  # a partial that only the full decode accepted
            if r >= nxt and r not in arrived:
                rx[r][:] = bytes_of(t)
                arrived.add(r)
        hub.members.check_alive()
        if time.monotonic() > deadline:
            silent = sorted(set(range(nxt, hub.world_size)) - arrived)
            raise hub.members.lose(silent[0], f"sent no partial for layer {tag.layer} within "
                                              f"{hub.step_timeout:.0f}s")

    def _buffers(self, nbytes: int, length: int, hidden: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Each worker's receive buffer of `nbytes` (uint8) and, for float32, the same memory as
        [length, hidden]; kept between calls, grown when a step needs more."""
        key = (nbytes, length, hidden)
        if self._rx_key != key:
            if not self._rx_store or any(len(b) < nbytes for b in self._rx_store.values()):
                self._rx_store = {r: np.empty(nbytes, dtype=np.uint8) for r in range(1, self.hub.world_size)}
            self._rx = {r: b[:nbytes] for r, b in self._rx_store.items()}
            whole = nbytes == 4 * length * hidden
            self._rx32 = {r: b.view(np.float32).reshape(length, hidden) for r, b in self._rx.items()} if whole else {}
            self._rx_key = key
        return self._rx, self._rx32


class SpokeStar:
    """A worker's end of the star, on the spoke's socket."""

    def __init__(self, spoke: SpokeEnd):
        self.spoke = spoke
        self._f32 = F32Views()  # a float32 partial is sent from, and its sum received into, its own memory

    def reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        spoke, payload = self.spoke, self.spoke.payload
        body = self._f32.get(partial) if payload is None else None  # [L, D]: the sum comes back into it
        in_place = body is not None
        if in_place:
            label, (length, hidden) = "float32", body.shape
        else:
            length, hidden = partial.shape
            label = payload.label if payload else wire.DTYPE_NAMES[partial.dtype]
            if payload is not None and label != wire.DTYPE_NAMES[partial.dtype]:
                body = payload.encode(partial.reshape(-1).to(torch.float32)).numpy()
            else:
                body = bytes_of(partial)
        sock = spoke.sock
        sock.send(wire.tensor_header(PARTIAL, tag, length, label, hidden), SNDMORE)
        sock.send(body, copy=in_place)  # in place, the sum lands in body: ZeroMQ must have its own copy
        want = wire.tensor_header(REDUCED, tag, length, label, hidden)  # the sum comes back the same way
        nbytes = body.nbytes
        out = body if in_place else np.empty(nbytes, dtype=np.uint8)  # in place: partial is sent, not needed
        deadline = time.monotonic() + spoke.step_timeout
        while True:
            msg = None
            try:
                head = sock.recv()
            except zmq.Again:  # quiet for the socket's receive timeout: the master may be gone
                msg = spoke.recv(0)
            else:
                if head == want:  # only the master reaches this DEALER, and it sends header + tensor
                    got = sock.recv_into(out)
                    if got == nbytes:
                        return partial if in_place else tensor_from(out, payload, partial.dtype, partial.shape)
                    log.warning("rank %d refused a sum of %d bytes, expected %d", spoke.rank, got, nbytes)
                else:
                    msg = spoke.decode([zmq.Frame(head), *drain(sock)])
            if time.monotonic() > deadline:
                raise CommError(f"rank {spoke.rank}: no sum from the master for layer {tag.layer} "
                                f"within {spoke.step_timeout:.0f}s")
            if msg is None or msg.kind == Kind.PING:
                continue
            if msg.kind == Kind.REDUCED and msg.tag == tag:
                return msg.tensor
            if msg.kind == Kind.SHUTDOWN:
                raise Shutdown(f"rank {spoke.rank}: the master asked us to stop")
            if msg.kind in (Kind.CANCEL, Kind.FREE) and msg.seq == tag.seq:
                raise StepAborted(f"rank {spoke.rank}: sequence {tag.seq} was cancelled")
            log.warning("rank %d dropped an unexpected %s during %s", spoke.rank, msg.kind.name, tag)
