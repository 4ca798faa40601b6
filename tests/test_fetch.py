"""Workers without a model of their own: shard files fetched from the master over its worker port,
cached, checked by sha256, resumed, refetched when damaged; refusals that name the reason."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch
import zmq

from tpi import LocalCluster
from tpi.comm.base import CommError
from tpi.comm.files import CHUNK_BYTES, ShardServer
from tpi.comm.hub import Hub
from tpi.comm.wire import PROTOCOL_VERSION, Expect, Kind, Message, decode, encode
from tpi.fetch import fetch_shards
from tpi.split import split_cached
from tpi.weights import Manifest

pytestmark = pytest.mark.cluster

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.timeout(240)
def test_workers_fetch_cache_and_refetch_damaged_files(tiny_models, split_cache, tmp_path):
    path, model = tiny_models("llama")
    ref = _greedy(model, PROMPT, 12)
    cache = tmp_path / "workers"
    with LocalCluster(path, 3, cache_dir=split_cache, worker_cache_dir=cache) as cluster:
        shard_dir = cluster.shard_dir
        assert cluster.generate(PROMPT, 12) == ref
        fetched = [r.fetched_bytes for r in cluster.stats()]
    manifest = Manifest.load(shard_dir)
    sizes = {r: sum(f["size"] for f in manifest.rank_files(r).values()) for r in (1, 2)}
    assert fetched == [0, sizes[1], sizes[2]]  # everything, on an empty cache
    for r in (1, 2):
        for rel, f in manifest.rank_files(r).items():
            assert hashlib.sha256((cache / f"rank{r}" / rel).read_bytes()).hexdigest() == f["sha256"]

    damaged = sorted((cache / "rank2" / "rank2").glob("layer*.safetensors"))
    _flip_byte(damaged[0], damaged[0].stat().st_size // 2)  # same size, wrong content
    damaged[1].write_bytes(damaged[1].read_bytes()[:100])  # truncated
    stale = cache / "rank1" / "rank1" / "layer099.attn.safetensors"
    stale.write_bytes(b"from an older split")
    with LocalCluster(path, 3, cache_dir=split_cache, worker_cache_dir=cache) as cluster:
        assert cluster.generate(PROMPT, 12) == ref  # equal to the loopback run, token for token
        fetched = [r.fetched_bytes for r in cluster.stats()]
    files2 = manifest.rank_files(2)
    assert fetched == [0, 0, sum(files2[f"rank2/{p.name}"]["size"] for p in damaged[:2])]
    assert not stale.exists()


class _ServingMaster:
    """A Hub whose socket is polled by a thread, as while it waits for workers to join."""

    def __init__(self, shard_dir: Path):
        manifest = Manifest.load(shard_dir)
        cfg = manifest.config
        self.master = Hub("tcp://127.0.0.1:0", manifest.plan.world_size, manifest.digest, cfg.hidden_size,
                          manifest.dtype, cfg.num_layers, files=ShardServer(shard_dir, manifest))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.master._poll_once(0.05, None, {})

    def __enter__(self) -> Hub:
        self.thread.start()
        return self.master

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.master.close()


@pytest.fixture(scope="module")
def split3(tiny_models, split_cache) -> Path:
    path, _ = tiny_models("llama")
    return split_cached(path, 3, None, "float32", split_cache, progress=False)


@pytest.mark.timeout(60)
def test_fetch_resumes_a_partial_download(split3, tmp_path, monkeypatch):
    import tpi.fetch as fetch

    monkeypatch.setattr(fetch, "CHUNK_BYTES", 4096)  # several chunks per file
    manifest = Manifest.load(split3)
    rel, entry = max(manifest.rank_files(1).items(), key=lambda kv: kv[1]["size"])
    part = tmp_path / f"{rel}.{entry['sha256'][:16]}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((split3 / rel).read_bytes()[:3 * 4096 + 100])  # three whole chunks and a bit
    with _ServingMaster(split3) as master:
        report = fetch_shards(master.address, 1, tmp_path, join_timeout=10, step_timeout=10)
    total = sum(f["size"] for f in manifest.rank_files(1).values())
    assert report.fetched_bytes == total - 3 * 4096
    assert (tmp_path / "manifest.json").read_bytes() == (split3 / "manifest.json").read_bytes()
    assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == entry["sha256"]
    with _ServingMaster(split3) as master:  # everything cached: nothing to fetch
        assert fetch_shards(master.address, 1, tmp_path, join_timeout=10, step_timeout=10).fetched_bytes == 0


def _ask(address: str, info: dict, kind: Kind = Kind.GET_CHUNK) -> Message:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(encode(Message(kind, info=info)))
        assert sock.poll(10_000), "no answer from the master"
        return decode(sock.recv_multipart(), Expect(frozenset({Kind.REFUSE, Kind.MANIFEST, Kind.CHUNK})))
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(60)
def test_master_refuses_bad_shard_requests(split3):
    manifest = Manifest.load(split3)
    own = next(iter(manifest.rank_files(1)))
    other = next(iter(manifest.rank_files(2)))
    size = manifest.raw["files"][own]["size"]
    base = {"rank": 1, "protocol": PROTOCOL_VERSION}
    with _ServingMaster(split3) as master:
        bad = [
            ({**base, "protocol": 99}, f"protocol version 99 of the worker does not match the master's "
                                       f"{PROTOCOL_VERSION}"),
            ({**base, "rank": 7}, "rank 7 is not a worker rank"),
            ({**base, "file": other, "offset": 0, "size": 10}, "is not one of rank 1's shard files"),
            ({**base, "file": "../manifest.json", "offset": 0, "size": 10}, "is not one of rank 1's"),
            ({**base, "file": own, "offset": size - 5, "size": 10}, "is outside"),
            ({**base, "file": own, "offset": 0, "size": CHUNK_BYTES + 1}, "larger than"),
            ({**base, "file": own, "offset": -1, "size": 10}, "is outside"),
        ]
        for info, reason in bad:
            reply = _ask(master.address, info)
            assert reply.kind == Kind.REFUSE and reason in reply.info["reason"], (info, reply.info)
        good = _ask(master.address, {**base, "file": own, "offset": 8, "size": 16})
        assert good.kind == Kind.CHUNK and good.data == (split3 / own).read_bytes()[8:24]
        manifest_reply = _ask(master.address, base, Kind.GET_MANIFEST)
        assert manifest_reply.data == (split3 / "manifest.json").read_bytes()


@pytest.mark.timeout(60)
def test_worker_with_another_protocol_version_is_refused(split3, tmp_path, monkeypatch):
    import tpi.fetch as fetch

    monkeypatch.setattr(fetch._Client, "protocol", PROTOCOL_VERSION + 1)
    with _ServingMaster(split3) as master, pytest.raises(CommError) as err:
        fetch_shards(master.address, 1, tmp_path, join_timeout=10, step_timeout=10)
    assert f"protocol version {PROTOCOL_VERSION + 1} of the worker does not match the master's " \
           f"{PROTOCOL_VERSION}" in str(err.value)


@pytest.mark.timeout(60)
def test_fetch_waits_for_a_master_that_never_comes(tmp_path):
    with pytest.raises(CommError, match=r"no manifest from the master at tcp://127.0.0.1:9 within 1s"):
        fetch_shards("tcp://127.0.0.1:9", 1, tmp_path, join_timeout=1, step_timeout=1)
