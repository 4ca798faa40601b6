"""CPU/GPU offload: the offload path with both parts on the CPU (CI), and on a real GPU where there
is one (skipped cleanly otherwise); the offload's planning and tuning."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import assert_close

from tpi import ClusterError, LocalCluster, forward, open_rank
from tpi.comm.base import SingleRank
from tpi.config import ModelConfig
from tpi.inprocess import InProcessCluster
from tpi.offload import calibrate
from tpi.offload.blocks import BlockOffload, divide_block
from tpi.offload.calibrate import calibrate_rows, dispatch_seconds, measure_bandwidths
from tpi.offload.offloader import Offloader
from tpi.offload.plan import COPY_SLOTS, balance_share, copy_slot_bytes, place, plan_shares, search_share, share_bytes
from tpi.open_rank import open_rank_model
from tpi.peers import Peers
from tpi.rank_model import RankModel
from tpi.split import split_cached
from tpi.weights import Manifest, block_spec, head_specs, rank_blocks

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _blocks(n: int, pin: bool) -> list[dict[str, torch.Tensor]]:
    """n random FFN-like blocks (gate/up/down, a bias, a norm) in host memory."""
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(n):
        shapes = {"post_attention_layernorm.weight": (64,), "gate_proj.weight": (96, 64), "gate_proj.bias": (96,),
                  "up_proj.weight": (96, 64), "down_proj.weight": (64, 96)}
        w = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        blocks.append({k: t.pin_memory() if pin else t for k, t in w.items()})
    return blocks


def _slot(blocks: list[dict], ratio: float) -> int:
    return max(share_bytes([(k, tuple(t.shape), t.dtype) for k, t in w.items()], ratio)[0] for w in blocks)


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("ratio", "slots"), [(0.0, 2), (0.3, 1), (0.3, 2), (1.0, 3)])
def test_offloader_pipeline_matches_linear(device, ratio, slots):
    """Blocks run in a cycle, the next one queued (its copies started) while the current one
    computes: every projection equals F.linear, norms arrive whole, the ring's slots are reused
    correctly; a block out of the queued order is still right. gate and up share their input (its
    CPU rows start together) except on odd steps, where each gets its own copy of it."""
    blocks = _blocks(3, pin=device == "cuda")
    gen = torch.Generator().manual_seed(1)
    with Offloader(device, ratio, _slot(blocks, ratio), slots=slots) as sp:
        for step in range(2 * len(blocks) + 1):
            i = step % len(blocks) if step < 2 * len(blocks) else 1  # the last: not the block queued
            w = sp.weights(i, blocks[i])
            sp.upcoming((i + 1) % len(blocks), blocks[(i + 1) % len(blocks)])  # prefetch
            x = torch.randn(3, 64, generator=gen)
            xd = x.to(device)
            h = sp.linear(xd, w, "gate_proj")
            u = sp.linear(xd if step % 2 == 0 else xd.clone(), w, "up_proj")
            y = sp.linear(torch.nn.functional.silu(h) * u, w, "down_proj")
            sp.finish(i)
            ref_h = torch.nn.functional.linear(x, blocks[i]["gate_proj.weight"], blocks[i]["gate_proj.bias"])
            ref_u = torch.nn.functional.linear(x, blocks[i]["up_proj.weight"])
            ref = torch.nn.functional.linear(torch.nn.functional.silu(ref_h) * ref_u, blocks[i]["down_proj.weight"])
            assert_close(y.cpu(), ref, rel=1e-5)
            assert torch.equal(w["post_attention_layernorm.weight"].cpu(), blocks[i]["post_attention_layernorm.weight"])
            assert "gate_proj.bias" not in w  # added by the offload's linear, with its rows


@pytest.mark.unit
def test_offloader_worker_threads_can_change():
    blocks = _blocks(1, pin=False)
    x = torch.randn(2, 64)
    with Offloader("cpu", 0.5, _slot(blocks, 0.5), threads=2) as sp:
        assert sp.threads == 2
        sp.set_threads(1)
        y = sp.linear(x, sp.weights(0, blocks[0]), "up_proj")
        sp.finish(0)
        assert sp.threads == 1
    assert_close(y, torch.nn.functional.linear(x, blocks[0]["up_proj.weight"]), rel=1e-5)


@pytest.mark.unit
def test_offloader_validates():
    with pytest.raises(ValueError, match="offload share=1.5"):
        Offloader("cpu", 1.5, 0)
    blocks = _blocks(1, pin=False)
    with pytest.raises(ValueError, match="more than a slot's"):
        Offloader("cpu", 0.5, _slot(blocks, 0.4)).weights(0, blocks[0])


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_offload_on_cpu_in_rank_processes_equals_the_in_process_cluster(tiny_models, split_cache):
    """One real-process case (the matrix of modes and shares is test_inprocess.py's): the blocks
    mode at a share that divides the FFN blocks and LM-head chunks, streamed (each block divided as
    it comes), both parts on the CPU, in rank processes: bit for bit the in-process cluster's
    logits, and its share of the host bytes as planned."""
    path, _ = tiny_models("qwen2")  # biases on q/k/v exercise the bias rows too
    kw = dict(cache_dir=split_cache, offload_mode="blocks", offload_share=0.6, stream_all=True)
    with InProcessCluster(path, 2, **kw) as local:
        ref, ref_tokens = local.forward(PROMPT), local.generate(PROMPT, 12)
    with LocalCluster(path, world_size=2, **kw) as cluster:
        assert torch.equal(cluster.forward(PROMPT), ref)
        assert cluster.generate(PROMPT, max_new_tokens=12) == ref_tokens
        stats = cluster.stats()
    assert all(r.offload_mode == "blocks" and r.offload_share == 0.6 for r in stats)
    assert abs(stats[0].offload_gpu_share - 0.6) < 0.01


@pytest.mark.unit
def test_plan_shares_gives_attention_whole_and_shares_the_rest():
    sizes, movable = [134, 270] * 3 + [87, 87, 88], [False, True] * 3 + [True] * 3
    plan = plan_shares(sizes, 0.5, movable)
    assert all(r == 1.0 for r, m in zip(plan, movable) if not m)
    assert len({r for r, m in zip(plan, movable) if m}) == 1  # one common share for the others
    assert sum(s * r for s, r in zip(sizes, plan)) == pytest.approx(0.5 * sum(sizes))
    assert plan_shares(sizes, 0.1, movable) == [1.0 if not m else 0.0 for m in movable]  # attention alone is more
    assert plan_shares([1] * 4, 0.25) == [0.25] * 4 and plan_shares([1] * 4, 1.0) == [1.0] * 4
    assert plan_shares([5, 5], 0.9, [False, False]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="fraction=1.5"):
        plan_shares([1], 1.5)
    with pytest.raises(ValueError, match="cpu_ok has 1 entries for 2 blocks"):
        plan_shares([1, 2], 0.5, [True])
    with pytest.raises(ValueError, match="block size -1"):
        plan_shares([-1], 0.5)


@pytest.mark.unit
def test_balance_share_equalises_the_two_sides():
    """The share of host bytes at which the copy engine (attention bytes plus the GPU's share of
    the rest) and the thread that runs the blocks (the CPU's share plus its dispatch) take equally
    long; more dispatch moves bytes to the GPU; clamped at both ends."""
    assert balance_share(0, 100, 40.0, 60.0) == pytest.approx(0.6)  # copy / (cpu + copy)
    attn, shared, cpu, copy = 400e6, 800e6, 46e9, 53e9
    last = 0.0
    for host_s in (0.0, 0.002, 0.008):
        f = balance_share(int(attn), int(shared), cpu, copy, host_s)
        s = (f * (attn + shared) - attn) / shared  # the shared blocks' share
        assert 0 < s < 1 and (attn + s * shared) / copy == pytest.approx((1 - s) * shared / cpu + host_s)
        assert f > last
        last = f
    assert balance_share(100, 100, 1.0, 1.0, host_s=1e3) == 1.0  # dispatch alone outlasts every copy
    assert balance_share(1000, 10, 1e9, 1.0) == pytest.approx(1000 / 1010)  # attention alone outlasts the CPU: s = 0
    assert balance_share(5, 0, 1.0, 1.0) == 1.0 and balance_share(0, 0, 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="copy_Bps=0.0: expected a bandwidth > 0"):
        balance_share(1, 1, 1.0, 0.0)
    with pytest.raises(ValueError, match="host_s=-1: expected a number >= 0"):
        balance_share(1, 1, 1.0, 1.0, -1)


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dispatch_seconds_times_every_path(tiny_models, family, monkeypatch):
    """Each path a block takes, timed on tiny blocks of the model's structure (biases, q/k norms),
    on the CPU as in CI: every path runs the model's own math the way the offload runs it (a
    divided block computes its CPU part and its accelerator part), each round once, and costs time."""
    path, _ = tiny_models(family)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    calls = {"attention": 0, "ffn": 0, "head": 0}

    def counted(name, fn):
        def run(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(calibrate, "attention_partial", counted("attention", calibrate.attention_partial))
    monkeypatch.setattr(calibrate, "ffn_partial", counted("ffn", calibrate.ffn_partial))
    monkeypatch.setattr(calibrate, "lm_head", counted("head", calibrate.lm_head))
    repeats = 5
    d = dispatch_seconds(cfg, torch.device("cpu"), torch.float32, repeats=repeats)
    assert set(d) == {"gpu_attn", "gpu_ffn", "copied_attn", "divided", "divided_head"}
    assert all(0 < v < 1 for v in d.values())
    rounds = repeats + 2  # and two warm-up rounds
    # per round: attention resident and copied; the FFN resident, then divided (both parts); the head divided
    assert calls == {"attention": 2 * rounds, "ffn": 3 * rounds, "head": 2 * rounds}


@pytest.mark.unit
@pytest.mark.parametrize("cpu", [1, 37, 95])
def test_divided_block_parts_add_up_to_the_block(cpu):
    """An FFN block's two parts (CPU: intermediate columns [0, cpu), accelerator: the rest) give
    partial FFNs that add up to the whole one; each part's weights are contiguous (copyable as
    they are); the down projection's bias is counted once."""
    from tpi.layers import ffn_partial

    w = _blocks(1, pin=False)[0]
    w["down_proj.bias"] = torch.randn(64)
    cfg = type("Cfg", (), {"rms_norm_eps": 1e-6})()  # all that ffn_partial reads
    x = torch.randn(3, 64)
    whole = ffn_partial(x, w, cfg)
    down = w["down_proj.weight"].clone()
    a, b = divide_block(dict(w), "ffn", cpu)
    assert all(t.is_contiguous() for part in (a, b) for t in part.values())
    assert a["down_proj.weight"].shape == (64, cpu) and b["gate_proj.weight"].shape == (96 - cpu, 64)
    assert torch.equal(a["down_proj.weight"], down[:, :cpu]) and torch.equal(b["down_proj.weight"], down[:, cpu:])
    assert "down_proj.bias" in a and "down_proj.bias" not in b
    assert_close(ffn_partial(x, a, cfg) + ffn_partial(x, b, cfg), whole, rel=1e-6)
    head = torch.randn(10, 64)
    c, d = divide_block({"lm_head.weight": head}, "head", 4)
    assert torch.equal(torch.cat([c["lm_head.weight"], d["lm_head.weight"]]), head)
    for bad in (0, 96):
        with pytest.raises(ValueError, match=f"divide at column {bad}: expected 0 < column < 96"):
            divide_block(dict(_blocks(1, pin=False)[0]), "ffn", bad)
    with pytest.raises(ValueError, match="block kind 'attn'"):
        divide_block({}, "attn", 1)


@pytest.mark.unit
def test_offloader_per_block_shares():
    """Blocks with their own share: 0 queues nothing (the CPU computes it whole), 1 copies it all."""
    blocks = _blocks(3, pin=False)
    x = torch.randn(2, 64)
    with Offloader("cpu", 0.5, _slot(blocks, 1.0), shares={0: 1.0, 1: 0.0}) as sp:
        assert [sp.share_of(k) for k in range(3)] == [1.0, 0.0, 0.5]
        sp.upcoming(1, blocks[1])
        assert not sp._blocks  # nothing of block 1 goes to the accelerator
        for i in (0, 2):
            y = sp.linear(x, sp.weights(i, blocks[i]), "up_proj")
            sp.finish(i)
            assert_close(y, torch.nn.functional.linear(x, blocks[i]["up_proj.weight"]), rel=1e-5)
    with pytest.raises(ValueError, match="offload share=2"):
        Offloader("cpu", 0.5, 0, shares={0: 2})


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_cuda_device_refused_without_cuda(tiny_models, split_cache):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, _ = tiny_models("llama")
    with pytest.raises(ClusterError, match="device='cuda', but torch sees no CUDA device"):
        with LocalCluster(path, world_size=1, cache_dir=split_cache, device="cuda"):
            pass


def _slots(shard_dir, ratio: float) -> int:
    """GPU bytes rank 0 reserves for the offload at `ratio`: copy slots, norms and biases."""
    m = Manifest.load(shard_dir)
    specs = [block_spec(shard_dir, m, 0, layer, kind) for layer, kind in rank_blocks(m.config, m.plan, 0)
             if kind != "head"]
    slot, small = copy_slot_bytes(specs, ratio)
    return COPY_SLOTS * slot + small


@pytest.mark.cluster
@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", ["rows", "blocks"])
def test_gpu_split_matches_cpu(tiny_models, split_cache, world_size, mode):
    path, _ = tiny_models("qwen2")
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache) as cluster:
        ref, stats, shard = cluster.forward(PROMPT), cluster.stats()[0], cluster.shard_dir
    kv, block = stats.kv_cache_bytes, stats.largest_block_bytes
    placements = []
    slots = (lambda r: _slots(shard, r)) if mode == "rows" else (lambda r: _slots(shard, 1.0))  # blocks: whole ones
    # room for the KV cache and the copy slots only (every block split; streamed: no prefetch),
    # for some blocks, for every block
    configs = ((kv + slots(0.3), 0.3, True), (kv + slots(0.7) + 2 * block, 0.7, False), ("50MB", 0.5, False))
    for budget, ratio, stream in configs:
        with LocalCluster(path, world_size=world_size, cache_dir=split_cache, device="cuda", offload_mode=mode,
                          gpu_memory_budget=budget, offload_share=ratio, stream_all=stream) as cluster:
            assert_close(cluster.forward(PROMPT), ref, rel=1e-4)
            placements.append(cluster.stats()[0].gpu_blocks)
    assert placements[0] == 0 and placements[0] < placements[1] < placements[2]
    with pytest.raises(ClusterError, match="too small for the KV cache"):
        with LocalCluster(path, world_size=world_size, cache_dir=split_cache, device="cuda", gpu_memory_budget=1):
            pass


@pytest.mark.cluster
@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["rows", "blocks"])
def test_gpu_greedy_tokens_match_transformers(smollm2, split_cache, mode):
    path, model, tok = smollm2
    ids = list(tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False))
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    with LocalCluster(path, world_size=1, cache_dir=split_cache, device="cuda", gpu_memory_budget="250MB",
                      offload_mode=mode, offload_share=0.5) as cluster:
        stats = cluster.stats()[0]
        assert stats.gpu_blocks > 0 and stats.streamed_blocks + stats.pinned_blocks > 0
        assert 0 < stats.offload_gpu_share < 1
        assert cluster.generate(ids, max_new_tokens=24) == ref


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
def test_rows_calibration_keeps_the_fastest_share_timed(device, monkeypatch):
    """The rows mode's share: the offload path timed on synthetic blocks over the grid and the
    best share's neighbours; with the timing replaced by a known curve it must find its minimum,
    and with the real path (synthetic blocks past the caches, or as many as the layers) every share
    it timed is a real time."""
    blocks = [{"q_proj.weight": (64, 64), "k_proj.weight": (32, 64), "v_proj.weight": (32, 64),
               "o_proj.weight": (64, 64)}, {"gate_proj.weight": (96, 64), "up_proj.weight": (96, 64),
                                            "down_proj.weight": (64, 96)}]
    cal, nbytes = calibrate_rows(torch.device(device), torch.float32, blocks, threads=1, min_bytes=1 << 20, passes=1)
    assert {0.0, 0.5, 1.0} <= set(cal.rows_ms) and all(v > 0 for v in cal.rows_ms.values()) and nbytes >= 1 << 20
    assert cal.fraction == min(cal.rows_ms, key=cal.rows_ms.get)
    unit = sum(4 * a * b for block in blocks for a, b in block.values())
    _, nbytes = calibrate_rows(torch.device(device), torch.float32, blocks, threads=1, min_bytes=1 << 30, passes=1,
                               max_copies=2)
    assert nbytes == 2 * unit  # a small model's walk is no longer than its layers, whatever the caches
    timed = []

    def curve(device, dtype, host, share, *args, **kw) -> float:
        timed.append(share)
        return 1.0 + (share - 0.63) ** 2

    monkeypatch.setattr(calibrate, "time_rows", curve)
    cal, _ = calibrate_rows(torch.device(device), torch.float32, blocks, threads=1, min_bytes=1 << 16, passes=1)
    assert cal.fraction == 0.625 and len(timed) == 15 and timed[:11] == [i / 10 for i in range(11)]


@pytest.mark.unit
def test_measure_bandwidths_needs_cuda():
    with pytest.raises(ValueError, match="device=cpu: measuring copy bandwidth needs a CUDA device"):
        measure_bandwidths(torch.device("cpu"), torch.float32, (64, 64))


@pytest.mark.cluster
@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2])
def test_blocks_mode_measures_its_fraction(tiny_models, split_cache, world_size):
    met = []
    cpu_bps, copy_bps = measure_bandwidths(torch.device("cuda"), torch.float32, (256, 256), threads=2,
                                           nbytes=64 << 20, ready=lambda: met.append(1))
    assert cpu_bps > 0 and copy_bps > 0 and met == [1]
    path, _ = tiny_models("llama")
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache) as cluster:
        ref, stats, shard = cluster.forward(PROMPT), cluster.stats()[0], cluster.shard_dir
    budget = stats.kv_cache_bytes + _slots(shard, 1.0) + stats.largest_block_bytes  # some blocks stay on the host
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache, device="cuda",
                      gpu_memory_budget=budget) as cluster:
        for stats in cluster.stats():
            # measured at start; a tiny model's dispatch outweighs its bytes, so the share may be 1
            assert stats.offload_mode == "blocks" and 0 < stats.offload_share <= 1
            assert 0 < stats.offload_host_s < 1  # the rank's dispatch, counted on the CPU's side
            assert stats.offload_tune_s > 0 and 0 < stats.offload_predicted <= 1  # predicted, then tuned
            assert stats.pinned_blocks + stats.streamed_blocks > 0
        assert_close(cluster.forward(PROMPT), ref, rel=1e-4)


@pytest.mark.unit
def test_ranks_of_one_machine_meet_and_share(tmp_path, capsys):
    """Ranks given the same folder wait for each other (so that each measures with the others'
    load on the machine) and see each other's measurements; a list that is not one is left out;
    one whose peers never come goes on alone after the timeout, saying so."""
    peers = [Peers(tmp_path, r, 2, timeout=30) for r in range(2)]
    done, got = threading.Event(), {}

    def rank1() -> None:
        got["met"] = peers[1].meet()
        done.set()
        got["shared"] = peers[1].share([2.0, 3.0])

    t = threading.Thread(target=rank1)
    t.start()
    assert not done.wait(0.3)  # rank 1 waits for rank 0
    assert peers[0].meet()  # the last to arrive does not wait
    assert done.wait(10)
    assert peers[0].share([1.0, 5.0]) == [[1.0, 5.0], [2.0, 3.0]]
    t.join(10)
    assert got == {"met": True, "shared": [[2.0, 3.0], [1.0, 5.0]]}
    (tmp_path / "share3.rank1.json").write_text('["x", 1]')  # a peer's malformed list
    (tmp_path / "meet3.rank1").touch()
    assert peers[0].share([4.0, 4.0]) == [[4.0, 4.0]]
    (tmp_path / "alone").mkdir()
    lonely = Peers(tmp_path / "alone", 1, 4, timeout=0.1)
    assert not lonely.meet() and lonely.alone and lonely.share([1.0]) == [[1.0]]
    assert "rank 1: measuring alone" in capsys.readouterr().err
    nobody = Peers(None, 5)  # a rank with no peers on its machine
    assert nobody.alone and not nobody.meet() and nobody.share([2.0]) == [[2.0]]
    with pytest.raises(ValueError, match="rank 4 of 4 peers"):
        Peers(tmp_path, 4, 4, timeout=1)


@pytest.mark.unit
def test_search_share_times_a_grid_then_the_best_neighbours():
    calls = []

    def time_at(shares: list[float]) -> list[float]:
        calls.append(shares)
        return [(s - 0.63) ** 2 for s in shares]

    best, timed = search_share(time_at)
    assert best == 0.625 and [len(c) for c in calls] == [11, 2, 2] and len(timed) == 15
    assert calls[1] == [0.55, 0.65] and calls[2] == [0.625, 0.675]
    assert search_share(lambda shares: [-s for s in shares])[0] == 1.0  # an edge: its outer neighbour clamps away
    with pytest.raises(ValueError, match="time_at gave 1 times for 11 shares"):
        search_share(lambda shares: [0.0])


def _rank_logits(model: RankModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        h = forward.run_layers(model, SingleRank(), model.embed(ids), 0, 0, 0)
        out = forward.logits(model, h)
    model.cache.free(0)
    return out


def _tunable(shard, manifest: Manifest, rank: int) -> RankModel:
    """A rank as a GPU rank is before its share is tuned (blocks mode planned at 0.5 of the host
    bytes, the pinned blocks' parts views), here on the CPU."""
    model = open_rank_model(shard, manifest, rank)
    slot = max(t.nbytes for b in model.sched.blocks for t in b.tensors) + 256  # LM-head chunks are whole blocks here
    model.offload = BlockOffload(model.sched, torch.device("cpu"), "blocks", 0.5, slot, 1, exact=False)
    return model


@pytest.mark.inprocess
@pytest.mark.timeout(300)
def test_tuned_share_times_views_and_keeps_the_offload_exact(tiny_models, split_cache, tmp_path, monkeypatch,
                                                              capsys):
    """The blocks mode's share tuned at start (both parts on the CPU here): the shares timed are
    views of the blocks as they are, so the logits afterwards still match the path without
    offload; a rank too slow to tune keeps the share as planned, exact too; ranks of one machine
    tune together and choose the same share."""
    path, _ = tiny_models("llama")
    shard = split_cached(path, 1, cache_dir=split_cache, progress=False)
    manifest = Manifest.load(shard)
    plain = open_rank_model(shard, manifest, 0)
    ref = _rank_logits(plain, PROMPT)
    plain.close()
    model = _tunable(shard, manifest, 0)
    open_rank._tune(model, Peers(None, 0))
    cal = model.calibration
    assert 13 <= len(cal.tuned_ms) <= 15 and model.offload.share == cal.fraction and cal.tune_s > 0
    assert model.sched.counters.loads == 0  # the timed steps are not counted as the rank's work
    assert_close(_rank_logits(model, PROMPT), ref, rel=1e-5)
    model.close()
    monkeypatch.setattr(calibrate, "TUNE_MAX_S", 0.0)  # as if its blocks streamed from disk: too slow to tune
    model = _tunable(shard, manifest, 0)
    open_rank._tune(model, Peers(None, 0))
    assert model.offload.share == 0.5 and model.calibration is None  # the offload as planned
    assert "keeping the share predicted from the rates" in capsys.readouterr().err
    assert_close(_rank_logits(model, PROMPT), ref, rel=1e-5)
    model.close()
    monkeypatch.undo()
    shard = split_cached(path, 2, cache_dir=split_cache, progress=False)
    manifest = Manifest.load(shard)
    ranks = [_tunable(shard, manifest, r) for r in range(2)]
    peers = [Peers(tmp_path, r, 2, timeout=60) for r in range(2)]
    threads = [threading.Thread(target=open_rank._tune, args=(m, p)) for m, p in zip(ranks, peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert ranks[0].calibration.share == ranks[1].calibration.share
    assert not any(p.alone for p in peers)
    for m in ranks:
        m.close()


@pytest.mark.unit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_copy_ring_packs_projections_of_mixed_sizes(device, ratio):
    """Attention-like and FFN-like blocks in turn, three rounds, each queued two blocks ahead: the
    ring holds small projections densely (more of them staged than it holds largest ones), wraps
    around, and every projection still equals F.linear."""
    gen = torch.Generator().manual_seed(2)
    attn = {"q_proj.weight": (64, 64), "k_proj.weight": (16, 64), "v_proj.weight": (16, 64), "o_proj.weight": (64, 64)}
    ffn = {"gate_proj.weight": (96, 64), "up_proj.weight": (96, 64), "down_proj.weight": (64, 96)}
    blocks = [{k: torch.randn(s, generator=gen) for k, s in (attn if i % 2 == 0 else ffn).items()} for i in range(4)]
    if device == "cuda":
        blocks = [{k: t.pin_memory() for k, t in b.items()} for b in blocks]
    staged = 0
    with Offloader(device, ratio, _slot(blocks, ratio), slots=2) as sp:
        for step in range(3 * len(blocks)):
            i = step % len(blocks)
            w = sp.weights(i, blocks[i])
            for ahead in (1, 2):
                sp.upcoming((i + ahead) % len(blocks), blocks[(i + ahead) % len(blocks)])
            staged = max(staged, len(sp.ring.staged))
            for name, t in blocks[i].items():  # in the order queued
                x = torch.randn(2, t.shape[1], generator=gen)
                y = sp.linear(x.to(device), w, name.removesuffix(".weight"))
                assert_close(y.cpu(), torch.nn.functional.linear(x, t), rel=1e-5)
            first = next(iter(blocks[i]))  # again, out of the order queued: copied anew
            y = sp.linear(x[:, :64].to(device), w, first.removesuffix(".weight"))
            assert_close(y.cpu(), torch.nn.functional.linear(x[:, :64], blocks[i][first]), rel=1e-5)
            sp.finish(i)
    assert staged > 2  # a ring of two largest shares holds more of the small ones


@pytest.mark.unit
@needs_cuda
def test_closed_offloader_holds_no_device_memory():
    """Tuning the blocks mode makes an Offloader per share timed: each one's copy ring must go back
    when it is closed, though the blocks it was given refer to it."""
    blocks, ring = _blocks(2, pin=True), 64 << 20

    def use_and_close() -> tuple[int, int]:
        sp = Offloader("cuda", 1.0, ring)
        w = sp.weights(0, blocks[0])
        sp.linear(torch.ones(1, 64, device="cuda"), w, "gate_proj")
        sp.finish(0)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        sp.close()
        return held, torch.cuda.memory_allocated()

    first = use_and_close()[1]  # from here on cuBLAS's workspace stays allocated
    for _ in range(3):
        held, closed = use_and_close()
        assert held - closed >= ring and closed <= first


@pytest.mark.inprocess
def test_placement_takes_the_lm_head_chunks_first(tiny_models, split_cache):
    """Rank 0 keeps its LM-head chunks on the accelerator before any layer block (every other
    rank waits while it computes the head), then the layer blocks largest first, within the
    budget left after the KV cache and the split's reserve (here on the CPU, the placement alone)."""
    path, _ = tiny_models("llama")
    shard = split_cached(path, 2, cache_dir=split_cache, progress=False)
    manifest = Manifest.load(shard)
    model = open_rank_model(shard, manifest, 0)
    layers = [block_spec(shard, manifest, 0, layer, kind) for layer, kind in rank_blocks(model.cfg, manifest.plan, 0)
              if kind != "head"]
    # chunks smaller than any layer block: largest first alone would not take them first
    heads = [c for c, _, _ in head_specs(shard, manifest, min(s.nbytes for s in layers) // 2)[3]]
    head_bytes = sum(b.nbytes for b in heads)
    largest = max(layers, key=lambda s: s.nbytes)
    budget = model.cache.nbytes + head_bytes + largest.nbytes  # the head and one layer block
    placed = open_rank._load_on_gpu(torch.device("cpu"), heads, layers, budget, model.cache.nbytes, 0)
    assert list(placed)[:len(heads)] == [b.key for b in heads] and list(placed)[len(heads)] == largest.key
    assert sum(sum(t.nbytes for t in w.values()) for w in placed.values()) <= budget - model.cache.nbytes
    assert [b.key for b in place(heads, layers, head_bytes + largest.nbytes)] == list(placed)
    model.close()
