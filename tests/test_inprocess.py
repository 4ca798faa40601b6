"""The whole matrix in one process (InProcessCluster: the engine, the layer loop and the worker loop,
one thread per rank, no sockets): every family at world sizes 1-4 and with uneven ratios (a rank
with ratio 0 included) against transformers on the same weights, float32 logits within 1e-4 of
their scale and greedy tokens identical; streaming at every window bit for bit equal to resident
weights; the CPU/GPU offload with both parts on the CPU equal to no offload. Seconds, not minutes:
the real-process cases are in test_exactness.py, budgets (which count each process's own memory)
in test_scheduler.py."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_close

from tpi.inprocess import InProcessCluster

pytestmark = [pytest.mark.inprocess, pytest.mark.timeout(120)]

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11, 200, 31]  # longer than mistral's window of 6
NEW = 24
CASES = [(f, ws, None) for f in FAMILIES for ws in (1, 2, 3, 4)]
CASES += [("llama", 3, "0,1,1"), ("llama3", 3, "3,1,1"), ("qwen2", 2, "1,3"), ("mistral", 3, "2,1,1"),
          ("qwen3", 4, "1,2,2,1"), ("llama3", 4, "0,3,1,2")]


@pytest.fixture(scope="module")
def references(tiny_models):
    """family -> (checkpoint dir, transformers logits [L, V], greedy tokens), computed once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path, model = tiny_models(family)
            with torch.no_grad():
                logits = model(torch.tensor([PROMPT])).logits[0]
                out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            cache[family] = (path, logits, out[0, len(PROMPT):].tolist())
        return cache[family]

    return get


@pytest.mark.parametrize("family,world_size,ratios", CASES, ids=[f"{f}-{w}-{r}" for f, w, r in CASES])
def test_matches_transformers(references, split_cache, family, world_size, ratios):
    path, ref_logits, ref_tokens = references(family)
    with InProcessCluster(path, world_size, ratios, cache_dir=split_cache) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """Blocks of a few hundred KB, so that a budget can pin some and not others."""
    from conftest import build_tiny

    path = tmp_path_factory.mktemp("mid-inprocess")
    build_tiny("llama", path, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=384)
    return path


@pytest.mark.parametrize("world_size", [1, 2])
def test_streaming_at_every_window_is_bit_identical_to_resident(mid_model, split_cache, world_size):
    with InProcessCluster(mid_model, world_size, cache_dir=split_cache) as cluster:
        logits, tokens, stats = cluster.forward(PROMPT), cluster.generate(PROMPT, 8), cluster.stats()
    assert all(r.streamed_blocks == 0 and r.bytes_read == 0 for r in stats)  # resident: nothing read after start
    for window in (1, 2, 3):
        with InProcessCluster(mid_model, world_size, cache_dir=split_cache, window=window, stream_all=True) as cluster:
            assert torch.equal(cluster.forward(PROMPT), logits) and cluster.generate(PROMPT, 8) == tokens
            for r in cluster.stats():
                assert r.pinned_blocks == 0 and r.window == window and 0 < r.max_streamed_held <= window
                assert r.bytes_read >= 9 * r.block_bytes  # every block re-read each step: 1 + 8 steps


# (share, stream every block: no prefetch, each block divided as it comes; else pinned, divided once)
OFFLOAD = {"rows": [(0.0, False), (0.3, True), (0.7, False), (1.0, False)],
           "blocks": [(0.0, False), (0.45, False), (0.6, True), (1.0, False)]}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("mode", ["rows", "blocks"])
def test_offload_on_the_cpu_matches_no_offload(tiny_models, split_cache, world_size, mode):
    """Both parts of the offload on the CPU (how CI runs it): the logits within 1e-5 of no offload,
    the same greedy tokens; the GPU's share of the host bytes as planned (rows: the share itself;
    blocks: attention always on the accelerator side, the rest as near the share as whole columns
    allow)."""
    path, _ = tiny_models("qwen2")  # biases on q/k/v exercise the bias rows too
    with InProcessCluster(path, world_size, cache_dir=split_cache) as cluster:
        ref, ref_tokens = cluster.forward(PROMPT), cluster.generate(PROMPT, 12)
    shares = []
    for share, stream in OFFLOAD[mode]:
        with InProcessCluster(path, world_size, cache_dir=split_cache, offload_mode=mode, offload_share=share,
                              stream_all=stream) as cluster:
            assert_close(cluster.forward(PROMPT), ref, rel=1e-5)
            assert cluster.generate(PROMPT, 12) == ref_tokens
            stats = cluster.stats()
            assert all(r.offload_share == share and r.offload_mode == mode for r in stats)
            shares.append(stats[0].offload_gpu_share)
    assert shares == sorted(shares) and len(set(shares)) == len(shares) and shares[-1] == 1.0
    if mode == "rows":
        assert shares == pytest.approx([s for s, _ in OFFLOAD[mode]])
    else:
        assert 0.0 < shares[0] < 0.5 and all(abs(s - r) < 0.01 for s, (r, _) in zip(shares[1:], OFFLOAD[mode][1:]))


@pytest.mark.parametrize("chunk", [1, 5])
def test_a_smaller_prefill_chunk_gives_the_same_answer(references, split_cache, chunk):
    """prefill_chunk: the prompt runs in steps of that many tokens (the activations a tight budget
    keeps room for), against transformers as in one step."""
    path, ref_logits, ref_tokens = references("mistral")
    with InProcessCluster(path, 2, cache_dir=split_cache, prefill_chunk=chunk) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens
        assert all(s.activation_bytes < 4 * 512 * 64 for s in cluster.stats())  # a bound for `chunk` tokens
