"""Collectives as processes and sockets: star, ring, tree and gloo give every rank the same bytes,
equal (bit for bit in float32) to an in-process reference that adds in the same order; 16- and
8-bit payloads equal their own in-order reference bit for bit and the float32 sum within a stated
bound; the links refuse malformed frames and time out naming the silent rank; the payload codecs
check sizes and ranges; the cost model picks what its formulas say.

Bound for a payload (checked against the exact float32 sum): each value passes at most N
roundings on its way (ring: N-1 hops and the result; tree: fewer), each off by at most u of the
running sum, whose magnitude is at most S = sum over ranks of max|partial|; so
|got - sum| <= N * u * S, with u = 2^-11 (float16), 2^-8 (bfloat16), 1/254 (q8: half a step of
max|block| / 127).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import traceback

import msgpack
import numpy as np
import pytest
import torch
import zmq

from tpi.comm.base import CommError, PeerLost
from tpi.comm.cost import Link, choose, fit, measure_link, predict
from tpi.comm.links import HEADER, MAGIC
from tpi.comm.payload import Payload, PayloadError, parse
from tpi.comm.ring import RingAllReduce, ring_bounds, ring_reference
from tpi.comm.tree import TreeAllReduce, tree_children, tree_parent, tree_reference
from tpi.comm.wire import Kind, Message, Tag, encode, tensor_header

SHAPES = [(3, 97), (1, 2), (2, 64)]  # 291 values: uneven ring chunks; 2 values: empty chunks for N > 2
PAYLOADS = ("float32", "float16", "bfloat16", "q8")
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "q8": 1 / 254}


def partial(rank: int, world: int, i: int) -> torch.Tensor:
    """Rank `rank`'s partial for shape i: ranks of uneven weight, the last one empty for shape 2
    (a rank with no share of a block adds zeros)."""
    if i == 2 and rank == world - 1:
        return torch.zeros(SHAPES[i])
    gen = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(SHAPES[i], generator=gen) * (1 + 3 * rank)


def star_reference(parts: list[torch.Tensor], payload: str = "float32") -> torch.Tensor:
    """The star: rank 0's partial as it is, each worker's as it crossed the wire, summed in rank
    order in float32; the sum as it crosses the wire back."""
    pay = parse(payload)
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += pay.round_trip(p.reshape(-1)).view(p.shape)
    return pay.round_trip(acc.reshape(-1)).view(acc.shape)


# -- every collective in spawned processes -------------------------------------------------------
def _build(rank: int, world: int) -> dict:
    from tpi.comm.gloo import GlooAllReduce
    from tpi.comm.hub import Hub
    from tpi.options import CommOptions

    out = {f"ring/{p}": RingAllReduce(rank, world, p, timeout=30) for p in PAYLOADS}
    out.update({f"tree/{p}": TreeAllReduce(rank, world, p, timeout=30) for p in PAYLOADS})
    out["gloo/float32"] = GlooAllReduce(rank, world, timeout=30)
    out["gloo/bfloat16"] = GlooAllReduce(rank, world, "bfloat16", timeout=30)
    for p in PAYLOADS if rank == 0 else ():  # the star: float32 is the plain path; the others come with PEERS
        out[f"star/{p}"] = Hub("tcp://127.0.0.1:0", world, "test", 97, torch.float32, 1,
                               CommOptions(payload=None if p == "float32" else p, step_timeout=30))
    return out


def _connect(rank: int, world: int, comms: dict, addrs: list[dict]) -> None:
    from tpi.comm.spoke import Spoke
    from tpi.options import CommOptions

    step = Message(Kind.STEP, 1, 0, length=1, tensor=torch.zeros(1, 97))
    for p in PAYLOADS:
        name = f"star/{p}"
        if rank == 0:
            comms[name].wait_for_workers(30)
            comms[name].broadcast(step)  # a payload is announced (PEERS) before the first step
        else:
            comms[name] = Spoke(addrs[0][name], rank, world, "test", 97, torch.float32, 1,
                                CommOptions(step_timeout=30))
            comms[name].join(30)
            assert comms[name].receive(30).kind == Kind.STEP
    for name, comm in comms.items():
        if not name.startswith("star"):
            comm.connect([a[name] for a in addrs])


def _rank(rank: int, world: int, up, down) -> None:
    torch.set_num_threads(1)
    comms = {}
    try:
        comms = _build(rank, world)
        up.put(("addr", rank, {k: getattr(c, "address", "") or "" for k, c in comms.items()}))
        _connect(rank, world, comms, down.get(timeout=60))
        results = {}
        for name in sorted(comms):
            for i, shape in enumerate(SHAPES):
                if name.startswith("star") and shape[1] != 97:
                    continue  # a star's hidden size is fixed at its construction
                out = comms[name].all_reduce(partial(rank, world, i), Tag(1, i, 0, 0))
                assert out.shape == shape and out.dtype == torch.float32
                results[(name, i)] = out.numpy().tobytes()
        # the star sums a contiguous float32 partial in its own memory (and hands it back); a
        # non-contiguous one, the same values, takes the copying path to the same bytes
        p = partial(rank, world, 0)
        out = comms["star/float32"].all_reduce(p, Tag(1, 7, 0, 0))
        results[("star/float32", "in place")] = out is p
        strided = partial(rank, world, 0).t().contiguous().t()
        out = comms["star/float32"].all_reduce(strided, Tag(1, 8, 0, 0))
        results[("star/float32", "strided")] = out.numpy().tobytes()
        up.put(("done", rank, results))
    except BaseException:
        up.put(("error", rank, traceback.format_exc()))
    finally:
        for c in comms.values():
            c.close()


def run_ranks(world: int) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    up, downs = ctx.Queue(), [ctx.Queue() for _ in range(world)]
    procs = [ctx.Process(target=_rank, args=(r, world, up, downs[r]), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got: dict[str, dict[int, dict]] = {"addr": {}, "done": {}}
        for stage in ("addr", "done"):
            while len(got[stage]) < world:
                kind, rank, value = up.get(timeout=120)
                if kind == "error":
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                got[kind][rank] = value
            if stage == "addr":
                for d in downs:
                    d.put([got["addr"][r] for r in range(world)])
        return got["done"]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def _tensor(raw: bytes, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(shape)


@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3, 5])  # a ring of 2, and trees of 3 and 5 (not a power of two)
def test_collectives_equal_in_order_references(world: int) -> None:
    results = run_ranks(world)
    for rank in range(world):
        in_place = results[rank].pop(("star/float32", "in place"))
        assert in_place is True, f"rank {rank}: the star copied a float32 partial"
        strided = results[rank].pop(("star/float32", "strided"))
        assert strided == results[rank][("star/float32", 0)], f"rank {rank}: a strided partial summed differently"
    for (name, i), raw in results[0].items():
        for rank in range(1, world):
            assert results[rank][(name, i)] == raw, f"{name}, shape {SHAPES[i]}: rank {rank} differs from rank 0"
        algo, payload = name.split("/")
        parts = [partial(r, world, i) for r in range(world)]
        got, exact = _tensor(raw, SHAPES[i]), star_reference(parts)
        if algo in ("star", "ring", "tree"):
            ref = {"star": star_reference, "ring": ring_reference, "tree": tree_reference}[algo](parts, payload)
            assert torch.equal(got, ref), f"{name}, shape {SHAPES[i]}: max diff {(got - ref).abs().max():.3e}"
            if payload != "float32":
                bound = world * UNIT[payload] * sum(p.abs().max().item() for p in parts)
                assert (got - exact).abs().max().item() <= bound, name
        else:  # gloo: its own summation order; same bytes everywhere (checked above), the sum within rounding
            unit = 2.0**-24 if payload == "float32" else 2.0**-8
            bound = world * unit * sum(p.abs().max().item() for p in parts)
            assert (got - exact).abs().max().item() <= bound, name
            if world == 2 and payload == "float32":
                assert torch.equal(got, exact)  # one addition: no order to differ in


# -- links: validation and timeouts, in one process ----------------------------------------------
def _pair(timeout: float) -> tuple[RingAllReduce, RingAllReduce]:
    a, b = RingAllReduce(0, 2, timeout=timeout), RingAllReduce(1, 2, timeout=timeout)
    addrs = [a.address, b.address]
    t = threading.Thread(target=b.connect, args=(addrs,))
    t.start()
    a.connect(addrs)
    t.join()
    return a, b


def _rogue_frames(tag: Tag) -> list[list[bytes]]:
    def header(**kw) -> bytes:
        f = dict(magic=MAGIC, kind=2, payload=1, src=1, dst=0, world=2, seq=tag.seq, step=tag.step,
                 layer=tag.layer, phase=tag.phase, pad=0, round=0, nbytes=4 * 3)
        f.update(kw)
        return HEADER.pack(*f.values())

    return [
        [b"\x00garbage"],
        [msgpack.packb({"k": 5})],
        [b"x" * 10000, b"y"],
        [header(magic=b"EVIL"), bytes(12)],
        [header(payload=4), bytes(12)],  # a q8 payload where float32 is expected
        [header(nbytes=16), bytes(16)],  # a size this step does not have
        [header(), bytes(11)],  # the header's size, but not the frame's
        [header(), bytes(12), b"extra"],
        [header()],  # no data frame
        [header(step=tag.step + 7), bytes(12)],  # a stale tag
        [header(src=0), bytes(12)],  # claims to be rank 0 itself
    ]


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_links_refuse_rogue_frames_and_stay_exact() -> None:
    a, b = _pair(timeout=10)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        rogue.connect(a.address)
        tag = Tag(3, 4, 0, 1)
        for frames in _rogue_frames(tag):
            rogue.send_multipart(frames)
        time.sleep(0.2)  # let the junk arrive first: it must be skipped, not waited out
        x0, x1 = torch.randn(1, 6), torch.randn(1, 6)
        box = {}
        t = threading.Thread(target=lambda: box.update(b=b.all_reduce(x1, tag)))
        t.start()
        got = a.all_reduce(x0, tag)
        t.join()
        ref = ring_reference([x0, x1])
        assert torch.equal(got, ref) and torch.equal(box["b"], ref)
    finally:
        rogue.close(0)
        ctx.term()
        a.close()
        b.close()


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_silent_peer_times_out_naming_it() -> None:
    a, b = _pair(timeout=0.5)
    checks = []
    a.links.check = lambda: checks.append(1)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match=r"no data from rank\(s\) \[1\]") as err:
            a.all_reduce(torch.ones(1, 4), Tag(1, 0, 0, 0))
        assert err.value.rank == 1 and time.monotonic() - t0 < 3
        assert checks, "the owner's check was not called while waiting"
    finally:
        a.close()
        b.close()


@pytest.mark.cluster
def test_connect_refuses_wrong_address_count() -> None:
    r = RingAllReduce(0, 3, timeout=1)
    try:
        with pytest.raises(CommError, match="got 2 addresses for a world of 3"):
            r.connect(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
    finally:
        r.close()


# -- shapes of the schedules ---------------------------------------------------------------------
@pytest.mark.unit
def test_ring_bounds_and_tree_shape() -> None:
    assert ring_bounds(10, 3) == [0, 3, 6, 10] and ring_bounds(2, 5) == [0, 0, 0, 1, 1, 2]
    assert tree_children(0, 5) == [1, 2, 4] and tree_children(2, 5) == [3] and tree_children(4, 5) == []
    assert [tree_parent(r) for r in range(6)] == [None, 0, 0, 2, 0, 4]
    for n in range(1, 10):  # every rank but 0 is exactly one rank's child
        kids = sorted(c for r in range(n) for c in tree_children(r, n))
        assert kids == list(range(1, n)) and all(tree_parent(c) == r for r in range(n) for c in tree_children(r, n))


# -- payload codecs ------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "q8", "q8_64"])
def test_payload_round_trip_and_sizes(name: str) -> None:
    pay = parse(name)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 50
    data = pay.encode(x)
    assert data.dtype == torch.uint8 and data.numel() == pay.nbytes(1000)
    y = pay.decode(data, 1000)
    assert y.dtype == torch.float32 and y.shape == (1000,)
    if name == "float32":
        assert torch.equal(y, x)
    elif name.startswith("q8"):
        for blk in range(0, 1000, pay.block):  # error at most half a step of each block's scale
            xb = x[blk:blk + pay.block]
            assert (y[blk:blk + pay.block] - xb).abs().max() <= xb.abs().max() / 254 * (1 + 1e-6)
    else:
        assert torch.equal(y, x.to(getattr(torch, name)).float())
    assert pay.nbytes(1000) == {"float32": 4000, "float16": 2000, "bfloat16": 2000, "q8": 1000 + 4 * 32,
                                "q8_64": 1000 + 4 * 16}[name]


@pytest.mark.unit
def test_payload_refuses_bad_input() -> None:
    with pytest.raises(PayloadError, match="payload 'q4': expected one of"):
        Payload("q4")  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="q8 block size 48"):
        Payload("q8", 48)
    with pytest.raises(PayloadError, match="needs 40 bytes, got 39"):
        Payload("float32").decode(torch.zeros(39, dtype=torch.uint8), 10)
    with pytest.raises(PayloadError, match="needs 42 bytes"):
        Payload("q8").decode(torch.zeros(40, dtype=torch.uint8), 34)
    with pytest.raises(PayloadError, match=r"\|x\| = 7e\+04"):
        Payload("float16").encode(torch.tensor([1.0, -70000.0]))
    with pytest.raises(PayloadError, match="cannot carry inf"):
        Payload("q8").encode(torch.tensor([1.0, float("inf")]))
    with pytest.raises(PayloadError, match="flat float32"):
        Payload("bfloat16").encode(torch.ones(2, 2))
    assert torch.equal(Payload("q8").round_trip(torch.zeros(70)), torch.zeros(70))


@pytest.mark.unit
def test_gloo_refuses_q8() -> None:
    from tpi.comm.gloo import GlooAllReduce

    with pytest.raises(PayloadError, match="gloo cannot sum q8"):
        GlooAllReduce(1, 2, "q8")


# -- the cost model ------------------------------------------------------------------------------
@pytest.mark.unit
def test_cost_model_formulas_and_choice() -> None:
    n = 8192 * 4  # one hidden state of 8192 float32 values
    gigabit = 125e6
    lan = Link(alpha_s=1e-3, bandwidth=gigabit)  # home Ethernet: latency dominates
    assert predict("star", 4, n, lan) == pytest.approx(2e-3 + 6 * n / gigabit)
    assert predict("ring", 4, n, lan) == pytest.approx(6 * (1e-3 + n / 4 / gigabit))
    assert predict("tree", 4, n, lan) == pytest.approx(4 * (1e-3 + n / gigabit))
    assert choose(4, n, lan) == "star"
    fast = Link(alpha_s=20e-6, bandwidth=gigabit)  # fast round trips, the master's link the bottleneck
    assert choose(8, n, fast) == "ring"
    # tree: star 2a+14t, ring 14a+1.75t, tree 6a+6t with t = n/B; a = t makes tree cheapest (12 < 15.75 < 16)
    assert choose(8, n, Link(alpha_s=n / gigabit, bandwidth=gigabit)) == "tree"
    assert choose(2, n, Link(0.0, gigabit), candidates=("star", "tree")) == "star"  # a tie goes to the first
    assert predict("ring", 1, n, lan) == 0.0
    with pytest.raises(ValueError, match="collective 'mesh'"):
        predict("mesh", 2, n, lan)  # type: ignore[arg-type]


@pytest.mark.unit
def test_link_fit_recovers_alpha_and_bandwidth() -> None:
    true = Link(alpha_s=150e-6, bandwidth=1.1e9)
    link = measure_link(lambda k: 2 * (true.alpha_s + k / true.bandwidth), repeats=3)
    assert link.alpha_s == pytest.approx(true.alpha_s) and link.bandwidth == pytest.approx(true.bandwidth)
    with pytest.raises(ValueError, match="small_bytes < large_bytes"):
        fit(100, 1e-3, 100, 2e-3)


@pytest.mark.unit
def test_tensor_header_is_what_encode_writes() -> None:
    """The star's hot path compares headers with tensor_header's bytes: they must be encode's, byte for byte."""
    for tag in (Tag(0, 0, 0, 0), Tag(3, 9, 2, 1), Tag(1 << 40, 70000, 300, 0)):
        for length, dtype in ((1, torch.float32), (7, torch.bfloat16)):
            for kind in (Kind.PARTIAL, Kind.REDUCED):
                msg = Message(kind, tag.seq, tag.step, tag.layer, tag.phase, length=length,
                              tensor=torch.zeros(length, 13, dtype=dtype))
                name = "float32" if dtype == torch.float32 else "bfloat16"
                assert tensor_header(kind, tag, length, name, 13) == encode(msg)[0]


# -- generation through each collective, against transformers --------------------------------------
PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]
GENERATION = [("ring", None), ("tree", None), ("gloo", None), ("auto", None), ("star", "float16"),
              ("ring", "bfloat16")]


@pytest.fixture(scope="module")
def llama_reference(tiny_models):
    path, model = tiny_models("llama")
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0]
        greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False)[0, len(PROMPT):].tolist()
    return path, logits, greedy


@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("collective,payload", GENERATION, ids=lambda v: str(v))
def test_generation_matches_transformers(llama_reference, split_cache, collective: str, payload: str | None) -> None:
    """Greedy tokens equal transformers' with every collective; logits within 1e-4 of their scale in
    float32, and within the payload's rounding (a few 1e-3) with a 16-bit one."""
    from conftest import assert_close

    from tpi import LocalCluster

    path, ref_logits, ref = llama_reference
    with LocalCluster(path, world_size=3, cache_dir=split_cache, collective=collective, payload=payload) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits, rel=1e-4 if payload is None else 2e-2)
        assert cluster.generate(PROMPT, max_new_tokens=10) == ref
        stats = cluster.stats()
    assert all(r.allreduce_calls == stats[0].allreduce_calls > 0 for r in stats)


@pytest.mark.cluster
def test_bad_collective_options_are_refused(tiny_models) -> None:
    from tpi import LocalCluster
    from tpi.config import ConfigError

    path, _ = tiny_models("llama")
    with pytest.raises(ConfigError, match="collective='mesh': expected one of star, ring, tree, gloo, auto"):
        LocalCluster(path, world_size=2, collective="mesh")
    with pytest.raises(ConfigError, match="payload='q4': expected one of"):
        LocalCluster(path, world_size=2, payload="q4")
    with pytest.raises(ConfigError, match="q8 cannot be summed by gloo"):
        LocalCluster(path, world_size=2, collective="gloo", payload="q8")


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("collective", ["ring", "gloo"])
def test_killed_worker_fails_fast_and_restart_sets_the_collective_up_again(llama_reference, split_cache,
                                                                           collective: str) -> None:
    import os
    import signal

    from tpi import ClusterError, LocalCluster

    path, _, ref = llama_reference
    with LocalCluster(path, world_size=3, cache_dir=split_cache, collective=collective) as cluster:
        assert cluster.generate(PROMPT, max_new_tokens=10) == ref
        os.kill(cluster.worker_pids[2], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="rank 2"):
            for _ in range(100):  # the kill is noticed in one of these
                cluster.generate(PROMPT, max_new_tokens=10)
        assert time.monotonic() - t0 < 10
        cluster.restart_worker(2)  # rank 1 survived the failed step; PEERS sets up the new group
        assert cluster.generate(PROMPT, max_new_tokens=10) == ref


@pytest.mark.unit
def test_peers_message_and_choice_checks() -> None:
    from tpi.comm.collectives import check_choice, parse_peers, peers_info, resolve
    from tpi.config import ConfigError

    addrs = ["tcp://*:5000", "tcp://10.0.0.2:6000", "tcp://10.0.0.3:6001"]
    assert parse_peers(peers_info("tree", Payload("q8", 64), addrs), 3) == ("tree", Payload("q8", 64), addrs)
    assert parse_peers(peers_info("star", None, []), 3) == ("star", None, [])
    assert resolve(addrs[0], "192.168.1.5") == "tcp://192.168.1.5:5000"
    with pytest.raises(CommError, match="collective 'mesh'"):
        parse_peers({"collective": "mesh", "payload": "", "addresses": ""}, 3)
    with pytest.raises(CommError, match="lists 2 addresses for a world of 3"):
        parse_peers(peers_info("ring", None, addrs[:2]), 3)
    with pytest.raises(CommError, match="expected tcp://HOST:PORT"):
        parse_peers(peers_info("ring", None, ["a", "b", "c"]), 3)
    with pytest.raises(CommError, match="payload 'q4'"):
        parse_peers({"collective": "ring", "payload": "q4", "addresses": " ".join(addrs)}, 3)
    check_choice(None, "ring")
    check_choice("auto", "tree")
    with pytest.raises(ConfigError, match="the master runs the ring collective; this worker was started with "
                                          "collective='tree'"):
        check_choice("tree", "ring")


# -- per-call traces ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_trace_per_call_is_last_in_to_last_out() -> None:
    from tpi.comm import trace

    def rank(*rows):  # (seq, step, layer, phase, rows, enter, exit)
        return np.array(rows, dtype=np.float64)

    traces = [rank((1, 2, 0, 0, 1, 1.0, 1.5), (1, 2, 0, 1, 1, 2.0, 2.1), (1, 0, 0, 0, 9, 0.1, 0.3)),
              rank((1, 2, 0, 0, 1, 1.2, 1.6), (1, 2, 0, 1, 1, 2.05, 2.2), (1, 0, 0, 0, 9, 0.2, 0.3)),
              rank((1, 2, 0, 0, 1, 1.1, 1.55), (1, 2, 0, 1, 1, 1.9, 2.15))]  # rank 2 missed the prefill call
    calls = trace.per_call(traces)
    assert set(calls) == {(1, 2, 0, 0), (1, 2, 0, 1)}
    assert calls[1, 2, 0, 0] == pytest.approx((1, 1.2, 0.4)) and calls[1, 2, 0, 1] == pytest.approx((1, 2.05, 0.15))
    assert trace.per_token(calls) == [pytest.approx(0.55)]
    assert trace.per_token(calls, start=1.5) == [pytest.approx(0.15)]  # only the call that began in the window


@pytest.mark.unit
def test_trace_is_bounded_and_a_bad_folder_is_logged_not_raised(tmp_path, caplog) -> None:
    from tpi.comm import trace

    t = trace.CommTrace(1, tmp_path, capacity=2)
    for step in range(3):
        t.add(Tag(1, step, 0, 0), 1, 0.0, 1.0)
    assert (t.n, t.dropped) == (2, 1)
    assert t.save() == tmp_path / "rank1.npy"
    assert np.load(tmp_path / "rank1.npy")[:, 1].tolist() == [0, 1]
    assert "kept the first 2 calls and dropped 1" in caplog.text
    (tmp_path / "file").write_text("")
    assert trace.CommTrace(2, tmp_path / "file").save() is None  # a file where the folder should be
    assert "could not write its allreduce trace" in caplog.text
    with pytest.raises(FileNotFoundError, match="no allreduce trace of rank 0"):
        trace.load(tmp_path, 2)


@pytest.mark.cluster
def test_trace_records_every_allreduce_of_every_rank(llama_reference, split_cache, tmp_path, monkeypatch) -> None:
    """TPI_COMM_TRACE: each rank saves every call at close; the calls line up across ranks, and the
    decode steps' communication is positive and no longer than the slowest rank's call."""
    import json

    from tpi import LocalCluster
    from tpi.comm import trace

    path, _, ref = llama_reference
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    monkeypatch.setenv(trace.ENV, str(tmp_path))
    with LocalCluster(path, world_size=3, cache_dir=split_cache) as cluster:
        t0 = time.perf_counter()
        assert cluster.generate(PROMPT, max_new_tokens=5) == ref[:5]
        t1 = time.perf_counter()
        n = cluster.stats()[0].allreduce_calls
    traces = trace.load(tmp_path, 3)
    assert [len(t) for t in traces] == [n, n, n]
    calls = trace.per_call(traces)
    assert len(calls) == n
    longest = {tuple(int(v) for v in row[:4]): 0.0 for row in traces[0]}
    for t in traces:
        for row in t:
            key = tuple(int(v) for v in row[:4])
            longest[key] = max(longest[key], row[6] - row[5])
    assert all(0 < secs <= longest[key] for key, (_, _, secs) in calls.items())
    decode = [key for key, (rows, _, _) in calls.items() if rows == 1]
    tokens = trace.per_token(calls, t0, t1)
    assert len(decode) == 2 * layers * len(tokens) and len(tokens) >= 4
