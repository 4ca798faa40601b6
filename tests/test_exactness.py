"""Sharded generation against transformers on the same weights over real processes and sockets, one
case per family (the whole matrix runs in one process in test_inprocess.py): fp32 logits within
1e-4 of their scale, greedy tokens identical, and every logit bit for bit equal to the in-process
cluster's on the same split, so that the transport adds nothing to the math."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from tpi import LocalCluster
from tpi.inprocess import InProcessCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11, 200, 31]  # longer than mistral's window of 6
# one real-process case per family, between them world sizes 2-4 and uneven ratios
CASES = [("llama", 2, None), ("llama3", 3, "3,1,1"), ("mistral", 4, None), ("qwen2", 2, "1,3"),
         ("qwen3", 3, "0,2,1")]


def reference(model, ids: list[int], new: int) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return logits, out[0, len(ids):].tolist()


@pytest.mark.parametrize("family,world_size,ratios", CASES)
def test_matches_transformers_and_the_in_process_cluster(tiny_models, split_cache, family, world_size, ratios):
    path, model = tiny_models(family)
    ref_logits, ref_tokens = reference(model, PROMPT, 32)
    with LocalCluster(path, world_size=world_size, ratios=ratios, cache_dir=split_cache) as cluster:
        logits = cluster.forward(PROMPT)
        assert_close(logits, ref_logits)
        assert cluster.generate(PROMPT, max_new_tokens=32, temperature=0.0) == ref_tokens
    with InProcessCluster(path, world_size, ratios, cache_dir=split_cache) as local:
        assert torch.equal(local.forward(PROMPT), logits)
