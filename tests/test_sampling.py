"""Sampling: greedy is the argmax; temperature, top-k and top-p give the distributions they promise
(checked by drawing many samples) and the same filtered distribution as transformers' own logits
warpers, applied in the same order; a seed repeats its tokens; bad values are refused."""

from __future__ import annotations

import math

import pytest
import torch

from tpi.config import ConfigError
from tpi.sampling import SamplingParams, filter_top_k, filter_top_p, sample

pytestmark = pytest.mark.unit

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()
DRAWS = 4000


def frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS, draws: int = DRAWS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(len(logits))
    for _ in range(draws):
        counts[sample(logits, params, gen)] += 1
    return counts / draws


def expected(weights: torch.Tensor, keep: list[int] | None = None) -> torch.Tensor:
    w = weights.clone()
    if keep is not None:
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[keep] = True
        w[~mask] = 0
    return w / w.sum()


def close(freq: torch.Tensor, want: torch.Tensor) -> None:
    """Every frequency within 5 standard deviations of its probability (about 0.017 at p=0.5)."""
    tol = 5 * torch.sqrt(want * (1 - want) / DRAWS) + 1e-9
    assert ((freq - want).abs() <= tol).all(), f"frequencies {freq.tolist()}, expected {want.tolist()}"


def test_greedy_is_the_argmax_whatever_else_is_set():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(), SamplingParams(0.0, top_k=5, top_p=0.5, seed=3)):
        assert sample(logits, params) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    close(frequencies(SamplingParams(temperature)), expected(PROBS ** (1 / temperature)))


@pytest.mark.parametrize("k,keep", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (10, None)])
def test_top_k_keeps_the_k_most_likely(k, keep):
    close(frequencies(SamplingParams(1.0, top_k=k)), expected(PROBS, keep))


@pytest.mark.parametrize("p,keep", [(0.4, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (1.0, None)])
def test_top_p_keeps_the_smallest_set_that_reaches_p(p, keep):
    close(frequencies(SamplingParams(1.0, top_p=p)), expected(PROBS, keep))


def test_temperature_then_top_k_then_top_p():
    # T=2 flattens the tail: probabilities ~ sqrt(PROBS) = .37 .29 .20 .12; top-k 3 drops the last;
    # of the three left (.43 .34 .23), top-p 0.7 keeps the first two
    close(frequencies(SamplingParams(2.0, top_k=3, top_p=0.7)), expected(PROBS.sqrt(), [0, 1]))


@pytest.mark.parametrize("temperature,k,p", [(0.7, 10, 0.9), (1.3, 40, 0.5), (1.0, 3, 1.0), (0.5, 100, 0.95)])
def test_filters_agree_with_transformers_warpers(temperature, k, p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = 3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(k))
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    ref = TopKLogitsWarper(k)(None, ref)
    ref = TopPLogitsWarper(p)(None, ref) if p < 1 else ref
    ours = filter_top_k(logits[0] / temperature, k)
    ours = filter_top_p(ours, p) if p < 1 else ours
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))  # the same tokens kept
    torch.testing.assert_close(ours.softmax(-1), ref[0].softmax(-1))


def test_a_seed_repeats_its_tokens_and_another_seed_does_not():
    logits = torch.zeros(1000)  # uniform: two seeds agreeing on 20 draws by chance is ~1e-60

    def draws(seed: int) -> list[int]:
        params = SamplingParams(1.0, seed=seed)
        gen = params.generator()
        return [sample(logits, params, gen) for _ in range(20)]

    assert draws(7) == draws(7) and draws(7) != draws(8)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -1.0}, "temperature=-1.0"), ({"temperature": math.nan}, "temperature=nan"),
    ({"temperature": math.inf}, "temperature=inf"), ({"top_k": 0}, "top_k=0"), ({"top_k": 2.5}, "top_k=2.5"),
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"),
])
def test_bad_values_are_refused_by_name(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kw)
