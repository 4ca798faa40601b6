"""Shard math properties: sizes add up, ranges are contiguous, GQA groups stay whole, ratios are
honoured, and impossible splits or bad ratios are refused with messages that name the values."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest

from tpi.config import ConfigError, ModelConfig
from tpi.partition import ShardPlan, apportion, make_plan, parse_ratios

pytestmark = pytest.mark.unit


def model_config(heads: int, kv_heads: int, intermediate: int, head_dim: int = 8) -> ModelConfig:
    return ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": heads * head_dim,
        "intermediate_size": intermediate, "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    })


SMOLLM2 = model_config(heads=9, kv_heads=3, intermediate=1536, head_dim=64)


def check_ranges(ranges: list[tuple[int, int]], total: int) -> None:
    """[start, end) ranges in rank order: start at 0, touch each other, end at `total`."""
    assert ranges[0][0] == 0, ranges
    for (a0, a1), (b0, _) in pairwise(ranges):
        assert a0 <= a1 == b0, ranges
    assert ranges[-1][0] <= ranges[-1][1] == total, ranges


def check_plan(cfg: ModelConfig, plan: ShardPlan) -> None:
    assert [s.rank for s in plan.shards] == list(range(plan.world_size))
    check_ranges([s.kv_heads for s in plan.shards], cfg.num_kv_heads)
    check_ranges([s.heads for s in plan.shards], cfg.num_heads)
    check_ranges([s.ffn for s in plan.shards], cfg.intermediate_size)
    assert sum(s.num_kv_heads for s in plan.shards) == cfg.num_kv_heads
    assert sum(s.num_heads for s in plan.shards) == cfg.num_heads
    assert sum(s.ffn_size for s in plan.shards) == cfg.intermediate_size
    g = cfg.group_size
    for s, ratio in zip(plan.shards, plan.ratios):
        assert s.heads == (s.kv_heads[0] * g, s.kv_heads[1] * g), s  # whole GQA groups
        if ratio > 0:
            assert s.num_kv_heads >= 1 and s.ffn_size >= 1, (s, plan.ratios)
        else:
            assert s.num_kv_heads == 0 and s.num_heads == 0 and s.ffn_size == 0, (s, plan.ratios)


def check_quota(sizes: list[int], total: int, ratios: list[float]) -> None:
    """Where no rank needs lifting to its minimum of one, each size is its quota rounded up or down."""
    quotas = [total * r / sum(ratios) for r in ratios]
    if all(q >= 1 or r == 0 for q, r in zip(quotas, ratios)):
        for s, q in zip(sizes, quotas):
            assert math.floor(q) <= s <= math.ceil(q), (sizes, quotas)


# --- apportion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("total,ratios,expected", [
    (8, [3, 1], [6, 2]),
    (8, [1, 1], [4, 4]),
    (1536, [3, 1, 1], [922, 307, 307]),  # quotas 921.6, 307.2, 307.2
    (3, [1, 1], [2, 1]),  # ties go to the lower rank
    (5, [1, 1, 1, 1], [2, 1, 1, 1]),
    (8, [100, 1, 1], [6, 1, 1]),  # the minimum of one is taken from the largest share
    (4, [0, 1, 1], [0, 2, 2]),
    (7, [1], [7]),
])
def test_apportion_examples(total: int, ratios: list[float], expected: list[int]) -> None:
    assert apportion(total, ratios, "units") == expected


def test_apportion_properties_random() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 8)
        ratios = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.0, rng.random() * 10]) for _ in range(n)]
        if sum(ratios) == 0:
            ratios[rng.randrange(n)] = 1.0
        active = sum(r > 0 for r in ratios)
        total = rng.randint(active, 5000)
        sizes = apportion(total, ratios, "units")
        assert sum(sizes) == total, (total, ratios, sizes)
        for s, r in zip(sizes, ratios):
            assert (s >= 1) if r > 0 else (s == 0), (total, ratios, sizes)
        check_quota(sizes, total, ratios)


def test_apportion_refuses_more_ranks_than_units() -> None:
    with pytest.raises(ConfigError, match=r"cannot split 2 KV heads over 3 ranks"):
        apportion(2, [1, 1, 1], "KV heads")


# --- make_plan ---------------------------------------------------------------------------------

def test_make_plan_uneven_ratios() -> None:
    cfg = model_config(heads=32, kv_heads=8, intermediate=1536)
    plan = make_plan(cfg, 2, "3,1")
    check_plan(cfg, plan)
    assert [s.num_kv_heads for s in plan.shards] == [6, 2]
    assert [s.heads for s in plan.shards] == [(0, 24), (24, 32)]
    assert [s.ffn for s in plan.shards] == [(0, 1152), (1152, 1536)]


def test_make_plan_three_ranks_close_to_ratios() -> None:
    cfg = model_config(heads=16, kv_heads=8, intermediate=1536)
    plan = make_plan(cfg, 3, [3, 1, 1])
    check_plan(cfg, plan)
    for s, quota in zip(plan.shards, (921.6, 307.2, 307.2)):
        assert abs(s.ffn_size - quota) < 1, plan
    assert [s.num_kv_heads for s in plan.shards] == [5, 2, 1]  # quotas 4.8, 1.6, 1.6


def test_make_plan_properties_random() -> None:
    rng = random.Random(1)
    for _ in range(500):
        kv = rng.randint(1, 16)
        cfg = model_config(heads=kv * rng.randint(1, 4), kv_heads=kv, intermediate=rng.randint(kv, 4096))
        world = rng.randint(1, kv)
        ratios = [rng.choice([0, 1, 1, 2, 3]) for _ in range(world)]
        if not any(ratios):
            ratios[0] = 1
        plan = make_plan(cfg, world, ratios)
        check_plan(cfg, plan)
        check_quota([s.num_kv_heads for s in plan.shards], kv, ratios)
        check_quota([s.ffn_size for s in plan.shards], cfg.intermediate_size, ratios)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_smollm2_shape_splits_up_to_its_kv_heads(world: int) -> None:
    plan = make_plan(SMOLLM2, world)
    check_plan(SMOLLM2, plan)
    assert plan.ratios == (1.0,) * world


def test_smollm2_shape_refuses_four_ranks() -> None:
    with pytest.raises(ConfigError, match=r"3 KV heads over 4 ranks.*at most 3.*ratio 0.*ratios 0,1,1,1$"):
        make_plan(SMOLLM2, 4)
    plan = make_plan(SMOLLM2, 4, "0,1,1,1")  # the rule the error gives: the master holds no share
    assert [s.num_kv_heads for s in plan.shards] == [0, 1, 1, 1] and plan.shards[0].ffn_size == 0
    with pytest.raises(ConfigError, match=r"ratios 0,0,1,1,1$"):
        make_plan(SMOLLM2, 5)


def test_zero_ratio_rank_gets_no_share() -> None:
    cfg = model_config(heads=8, kv_heads=4, intermediate=96)
    plan = make_plan(cfg, 3, "0,1,1")
    check_plan(cfg, plan)
    master = plan.shards[0]
    assert (master.kv_heads, master.heads, master.ffn) == ((0, 0), (0, 0), (0, 0))
    assert [s.num_kv_heads for s in plan.shards[1:]] == [2, 2]
    assert [s.ffn_size for s in plan.shards[1:]] == [48, 48]


def test_plan_dict_round_trip() -> None:
    plan = make_plan(model_config(heads=8, kv_heads=4, intermediate=96), 3, "2,1,1")
    assert ShardPlan.from_dict(plan.to_dict()) == plan


# --- parse_ratios ------------------------------------------------------------------------------

def test_parse_ratios_accepts() -> None:
    assert parse_ratios(None, 3) == (1.0, 1.0, 1.0)
    assert parse_ratios("3,1,1", 3) == (3.0, 1.0, 1.0)
    assert parse_ratios(" 3 , 1.5 ", 2) == (3.0, 1.5)
    assert parse_ratios([2, 0], 2) == (2.0, 0.0)


@pytest.mark.parametrize("ratios,world,match", [
    ("1,1", 3, r"ratios=\[1\.0, 1\.0\] has 2 values; expected one per rank, 3"),
    ([1, 1, 1], 2, r"ratios=\[1\.0, 1\.0, 1\.0\] has 3 values"),
    ("1,-1", 2, r"ratios=\[1\.0, -1\.0\]: expected finite non-negative"),
    ("0,0", 2, r"ratios=\[0\.0, 0\.0\].*positive sum"),
    ("3,x", 2, r"ratios='3,x': expected numbers, one per rank"),
    ("nan,1", 2, r"ratios=\[nan, 1\.0\]"),
    ("inf,1", 2, r"ratios=\[inf, 1\.0\]"),
    (None, 0, r"world_size=0"),
])
def test_parse_ratios_refuses(ratios, world: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_ratios(ratios, world)


def test_make_plan_refuses_bad_ratios() -> None:
    with pytest.raises(ConfigError, match=r"ratios=\[1\.0, 1\.0\] has 2 values"):
        make_plan(SMOLLM2, 3, "1,1")


@pytest.mark.parametrize("ratios", [["3", "x"], [None, 1]])
def test_parse_ratios_refuses_non_numeric_sequence(ratios: list) -> None:
    with pytest.raises(ConfigError, match="ratios"):
        parse_ratios(ratios, 2)
