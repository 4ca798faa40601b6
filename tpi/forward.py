"""The one loop over layers, where each layer's two allreduces happen; and one rank's weights.

Owns: ``RankModel`` (this rank's blocks behind a weight scheduler, its KV cache, its rotary table,
on rank 0 also the embedding rows and the LM head in row chunks) and ``run_layers``, which every
rank, master and workers alike, runs for each step. Does not know: sockets (it gets a
Communicator), tokenizers, sampling, HTTP.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import psutil
import torch
import torch.nn.functional as F

from tpi.comm.base import Communicator, SingleRank
from tpi.comm.wire import Phase, Tag
from tpi.config import SPLIT_MODES, ConfigError, ModelConfig, parse_bytes
from tpi.hetero import (
    SHARE_GRID,
    SHARE_REFINE,
    SPLIT_COUNTERS,
    Splitter,
    balance_share,
    calibrate,
    is_projection,
    measure_bandwidths,
    plan_shares,
    search_share,
    share_bytes,
    split_block,
)
from tpi.kv_cache import KVCache, LayerCache
from tpi.layers import Weights, _linear, attention_partial, ffn_partial, rms_norm, rope_cos_sin, rope_inv_freq
from tpi.peers import Peers
from tpi.safetensors_io import pread_into, read_rows
from tpi.scheduler import Counters, WeightScheduler, plan_residency, read_block
from tpi.weights import Manifest, block_spec, head_specs, rank_blocks, verify_rank_files

PREFILL_CHUNK = 512
MEET_TIMEOUT = 120.0  # seconds a rank waits for the others of its machine before measuring alone
TUNE_ROUNDS = 3  # timed steps per share when the block split's share is tuned at start
# steps the tuning takes: search_share's shares x TUNE_ROUNDS, each timed step after an untimed one
TUNE_STEPS = (SHARE_GRID + 1 + 2 * len(SHARE_REFINE)) * TUNE_ROUNDS * 2
TUNE_MAX_S = 20.0  # a rank whose steps would take longer to tune (blocks streamed from disk) keeps the prediction
TUNE_SEQ = -1  # the sequence id of those steps (its KV slot is freed after each)
# dispatch_seconds' key for the path each kind of host block takes in the block split
HOST_PATHS = {"attn": "copied_attn", "ffn": "split", "head": "split_head"}
SPLIT_SLOTS = 3  # the copy ring holds 3 of the largest projection's GPU rows: the one in use and the next copies
@dataclass(frozen=True)
class MemoryOptions:
    memory_budget: int | str | None = None  # None: keep every block resident
    window: int | None = None  # streamed buffers; None: chosen from the budget
    drop_page_cache: bool = False  # drop what streaming read from the page cache (measure the disk)
    stream_all: bool = False  # pin nothing whatever the budget: for measuring and testing streaming
    device: str = "cpu"  # "cuda" / "cuda:1": KV cache and the blocks that fit gpu_memory_budget on the GPU
    gpu_memory_budget: int | str | None = None  # None with a GPU: 90% of its free memory
    # "blocks": attention blocks on the accelerator from a copy, every other host block (FFN, LM-head
    # chunk) computed by both at once on disjoint columns, the CPU's from host memory
    # (hetero.plan_shares, split_block); "rows": every host block's projections split by output rows
    split_mode: Literal["blocks", "rows"] = "blocks"
    # the accelerator's share of the host blocks (blocks: of their bytes; rows: of each projection's
    # rows); None: measured with a GPU, no split without one. With device "cpu" a ratio runs the
    # split path with both parts on the CPU (how CI tests it).
    split_ratio: float | None = None
    gpu_prefetch: bool = True  # copy the next host block's GPU share while this one computes
    # (folder, ranks): ranks sharing this machine (LocalCluster's) meet there to measure the split's
    # rates at the same time, each seeing the others' load; None: measure alone
    measure_peers: tuple[str, int] | None = None
    # block split on a GPU, no ratio configured: time this rank's own step over a grid of shares
    # (a few seconds at start) and keep the fastest; False: the share predicted from the measured
    # rates, as it is
    split_tune: bool = True
    verify_shards: bool = True  # sha256 of this rank's files at start (sizes are always checked)


def split_gpu_bytes(specs: list, ratio: float) -> tuple[int, int]:
    """(one copy slot of the CPU/GPU split: the largest projection's GPU rows at `ratio`; the norms
    and bias shares of every block, kept on the GPU) in bytes."""
    sizes = [share_bytes([(t.name, t.shape, t.dtype) for t in s.tensors], ratio) for s in specs]
    return max((a for a, _ in sizes), default=0), sum(b for _, b in sizes)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but torch sees no CUDA device on this machine")
    return dev


def default_max_context(manifest: Manifest) -> int:
    return min(manifest.config.max_position_embeddings, 4096)


def peak_rss_bytes() -> int:
    """VmHWM of this process: the peak resident set as the OS counts it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


class RankModel:
    """One rank's share of every layer, under a memory budget, and the KV cache for its heads."""

    def __init__(self, shard_dir: str | os.PathLike, manifest: Manifest, rank: int,
                 max_context: int | None = None, slots: int = 1, memory: MemoryOptions = MemoryOptions(),
                 threads: int = 1):
        self.cfg, self.manifest, self.rank = manifest.config, manifest, rank
        verify_rank_files(shard_dir, manifest, rank, checksums=memory.verify_shards)  # before any read
        self.dtype = manifest.dtype
        self.max_context = max_context or default_max_context(manifest)
        runtime = psutil.Process().memory_info().rss
        shard = manifest.plan.shards[rank]
        self.device = _device(memory.device)
        self.cache = KVCache(self.cfg.num_layers, shard.num_kv_heads, self.cfg.head_dim, self.max_context,
                             self.dtype, slots, self.device)
        specs = [block_spec(shard_dir, manifest, rank, layer, kind)
                 for layer, kind in rank_blocks(self.cfg, manifest.plan, rank) if kind != "head"]
        if memory.split_mode not in SPLIT_MODES:
            raise ConfigError(f"split_mode={memory.split_mode!r}: expected 'blocks' or 'rows'")
        blocks_mode = memory.split_mode == "blocks"
        measure = blocks_mode and memory.split_ratio is None and self.device.type == "cuda"  # once placed
        self.calibration: dict | None = None  # what was measured at start for the split, if anything
        folder, n = memory.measure_peers or (None, 1)
        self.peers = Peers(folder, rank, n, MEET_TIMEOUT)  # the ranks of this machine, meeting to measure the split
        ratio = 1.0 if measure else self._split_ratio(memory, specs, threads)
        # any block may end up on the host; a block split copies whole projections (or their columns)
        slot, small = (0, 0) if ratio is None else split_gpu_bytes(specs, 1.0 if blocks_mode else ratio)
        reserve = SPLIT_SLOTS * slot + small
        heads: list = []  # rank 0: the LM head in chunks of rows, blocks like the layers' ones
        if rank == 0:
            largest = max((s.nbytes for s in specs), default=64 << 20)
            if ratio is not None:  # LM-head chunks no larger than a projection, so that their GPU rows fit a copy slot
                largest = min(largest, max((t.nbytes for s in specs for t in s.tensors), default=largest))
            self.embed_info, norm_info, head_path, heads = head_specs(shard_dir, manifest, largest)
        # LM-head chunks first: while rank 0 computes the head every other rank waits
        self.gpu_blocks = (self._place_on_gpu([c for c, _, _ in heads], specs, memory, reserve)
                           if self.device.type == "cuda" else {})
        if rank == 0:  # opened once the budget is known to hold (a refusal leaves nothing open)
            self._head_fd = os.open(head_path, os.O_RDONLY)
            self.norm = read_rows(self._head_fd, norm_info, 0, norm_info.shape[0])
        all_specs, specs = specs, [s for s in specs if s.key not in self.gpu_blocks]
        self.prefetch = memory.gpu_prefetch
        self.head_chunks: list[tuple[tuple, int, int]] = []  # (block key, first row, end row)
        for spec, a, b in heads:
            self.head_chunks.append((spec.key, a, b))
            if spec.key not in self.gpu_blocks:
                specs.append(spec)
        self.index = {spec.key: i for i, spec in enumerate(specs)}
        if measure:  # now that it is known what is where
            ratio = self._measured_fraction(memory, all_specs, specs, threads, SPLIT_SLOTS * slot)
        self.split_mode = memory.split_mode
        self.split: Splitter | None = None
        self._plan_split(specs, ratio, slot, threads)
        host_kv = self.cache.nbytes + (self.split.nbytes if self.split else 0) if self.device.type == "cpu" else 0
        fixed = runtime + host_kv + self._activation_bytes(shard)
        budget = parse_bytes(memory.memory_budget)
        if memory.stream_all:
            budget = fixed + (memory.window or 2) * max((s.nbytes for s in specs), default=0)
        self.residency = plan_residency(specs, budget, fixed, memory.window)
        self.fixed_bytes = fixed
        self.sched = WeightScheduler(specs, self.residency, memory.drop_page_cache, threads,
                                     pin_memory=self.device.type == "cuda").start()
        self.embed_table = self._resident_embedding(budget) if rank == 0 else None
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim)
        self._rope: tuple = (None, None)  # ((start, length, device), (cos, sin)): once per step, not per layer
        self._halves: dict[int, tuple[Weights, Weights]] = {}
        if measure and memory.split_tune:
            self._tune_share(specs, slot, threads)
        else:
            self._halves = self._pinned_halves(exact=True)  # built once: they stay in host memory
        self.busy_s = 0.0  # time inside steps: compute + waiting for weights + allreduce
        self.steps = 0
        self.fetched_bytes = 0  # shard bytes this worker downloaded from the master at start

    def reset(self) -> None:
        """Forget every sequence (the master that owned them is gone) and the step in flight."""
        self.cache.free_all()
        self.sched.reset()

    def stats(self, comm: Communicator) -> dict:
        """Counters since start, as plain numbers (they travel in a STATS_REPLY)."""
        c, r = self.sched.counters, self.residency
        blocks = self.sched.blocks
        return {
            "rank": self.rank, "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": psutil.Process().memory_info().rss,
            "bytes_read": c.bytes_read, "stall_s": c.stall_s, "allreduce_s": comm.allreduce_s,
            "allreduce_calls": comm.allreduce_calls, "steps": self.steps, "loads": c.loads,
            "compute_s": max(0.0, self.busy_s - c.stall_s - comm.allreduce_s),
            "pinned_blocks": len(r.pinned), "streamed_blocks": len(blocks) - len(r.pinned), "window": r.window,
            "max_streamed_held": c.max_streamed_held, "planned_bytes": r.planned_bytes + self._embedding_copy_bytes(),
            "fixed_bytes": self.fixed_bytes, "needed_min_bytes": r.needed_min,
            "block_bytes": sum(b.nbytes for b in blocks),
            "largest_block_bytes": max((b.nbytes for b in blocks), default=0), "kv_cache_bytes": self.cache.nbytes,
            "device": str(self.device), "gpu_blocks": len(self.gpu_blocks),
            "split_ratio": self.split.ratio if self.split else 0.0, "split_mode": self.split_mode if self.split else "",
            "split_gpu_share": self._gpu_share(),
            # block split measured at start: the dispatch per token and the wait for rank 0's LM
            # head counted on the CPU's side, the CPU's and the copy engine's rates, the share they
            # predict, the seconds spent tuning it (0: not tuned) and the step's seconds at the share
            # kept (the slowest rank's of this machine, no allreduce)
            **{f"split_{k}": float((self.calibration or {}).get(k, 0.0))
               for k in ("host_s", "head_wait_s", "cpu_Bps", "copy_Bps", "predicted", "tune_s", "step_s")},
            "split_slot_bytes": self.split.nbytes if self.split else 0, "fetched_bytes": self.fetched_bytes,
            **{f"split_{k}": self.split.counters[k] if self.split else 0.0 for k in SPLIT_COUNTERS},
            "refused_messages": getattr(comm, "refused", 0),  # on the master: hostile or malformed input
        }

    def _place_on_gpu(self, first: list, specs: list, memory: MemoryOptions, split: int) -> dict[tuple, Weights]:
        """Blocks that fit the GPU budget after the KV cache and the split's `split` bytes (copy
        slots, norms), loaded onto the GPU: of `first` in order, then of `specs` largest first."""
        budget = parse_bytes(memory.gpu_memory_budget)
        if budget is None:
            budget = int(0.9 * torch.cuda.mem_get_info(self.device)[0])
        room = budget - self.cache.nbytes - split
        if room < 0:
            raise ConfigError(f"gpu_memory_budget of {budget:,} bytes is too small for the KV cache "
                              f"({self.cache.nbytes:,} bytes) and the split's copy slots ({split:,} bytes); "
                              "lower --max-context or raise the budget")
        chosen = {}
        for spec in [*first, *sorted(specs, key=lambda s: -s.nbytes)]:
            if spec.nbytes <= room:
                chosen[spec.key] = {k: t.to(self.device) for k, t in read_block(spec).items()}
                room -= spec.nbytes
        return chosen

    def _gpu_share(self) -> float:
        """The share of host-block bytes the accelerator computes (rows split: the ratio itself)."""
        if self.split is None:
            return 0.0
        blocks = self.sched.blocks
        total = sum(b.nbytes for b in blocks)
        share = self.shares.get if self.split_mode == "blocks" else lambda key, _: self.split.ratio_of(key)
        return sum(b.nbytes * share(b.key, 0.0) for b in blocks) / total if total else 0.0

    def _split_ratio(self, memory: MemoryOptions, specs: list, threads: int) -> float | None:
        """The configured ratio; for a row split with a GPU and none configured, the fastest ratio
        when the split path is timed on this rank's shapes (one attention and one FFN block). (A
        block split's is measured once its blocks are placed: ``_measured_fraction``.) None: no
        split."""
        ratio = memory.split_ratio
        if ratio is None and self.device.type == "cuda":
            self.peers.meet()
            firsts = {s.key[1]: s for s in reversed(specs)}.values()
            blocks = [{t.name: tuple(t.shape) for t in s.tensors if is_projection(t.name) and len(t.shape) == 2}
                      for s in firsts]
            if any(blocks):
                self.calibration = calibrate(self.device, self.dtype, blocks, threads, SPLIT_SLOTS,
                                             max_copies=self.cfg.num_layers)
                ratio = self.calibration["ratio"]
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"split_ratio={ratio}: expected a number in [0, 1]")
        return ratio

    def _measured_fraction(self, memory: MemoryOptions, all_specs: list, specs: list, threads: int,
                           ring: int) -> float:
        """The block split's share of the host bytes (`specs`) for the GPU, measured here: the
        CPU's and the copy engine's rates running at once (hetero.measure_bandwidths, on the
        largest projection's shape, with the ranks that share this machine measuring at the same
        time), and this rank's own work per token on the thread that runs the blocks, which the
        CPU's part has to share: the dispatch of its GPU-resident blocks and of its host blocks,
        timed on tiny blocks of the model (dispatch_seconds); hetero.balance_share balances the two.
        A rank other than 0 also waits each token while rank 0 computes the LM head (estimated at
        this rank's rates, both sides at once), with its thread idle but its copy engine filling
        the copy ring (`ring` bytes) with the next blocks: that much copying is free."""
        shapes = [tuple(t.shape) for s in all_specs for t in s.tensors if is_projection(t.name) and len(t.shape) == 2]
        if not shapes:  # no share of any layer here: nothing to split
            self.peers.meet()  # the others' measurement meets this rank's: keep count with them
            return 1.0
        cal = self.calibration = measure_bandwidths(self.device, self.dtype, max(shapes, key=math.prod), threads,
                                                    ready=self.peers.meet)
        d = dispatch_seconds(self.cfg, self.device, self.dtype)
        host_s = (sum(d["gpu_attn" if k[1] == "attn" else "gpu_ffn"] for k in self.gpu_blocks if k[1] != "head")
                  + sum(d[HOST_PATHS[s.key[1]]] for s in specs))
        head_wait_s = 0.0
        if self.rank != 0:
            head = self.cfg.vocab_size * self.cfg.hidden_size * self.dtype.itemsize
            head_wait_s = min(head / (cal["cpu_Bps"] + cal["copy_Bps"]), ring / cal["copy_Bps"])
        attn = sum(s.nbytes for s in specs if s.key[1] == "attn")
        fraction = balance_share(attn, sum(s.nbytes for s in specs) - attn, cal["cpu_Bps"], cal["copy_Bps"],
                                 host_s + head_wait_s)
        cal.update(dispatch_s=d, host_s=host_s, head_wait_s=head_wait_s, bandwidth_fraction=cal["fraction"],
                   fraction=fraction, predicted=fraction)
        return fraction

    def _plan_split(self, specs: list, ratio: float | None, slot: int, threads: int) -> None:
        """The split of the host blocks (`specs`) at `ratio` (None: no split): for a block split,
        each block's share and the CPU's columns of those both compute; and a new Splitter."""
        if self.split is not None:
            self.split.close()
        # block split: block key -> the CPU's columns (FFN) or rows (head chunk) of a block both compute
        self.columns: dict[tuple, int] = {}
        self.shares: dict[tuple, float] = {}  # block split: block key -> the accelerator's share of its bytes
        plan: dict[tuple, float] = {}  # the Splitter's: 0 for a block the CPU computes whole, 1 for the others
        if ratio is not None and self.split_mode == "blocks":  # attention stays where its KV cache is
            for s, share in zip(specs, plan_shares([s.nbytes for s in specs], ratio,
                                                   [s.key[1] != "attn" for s in specs]), strict=True):
                n = self._split_extent(s)
                if n:
                    cpu = n - round(n * share)
                    share = (n - cpu) / n
                    if 0 < cpu < n:
                        self.columns[s.key] = cpu
                else:  # not divided: whole, on the side nearer its share (attention: the accelerator)
                    share = float(round(share))
                self.shares[s.key] = share
                plan[s.key] = 0.0 if share == 0 else 1.0
        self.split = None if ratio is None else Splitter(self.device, ratio, slot, SPLIT_SLOTS, threads, plan)

    def _pinned_halves(self, exact: bool) -> dict[int, tuple[Weights, Weights]]:
        """The (CPU part, accelerator part) of every pinned block with planned columns; `exact`
        False: parts for timing only, the blocks left as they are (hetero.split_block)."""
        blocks = self.sched.blocks
        return {j: self._split_block(blocks[j].key, self.sched.pinned(j), exact) for j in self.residency.pinned
                if blocks[j].key in self.columns}

    def _tune_share(self, specs: list, slot: int, threads: int) -> None:
        """The block split's share, found by timing this rank's own step (every layer, and on
        rank 0 the LM head, with no allreduce) at shares of the FFN and LM-head bytes over a grid
        (hetero.search_share), each timed after one untimed step at the same share (the copy ring
        then starts full, as it does from one token to the next), over TUNE_ROUNDS rounds in
        rotating order; the ranks of this machine time the same share at once, start each timed
        step together (a rank other than 0 waits while rank 0 computes the LM head, as it does
        when serving) and keep the share at which the slowest of them is fastest. The parts timed
        are views of the blocks as they are, so nothing is rearranged until the share is chosen.
        The share predicted from the rates (``_measured_fraction``) stays in self.calibration.
        Afterwards the split is planned at the share chosen and its pinned blocks' parts are made.
        A rank whose first step shows that tuning would take more than TUNE_MAX_S (blocks streamed
        from disk) keeps the split as it was planned (the prediction), as do the ranks it meets."""
        t0 = time.perf_counter()
        attn = sum(s.nbytes for s in specs if s.key[1] == "attn")
        total = sum(s.nbytes for s in specs)
        fraction = lambda share: (attn + share * (total - attn)) / total if total else 1.0  # noqa: E731
        x = torch.randn(1, self.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(self.dtype)

        def step_at(share: float) -> float:
            self._plan_split(specs, fraction(share), slot, threads)
            self._halves = self._pinned_halves(exact=False)
            self._tuning_step(x)
            self.peers.meet("tuning the split")
            return self._tuning_step(x)

        def time_at(shares: list[float]) -> list[float]:
            times: dict[float, list[float]] = {s: [] for s in shares}
            for r in range(TUNE_ROUNDS):
                for share in shares[r % len(shares):] + shares[:r % len(shares)]:
                    times[share].append(step_at(share))
            mine = [statistics.median(times[s]) for s in shares]
            return [max(ranks) for ranks in zip(*self.peers.share(mine), strict=True)]

        self._halves = self._pinned_halves(exact=False)
        first = self._tuning_step(x)  # warm-up: pinned blocks in place, kernels chosen
        slowest = max(v[0] for v in self.peers.share([first]))
        best, ratio = None, self.split.ratio
        if slowest * TUNE_STEPS > TUNE_MAX_S:  # every rank of the machine decides alike
            print(f"rank {self.rank}: block split: a step takes {slowest:.2f}s, so tuning would take about "
                  f"{slowest * TUNE_STEPS:.0f}s: keeping the share predicted from the rates",
                  file=sys.stderr, flush=True)
        else:
            best, seconds = search_share(time_at)
            ratio = fraction(best)
        # a new Splitter: nothing copied from the parts timed may stay staged
        self._plan_split(specs, ratio, slot, threads)
        self._halves = self._pinned_halves(exact=True)
        self.sched.counters = Counters()  # start-up walks are not the rank's work
        self._rope = (None, None)
        if best is None:
            return
        cal = self.calibration = self.calibration or {}
        cal.update(fraction=fraction(best), share=best, step_s=seconds[best],
                   tune_s=time.perf_counter() - t0,
                   tuned_ms={round(fraction(s), 4): 1000 * t for s, t in seconds.items()})

    @torch.inference_mode()
    def _tuning_step(self, x: torch.Tensor) -> float:
        """Seconds for one step of this rank's blocks (and LM head) on x [1, D] at position 0,
        each allreduce left out; its KV slot is freed after."""
        t0 = time.perf_counter()
        h = run_layers(self, SingleRank(), x, TUNE_SEQ, 0, 0)
        if self.rank == 0:
            self.logits(h)
        seconds = time.perf_counter() - t0
        self.cache.free(TUNE_SEQ)
        return seconds

    @staticmethod
    def _split_extent(spec) -> int:
        """What the block split divides: an FFN block's intermediate columns, a head chunk's rows."""
        names = {t.name: t for t in spec.tensors}
        if spec.key[1] == "ffn" and "gate_proj.weight" in names:
            return names["gate_proj.weight"].shape[0]
        if spec.key[1] == "head":
            return names["weight"].shape[0]
        return 0

    def _split_block(self, key: tuple, w: Weights, exact: bool = True) -> tuple[Weights, Weights]:
        """Block `key`'s (CPU part, accelerator part) at its planned columns, named as the Splitter
        names them. `w` is consumed (hetero.split_block rearranges it), unless `exact` is False:
        then the parts are for timing only and `w` stays as it is."""
        cpu, dev = split_block(w, "head" if key[1] == "head" else "ffn", self.columns[key], exact)
        if exact:
            w.pop("down_proj.weight", None)  # scrambled: nothing may read it whole
        return self._split_tensors(key, cpu), self._split_tensors(key, dev)

    def _parts(self, i: int, key: tuple, w: Weights) -> tuple[Weights | None, Weights]:
        """Host block i's (CPU part or None, accelerator part): a pinned block's parts were made
        once at start, a streamed block's are made in its buffer on each use."""
        if key not in self.columns:
            return None, self._split_tensors(key, w)
        return self._halves[i] if i in self._halves else self._split_block(key, w)

    def _activation_bytes(self, shard) -> int:
        """A bound on one prefill chunk's temporaries: projections, FFN columns, attention scores."""
        cfg, c = self.cfg, PREFILL_CHUNK
        per_token = 6 * cfg.hidden_size + 3 * shard.ffn_size + shard.num_heads * (self.max_context + 3 * cfg.head_dim)
        head = cfg.vocab_size if self.rank == 0 else 0
        return 4 * c * (per_token + head)

    def close(self) -> None:
        self.sched.close()
        if self.split is not None:
            self.split.close()
        if self.rank == 0:
            os.close(self._head_fd)

    def attention(self, layer: int, x: torch.Tensor, seq: int, start: int) -> torch.Tensor:
        def run(x: torch.Tensor, w: Weights) -> torch.Tensor:
            return attention_partial(x, w, self.cache.layer(seq, layer), start, self.cfg, self.rope(start, x),
                                     self.cfg.sliding_windows[layer])
        return self._block((layer, "attn"), x, run)

    def rope(self, start: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [start, start + len(x)) on x's device; every layer of a step shares them."""
        key = (start, x.shape[0], x.device)
        if self._rope[0] != key:
            positions = torch.arange(start, start + x.shape[0], device=x.device)
            self._rope = (key, rope_cos_sin(self.inv_freq.to(x.device), positions, x.dtype))
        return self._rope[1]

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._block((layer, "ffn"), x, lambda x, w: ffn_partial(x, w, self.cfg))

    def _block(self, key: tuple, x: torch.Tensor, run) -> torch.Tensor:
        """Run one block where its weights are: on the GPU, or from the host (split when configured)."""
        if key in self.gpu_blocks:
            return run(x.to(self.device), self.gpu_blocks[key]).to(x.device)
        i = self.index.get(key)
        if i is None:  # no share of this block here: this rank adds nothing
            return torch.zeros_like(x)
        with self.sched.block(i) as w:
            if self.split is None or self.split.on_cpu(key):  # the CPU computes it whole
                return run(x, w)
            return self._run_split(i, key, x, w, run)

    def _run_split(self, i: int, key: tuple, x: torch.Tensor, w: Weights, run, join=torch.add) -> torch.Tensor:
        """Host block i on the GPU from a copy, or split between the CPU and the GPU; x and the
        result on the CPU. Block split: a block with planned columns runs as two blocks at once,
        the GPU's part queued first, then the CPU's computed here, and the results joined
        (`join`: added for an FFN block's partial sums). Row split: the Splitter splits every
        projection itself."""
        cpu_w, gpu_w = self._parts(i, key, w)
        return split_step(self.split, key, x, cpu_w, gpu_w, run, join, lambda: self._prefetch_after(i))

    @staticmethod
    def _split_tensors(key: tuple, w: Weights) -> Weights:
        """A block's tensors as the split names them (an LM-head chunk's "weight" is a projection)."""
        return {"lm_head.weight": w["weight"]} if key[1] == "head" else w

    def _prefetch_after(self, i: int) -> None:
        """Queue the next host blocks that have GPU rows (LM-head chunks included; blocks the CPU
        computes whole are passed over), as many as the copy ring holds, so that their copies start
        while block i and any CPU blocks before them compute, if they stay in host memory (a
        streamed block's buffer is ours only inside its `with`)."""
        if not self.prefetch or not self.split.copies:
            return
        blocks, queued = self.sched.blocks, 0.0
        for j in ((i + d) % len(blocks) for d in range(1, len(blocks))):
            key, ratio = blocks[j].key, self.split.ratio_of(blocks[j].key)
            if ratio == 0:  # nothing of it is copied (the CPU's whole, or a row split at 0)
                continue
            if j not in self.residency.pinned:
                return
            w = self._parts(j, key, self.sched.pinned(j))[1]
            self.split.upcoming(key, w)
            queued += sum(t.nbytes for t in w.values()) if key in self.columns else ratio * blocks[j].nbytes
            if queued >= self.split.nbytes:  # as far ahead as the copy ring holds
                return

    # -- rank 0 only ---------------------------------------------------------------------------
    def _resident_embedding(self, budget: int | None) -> list[tuple[int, int, torch.Tensor]] | None:
        """The embedding table as (first row, end row, rows) pieces, if it may stay in memory: the
        pinned LM-head chunks themselves when the embeddings are tied, else a copy when the budget
        holds it on top of everything else. None: rows are read from disk as needed."""
        if self.residency.window != 0:  # something streams: no room to keep the table
            return None
        if self.cfg.tie_word_embeddings:  # a chunk on the GPU gives its rows from there
            return [(a, b, (self.gpu_blocks.get(key) or self.sched.pinned(self.index[key]))["weight"])
                    for key, a, b in self.head_chunks]
        info = self.embed_info
        if budget is None or self.residency.planned_bytes + info.nbytes <= budget:
            return [(0, info.shape[0], read_rows(self._head_fd, info, 0, info.shape[0]))]
        return None

    def _embedding_copy_bytes(self) -> int:
        """Bytes of an embedding table kept beside the blocks (tied tables share the LM head's)."""
        if self.embed_table is None or self.cfg.tie_word_embeddings:
            return 0
        return sum(t.nbytes for _, _, t in self.embed_table)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """Embedding rows for `ids` [L] -> [L, D]: from memory when the table is resident, else read
        row by row from the head file (no full table in memory under a small budget)."""
        if self.embed_table is not None:
            return torch.stack([next(t[i - a] for a, b, t in self.embed_table if a <= i < b).cpu() for i in ids])
        info = self.embed_info
        out = torch.empty((len(ids), info.shape[1]), dtype=info.dtype)
        for row, token in enumerate(ids):
            pread_into(self._head_fd, out[row], info.start + token * info.row_bytes)
        self.sched.counters.bytes_read += len(ids) * info.row_bytes
        return out.to(self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, chunk by chunk of vocabulary rows: h [L, D] -> float32 [L, V]."""
        hn = rms_norm(h, self.norm, self.cfg.rms_norm_eps)
        out = torch.empty((h.shape[0], self.cfg.vocab_size), dtype=torch.float32)
        resident = [(a, b, self.gpu_blocks[key]["weight"]) for key, a, b in self.head_chunks if key in self.gpu_blocks]
        on_gpu = []
        if resident:  # queued first: the GPU computes them while the host's chunks go by
            hd = hn.to(self.device)
            on_gpu = [(a, b, F.linear(hd, w)) for a, b, w in resident]
        for key, a, b in self.head_chunks:
            i = self.index.get(key)
            if i is None:
                continue
            with self.sched.block(i) as w:
                if self.split is None or self.split.on_cpu(key):
                    out[:, a:b] = F.linear(hn, w["weight"])
                else:  # on the GPU from a copy, or split like the layers' projections
                    out[:, a:b] = self._run_split(i, key, hn, w, _head_rows, lambda c, y: torch.cat([c, y], dim=1))
        for a, b, y in on_gpu:
            out[:, a:b] = y.cpu()
        return out


def _head_rows(x: torch.Tensor, w: Weights) -> torch.Tensor:
    """An LM-head chunk (or a part of its rows) on x, on the accelerator through the Splitter or on
    the CPU from host memory."""
    return _linear(x, w, "lm_head")


def split_step(split: Splitter, key: tuple, x: torch.Tensor, cpu_w: Weights | None, gpu_w: Weights, run, join,
               prefetch=lambda: None) -> torch.Tensor:
    """One host block through `split`, x and the result on the CPU: the GPU's part (`gpu_w`) queued
    first (`prefetch` then queues the next blocks' copies), then the CPU's part (`cpu_w`, if any)
    computed here while the GPU computes, and the two joined."""
    weights = split.weights(key, gpu_w)  # queues the copies, unless already queued
    prefetch()
    y = run(x.to(split.device), weights)  # activations stay on the GPU; only the CPU's rows travel
    c = None if cpu_w is None else run(x, cpu_w)  # while the GPU computes its part
    y = y.to(x.device)
    split.finish(key)
    return y if c is None else join(c, y)


def dispatch_seconds(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, repeats: int = 20
                     ) -> dict[str, float]:
    """Host seconds per block of one decode token along each path a block of this model can take,
    timed on tiny blocks of its structure (head_dim, grouped KV heads, biases, q/k norms), whose
    bytes cost next to nothing: what is left is the work of the thread that runs the blocks
    (Python, op dispatch, kernel launches, the sync that brings each result back). Keys: "gpu_attn",
    "gpu_ffn" (resident on the accelerator), "copied_attn" (from the copy ring), "split" and
    "split_head" (an FFN block, an LM-head chunk, in a CPU part and an accelerator part, as the block
    split runs them). Medians of `repeats`."""
    gen = torch.Generator().manual_seed(0)
    hd, d, inter = cfg.head_dim, 64, 64
    hq, hkv = (2, 1) if cfg.group_size > 1 else (2, 2)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    ones = lambda n: torch.ones(n, dtype=dtype)  # noqa: E731
    attn = {"input_layernorm.weight": ones(d), "q_proj.weight": rand(hq * hd, d), "k_proj.weight": rand(hkv * hd, d),
            "v_proj.weight": rand(hkv * hd, d), "o_proj.weight": rand(d, hq * hd)}
    if cfg.qkv_bias:
        attn.update({"q_proj.bias": rand(hq * hd), "k_proj.bias": rand(hkv * hd), "v_proj.bias": rand(hkv * hd)})
    if cfg.attention_bias:
        attn["o_proj.bias"] = rand(d)
    if cfg.qk_norm:
        attn.update({"q_norm.weight": ones(hd), "k_norm.weight": ones(hd)})
    ffn = {"post_attention_layernorm.weight": ones(d), "gate_proj.weight": rand(inter, d),
           "up_proj.weight": rand(inter, d), "down_proj.weight": rand(d, inter)}
    if cfg.mlp_bias:
        ffn.update({"gate_proj.bias": rand(inter), "up_proj.bias": rand(inter), "down_proj.bias": rand(d)})
    pin = device.type == "cuda"
    host = [{k: t.pin_memory() if pin else t.clone() for k, t in b.items()} for b in (attn, ffn)]
    cpu_ffn, gpu_ffn = split_block(host[1], "ffn", inter // 2)
    head = rand(inter, d)
    cpu_head, gpu_head = {"lm_head.weight": head[: inter // 2]}, {"lm_head.weight": head.pin_memory() if pin else head}
    on_dev = [{k: t.to(device) for k, t in b.items()} for b in (attn, ffn)]
    start = 8
    cache = LayerCache(*(torch.zeros(hkv, 2 * start, hd, dtype=dtype, device=device) for _ in range(2)))
    rope = rope_cos_sin(rope_inv_freq(cfg.rope, hd).to(device), torch.tensor([start], device=device), dtype)
    run_attn = lambda x, w: attention_partial(x, w, cache, start, cfg, rope, None)  # noqa: E731
    run_ffn = lambda x, w: ffn_partial(x, w, cfg)  # noqa: E731
    x = rand(1, d)
    slot = max(share_bytes([(n, tuple(t.shape), t.dtype) for n, t in b.items()], 1.0)[0] for b in host)
    cat = lambda c, y: torch.cat([c, y], dim=1)  # noqa: E731
    walk = [("attn", None, host[0], run_attn, None), ("ffn", cpu_ffn, gpu_ffn, run_ffn, torch.add),
            ("head", cpu_head, gpu_head, _head_rows, cat)]
    times: dict[str, list[float]] = {k: [] for k in ("gpu_attn", "gpu_ffn", *HOST_PATHS.values())}
    with torch.inference_mode(), Splitter(device, 1.0, slot, SPLIT_SLOTS, 1) as sp:
        for _ in range(repeats + 2):  # two warm-up rounds
            for name, run, w in (("gpu_attn", run_attn, on_dev[0]), ("gpu_ffn", run_ffn, on_dev[1])):
                t0 = time.perf_counter()
                run(x.to(device), w).to("cpu")
                times[name].append(time.perf_counter() - t0)
            for j, (key, cpu_w, gpu_w, run, join) in enumerate(walk):
                after = walk[(j + 1) % len(walk)]
                t0 = time.perf_counter()
                split_step(sp, key, x, cpu_w, gpu_w, run, join, lambda a=after: sp.upcoming(a[0], a[2]))
                times[HOST_PATHS[key]].append(time.perf_counter() - t0)
    return {k: statistics.median(v[2:]) for k, v in times.items()}


def run_layers(model: RankModel, comm: Communicator, x: torch.Tensor, seq: int, step: int,
               start: int) -> torch.Tensor:
    """All decoder layers for hidden states x [L, D] at positions [start, start + L)."""
    for layer in range(model.cfg.num_layers):
        x = x + comm.all_reduce(model.attention(layer, x, seq, start), Tag(seq, step, layer, Phase.ATTN))
        x = x + comm.all_reduce(model.mlp(layer, x), Tag(seq, step, layer, Phase.FFN))
    return x
