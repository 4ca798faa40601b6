"""The alpha-beta cost model of one allreduce, the `auto` choice it makes, and measuring a link.

Owns: ``Link`` (alpha: the one-way time of a message, software included; bandwidth: bytes per
second of one device's link, each direction), the predicted time of star, ring and tree for n
bytes over N ranks, ``choose`` (the cheapest; ties go to the earlier name, the star first), and
fitting alpha and bandwidth from ping-pong round trips of a small and a large message. Model,
every device on its own full-duplex link to a switch:
    star  2a + 2(N-1) n/B        rank 0's link carries N-1 partials in, then N-1 sums out
    ring  2(N-1) (a + n/(N B))   reduce-scatter + allgather, 1/N of the vector per hop
    tree  2 ceil(log2 N) (a + n/B)   binomial reduce to rank 0, then broadcast
So the star wins when latency dominates (few ranks, small vectors, slow round trips) and the
ring when rank 0's link is the bottleneck (many ranks, large vectors, fast round trips). Does not
know: sockets (``measure_link`` takes a round-trip function), the collectives' code.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Collective = Literal["star", "ring", "tree"]
COLLECTIVES: tuple[Collective, ...] = ("star", "ring", "tree")


@dataclass(frozen=True)
class Link:
    alpha_s: float  # one-way time of a message, seconds
    bandwidth: float  # bytes per second

    def __post_init__(self) -> None:
        if not (self.alpha_s >= 0 and math.isfinite(self.alpha_s)):
            raise ValueError(f"alpha_s={self.alpha_s}: expected a finite time >= 0")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth={self.bandwidth}: expected bytes per second > 0")


def predict(collective: Collective, world_size: int, nbytes: int, link: Link) -> float:
    """Predicted seconds of one allreduce of `nbytes` per rank over `world_size` ranks."""
    if world_size < 1 or nbytes < 0:
        raise ValueError(f"world_size={world_size}, nbytes={nbytes}: expected >= 1 and >= 0")
    n, a, b = world_size, link.alpha_s, link.bandwidth
    if n == 1:
        return 0.0
    if collective == "star":
        return 2 * a + 2 * (n - 1) * nbytes / b
    if collective == "ring":
        return 2 * (n - 1) * (a + math.ceil(nbytes / n) / b)
    if collective == "tree":
        return 2 * math.ceil(math.log2(n)) * (a + nbytes / b)
    raise ValueError(f"collective {collective!r}: expected one of {', '.join(COLLECTIVES)}")


def choose(world_size: int, nbytes: int, link: Link, candidates: tuple[Collective, ...] = COLLECTIVES) -> Collective:
    """The candidate the model predicts fastest; the earlier one on a tie."""
    return min(candidates, key=lambda c: (predict(c, world_size, nbytes, link), candidates.index(c)))


def fit(small_bytes: int, small_rtt: float, large_bytes: int, large_rtt: float) -> Link:
    """alpha and bandwidth from two round trips (a message there and the same size back):
    rtt(k) = 2 (alpha + k / B)."""
    if not 0 <= small_bytes < large_bytes:
        raise ValueError(f"expected 0 <= small_bytes < large_bytes, got {small_bytes} and {large_bytes}")
    extra = max(large_rtt - small_rtt, 1e-9) / 2  # the large message's extra one-way time
    bandwidth = (large_bytes - small_bytes) / extra
    alpha = max(small_rtt / 2 - small_bytes / bandwidth, 0.0)
    return Link(alpha, bandwidth)


def measure_link(roundtrip: Callable[[int], float], small: int = 64, large: int = 1 << 20,
                 repeats: int = 20) -> Link:
    """Fit a Link from the medians of `repeats` round trips of `small` and `large` bytes;
    `roundtrip(k)` sends k bytes to the peer, waits for k bytes back and returns the seconds."""
    roundtrip(small)
    roundtrip(large)  # warm up: connections, buffers
    rtt_small = statistics.median(roundtrip(small) for _ in range(repeats))
    rtt_large = statistics.median(roundtrip(large) for _ in range(max(3, repeats // 4)))
    return fit(small, rtt_small, large, rtt_large)
