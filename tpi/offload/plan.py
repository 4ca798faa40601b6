"""Offload planning: pure arithmetic on block sizes and measured rates, no tensors moved.

Owns: which rows of a projection the accelerator computes (``gpu_rows``: the last ones), the GPU
memory the offload needs (``share_bytes``, ``copy_slot_bytes``), which blocks a GPU budget holds
(``place``: LM-head chunks first, then layer blocks largest first), the blocks mode's plan
(``plan_shares``: attention whole on the accelerator, every other block at one common share;
``plan_blocks``: that share turned into whole columns per block), the share the measured rates
predict (``balance_share``) and the search over timed shares (``search_share``). Every function
checks its inputs and names the value in its error. Does not know: tensors, streams, threads,
timing (calibrate.py times; blocks.py and offloader.py move the bytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ALIGN = 256  # copy slot sizes are rounded up to this
COPY_SLOTS = 3  # the copy ring holds 3 of the largest projection's GPU rows: the one in use and the next copies
SHARE_GRID, SHARE_REFINE = 10, (0.05, 0.025)  # search_share: shares 0, 0.1, ..., 1, then the best's neighbours


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def gpu_rows(out: int, share: float) -> int:
    """Rows of an [out, in] projection given to the accelerator: the last round(out * share)."""
    return int(round(out * share))


def is_projection(name: str) -> bool:
    """A projection's weight or bias ("q_proj.weight", "q_proj.bias"), as opposed to a norm."""
    return name.rsplit(".", 1)[0] in PROJECTIONS


def _share_shape(name: str, shape: tuple[int, ...], share: float) -> tuple[int, ...]:
    """The accelerator's part of tensor `name`: the last rows of a projection, other tensors whole."""
    return (gpu_rows(shape[0], share), *shape[1:]) if is_projection(name) else tuple(shape)


def share_bytes(tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], share: float) -> tuple[int, int]:
    """(a copy slot: the largest projection weight's accelerator rows, plus two rows of room so
    that an LM-head chunk no larger than that projection fits too; the norms and bias shares,
    which stay on the accelerator) in bytes, for a block's tensors (name, shape, dtype)."""
    slot, small = 0, 0
    for name, shape, dtype in tensors:
        n = aligned(dtype.itemsize * math.prod(_share_shape(name, shape, share)))
        if is_projection(name) and name.endswith(".weight"):
            slot = max(slot, n + 2 * dtype.itemsize * math.prod(shape[1:]))
        else:
            small += n
    return slot, small


def copy_slot_bytes(specs: Sequence, share: float) -> tuple[int, int]:
    """(one copy slot at `share`, the norms and bias shares of every block kept on the GPU) in
    bytes, for block specs (anything with ``.tensors`` of name, shape, dtype)."""
    sizes = [share_bytes([(t.name, t.shape, t.dtype) for t in s.tensors], share) for s in specs]
    return max((a for a, _ in sizes), default=0), sum(b for _, b in sizes)


def place(first: Sequence, others: Sequence, room: int) -> list:
    """The blocks a GPU with `room` bytes holds: of `first` in order (rank 0's LM-head chunks:
    every other rank waits while rank 0 computes the head), then of `others` largest first,
    each one that still fits. Blocks are anything with ``.nbytes``."""
    chosen = []
    for spec in [*first, *sorted(others, key=lambda s: -s.nbytes)]:
        if spec.nbytes <= room:
            chosen.append(spec)
            room -= spec.nbytes
    return chosen


def plan_shares(sizes: Sequence[int], fraction: float, cpu_ok: Sequence[bool] | None = None) -> list[float]:
    """The blocks mode: for host blocks of these sizes (bytes, in order of use), the accelerator's
    share of each block, so that it computes `fraction` of all their bytes: a block whose `cpu_ok`
    is False (an attention block: its KV cache is on the accelerator) goes to the accelerator
    whole (1.0); every other block (FFN blocks, LM-head chunks) is shared at one common share, which
    may come out at 0 (the CPU's whole) or 1. Each shared block is computed by both at once, on
    disjoint columns (``blocks.divide_block``), so neither waits for the other within a block, and
    the copy engine brings the next blocks' accelerator parts over while the CPU computes its part."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"offload fraction={fraction}: expected a number in [0, 1]")
    cpu_ok = [True] * len(sizes) if cpu_ok is None else list(cpu_ok)
    if len(cpu_ok) != len(sizes):
        raise ValueError(f"cpu_ok has {len(cpu_ok)} entries for {len(sizes)} blocks")
    for size in sizes:
        if size < 0:
            raise ValueError(f"block size {size}: expected a number of bytes >= 0")
    fixed = sum(s for s, movable in zip(sizes, cpu_ok, strict=True) if not movable)
    movable = sum(sizes) - fixed
    share = min(1.0, max(0.0, (fraction * sum(sizes) - fixed) / movable)) if movable else 0.0
    return [share if m else 1.0 for m in cpu_ok]


@dataclass(frozen=True)
class BlockPlan:
    """The blocks mode at one fraction of the host bytes, per block key."""

    fraction: float
    columns: dict[Hashable, int] = field(default_factory=dict)  # a divided block: the CPU's columns (head: rows)
    shares: dict[Hashable, float] = field(default_factory=dict)  # the accelerator's share of each block's bytes
    ratios: dict[Hashable, float] = field(default_factory=dict)  # the Offloader's: 0 the CPU's whole, else 1


def plan_blocks(blocks: Sequence[tuple[Hashable, int, int, bool]], fraction: float) -> BlockPlan:
    """`plan_shares` made whole: blocks as (key, bytes, extent, cpu_ok), where extent is what can
    be divided (an FFN block's intermediate columns, a head chunk's rows; 0: not divisible). A
    divisible block gets the CPU's columns [0, cpu) nearest its share; another goes whole to the
    side nearer its share (attention: the accelerator)."""
    plan = BlockPlan(fraction)
    shares = plan_shares([b[1] for b in blocks], fraction, [b[3] for b in blocks])
    for (key, _, n, _), share in zip(blocks, shares, strict=True):
        if n:
            cpu = n - round(n * share)
            share = (n - cpu) / n
            if 0 < cpu < n:
                plan.columns[key] = cpu
        else:
            share = float(round(share))
        plan.shares[key] = share
        plan.ratios[key] = 0.0 if share == 0 else 1.0
    return plan


def balance_share(gpu_only: int, shared: int, cpu_Bps: float, copy_Bps: float, host_s: float = 0.0) -> float:
    """The blocks mode's share of the host bytes for the accelerator, from measured rates: per
    token the copy engine brings over the `gpu_only` bytes (attention blocks) and a share s of the
    `shared` ones (FFN blocks, LM-head chunks), while the thread that runs the blocks computes the
    other 1 - s of them on the CPU and also spends `host_s` seconds on everything else (launching
    the accelerator's work, the blocks resident there, syncs). Both run at once, so a token takes
    the longer of the two: s is where they are equal,
    (gpu_only + s * shared) / copy_Bps == (1 - s) * shared / cpu_Bps + host_s, clamped to [0, 1].
    Returns (gpu_only + s * shared) / (gpu_only + shared), the fraction ``plan_shares`` takes.
    With host_s = 0 and no gpu_only bytes this is copy_Bps / (cpu_Bps + copy_Bps)."""
    for name, v in (("gpu_only", gpu_only), ("shared", shared), ("host_s", host_s)):
        if v < 0:
            raise ValueError(f"{name}={v}: expected a number >= 0")
    for name, v in (("cpu_Bps", cpu_Bps), ("copy_Bps", copy_Bps)):
        if not v > 0:
            raise ValueError(f"{name}={v}: expected a bandwidth > 0 bytes per second")
    if gpu_only + shared == 0:
        return 0.0
    if shared == 0:
        return 1.0
    s = (shared / cpu_Bps + host_s - gpu_only / copy_Bps) / (shared / cpu_Bps + shared / copy_Bps)
    s = min(1.0, max(0.0, s))
    return (gpu_only + s * shared) / (gpu_only + shared)


def search_share(time_at: Callable[[list[float]], list[float]], grid: int = SHARE_GRID,
                 refine: Sequence[float] = SHARE_REFINE) -> tuple[float, dict[float, float]]:
    """The share in [0, 1] at which `time_at` (seconds for each of a list of shares, timed
    together) is least: shares 0, 1/grid, ..., 1, then the best's neighbours at each step of
    `refine`. Returns (the best share, {share: seconds} for every share timed)."""
    if grid < 1:
        raise ValueError(f"grid={grid}: expected at least 1 step")
    timed: dict[float, float] = {}

    def at(shares: list[float]) -> None:
        shares = [s for s in dict.fromkeys(round(min(1.0, max(0.0, s)), 4) for s in shares) if s not in timed]
        if shares:
            seconds = time_at(shares)
            if len(seconds) != len(shares):
                raise ValueError(f"time_at gave {len(seconds)} times for {len(shares)} shares")
            timed.update(zip(shares, seconds, strict=True))

    at([i / grid for i in range(grid + 1)])
    for step in refine:
        best = min(timed, key=timed.get)
        at([best - step, best + step])
    return min(timed, key=timed.get), dict(sorted(timed.items()))


def search_steps(rounds: int) -> int:
    """Steps the search takes when each share is timed `rounds` times, each after an untimed step."""
    return (SHARE_GRID + 1 + 2 * len(SHARE_REFINE)) * rounds * 2
