"""Tree allreduce over ZeroMQ: a binomial-tree reduce to rank 0, then a binomial-tree broadcast.

Owns: the tree's shape and its fixed summation order. Rank r's parent is r - lowbit(r); its
children are r + m for m = 1, 2, 4, ... below lowbit(r) (every power of two for rank 0) while
r + m < N. Rank r adds its children's subtree sums to its own partial in increasing m, each as
soon as it has arrived and every earlier one has been added:
    S(r) = (((p[r] + S(r+1)) + S(r+2)) + S(r+4)) + ...     (float32, left to right)
so for N = 4 the result is (p0 + p1) + (p2 + p3). Rank 0 encodes S(0) once; the broadcast
forwards those bytes unchanged (farthest subtree first) and rank 0 keeps their decoding too,
so every rank returns the same bytes. With a 16- or 8-bit payload every subtree sum is rounded
once as it goes up, and the result once more. 2*ceil(log2 N) hops of the whole vector: fewer
hops than a ring, less load on rank 0's link than a star. Does not know: the model, control
messages, sockets beyond ``links.Links``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tpi.comm.links import Links
from tpi.comm.payload import Payload, PayloadName, parse
from tpi.comm.wire import Tag

REDUCE, BROADCAST = 0, 1


def tree_parent(rank: int) -> int | None:
    return None if rank == 0 else rank - (rank & -rank)


def tree_children(rank: int, world_size: int) -> list[int]:
    """In increasing distance: the order their sums are added in."""
    limit = (rank & -rank) if rank else 1 << max(world_size - 1, 0).bit_length()
    out, m = [], 1
    while m < limit and rank + m < world_size:
        out.append(rank + m)
        m <<= 1
    return out


class TreeAllReduce:
    """One rank of a binomial tree. `address` after construction; `connect(addresses)` with every rank's."""

    def __init__(self, rank: int, world_size: int, payload: PayloadName | Payload = "float32",
                 host: str = "127.0.0.1", timeout: float = 60.0, check: Callable[[], None] | None = None,
                 links: Links | None = None):
        """`links`: an already bound Links of this rank (its address already handed out) to use."""
        self.rank, self.world_size, self.payload = rank, world_size, parse(payload)
        self._own_links = links is None
        self.links = links or Links(rank, world_size, host, timeout, check)
        self.address = self.links.address
        self.parent, self.children = tree_parent(rank), tree_children(rank, world_size)
        self._bufs: dict[int, torch.Tensor] = {}  # sender -> receive buffer (grown as needed)
        self._views: dict[int, memoryview] = {}
        self._nbytes = -1

    def connect(self, addresses: list[str], timeout: float | None = None) -> None:
        peers = self.children + ([] if self.parent is None else [self.parent])
        self.links.connect(addresses, peers, peers, timeout)

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        acc = partial.reshape(-1).to(torch.float32, copy=True)  # [n]
        self._buffers(self.payload.nbytes(acc.numel()))
        acc = self._reduce(acc, tag)
        out = self._broadcast(acc, tag)
        return out.view(partial.shape).to(partial.dtype)

    def _reduce(self, acc: torch.Tensor, tag: Tag) -> torch.Tensor:
        n, code, nbytes = acc.numel(), self.payload.code, self._nbytes
        expect = {c: self.links.expected(c, code, tag, REDUCE, nbytes) for c in self.children}
        arrived: set[int] = set()
        for child in self.children:  # fixed order; later children may arrive first
            while child not in arrived:
                src = self.links.recv(expect, self._views)
                arrived.add(src)
                del expect[src]
            acc.add_(self.payload.decode(self._bufs[child][:nbytes], n))
        if self.parent is not None:
            self.links.send(self.parent, code, tag, REDUCE, self.payload.encode(acc))
        return acc

    def _broadcast(self, acc: torch.Tensor, tag: Tag) -> torch.Tensor:
        n, code, nbytes = acc.numel(), self.payload.code, self._nbytes
        if self.parent is None:
            data = self.payload.encode(acc)
            out = acc if self.payload.name == "float32" else self.payload.decode(data, n)
        else:
            src = self.parent
            self.links.recv({src: self.links.expected(src, code, tag, BROADCAST, nbytes)}, self._views)
            data = self._bufs[src][:nbytes]
            out = self.payload.decode(data, n)
            if self.payload.name == "float32":
                out = out.clone()  # a view of the receive buffer otherwise
        for child in reversed(self.children):  # the largest subtree first
            self.links.send(child, code, tag, BROADCAST, data)
        return out

    def _buffers(self, nbytes: int) -> None:
        if nbytes == self._nbytes:
            return
        for peer in [*self.children, *([] if self.parent is None else [self.parent])]:
            if peer not in self._bufs or self._bufs[peer].numel() < nbytes:
                self._bufs[peer] = torch.empty(nbytes, dtype=torch.uint8)
            self._views[peer] = memoryview(self._bufs[peer].numpy())[:nbytes]
        self._nbytes = nbytes

    def close(self) -> None:
        if self._own_links:
            self.links.close()


def tree_reference(partials: list[torch.Tensor], payload: PayloadName | Payload = "float32") -> torch.Tensor:
    """What a tree of len(partials) ranks returns, computed in one process in the same order."""
    pay, n_ranks = parse(payload), len(partials)
    flat = [p.reshape(-1).to(torch.float32) for p in partials]

    def subtree(r: int) -> torch.Tensor:
        acc = flat[r].clone()
        for c in tree_children(r, n_ranks):
            acc = acc + pay.round_trip(subtree(c))
        return acc

    return pay.round_trip(subtree(0)).view(partials[0].shape).to(partials[0].dtype)
