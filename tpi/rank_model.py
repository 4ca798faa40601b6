"""One rank's share of the model, as the layer loop uses it.

Owns: ``RankModel`` (this rank's host blocks behind a weight scheduler, the blocks an accelerator
holds, the host blocks' CPU/GPU offload, the KV cache for its heads, the rotary table, and on rank
0 the embedding rows, the final norm and the LM head in row chunks), its embedding lookup, rotary
table and statistics. It is built by ``open_rank.open_rank_model``, which does the reading,
placing, measuring and tuning: the constructor itself starts nothing. Does not know: sockets
(forward.py gets a Communicator), how its blocks were placed, tokenizers, sampling, HTTP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil
import torch

from tpi.config import ModelConfig
from tpi.kv_cache import KVCache
from tpi.layers import Linear, Weights, dense, rope_cos_sin, rope_inv_freq
from tpi.offload.blocks import BlockOffload
from tpi.offload.calibrate import Calibration
from tpi.quant.formats import TILE, QuantTensor, dequantize, from_block, untile_int4
from tpi.safetensors_io import TensorInfo, pread_into
from tpi.scheduler import WeightScheduler
from tpi.stats import RankStats
from tpi.weights import Manifest


@dataclass
class Head:
    """Rank 0's head file: the embedding's tensors in it ({"weight"}, or a quantized table's
    {"qweight", "scales"(, "mins")}), the final norm, and the LM head's row chunks as blocks (key,
    first row, end row)."""
    fd: int
    embed: dict[str, TensorInfo]
    norm: torch.Tensor
    chunks: list[tuple[tuple, int, int]]
    table: list[tuple[int, int, Weights]] | None = None  # resident embedding rows: (first, end, "lm_head.*")


@dataclass
class RankModel:
    """One rank's share of every layer under a memory budget, and the KV cache for its heads.
    Built by ``open_rank_model``; ``close`` stops its threads and closes its files."""

    cfg: ModelConfig
    rank: int
    dtype: torch.dtype
    max_context: int
    device: torch.device
    cache: KVCache
    sched: WeightScheduler  # the host blocks, in the order every step uses them
    gpu_blocks: dict[tuple, Weights]  # blocks resident on the accelerator, by key
    offload: BlockOffload | None  # how host blocks share the accelerator; None: on the CPU whole
    head: Head | None  # rank 0 only
    fixed_bytes: int  # what the budget keeps for the runtime, the KV cache and activations
    activation_bytes: int  # of fixed_bytes: the bound on one prefill chunk's temporaries
    prefill_chunk: int  # the most tokens of one step this rank keeps room for
    calibration: Calibration | None = None  # what was measured at start for the offload
    linear: Linear = dense  # the projections' matmul: dense, or a QuantLinear for a quantized split
    weight_bytes: int = 0  # bytes of weights this rank holds or streams (as stored: quantized or not)
    weight_format: str = ""  # "int4/fast", "gguf/exact", ...; "": floats
    busy_s: float = 0.0  # time inside steps: compute + waiting for weights + allreduce
    steps: int = 0
    fetched_bytes: int = 0  # shard bytes this worker downloaded from the master at start
    index: dict[tuple, int] = field(init=False)  # block key -> position in the scheduler's cycle
    _rope: tuple = field(init=False, default=(None, None))  # ((start, length, device), (cos, sin)): once per step

    def __post_init__(self) -> None:
        self.index = {spec.key: i for i, spec in enumerate(self.sched.blocks)}
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim)

    def close(self) -> None:
        self.sched.close()
        if self.offload is not None:
            self.offload.close()
        if self.head is not None:
            os.close(self.head.fd)

    def reset(self) -> None:
        """Forget every sequence (the master that owned them is gone) and the step in flight."""
        self.cache.free_all()
        self.sched.reset()

    def rope(self, start: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [start, start + len(x)) on x's device; every layer of a step shares them."""
        key = (start, x.shape[0], x.device)
        if self._rope[0] != key:
            positions = torch.arange(start, start + x.shape[0], device=x.device)
            self._rope = (key, rope_cos_sin(self.inv_freq.to(x.device), positions, x.dtype))
        return self._rope[1]

    def embed(self, ids: list[int]) -> torch.Tensor:
        """Embedding rows for `ids` [L] -> [L, D] (rank 0): from memory when the table is resident,
        else read row by row from the head file (no full table in memory under a small budget);
        a quantized table's rows are dequantized."""
        head = self.head
        if head.table is not None:
            rows = [_row(w, i - a).cpu() for i in ids for a, b, w in head.table if a <= i < b]  # chunks: GPU or CPU
        else:
            rows = [self._read_row(token) for token in ids]
        return torch.cat(rows).to(self.dtype)

    def _read_row(self, token: int) -> torch.Tensor:
        """One embedding row from the head file [1, D]; of tiled int4 codes, the tile holding it."""
        parts = {}
        for part, info in self.head.embed.items():
            first, n = token, 1
            if part == "qweight" and info.dtype == torch.uint8 and info.shape[0] % TILE == 0:
                first, n = token // TILE * TILE, TILE
            parts[part] = t = torch.empty((n, *info.shape[1:]), dtype=info.dtype)
            pread_into(self.head.fd, t, info.start + first * info.row_bytes)
            self.sched.counters.bytes_read += t.nbytes
        if "weight" in parts:
            return parts["weight"]
        codes = parts["qweight"]
        if codes.shape[0] != 1:
            codes = untile_int4(codes)[token % TILE:token % TILE + 1]
        return dequantize(QuantTensor(codes, parts["scales"], parts.get("mins")))

    def stats(self, allreduce_s: float = 0.0, allreduce_calls: int = 0, refused: int = 0) -> RankStats:
        """Counters since start; the communicator's figures are given by its owner."""
        c, r, blocks = self.sched.counters, self.sched.res, self.sched.blocks
        cal, off = self.calibration or Calibration(), self.offload
        counters = off.offloader.counters if off else {}
        return RankStats(
            rank=self.rank, peak_rss_bytes=peak_rss_bytes(), rss_bytes=psutil.Process().memory_info().rss,
            bytes_read=c.bytes_read, stall_s=c.stall_s, allreduce_s=allreduce_s, allreduce_calls=allreduce_calls,
            steps=self.steps, loads=c.loads, compute_s=max(0.0, self.busy_s - c.stall_s - allreduce_s),
            pinned_blocks=len(r.pinned), streamed_blocks=len(blocks) - len(r.pinned), window=r.window,
            max_streamed_held=c.max_streamed_held, planned_bytes=r.planned_bytes + self._embedding_copy_bytes(),
            fixed_bytes=self.fixed_bytes, activation_bytes=self.activation_bytes, needed_min_bytes=r.needed_min,
            block_bytes=sum(b.nbytes for b in blocks),
            largest_block_bytes=max((b.nbytes for b in blocks), default=0), kv_cache_bytes=self.cache.nbytes,
            device=str(self.device), gpu_blocks=len(self.gpu_blocks), fetched_bytes=self.fetched_bytes,
            refused_messages=refused, offload_mode=off.mode if off else "", offload_share=off.share if off else 0.0,
            offload_gpu_share=off.gpu_share() if off else 0.0, offload_slot_bytes=off.nbytes if off else 0,
            offload_host_s=cal.host_s, offload_head_wait_s=cal.head_wait_s, offload_cpu_Bps=cal.cpu_Bps,
            offload_copy_Bps=cal.copy_Bps, offload_predicted=cal.predicted, offload_tune_s=cal.tune_s,
            offload_step_s=cal.step_s, weight_bytes=self.weight_bytes, weight_format=self.weight_format,
            **{f"offload_{k}": v for k, v in counters.items()})

    def _embedding_copy_bytes(self) -> int:
        """Bytes of an embedding table kept beside the blocks (tied tables share the LM head's)."""
        if self.head is None or self.head.table is None or self.cfg.tie_word_embeddings:
            return 0
        return sum(t.nbytes for _, _, w in self.head.table for t in w.values())


def _row(w: Weights, i: int) -> torch.Tensor:
    """Row i of an LM-head chunk's (or embedding table's) weight, as floats [1, D]."""
    if "lm_head.weight" in w:
        return w["lm_head.weight"][i:i + 1]
    return dequantize(from_block(w, "lm_head").rows(i, i + 1))


def peak_rss_bytes() -> int:
    """VmHWM of this process: the peak resident set as the OS counts it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def default_max_context(manifest: Manifest) -> int:
    return min(manifest.config.max_position_embeddings, 4096)
