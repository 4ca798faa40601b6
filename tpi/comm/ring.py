"""Ring allreduce over ZeroMQ: reduce-scatter, then allgather, each rank talking to its neighbours.

Owns: the ring schedule and its fixed summation order. The flat vector of n values is cut into
N chunks, chunk c = [c*n//N, (c+1)*n//N) (uneven when N does not divide n; possibly empty).
Rank r sends to r+1 and receives from r-1 (mod N). Reduce-scatter: chunk c starts at rank c
and gathers one partial per hop, so its sum is, left to right in float32,
    p[c] + p[c+1] + ... + p[c+N-1]        (ranks mod N)
(chunk 0 is in the star's order; the others are rotations of it). The rank that completes
chunk c (rank c-1) encodes it once; allgather forwards those bytes unchanged, and that rank too
keeps the decoded bytes, so every rank returns the same bytes. With a 16- or 8-bit payload, each
reduce-scatter hop carries the running sum encoded (N-1 roundings) and the result one more.
Each rank moves 2(N-1)/N of the vector in 2(N-1) messages: the choice when the master's link,
not latency, limits a star (see cost.py). Does not know: the model, control messages (the star
carries those), sockets beyond what ``links.Links`` gives it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tpi.comm.links import Links
from tpi.comm.payload import Payload, PayloadName, parse
from tpi.comm.wire import Tag


def ring_bounds(n: int, world_size: int) -> list[int]:
    """Chunk c of a ring allreduce is [bounds[c], bounds[c+1])."""
    return [c * n // world_size for c in range(world_size + 1)]


class _Layout:
    """Where each chunk's encoded bytes live in a receive buffer (8-byte aligned regions)."""

    def __init__(self, n: int, world_size: int, payload: Payload):
        self.bounds = ring_bounds(n, world_size)
        self.sizes = [payload.nbytes(self.bounds[c + 1] - self.bounds[c]) for c in range(world_size)]
        self.offsets, at = [], 0
        for size in self.sizes:
            self.offsets.append(at)
            at += -(-size // 8) * 8
        self.total = at


class RingAllReduce:
    """One rank of a ring. `address` after construction; `connect(addresses)` with every rank's."""

    def __init__(self, rank: int, world_size: int, payload: PayloadName | Payload = "float32",
                 host: str = "127.0.0.1", timeout: float = 60.0, check: Callable[[], None] | None = None,
                 links: Links | None = None):
        """`links`: an already bound Links of this rank (its address already handed out) to use."""
        self.rank, self.world_size, self.payload = rank, world_size, parse(payload)
        self._own_links = links is None
        self.links = links or Links(rank, world_size, host, timeout, check)
        self.address = self.links.address
        self.next, self.prev = (rank + 1) % world_size, (rank - 1) % world_size
        self._layouts: dict[int, _Layout] = {}
        self._rs = torch.empty(0, dtype=torch.uint8)  # reduce-scatter receive buffer
        self._ag = torch.empty(0, dtype=torch.uint8)  # allgather receive buffer

    def connect(self, addresses: list[str], timeout: float | None = None) -> None:
        self.links.connect(addresses, [self.next], [self.prev], timeout)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        x = partial.reshape(-1).to(torch.float32, copy=True)  # [n], summed in place, chunk by chunk
        lay = self._layout(x.numel())
        self._reduce_scatter(x, lay, tag)
        self._allgather(x, lay, tag)
        return x.view(partial.shape).to(partial.dtype)

    def _reduce_scatter(self, x: torch.Tensor, lay: _Layout, tag: Tag) -> None:
        n_ranks, code, r = self.world_size, self.payload.code, self.rank
        for s in range(n_ranks - 1):
            send_c, recv_c = (r - s) % n_ranks, (r - s - 1) % n_ranks
            self.links.send(self.next, code, tag, s, self.payload.encode(self._chunk(x, lay, send_c)))
            view = self._region(self._rs, lay, recv_c)
            self.links.recv({self.prev: self.links.expected(self.prev, code, tag, s, lay.sizes[recv_c])},
                            {self.prev: memoryview(view.numpy())})
            mine = self._chunk(x, lay, recv_c)
            torch.add(self.payload.decode(view, mine.numel()), mine, out=mine)  # running sum + own partial

    def _allgather(self, x: torch.Tensor, lay: _Layout, tag: Tag) -> None:
        n_ranks, code, r = self.world_size, self.payload.code, self.rank
        own = (r + 1) % n_ranks  # the chunk this rank completed
        out = self.payload.encode(self._chunk(x, lay, own))
        if self.payload.name != "float32":
            self._chunk(x, lay, own).copy_(self.payload.decode(out, lay.bounds[own + 1] - lay.bounds[own]))
        for s in range(n_ranks - 1):
            rnd, recv_c = n_ranks - 1 + s, (r - s) % n_ranks
            self.links.send(self.next, code, tag, rnd, out)
            view = self._region(self._ag, lay, recv_c)
            self.links.recv({self.prev: self.links.expected(self.prev, code, tag, rnd, lay.sizes[recv_c])},
                            {self.prev: memoryview(view.numpy())})
            chunk = self._chunk(x, lay, recv_c)
            chunk.copy_(self.payload.decode(view, chunk.numel()))
            out = view  # forwarded as received

    def _layout(self, n: int) -> _Layout:
        lay = self._layouts.get(n)
        if lay is None:
            if len(self._layouts) >= 16:
                self._layouts.clear()
            lay = self._layouts[n] = _Layout(n, self.world_size, self.payload)
            if lay.total > self._rs.numel():
                self._rs = torch.empty(lay.total, dtype=torch.uint8)
                self._ag = torch.empty(lay.total, dtype=torch.uint8)
        return lay

    @staticmethod
    def _chunk(x: torch.Tensor, lay: _Layout, c: int) -> torch.Tensor:
        return x[lay.bounds[c]:lay.bounds[c + 1]]

    @staticmethod
    def _region(buf: torch.Tensor, lay: _Layout, c: int) -> torch.Tensor:
        return buf[lay.offsets[c]:lay.offsets[c] + lay.sizes[c]]

    def close(self) -> None:
        if self._own_links:
            self.links.close()


def ring_reference(partials: list[torch.Tensor], payload: PayloadName | Payload = "float32") -> torch.Tensor:
    """What a ring of len(partials) ranks returns, computed in one process in the same order."""
    pay, n_ranks = parse(payload), len(partials)
    flat = [p.reshape(-1).to(torch.float32) for p in partials]
    bounds = ring_bounds(flat[0].numel(), n_ranks)
    out = torch.empty_like(flat[0])
    for c in range(n_ranks):
        a, b = bounds[c], bounds[c + 1]
        acc = flat[c][a:b].clone()
        for k in range(1, n_ranks):
            acc = pay.round_trip(acc) + flat[(c + k) % n_ranks][a:b]
        out[a:b] = pay.round_trip(acc)
    return out.view(partials[0].shape).to(partials[0].dtype)
