"""Choosing the next token from logits: greedy, temperature, top-k, top-p. Small pure functions.

Owns: the order the filters apply in (temperature, then top-k, then top-p, as transformers does)
and the validation of their values. Does not know: models, tokenizers, the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tpi.config import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: expected a finite number >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k={self.top_k}: expected an integer >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: expected a number in (0, 1]")

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[..., -1, None]
    return logits.masked_fill(logits < threshold, -math.inf)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= 1 - p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [V] float32 -> token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k is not None:
        scores = filter_top_k(scores, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        scores = filter_top_p(scores, params.top_p)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
