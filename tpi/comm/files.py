"""Shard serving: the master's split folder, read by byte range for the workers that fetch it.

Owns: ``ShardServer``, which answers GET_MANIFEST (the manifest file's bytes and digest) and
GET_CHUNK (a byte range of one of the asking rank's own files, at most CHUNK_BYTES) with MANIFEST,
CHUNK or REFUSE and the reason. Requests and replies are the validated wire messages of every
other exchange (wire.py) on the master's worker port. Does not know: sockets (the hub sends its
answers), the worker's side of the fetch (fetch.py), the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpi.comm.wire import PROTOCOL_VERSION, Kind, Message
from tpi.weights import Manifest

CHUNK_BYTES = 1 << 20


class ShardServer:
    """The master's split folder, served by byte range to the ranks it belongs to."""

    def __init__(self, shard_dir: str | os.PathLike, manifest: Manifest):
        self.dir = Path(shard_dir)
        self.manifest_bytes = (self.dir / "manifest.json").read_bytes()
        self.manifest = manifest
        self.world_size = manifest.plan.world_size
        self.bytes_sent = 0

    def answer(self, msg: Message) -> Message:
        """The reply to a GET_MANIFEST or GET_CHUNK: MANIFEST, CHUNK, or REFUSE with the reason."""
        info = msg.info
        if info.get("protocol") != PROTOCOL_VERSION:
            return _refuse(f"protocol version {info.get('protocol')!r} of the worker does not match the "
                           f"master's {PROTOCOL_VERSION}")
        rank = info.get("rank")
        if not isinstance(rank, int) or not 1 <= rank < self.world_size:
            return _refuse(f"rank {rank!r} is not a worker rank of this cluster (1..{self.world_size - 1})")
        if msg.kind == Kind.GET_MANIFEST:
            return Message(Kind.MANIFEST, info={"digest": self.manifest.digest, "protocol": PROTOCOL_VERSION},
                           data=self.manifest_bytes)
        rel, offset, size = info.get("file"), info.get("offset"), info.get("size")
        entry = self.manifest.rank_files(rank).get(rel) if isinstance(rel, str) else None
        if entry is None:
            return _refuse(f"file {rel!r} is not one of rank {rank}'s shard files")
        if (not isinstance(offset, int) or not isinstance(size, int) or not 0 < size <= CHUNK_BYTES
                or offset < 0 or offset + size > entry["size"]):
            return _refuse(f"byte range offset={offset!r} size={size!r} is outside {rel} ({entry['size']} bytes) "
                           f"or larger than {CHUNK_BYTES}")
        with open(self.dir / rel, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            return _refuse(f"the master's {rel} is shorter than its manifest says; split again")
        self.bytes_sent += size
        return Message(Kind.CHUNK, info={"file": rel, "offset": offset}, data=data)


def _refuse(reason: str) -> Message:
    return Message(Kind.REFUSE, info={"reason": reason[:1000]})
