"""Hostile input on every listening port of a running cluster, and damaged shard files at start.

The fuzz sends 1,000 seeded malformed messages (loopback only) to the master's worker port and its
control port, part of them while a generation is in flight, plus raw TCP junk that is not ZeroMQ at
all: every message must be refused and logged (the master counts what it refuses on the worker
port; the control port answers each with an error), no process may die or grow by 50 MB, and
generation must still equal transformers' greedy output. Shard files: a flipped byte, a cut file
and a lying header are found when the ranks start, and named, through LocalCluster and `tpi run`.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import zmq

from tpi import ClusterError, LocalCluster
from tpi.comm.wire import HOT, HOT_CODES, HOT_MAGIC
from tpi.split import split_cached
from tpi.weights import block_file

pytestmark = pytest.mark.cluster

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]
NEW = 48
SEED = 6
WORKER_PER_KIND = 75  # x 8 kinds = 600 messages to the worker port
CONTROL_PER_KIND = 50  # x 8 kinds = 400 to the control port
RAW_PER_PORT = 10  # TCP connections that never speak ZeroMQ
RSS_LIMIT = 50 << 20

Frames = list[bytes]
pack = msgpack.packb


# -- the worker port: messages as wire.decode sees them ------------------------------------------

def worker_kinds(rng: random.Random, hidden: int, layers: int) -> dict[str, Callable[[], Frames]]:
    """Makers of malformed messages for the master's worker port, one per kind of fault."""
    row = 4 * hidden  # bytes of one float32 row

    def partial(**fields) -> dict:
        return {"k": 5, "seq": 1, "step": 0, "layer": 0, "phase": 0, "length": 1, "dtype": "float32",
                "shape": [1, hidden], **fields}

    def head(**fields) -> bytes:
        """A PARTIAL's header with `fields` changed: mostly the binary one it travels with, where that
        can hold the values; else msgpack (refused for its format, and for its values)."""
        f = partial(**fields)
        dtype, shape = f["dtype"], f["shape"]
        code = HOT_CODES.get(dtype, 200) if isinstance(dtype, str) else dtype
        if rng.random() < 0.8 and isinstance(shape, list) and len(shape) == 2:
            try:
                return HOT.pack(HOT_MAGIC, f["k"], f["phase"], code, f["layer"], f["seq"], f["step"], 0, f["length"],
                                shape[1])
            except (struct.error, TypeError):
                pass  # a value the binary header cannot hold
        return pack(f)

    def truncated() -> Frames:
        h = head(seq=rng.randrange(1, 100))
        cut = rng.randrange(3)
        if cut == 0:
            return [h[:rng.randrange(len(h))]]
        if cut == 1:
            return [h[:rng.randrange(1, len(h))], rng.randbytes(row)]
        return [h, rng.randbytes(rng.randrange(row))]  # the tensor cut short

    def wrong_kind() -> Frames:
        k = rng.choice([0, 64, 99, 255, -1, 1 << 40, "PARTIAL", None, True, 1.5, [5],
                        2, 3, 4, 6, 7, 8, 9, 11, 12, 15, 17])  # the last ones: kinds only the master sends
        return [head(k=k)] + ([rng.randbytes(row)] if rng.random() < 0.5 else [])

    def wrong_shape_or_dtype() -> Frames:
        fields: dict = {}
        which = rng.randrange(3)
        if which == 0:
            fields["dtype"] = rng.choice(["float16", "bfloat16", "float64", "int8", "bool", "", 5, None])
        elif which == 1:
            fields["shape"] = rng.choice([[1, hidden - 1], [1, hidden, 1], [hidden], [], [2, hidden], [0, hidden],
                                          [-1, hidden], [1.0, hidden], [True, hidden], "1x64", None])
        else:
            fields["length"] = rng.choice([0, 2, 7])  # disagrees with the shape
        return [head(**fields), rng.randbytes(rng.choice([row, row // 2, 2 * row, 0]))]

    def out_of_order() -> Frames:
        fields = {"seq": rng.randrange(1 << 20), "step": rng.randrange(1 << 16), "layer": rng.randrange(layers),
                  "phase": rng.randrange(2)}
        fault = rng.randrange(4)
        if fault == 1:
            fields["layer"] = layers + rng.randrange(100)
        elif fault == 2:
            fields["phase"] = rng.choice([2, 3, 255])
        elif fault == 3:
            fields[rng.choice(["seq", "step"])] = rng.choice([-1, 1 << 62, (1 << 64) - 1])
        return [head(**fields), rng.randbytes(row)]  # fault 0: well-formed, but no step of ours

    def oversized() -> Frames:
        which = rng.randrange(4)
        if which == 0:  # header over the 4 KiB limit
            return [pack({"k": 1, "info": {"rank": 1, "pad": "x" * rng.randrange(4096, 65536)}})]
        if which == 1:  # more info fields than allowed
            return [pack({"k": 1, "info": {f"f{i}": i for i in range(rng.randrange(33, 300))}})]
        if which == 2:  # a text longer than allowed in a small header
            return [pack({"k": 10, "info": {"message": "m" * rng.randrange(2049, 3500)}})]
        length = 1 << 21  # over the row limit, with a large tensor frame
        return [head(length=length, shape=[length, hidden]), rng.randbytes(rng.choice([1, 4]) << 20)]

    def random_bytes() -> Frames:
        return [rng.randbytes(rng.randrange(600)) for _ in range(rng.choice([1, 1, 1, 2]))]

    def wrong_frame_count() -> Frames:
        which = rng.randrange(4)
        if which == 0:
            return [head()]  # a partial without its tensor
        if which == 1:
            return [pack({"k": 1, "info": {"rank": 1, "protocol": 1}}), rng.randbytes(16)]  # HELLO with a tensor
        if which == 2:
            return [head(), rng.randbytes(row), rng.randbytes(row)]
        return [head()] + [b""] * rng.randrange(2, 6)

    def wrong_types() -> Frames:
        chunk = {"rank": 1, "protocol": 1, "file": block_file(1, 0, "attn"), "offset": 0, "size": 16}
        value = rng.choice([
            [1, 2, 3], 5, "PARTIAL", None, True, 1.5, b"\x00\x01", {1: 5},
            {"k": 5, "seq": "1"}, {"k": 5, "seq": 1.5}, {"k": 5, "layer": True}, {"k": 5, "extra": 1},
            {"k": 1, "info": [1, 2]}, {"k": 1, "info": {"a": [1]}}, {"k": 1, "info": {"a": None}},
            {"k": 1, "info": {"a": float("nan")}}, {"k": 1, "info": {"a": True}}, {"k": 1, "info": {5: 1}},
            {"k": 1, "info": {"rank": "one", "protocol": 1}},
            {"k": 1, "info": {"rank": 1, "protocol": 1, "digest": "0" * 64}},  # HELLO from the wrong identity
            {"k": 14, "info": {"rank": 7, "protocol": 1}}, {"k": 14, "info": {"rank": 1, "protocol": 99}},
            {"k": 16, "info": {**chunk, "rank": "1"}}, {"k": 16, "info": {**chunk, "file": "../manifest.json"}},
            {"k": 16, "info": {**chunk, "offset": -1}}, {"k": 16, "info": {**chunk, "size": 1 << 40}},
            {"k": 16, "info": {**chunk, "file": block_file(2, 0, "attn")}},  # another rank's file
        ])
        return [pack(value, strict_types=False)]

    return {"truncated": truncated, "wrong kind": wrong_kind, "wrong shape/dtype": wrong_shape_or_dtype,
            "out-of-order step": out_of_order, "oversized": oversized, "random bytes": random_bytes,
            "wrong frame count": wrong_frame_count, "msgpack of wrong types": wrong_types}


# -- the control port: requests as master._control_loop sees them --------------------------------

def control_kinds(rng: random.Random, max_context: int) -> dict[str, Callable[[], Frames]]:
    """Makers of malformed control requests: none is a request the master may carry out."""
    def generate(**fields) -> dict:
        return {"op": "generate", "ids": [3, 17, 42], "max_new_tokens": 4, "rid": rng.randrange(1 << 30), **fields}

    def truncated() -> Frames:
        data = pack(generate())
        return [data[:rng.randrange(len(data))]]

    def wrong_kind() -> Frames:
        op = rng.choice(["nope", "", "GENERATE", "shutdown ", "ready!", 1, None, ["generate"], {"op": "x"}])
        return [pack({"op": op, "ids": [1]}) if rng.random() < 0.8 else pack({"ids": [1]})]

    def wrong_shape_or_dtype() -> Frames:
        field, value = rng.choice([
            ("ids", "abc"), ("ids", [1.5]), ("ids", [[1]]), ("ids", [None]), ("ids", {"a": 1}), ("ids", [True]),
            ("ids", ["1"]), ("ids", []), ("ids", [-1]), ("ids", [(1 << 64) - 1]), ("ids", [1] * (max_context + 1)),
            ("max_new_tokens", 0), ("max_new_tokens", -5), ("max_new_tokens", 1.5), ("max_new_tokens", "many"),
            ("max_new_tokens", 10 ** 6), ("temperature", -1.0), ("temperature", "hot"), ("top_k", 0),
            ("top_p", 0.0), ("top_p", 1.5), ("seed", "x"), ("stop", "x"), ("stop", [1]), ("stream", "yes"),
            ("messages", "hi"), ("messages", [1]), ("messages", [{"role": 1}]), ("ignore_eos", 1),
        ])
        op = "forward" if field == "ids" and rng.random() < 0.3 else "generate"
        req = generate(**{field: value}) if op == "generate" else {"op": "forward", field: value}
        return [pack(req)]

    def out_of_order() -> Frames:  # a field of the other request, or a request id of any type
        which = rng.randrange(3)
        if which == 0:
            return [pack({"op": "forward", "ids": [1, 2], "max_new_tokens": 3})]
        if which == 1:
            return [pack(generate(shape=[1, 64], layer=3))]
        return [pack({"op": "generate", "rid": rng.choice([-1, "x", [1], None, 1.5]), "ids": "late"})]

    def oversized() -> Frames:
        which = rng.randrange(3)
        if which == 0:
            return [pack({"op": "forward", "ids": [1] * rng.randrange(max_context + 1, 300_000)})]
        if which == 1:
            return [pack({"op": "x" * rng.randrange(10_000, 1_000_000)})]
        return [b"\x91" * rng.randrange(2_000, 200_000) + b"\xc0"]  # arrays nested deeper than any parser goes

    def random_bytes() -> Frames:
        return [rng.randbytes(rng.randrange(1, 600))]

    def wrong_frame_count() -> Frames:  # even a valid request, with extra frames, is refused
        return [pack({"op": "ready"})] + [rng.randbytes(8) for _ in range(rng.randrange(1, 4))]

    def wrong_types() -> Frames:
        value = rng.choice([[1, 2, 3], 5, "generate", None, True, 1.5, b"\x00\x01", {1: "generate"},
                            {"op": 5}, {"op": b"generate"}])
        return [pack(value, strict_types=False)]

    return {"truncated": truncated, "wrong kind": wrong_kind, "wrong shape/dtype": wrong_shape_or_dtype,
            "out-of-order step": out_of_order, "oversized": oversized, "random bytes": random_bytes,
            "wrong frame count": wrong_frame_count, "msgpack of wrong types": wrong_types}


def schedule(kinds: dict[str, Callable[[], Frames]], per_kind: int, rng: random.Random) -> list[tuple[str, Frames]]:
    plan = [(name, make()) for name, make in kinds.items() for _ in range(per_kind)]
    rng.shuffle(plan)
    return plan


def raw_junk(address: str, count: int, rng: random.Random) -> None:
    """TCP connections that send bytes that are not ZeroMQ: random, a cut greeting, a greeting
    asking for a security mechanism the port does not have, a greeting then garbage."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00"
    for i in range(count):
        payload = [rng.randbytes(rng.randrange(1, 2000)), greeting[:rng.randrange(1, len(greeting))],
                   greeting + b"PLAIN".ljust(20, b"\x00") + b"\x00" * 32,
                   greeting + b"NULL".ljust(20, b"\x00") + b"\x00" * 32 + rng.randbytes(500)][i % 4]
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 10_000)  # a send that cannot go out fails the test instead of hanging
    s.connect(address)
    return s


def wait_refused(cluster: LocalCluster, target: int, timeout: float = 30.0) -> int:
    """The master's count of refused worker-port messages, once it reaches `target` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        refused = cluster.stats()[0].refused_messages
        if refused >= target or time.monotonic() > deadline:
            return refused
        time.sleep(0.05)  # the master drains its port between requests; this paces the asking


def control_replies(sock: zmq.Socket, count: int, timeout: float = 30.0) -> list[dict]:
    replies: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        if sock.poll(200):
            replies.append(msgpack.unpackb(sock.recv_multipart()[0], raw=False))
    return replies


def greedy(model, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def rss(pids: dict[int, int]) -> dict[int, int]:
    return {rank: psutil.Process(pid).memory_info().rss for rank, pid in pids.items()}


@pytest.mark.timeout(180)
def test_fuzz_every_port_refused_logged_and_harmless(tiny_models, split_cache, capfd):
    path, model = tiny_models("llama")
    ref = greedy(model, PROMPT, NEW)
    cfg = model.config
    rng = random.Random(SEED)
    worker = schedule(worker_kinds(rng, cfg.hidden_size, cfg.num_hidden_layers), WORKER_PER_KIND, rng)
    control = schedule(control_kinds(rng, cfg.max_position_embeddings), CONTROL_PER_KIND, rng)
    t0 = time.monotonic()
    with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
        started = time.monotonic()
        assert cluster.generate(PROMPT, NEW) == ref  # warm-up
        pids = cluster.pids
        before = rss(pids)
        refused0 = cluster.stats()[0].refused_messages
        ctx = zmq.Context()
        wsock, csock = dealer(ctx, cluster.master_address), dealer(ctx, control_address(cluster))
        try:
            # half of each port's messages while a generation is in flight, the rest while idle
            first_token, result = threading.Event(), {}

            def run() -> None:
                for event, _ in cluster.stream(PROMPT, NEW):
                    first_token.set()
                    result.update(event)

            gen = threading.Thread(target=run)
            gen.start()
            assert first_token.wait(30)
            for sock, plan in ((wsock, worker[:len(worker) // 2]), (csock, control[:len(control) // 2])):
                for _, frames in plan:
                    sock.send_multipart(frames)
            in_flight = gen.is_alive()
            gen.join(60)
            assert result.get("ids") == ref, "the generation in flight during the fuzz went wrong"
            for _, frames in worker[len(worker) // 2:]:
                wsock.send_multipart(frames)
            for _, frames in control[len(control) // 2:]:
                csock.send_multipart(frames)
            replies = control_replies(csock, len(control))
            refused = wait_refused(cluster, refused0 + len(worker)) - refused0
        finally:
            wsock.close(0)
            csock.close(0)
            ctx.term()
        log = capfd.readouterr().err  # every refusal is logged before it is counted or answered
        # bytes that are not ZMTP 3: libzmq drops them, or takes them for a ZMTP 1.0 peer whose
        # "messages" the master then refuses like the others (not counted here: how many is up to TCP)
        raw_junk(cluster.master_address, RAW_PER_PORT, rng)
        raw_junk(control_address(cluster), RAW_PER_PORT, rng)
        assert cluster.generate(PROMPT, NEW) == ref
        assert cluster.forward(PROMPT).shape == (len(PROMPT), cfg.vocab_size)
        after = rss(pids)
        alive = {rank: psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for rank, pid in pids.items()}
        fuzz_s = time.monotonic() - started
    print_report(worker, control, refused, replies, before, after, in_flight, fuzz_s, time.monotonic() - t0)
    assert all(alive.values()), alive
    assert refused == len(worker), f"the master refused {refused} of {len(worker)} messages on its worker port"
    assert len(replies) == len(control), f"{len(replies)} answers to {len(control)} control messages"
    assert all(r.get("event") == "error" and r.get("message") for r in replies), [
        r for r in replies if r.get("event") != "error"][:3]
    worker_logged = len(re.findall(r"\[rank 0\] WARNING refused a (message|worker|shard request|\w+ from an unknown)",
                                   log))
    control_logged = len(re.findall(r"\[rank 0\] WARNING (refused a control|request failed)", log))
    assert worker_logged == len(worker) and control_logged == len(control), (worker_logged, control_logged)
    grown = {rank: after[rank] - before[rank] for rank in pids}
    assert all(g < RSS_LIMIT for g in grown.values()), grown


def control_address(cluster: LocalCluster) -> str:
    return cluster._sock.getsockopt_string(zmq.LAST_ENDPOINT)


def print_report(worker, control, refused, replies, before, after, in_flight, fuzz_s, total_s) -> None:
    print(f"\nworker port: {len(worker)} messages {dict(Counter(k for k, _ in worker))}, {refused} refused")
    print(f"control port: {len(control)} messages {dict(Counter(k for k, _ in control))}, "
          f"{len(replies)} refused with an answer")
    print(f"raw TCP junk: {RAW_PER_PORT} connections per port; first half sent with a generation in flight: "
          f"{in_flight}")
    for rank in before:
        print(f"rank {rank}: RSS {before[rank] / 1e6:.1f} MB -> {after[rank] / 1e6:.1f} MB "
              f"({(after[rank] - before[rank]) / 1e6:+.1f} MB)")
    print(f"fuzz and checks {fuzz_s:.1f}s, test {total_s:.1f}s")


# -- shard files checked at start ----------------------------------------------------------------

def damaged_split(model_dir: Path, cache: Path, rel: str, damage: str) -> Path:
    """Split into a private cache, then flip a byte of (or cut) one of its files."""
    out = split_cached(model_dir, 2, cache_dir=cache, progress=False)
    path = out / rel
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    return out


@pytest.mark.timeout(120)
def test_flipped_byte_refused_at_start_with_its_name(tiny_models, tmp_path):
    path, _ = tiny_models("llama")
    rel = block_file(1, 1, "ffn")
    damaged_split(path, tmp_path / "splits", rel, "flip")
    with pytest.raises(ClusterError, match=rf"rank 1 .*ShardFileError: rank 1: \S*{rel}: sha256 .* does not "
                                           "match the manifest"):
        with LocalCluster(path, world_size=2, cache_dir=tmp_path / "splits"):
            pass


@pytest.mark.timeout(120)
def test_tpi_run_names_a_cut_shard_file(tiny_models, tmp_path, monkeypatch):
    from launcher.cli import main

    path, _ = tiny_models("llama")
    rel = block_file(0, None, "head")  # the master's own file
    damaged_split(path, tmp_path / "splits", rel, "cut")
    monkeypatch.setenv("TPI_CACHE", str(tmp_path))  # where `tpi run` keeps its splits
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--model", str(path), "--world-size", "2", "--prompt", "hi", "--raw"])
    assert re.fullmatch(rf"tpi run: ShardFileError: rank 0: \S*{rel}: size \d+, manifest says \d+ bytes",
                        str(exit_.value.code)), exit_.value.code
