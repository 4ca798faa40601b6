"""torch.distributed's gloo allreduce behind tpi's allreduce call: the established engine to
measure the ZeroMQ collectives against, and a collective in its own right.

Owns: one ``ProcessGroupGloo`` object per rank (no global default group, so several can live in
one process), its rendezvous (rank 0 runs a ``TCPStore`` on port 0 and its address is the one
the other ranks need) and its timeout. Summation order is gloo's own ring (reduce-scatter +
allgather over segments): deterministic for a given world size and vector length and the same
bytes on every rank, but not the star's rank order, so results may differ from the star in the
last bits. A 16-bit payload is summed by gloo in 16 bits (not float32); q8 has no gloo
reduction and is refused. Gloo checks no tags: its own sequence numbers keep collectives apart,
and its messages are gloo's (not pickled). Does not know: the model, control messages.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from torch.distributed import ProcessGroupGloo, TCPStore

from tpi.comm.base import CommError
from tpi.comm.payload import Payload, PayloadError, PayloadName, parse
from tpi.comm.wire import Tag

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GlooAllReduce:
    """One rank of a gloo group. Rank 0's `address` is the rendezvous; `connect` needs only it."""

    def __init__(self, rank: int, world_size: int, payload: PayloadName | Payload = "float32",
                 host: str = "127.0.0.1", timeout: float = 60.0):
        self.rank, self.world_size, self.payload = rank, world_size, parse(payload)
        if self.payload.name == "q8":
            raise PayloadError("gloo cannot sum q8 payloads: use the star, ring or tree collective for q8")
        self.dtype = _DTYPES[self.payload.name]
        self.host, self.timeout = host, timedelta(seconds=timeout)
        self.store: TCPStore | None = None
        self.pg: ProcessGroupGloo | None = None
        self.address = ""
        if rank == 0:
            self.store = TCPStore(host, 0, world_size, is_master=True, timeout=self.timeout, wait_for_workers=False)
            self.address = f"tcp://{host}:{self.store.port}"

    def connect(self, addresses: list[str], timeout: float | None = None) -> None:
        """Join the group at rank 0's address (addresses[0]); returns when every rank has joined."""
        if len(addresses) != self.world_size:
            raise CommError(f"got {len(addresses)} addresses for a world of {self.world_size} ranks")
        wait = timedelta(seconds=timeout) if timeout else self.timeout
        if self.store is None:
            host, port = _host_port(addresses[0])
            self.store = TCPStore(host, port, self.world_size, is_master=False, timeout=wait)
        opts = ProcessGroupGloo._Options()
        opts._devices = [ProcessGroupGloo.create_device(hostname=self.host)]
        opts._timeout = self.timeout
        try:
            self.pg = ProcessGroupGloo(self.store, self.rank, self.world_size, opts)
        except RuntimeError as e:
            raise CommError(f"rank {self.rank}: gloo could not form a group of {self.world_size}: {e}") from None

    def all_reduce(self, partial: torch.Tensor, tag: Tag) -> torch.Tensor:
        buf = partial.to(self.dtype, copy=True)
        try:
            self.pg.allreduce([buf]).wait()
        except RuntimeError as e:
            raise CommError(f"rank {self.rank}: gloo allreduce for layer {tag.layer} failed: {e}") from None
        return buf.to(partial.dtype)

    def close(self) -> None:
        if self.pg is not None:
            try:
                self.pg.shutdown()
            except (RuntimeError, AttributeError):
                pass
            self.pg = None
        self.store = None


def _host_port(address: str) -> tuple[str, int]:
    """'tcp://host:port' -> (host, port), with an error naming the address."""
    try:
        rest = address.split("://", 1)[1]
        host, port = rest.rsplit(":", 1)
        return host.strip("[]"), int(port)
    except (IndexError, ValueError):
        raise CommError(f"gloo rendezvous address {address!r}: expected tcp://HOST:PORT") from None
