"""Shard math: which heads and FFN columns each rank owns. Pure functions, no torch.

Owns: turning a world size and optional per-rank ratios into explicit per-rank sizes and ranges,
attention at KV-group granularity (a rank owns whole KV heads and the query heads that share them),
the FFN by intermediate columns, and the errors for splits that cannot be made. Does not know:
tensors, files, processes. A ratio of 0 gives a rank no share of the layers (a master that only
embeds, samples and sums).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tpi.config import ConfigError, ModelConfig


def make_plan(cfg: ModelConfig, world_size: int, ratios: Sequence[float] | str | None = None,
              ffn_unit: int = 1) -> ShardPlan:
    """Per-rank KV-head, query-head and FFN-column ranges for `world_size` ranks (master included).
    FFN columns go in whole units of `ffn_unit` (a quantized split's group size: the down
    projection's column slices never cut a group)."""
    r = parse_ratios(ratios, world_size)
    kv_sizes = apportion(cfg.num_kv_heads, r, "KV heads")
    if cfg.intermediate_size % ffn_unit:
        raise ConfigError(f"intermediate_size={cfg.intermediate_size} is not a multiple of the group size "
                          f"{ffn_unit}: the FFN cannot be split in whole groups; choose a group size that divides it")
    ffn_sizes = [n * ffn_unit for n in apportion(cfg.intermediate_size // ffn_unit, r, f"FFN groups of {ffn_unit}")]
    g = cfg.group_size
    shards = tuple(
        RankShard(rank, kv, (kv[0] * g, kv[1] * g), ffn)
        for rank, (kv, ffn) in enumerate(zip(_ranges(kv_sizes), _ranges(ffn_sizes)))
    )
    return ShardPlan(world_size, r, shards)


def parse_ratios(text: str | Sequence[float] | None, world_size: int) -> tuple[float, ...]:
    """`"3,1,1"` or a sequence -> validated ratios, one per rank; None -> all equal."""
    if world_size < 1:
        raise ConfigError(f"world_size={world_size}: expected at least 1")
    if text is None:
        return (1.0,) * world_size
    items = [v for v in text.split(",") if v.strip()] if isinstance(text, str) else list(text)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"ratios={text!r}: expected numbers, one per rank, such as 3,1,1") from None
    if len(values) != world_size:
        raise ConfigError(f"ratios={values} has {len(values)} values; expected one per rank, {world_size}")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(f"ratios={values}: expected finite non-negative numbers with a positive sum")
    return tuple(values)


def apportion(total: int, ratios: Sequence[float], what: str) -> list[int]:
    """Split `total` units by `ratios`: every rank with a positive ratio gets at least one unit,
    the rest go by largest remainder (ties to the lower rank). Sizes sum to `total`."""
    active = [i for i, r in enumerate(ratios) if r > 0]
    if len(active) > total:
        raise ConfigError(
            f"cannot split {total} {what} over {len(active)} ranks with a share (ratios {list(ratios)}): "
            f"every rank with a nonzero ratio needs at least one, so at most {total} ranks may have one; "
            f"give the others ratio 0 (they hold no share of the layers), for example the master, which then "
            f"only embeds, samples and serves: ratios {_suggest(len(ratios), total)}"
        )
    rsum = sum(ratios)
    quotas = [total * r / rsum for r in ratios]
    sizes = [max(1, math.floor(q)) if r > 0 else 0 for q, r in zip(quotas, ratios)]
    while sum(sizes) > total:  # minimums pushed us over: take from the most over-served rank
        i = max((i for i in active if sizes[i] > 1), key=lambda i: (sizes[i] - quotas[i], -i))
        sizes[i] -= 1
    while sum(sizes) < total:
        i = max(active, key=lambda i: (quotas[i] - sizes[i], -i))
        sizes[i] += 1
    return sizes


def _suggest(world_size: int, total: int) -> str:
    """Ratios that fit: rank 0 (and the next ranks, if need be) at 0, at most `total` ranks at 1."""
    zeros = max(1, world_size - total)
    return ",".join(["0"] * zeros + ["1"] * (world_size - zeros))


def _ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


@dataclass(frozen=True)
class RankShard:
    rank: int
    kv_heads: tuple[int, int]  # [start, end) over KV heads
    heads: tuple[int, int]  # [start, end) over query heads
    ffn: tuple[int, int]  # [start, end) over intermediate columns

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def ffn_size(self) -> int:
        return self.ffn[1] - self.ffn[0]


@dataclass(frozen=True)
class ShardPlan:
    world_size: int
    ratios: tuple[float, ...]
    shards: tuple[RankShard, ...]

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "ratios": list(self.ratios),
            "shards": [
                {"rank": s.rank, "kv_heads": list(s.kv_heads), "heads": list(s.heads), "ffn": list(s.ffn)}
                for s in self.shards
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShardPlan:
        shards = tuple(
            RankShard(s["rank"], tuple(s["kv_heads"]), tuple(s["heads"]), tuple(s["ffn"])) for s in d["shards"]
        )
        return cls(int(d["world_size"]), tuple(float(r) for r in d["ratios"]), shards)
