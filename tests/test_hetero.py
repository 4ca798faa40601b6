"""CPU/GPU split compute: the split path with both parts on the CPU (CI), and on a real GPU where
there is one (skipped cleanly otherwise)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from tpi import ClusterError, LocalCluster
from tpi.hetero import SplitContext, SplitWeight, measure_ratio

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_split_weight_on_cpu_matches_linear(ratio):
    gen = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(s, generator=gen) for s in ((96, 64), (96,), (5, 64)))
    out = SplitWeight(w, b, SplitContext.create("cpu", ratio))(x)
    assert_close(out, torch.nn.functional.linear(x, w, b), rel=1e-6)


def test_split_ratio_is_validated():
    with pytest.raises(ValueError, match="split ratio=1.5"):
        SplitContext.create("cpu", 1.5)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [1, 2])
def test_split_path_on_cpu_matches_unsplit(tiny_models, split_cache, world_size):
    path, _ = tiny_models("qwen2")  # biases on q/k/v exercise the bias split too
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache) as cluster:
        ref, ref_tokens = cluster.forward(PROMPT), cluster.generate(PROMPT, max_new_tokens=12)
    for ratio in (0.0, 0.3, 1.0):
        with LocalCluster(path, world_size=world_size, cache_dir=split_cache, split_ratio=ratio,
                          stream_all=ratio == 0.3) as cluster:
            assert_close(cluster.forward(PROMPT), ref, rel=1e-5)
            assert cluster.generate(PROMPT, max_new_tokens=12) == ref_tokens
            assert all(r["split_ratio"] == ratio for r in cluster.stats())


@pytest.mark.timeout(60)
def test_cuda_device_refused_without_cuda(tiny_models, split_cache):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, _ = tiny_models("llama")
    with pytest.raises(ClusterError, match="device='cuda', but torch sees no CUDA device"):
        with LocalCluster(path, world_size=1, cache_dir=split_cache, device="cuda"):
            pass


@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2])
def test_gpu_split_matches_cpu(tiny_models, split_cache, world_size):
    path, _ = tiny_models("qwen2")
    with LocalCluster(path, world_size=world_size, cache_dir=split_cache) as cluster:
        ref, stats = cluster.forward(PROMPT), cluster.stats()[0]
    kv, block = stats["kv_cache_bytes"], stats["largest_block_bytes"]
    placements = []
    # room for the KV cache only (every block split), for some blocks, for every block
    for budget, ratio in ((kv, 0.3), (kv + 2 * block, 0.7), ("50MB", 0.5)):
        with LocalCluster(path, world_size=world_size, cache_dir=split_cache, device="cuda",
                          gpu_memory_budget=budget, split_ratio=ratio) as cluster:
            assert_close(cluster.forward(PROMPT), ref, rel=1e-4)
            placements.append(cluster.stats()[0]["gpu_blocks"])
    assert placements[0] == 0 and placements[0] < placements[1] < placements[2]
    with pytest.raises(ClusterError, match="too small for the KV cache"):
        with LocalCluster(path, world_size=world_size, cache_dir=split_cache, device="cuda", gpu_memory_budget=1):
            pass


@needs_cuda
@pytest.mark.timeout(300)
def test_gpu_greedy_tokens_match_transformers(smollm2, split_cache):
    path, model, tok = smollm2
    ids = list(tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False))
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    with LocalCluster(path, world_size=1, cache_dir=split_cache, device="cuda", gpu_memory_budget="250MB",
                      split_ratio=0.5) as cluster:
        stats = cluster.stats()[0]
        assert stats["gpu_blocks"] > 0 and stats["streamed_blocks"] + stats["pinned_blocks"] > 0
        assert cluster.generate(ids, max_new_tokens=24) == ref


def test_measured_ratio_is_a_fraction():
    r = measure_ratio(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32, 8 << 20, 1)
    assert 0 < r["ratio"] < 1 and r["cpu_bytes_per_s"] > 0
