"""The sliding-window weight scheduler: residency planning, the window bound, release, real
prefetch overlap (shown with events, not sleeps), and streamed runs equal to resident ones."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_tiny

from tpi import ClusterError, LocalCluster
from tpi.config import ConfigError, parse_bytes
from tpi.safetensors_io import StreamingWriter, read_header
from tpi.scheduler import BlockSpec, Residency, SchedulerError, TensorRange, WeightScheduler, plan_residency

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]


def _blocks(tmp_path, sizes: list[int]) -> tuple[list[BlockSpec], list[torch.Tensor]]:
    """One file per block with one float32 tensor of `size` values i + arange."""
    specs, values = [], []
    for i, n in enumerate(sizes):
        t = torch.arange(n, dtype=torch.float32) + 1000 * i
        path = str(tmp_path / f"b{i}.safetensors")
        w = StreamingWriter(path, [("w", torch.float32, (n,))])
        w.write(t)
        w.close()
        info = read_header(path)["w"]
        specs.append(BlockSpec((i,), path, (TensorRange("w", info.dtype, info.shape, info.start, info.nbytes),)))
        values.append(t)
    return specs, values


@pytest.mark.unit
def test_parse_bytes_units():
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert parse_bytes(12345) == 12345 and parse_bytes(None) is None
    for bad in ("lots", "-1GB", "2XB", 0, "0"):
        with pytest.raises(ConfigError, match="memory_budget"):
            parse_bytes(bad)


@pytest.mark.unit
def test_plan_residency_pins_what_fits():
    specs = [BlockSpec((i,), "x", (TensorRange("w", torch.uint8, (n,), 0, n),)) for i, n in
             enumerate([64 * 10, 64 * 30, 64 * 10, 64 * 30, 64 * 30])]
    total = sum(s.nbytes for s in specs)
    assert plan_residency(specs, None, 1000, None).pinned == frozenset(range(len(specs)))
    assert plan_residency(specs, 1000 + total, 1000, 2).window == 0  # everything fits: nothing streamed
    tight = plan_residency(specs, 1000 + 2 * 64 * 30, 1000, None)
    assert tight.pinned == frozenset() and tight.window == 2 and tight.slot_bytes == 64 * 30
    half = plan_residency(specs, 1000 + 64 * 30 + 2 * 64 * 30, 1000, 2)  # room for one big block
    assert len(half.pinned) == 1 and half.planned_bytes <= 1000 + 3 * 64 * 30
    one = plan_residency(specs, 1000 + 64 * 30, 1000, None)  # only window 1 fits: chosen automatically
    assert one.window == 1
    with pytest.raises(ConfigError, match=r"too small: this rank needs at least 4,840 bytes"):
        plan_residency(specs, 1000 + 64 * 30, 1000, 2)
    with pytest.raises(ConfigError, match="window=0"):
        plan_residency(specs, 10**9, 1000, 0)


@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_bound_values_and_release(tmp_path, window):
    specs, values = _blocks(tmp_path, [100, 300, 200, 50, 400])
    res = Residency(frozenset(), window, max(s.nbytes for s in specs), 0, 0)  # stream everything
    with WeightScheduler(specs, res) as sched:
        for _ in range(3):  # three steps: each walks the whole cycle
            for i in range(len(specs)):
                with sched.block(i) as w:
                    assert torch.equal(w["w"], values[i])
                    held = sum(s.ticket is not None for s in sched._slots)
                    assert held <= window
        assert sched.counters.max_streamed_held <= window
        # each use loaded once (a released buffer is reused, never a block loaded twice), and after the
        # last use at most a window's worth loaded ahead
        assert 3 * len(specs) <= sched.counters.loads <= 3 * len(specs) + window
        assert sched.counters.bytes_read >= 3 * sum(v.nbytes for v in values)
        with pytest.raises(SchedulerError, match="out of order"):
            with sched.block(3):
                pass


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_prefetch_overlaps_compute(tmp_path):
    """With window 2 the load of block i+1 starts while block i is still in use."""
    specs, _ = _blocks(tmp_path, [256] * 4)
    res = plan_residency(specs, 2 * specs[0].nbytes, 0, 2)
    started = [threading.Event() for _ in specs]
    sched = WeightScheduler(specs, res)
    sched.on_load_start = lambda i: started[i].set()
    with sched:
        for i in range(len(specs)):
            with sched.block(i):
                # "compute" of block i does not end until the next block's load has begun
                assert started[(i + 1) % len(specs)].wait(10), f"load of block {i + 1} did not start"
            started[(i + 1) % len(specs)].clear() if i + 1 == len(specs) else None


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_window_one_does_not_overlap(tmp_path):
    specs, _ = _blocks(tmp_path, [256] * 3)
    res = plan_residency(specs, specs[0].nbytes, 0, 1)
    with WeightScheduler(specs, res) as sched:
        for i in range(len(specs)):
            with sched.block(i):
                assert sched.counters.loads == i + 1  # nothing loads ahead while a block is held


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_reset_restarts_the_cycle(tmp_path):
    specs, values = _blocks(tmp_path, [64, 64, 64])
    res = plan_residency(specs, 2 * specs[0].nbytes, 0, 2)
    with WeightScheduler(specs, res) as sched:
        with sched.block(0):
            pass
        sched.reset()  # a step abandoned after block 0
        for i in range(3):
            with sched.block(i) as w:
                assert torch.equal(w["w"], values[i])


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """Big enough that blocks are megabytes, so a budget can pin some and not others."""
    path = tmp_path_factory.mktemp("mid")
    model = build_tiny("llama", path, hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=6, num_key_value_heads=3, vocab_size=512)
    return path, model


def _run(path, split_cache, world_size, **kw):
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache, **kw) as cluster:
        return cluster.forward(PROMPT), cluster.generate(PROMPT, max_new_tokens=16), cluster.stats()


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_resident_budget_reads_nothing_after_start(mid_model, split_cache):
    path, _ = mid_model
    with LocalCluster(path, world_size=2, cache_dir=split_cache, memory_budget="20GB") as cluster:
        cluster.generate(PROMPT, max_new_tokens=2)
        before = cluster.stats()
        cluster.generate(PROMPT, max_new_tokens=16)
        after = cluster.stats()
    for a, b in zip(before, after):  # a resident rank reads nothing after start, the start-up load included
        assert b.streamed_blocks == 0 and b.bytes_read == a.bytes_read == 0, (a, b)


@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3])  # one real-process case: every window is test_inprocess.py's
def test_streaming_is_bit_identical_to_resident(mid_model, split_cache, world_size):
    path, _ = mid_model
    logits, tokens, stats = _run(path, split_cache, world_size)
    assert all(r.streamed_blocks == 0 for r in stats)
    for window in (2,):
        s_logits, s_tokens, s_stats = _run(path, split_cache, world_size, window=window, stream_all=True)
        assert torch.equal(s_logits, logits) and s_tokens == tokens, f"window {window}"
        for r in s_stats:
            assert r.pinned_blocks == 0 and r.window == window
            assert 0 < r.max_streamed_held <= window
            assert r.bytes_read > 10 * r.block_bytes  # re-read every step: 1 + 16 steps
    # per rank, a budget with room for the window and about half of the rank's blocks
    budgets = [r.fixed_bytes + 2 * r.largest_block_bytes + r.block_bytes // 2 for r in stats]
    p_logits, p_tokens, p_stats = _run(path, split_cache, world_size, memory_budget=budgets)
    assert torch.equal(p_logits, logits) and p_tokens == tokens
    for r, budget in zip(p_stats, budgets):
        assert 0 < r.pinned_blocks and r.streamed_blocks > 0, r
        assert r.planned_bytes <= budget


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_budget_too_small_is_refused_with_bytes_needed(mid_model, split_cache):
    path, _ = mid_model
    with pytest.raises(ClusterError, match=r"memory budget of 1,000,000 bytes is too small: .*needs at least"):
        with LocalCluster(path, world_size=1, cache_dir=split_cache, memory_budget="1MB"):
            pass
