"""Workers need no model of their own: they fetch their shard files from the master.

Owns: ``fetch_shards``, the worker's side of the fetch: it asks for the manifest, keeps cached
files whose sha256 matches it, downloads the others in pipelined chunks into ``*.part`` files
that a later start resumes, checks each against the manifest's sha256, and writes the manifest
last. Messages travel on the master's worker port, as the same validated wire messages as the
collective; the master's side is comm/files.py. Does not know: the model, the collective.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from tpi.comm.base import CommError
from tpi.comm.files import CHUNK_BYTES
from tpi.comm.security import Curve, secure_client
from tpi.comm.wire import PROTOCOL_VERSION, Expect, Kind, Message, WireError, decode, encode
from tpi.weights import Manifest, sha256_file

log = logging.getLogger("tpi.fetch")

IN_FLIGHT = 8  # chunks requested ahead: hides the link's round trip
MAX_MANIFEST_BYTES = 16 << 20
_REL = re.compile(r"rank[0-9]+/[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class FetchReport:
    shard_dir: Path
    files: int  # this rank's files in the manifest
    fetched_files: int  # of which downloaded now (missing, partial, or not matching the manifest)
    fetched_bytes: int
    seconds: float


class _Client:
    """A DEALER on the master's worker port, for the fetch only."""

    protocol = PROTOCOL_VERSION

    def __init__(self, master: str, rank: int, timeout: float, curve: Curve | None = None):
        self.master, self.rank, self.timeout = master, rank, timeout
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            secure_client(self.sock, curve)
        self.sock.setsockopt(zmq.IDENTITY, b"fetch%d-%d" % (rank, os.getpid()))
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MANIFEST_BYTES + 4096)
        self.sock.connect(master)
        self.expect = Expect(frozenset({Kind.MANIFEST, Kind.CHUNK, Kind.REFUSE, Kind.PING}),
                             max_data=MAX_MANIFEST_BYTES)

    def send(self, kind: Kind, **info) -> None:
        self.sock.send_multipart(encode(Message(kind, info={"rank": self.rank, "protocol": self.protocol,
                                                            **info})))

    def recv(self, what: str, timeout: float | None = None) -> Message:
        """The next MANIFEST or CHUNK; REFUSE raises with the master's reason."""
        timeout = timeout or self.timeout
        start = last_note = time.monotonic()
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise CommError(f"rank {self.rank}: no {what} from the master at {self.master} within {timeout:.0f}s")
            if now - last_note > 10:
                log.warning("rank %d: waiting for the master at %s (%s)", self.rank, self.master, what)
                last_note = now
            if not self.sock.poll(1000):
                continue
            try:
                msg = decode(self.sock.recv_multipart(copy=False), self.expect)
            except WireError as e:
                log.warning("rank %d refused a message from the master: %s", self.rank, e)
                continue
            if msg.kind == Kind.REFUSE:
                raise CommError(f"rank {self.rank}: the master refused us: {msg.info.get('reason')}")
            if msg.kind != Kind.PING:
                return msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def fetch_shards(master: str, rank: int, cache_dir: str | os.PathLike, join_timeout: float = 300.0,
                 step_timeout: float = 60.0, progress: bool = False, curve: Curve | None = None) -> FetchReport:
    """Make `cache_dir` hold this rank's shard files as the master's manifest lists them."""
    t0 = time.monotonic()
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    client = _Client(master, rank, step_timeout, curve)
    try:
        with open(out / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one worker per cache folder at a time
            client.send(Kind.GET_MANIFEST)
            reply = client.recv("manifest", join_timeout)
            if reply.kind != Kind.MANIFEST:
                raise CommError(f"rank {rank}: expected the manifest from the master, got {reply.kind.name}")
            manifest = Manifest.parse(reply.data, f"the manifest from {master}")
            if manifest.digest != reply.info.get("digest"):
                raise CommError(f"rank {rank}: the manifest from {master} does not match its digest")
            files = manifest.rank_files(rank)
            for rel in files:
                if not _REL.fullmatch(rel):
                    raise CommError(f"rank {rank}: the manifest names an unsafe file path {rel!r}")
            todo = {rel: f for rel, f in files.items() if not _cached(out / rel, f)}
            _drop_stale(out, rank, files)
            fetched = _download(client, out, todo, progress)
            tmp = out / "manifest.json.tmp"
            tmp.write_bytes(reply.data)
            os.replace(tmp, out / "manifest.json")
    finally:
        client.close()
    report = FetchReport(out, len(files), len(todo), fetched, time.monotonic() - t0)
    log.info("rank %d: %d of %d shard files fetched (%.1f MB) in %.1fs into %s", rank, report.fetched_files,
             report.files, fetched / 1e6, report.seconds, out)
    return report


def _cached(path: Path, entry: dict) -> bool:
    if not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    if sha256_file(path) == entry["sha256"]:
        return True
    log.warning("%s does not match the master's manifest (sha256); fetching it again", path)
    return False


def _drop_stale(out: Path, rank: int, files: dict[str, dict]) -> None:
    """Remove files of an older split, and partial downloads that no longer match a file."""
    parts = {f"{out / rel}.{f['sha256'][:16]}.part" for rel, f in files.items()}
    folder = out / f"rank{rank}"
    if folder.is_dir():
        for p in folder.iterdir():
            rel = f"rank{rank}/{p.name}"
            if rel not in files and str(p) not in parts:
                p.unlink()


def _download(client: _Client, out: Path, todo: dict[str, dict], progress: bool) -> int:
    from tqdm import tqdm

    total = sum(f["size"] for f in todo.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"rank {client.rank} fetch", disable=not progress,
               leave=False)
    fetched = 0
    try:
        for rel, entry in todo.items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            part = Path(f"{path}.{entry['sha256'][:16]}.part")
            for attempt in (1, 2):
                fetched += _download_file(client, rel, part, entry["size"], bar)
                if sha256_file(part) == entry["sha256"]:
                    break
                part.unlink()
                if attempt == 2:
                    raise CommError(f"rank {client.rank}: {rel} from the master does not match the manifest's "
                                    f"sha256 twice; the master's copy may be damaged")
            os.replace(part, path)
    finally:
        bar.close()
    return fetched


def _download_file(client: _Client, rel: str, part: Path, size: int, bar) -> int:
    """Fill `part` up to `size` bytes, resuming after what an earlier start wrote; returns bytes fetched."""
    have = part.stat().st_size if part.is_file() else 0
    have = min(have - have % CHUNK_BYTES, size)  # resume on a chunk boundary
    offsets = list(range(have, size, CHUNK_BYTES))
    pending: set[int] = set()
    fd = os.open(part, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, have)
        bar.update(have)
        while offsets or pending:
            while offsets and len(pending) < IN_FLIGHT:
                off = offsets.pop(0)
                client.send(Kind.GET_CHUNK, file=rel, offset=off, size=min(CHUNK_BYTES, size - off))
                pending.add(off)
            msg = client.recv(f"chunk of {rel}")
            off = msg.info.get("offset")
            if msg.kind != Kind.CHUNK or msg.info.get("file") != rel or off not in pending:
                log.warning("rank %d dropped an unexpected %s", client.rank, msg.kind.name)
                continue
            if len(msg.data) != min(CHUNK_BYTES, size - off):
                raise CommError(f"rank {client.rank}: chunk at {off} of {rel} has {len(msg.data)} bytes")
            os.pwrite(fd, msg.data, off)
            pending.discard(off)
            bar.update(len(msg.data))
    finally:
        os.close(fd)
    return size - have
