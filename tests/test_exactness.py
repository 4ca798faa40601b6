"""Sharded generation against transformers on the same weights, for every family, over real
processes and sockets: fp32 logits within 1e-4 of their scale, greedy tokens identical."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_close

from tpi import LocalCluster

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11, 200, 31]  # longer than mistral's window of 6

CASES = [(f, ws, None) for f in FAMILIES for ws in (1, 2, 3, 4)]
CASES += [("llama3", 3, "3,1,1"), ("qwen2", 2, "1,3"), ("mistral", 3, "2,1,1")]


def reference(model, ids: list[int], new: int) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return logits, out[0, len(ids):].tolist()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family,world_size,ratios", CASES)
def test_matches_transformers(tiny_models, split_cache, family, world_size, ratios):
    path, model = tiny_models(family)
    ref_logits, ref_tokens = reference(model, PROMPT, 32)
    with LocalCluster(path, world_size=world_size, ratios=ratios, cache_dir=split_cache) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, max_new_tokens=32, temperature=0.0) == ref_tokens
