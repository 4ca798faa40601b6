"""One rank's host blocks under the offload: which block runs where, and its two parts.

Owns: ``divide_block`` (a block as the CPU's part and the accelerator's part on disjoint FFN
columns or head rows, each part's weights contiguous so that the accelerator's is copied as it
is) and ``BlockOffload``, a rank's offload state: the ``Offloader``, the plan (rows mode: one
share for every projection; blocks mode: a ``plan.BlockPlan``), the parts of its pinned blocks
(made once), ``run`` (one host block through ``offloader.offload_step``, the next blocks'
copies queued as far ahead as the ring holds) and the GPU's share achieved. Does not know: the
model math (the caller hands in the block's ``run``), the network, how the share was chosen
(calibrate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import torch

from tpi.offload.offloader import Offloader, offload_step
from tpi.offload.plan import COPY_SLOTS, BlockPlan, plan_blocks

Weights = dict[str, torch.Tensor]


def divide_block(w: Mapping[str, torch.Tensor], kind: str, cpu: int, rearrange: bool = True) -> tuple[dict, dict]:
    """Block `w` as two blocks whose results add up (FFN) or sit side by side (an LM-head chunk):
    (the CPU's: intermediate columns [0, cpu) of an FFN block, rows [0, cpu) of a head chunk; the
    accelerator's: the rest), each part's weights contiguous in memory, so that the accelerator's
    can be copied over as they are. An FFN block's down projection [D, I] is rearranged in place
    for that (its columns [0, cpu), then the others, each part row-major): `w`'s own
    down_proj.weight is scrambled afterwards and must not be used again. The norm goes to both
    parts, the down projection's bias to the CPU's alone (it is added once). `rearrange` False:
    parts of the same shapes over the same bytes, `w` left as it is, but the down projection's
    parts are not its columns: for timing the offload at several shares, never for results."""
    if kind == "head":
        t = w["lm_head.weight"]
        if not 0 < cpu < t.shape[0]:
            raise ValueError(f"divide at row {cpu}: expected 0 < row < {t.shape[0]}")
        return {"lm_head.weight": t[:cpu]}, {"lm_head.weight": t[cpu:]}
    if kind != "ffn":
        raise ValueError(f"block kind {kind!r}: only FFN blocks and LM-head chunks are divided by columns")
    down = w["down_proj.weight"]
    d, inter = down.shape
    if not 0 < cpu < inter:
        raise ValueError(f"divide at column {cpu}: expected 0 < column < {inter}")
    flat = down.view(-1)
    if rearrange:
        gpu_cols = down[:, cpu:].clone()  # its place is overwritten by the CPU's columns first
        for a in range(0, d, 256):  # row chunks: their CPU columns land before their own start (cpu <= inter)
            b = min(d, a + 256)
            flat[a * cpu:b * cpu].view(b - a, cpu).copy_(down[a:b, :cpu].clone())
        flat[d * cpu:].view(d, inter - cpu).copy_(gpu_cols)
    halves: tuple[dict, dict] = ({}, {})
    for name, t in w.items():
        base = name.rsplit(".", 1)[0]
        if base in ("gate_proj", "up_proj"):  # rows (weight) or entries (bias) by intermediate column
            halves[0][name], halves[1][name] = t[:cpu], t[cpu:]
        elif name == "down_proj.weight":
            halves[0][name] = flat[:d * cpu].view(d, cpu)
            halves[1][name] = flat[d * cpu:].view(d, inter - cpu)
        elif name == "down_proj.bias":
            halves[0][name] = t
        else:  # the norm
            halves[0][name] = halves[1][name] = t
    return halves


def extent(spec) -> int:
    """What the blocks mode divides: an FFN block's intermediate columns, a head chunk's rows (0:
    a block it does not divide)."""
    names = {t.name: t for t in spec.tensors}
    if spec.key[1] == "ffn" and "gate_proj.weight" in names:
        return names["gate_proj.weight"].shape[0]
    if spec.key[1] == "head":
        return names["lm_head.weight"].shape[0]
    return 0


class BlockOffload:
    """The offload of one rank's host blocks (`sched`: its weight scheduler, whose blocks they
    are), in `mode` "blocks" or "rows", at `share` (blocks: the fraction of the host bytes the
    accelerator computes; rows: its share of every projection's rows). `exact` False: the pinned
    blocks' parts are views for timing (see ``replan``). ``replan`` changes the share (a new
    Offloader: nothing copied before may stay staged); ``close`` stops it."""

    def __init__(self, sched, device: torch.device, mode: str, share: float, slot_bytes: int, threads: int,
                 prefetch: bool = True, exact: bool = True):
        self.sched, self.device, self.mode, self.slot_bytes, self.threads = sched, device, mode, slot_bytes, threads
        self.prefetch = prefetch
        self.offloader: Offloader | None = None
        self.plan = BlockPlan(share)
        self._halves: dict[int, tuple[Weights, Weights]] = {}
        self.replan(share, exact)

    @property
    def share(self) -> float:
        return self.offloader.share

    def replan(self, share: float, exact: bool = True) -> None:
        """Plan the offload at `share` and make the pinned blocks' parts. `exact` False: parts for
        timing only, the blocks left as they are (``divide_block``'s `rearrange`)."""
        if self.offloader is not None:
            self.offloader.close()
        blocks = self.sched.blocks
        if self.mode == "blocks":  # attention stays where its KV cache is
            self.plan = plan_blocks([(s.key, s.nbytes, extent(s), s.key[1] != "attn") for s in blocks], share)
        else:
            self.plan = BlockPlan(share)
        self.offloader = Offloader(self.device, share, self.slot_bytes, COPY_SLOTS, self.threads, self.plan.ratios)
        self._halves = {j: self._divide(blocks[j].key, self.sched.pinned(j), exact) for j in self.sched.res.pinned
                        if blocks[j].key in self.plan.columns}

    def close(self) -> None:
        if self.offloader is not None:
            self.offloader.close()
        self._halves = {}

    @property
    def nbytes(self) -> int:
        return self.offloader.nbytes

    def on_cpu(self, key: Hashable) -> bool:
        """Block `key` is computed whole on the CPU from host memory."""
        return self.offloader.on_cpu(key)

    def gpu_share(self) -> float:
        """The share of host-block bytes the accelerator computes (rows mode: the share itself)."""
        blocks = self.sched.blocks
        total = sum(b.nbytes for b in blocks)
        of = self.plan.shares.get if self.mode == "blocks" else lambda key, _: self.offloader.share_of(key)
        return sum(b.nbytes * of(b.key, 0.0) for b in blocks) / total if total else 0.0

    def _divide(self, key: Hashable, w: Weights, exact: bool) -> tuple[Weights, Weights]:
        """Block `key`'s (CPU part, accelerator part) at its planned columns. `w` is consumed
        (``divide_block`` rearranges it) unless `exact` is False."""
        cpu, dev = divide_block(w, "head" if key[1] == "head" else "ffn", self.plan.columns[key], exact)
        if exact:
            w.pop("down_proj.weight", None)  # scrambled: nothing may read it whole
        return cpu, dev

    def _parts(self, i: int, key: Hashable, w: Weights) -> tuple[Weights | None, Weights]:
        """Host block i's (CPU part or None, accelerator part): a pinned block's parts were made
        once, a streamed block's are made in its buffer on each use."""
        if key not in self.plan.columns:
            return None, w
        return self._halves[i] if i in self._halves else self._divide(key, w, exact=True)

    def run(self, i: int, key: Hashable, x: torch.Tensor, w: Weights, run: Callable, join: Callable) -> torch.Tensor:
        """Host block i (`key`, its weights `w`) on x, offloaded; x and the result on the CPU."""
        cpu_w, gpu_w = self._parts(i, key, w)
        return offload_step(self.offloader, key, x, cpu_w, gpu_w, run, join, lambda: self._prefetch_after(i))

    def _prefetch_after(self, i: int) -> None:
        """Queue the next host blocks that have accelerator rows (blocks the CPU computes whole
        are passed over), as many as the copy ring holds, so that their copies start while block
        i and any CPU blocks before them compute, if they stay in host memory (a streamed block's
        buffer is ours only inside its `with`)."""
        off = self.offloader
        if not self.prefetch or not off.copies:
            return
        blocks, queued = self.sched.blocks, 0.0
        for j in ((i + d) % len(blocks) for d in range(1, len(blocks))):
            key, share = blocks[j].key, off.share_of(blocks[j].key)
            if share == 0:  # nothing of it is copied (the CPU's whole, or the rows mode at 0)
                continue
            if j not in self.sched.res.pinned:
                return
            w = self._parts(j, key, self.sched.pinned(j))[1]
            off.upcoming(key, w)
            queued += sum(t.nbytes for t in w.values()) if key in self.plan.columns else share * blocks[j].nbytes
            if queued >= off.nbytes:  # as far ahead as the copy ring holds
                return
