"""Opening one rank's share: the factory that builds a RankModel ready to run.

Owns: ``open_rank_model``, which checks the rank's files, places the blocks a GPU budget holds on
the GPU (rank 0's LM-head chunks first), measures and tunes the CPU/GPU offload's share, plans what
stays in memory under the budget, starts the weight scheduler, and closes whatever it started if
any of that fails; and the bound on a prefill chunk's activations the budget keeps room for.
Does not know: sockets, tokenizers, what the model is then used for.
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import psutil
import torch

from tpi import forward
from tpi.comm.base import SingleRank
from tpi.config import ConfigError, ModelConfig, parse_bytes
from tpi.kv_cache import KVCache
from tpi.layers import Weights, dense
from tpi.offload.blocks import BlockOffload
from tpi.offload.calibrate import Calibration, calibrate_rows, predict_share, tune_share
from tpi.offload.plan import COPY_SLOTS, copy_slot_bytes, is_projection, place
from tpi.options import RankOptions
from tpi.peers import Peers
from tpi.quant.kernels import QuantLinear, transient_bytes
from tpi.rank_model import Head, RankModel, default_max_context
from tpi.safetensors_io import read_rows
from tpi.scheduler import Counters, WeightScheduler, plan_residency, read_block
from tpi.weights import Manifest, block_spec, head_specs, rank_blocks, verify_rank_files

MEET_TIMEOUT = 120.0  # seconds a rank waits for the others of its machine before measuring alone
# what a rank's own memory grows by after it plans (a worker's sockets and their threads, each
# thread's malloc arena, messages in flight): 70B-shaped int4 workers peaked up to 12 MB over plan
RUNTIME_GROWTH = 32 << 20


def open_rank_model(shard_dir: str | os.PathLike, manifest: Manifest, rank: int,
                    opts: RankOptions | None = None) -> RankModel:
    """Rank `rank`'s share of the split in `shard_dir`, ready to run: files checked, blocks placed
    on the GPU (if any), the offload's share measured and tuned, the rest pinned or streamed under
    the memory budget."""
    opts = opts or RankOptions()
    verify_rank_files(shard_dir, manifest, rank, checksums=opts.memory.verify_shards)  # before any read
    cfg, mem, off = manifest.config, opts.memory, opts.offload
    linear = QuantLinear(compute_mode(manifest, opts)) if manifest.quantized else dense
    if manifest.quantized and off.share is not None:
        raise ConfigError(f"offload_share={off.share!r}: the CPU/GPU offload divides float weights; this split is "
                          f"quantized ({manifest.quant['format']}): its blocks that fit the GPU budget run there, "
                          "the others on the CPU. Leave offload_share unset")
    runtime = psutil.Process().memory_info().rss + RUNTIME_GROWTH
    device = _device(off.device)
    shard = manifest.plan.shards[rank]
    max_context = opts.max_context or default_max_context(manifest)
    cache = KVCache(cfg.num_layers, shard.num_kv_heads, cfg.head_dim, max_context, manifest.dtype, 1, device)
    layers = [block_spec(shard_dir, manifest, rank, layer, kind)
              for layer, kind in rank_blocks(cfg, manifest.plan, rank) if kind != "head"]
    folder, n = opts.peers or (None, 1)
    peers = Peers(folder, rank, n, MEET_TIMEOUT)  # the ranks of this machine, meeting to measure the offload
    measure = off.mode == "blocks" and off.share is None and device.type == "cuda" and not manifest.quantized
    calibration = None if measure or manifest.quantized else \
        _rows_calibration(off, device, manifest.dtype, layers, cfg, opts.threads, peers)
    share = off.share if calibration is None else calibration.fraction
    # any block may end up on the host; the blocks mode copies whole projections (or their columns)
    slot, small = (0, 0) if share is None and not measure else \
        copy_slot_bytes(layers, 1.0 if off.mode == "blocks" else share)
    chunks = []  # rank 0: the LM head in chunks of rows, blocks like the layers' ones
    with ExitStack() as stack:
        if rank == 0:
            largest = max((s.nbytes for s in layers), default=64 << 20)
            if share is not None or measure:  # chunks no larger than a projection: their GPU rows fit a copy slot
                largest = min(largest, max((t.nbytes for s in layers for t in s.tensors), default=largest))
            embed_info, norm_info, head_path, chunks = head_specs(shard_dir, manifest, largest)
        # LM-head chunks first: while rank 0 computes the head every other rank waits
        gpu_blocks = _load_on_gpu(device, [c for c, _, _ in chunks], layers, off.gpu_memory_budget, cache.nbytes,
                                  COPY_SLOTS * slot + small) if device.type == "cuda" else {}
        head = None
        if rank == 0:  # opened once the budget is known to hold (a refusal leaves nothing open)
            fd = os.open(head_path, os.O_RDONLY)
            stack.callback(os.close, fd)
            norm = read_rows(fd, norm_info, 0, norm_info.shape[0])
            head = Head(fd, embed_info, norm, [(s.key, a, b) for s, a, b in chunks])
        host = [s for s in layers if s.key not in gpu_blocks] + [s for s, _, _ in chunks if s.key not in gpu_blocks]
        if measure:  # now that it is known what is where
            calibration = predict_share(cfg, device, manifest.dtype, layers, host, list(gpu_blocks), rank,
                                        opts.threads, COPY_SLOTS * slot, peers)
            share = calibration.fraction if calibration is not None else 1.0
        host_kv = cache.nbytes + (COPY_SLOTS * slot if share is not None else 0) if device.type == "cpu" else 0
        activations = activation_bytes(cfg, shard, rank, max_context, opts.prefill_chunk)
        if isinstance(linear, QuantLinear):  # its reused buffers for the largest quantized projection
            activations += transient_bytes(((t.name, t.dtype, t.shape) for s in host for t in s.tensors),
                                           linear.compute, opts.prefill_chunk)
        fixed = runtime + host_kv + activations
        budget = mem.budget_bytes
        if mem.stream_all:
            budget = fixed + (mem.window or 2) * max((s.nbytes for s in host), default=0)
        residency = plan_residency(host, budget, fixed, mem.window)
        sched = WeightScheduler(host, residency, mem.drop_page_cache, opts.threads,
                                pin_memory=device.type == "cuda").start()
        stack.callback(sched.close)
        if isinstance(linear, QuantLinear):  # a tied table's chunks keep their scales: embedding rows read them
            table = {s.key for s, _, _ in chunks} if cfg.tie_word_embeddings else set()
            for i in sched.res.pinned:
                if host[i].key not in table:
                    linear.prepare(sched.pinned(i))
        tune = measure and off.tune  # every rank of the machine tunes: they meet at every timed step
        offload = None
        if share is not None:
            offload = BlockOffload(sched, device, off.mode, share, slot, opts.threads, off.prefetch, exact=not tune)
            stack.callback(offload.close)
        model = RankModel(cfg, rank, manifest.dtype, max_context, device, cache, sched, gpu_blocks, offload, head,
                          fixed, activations, opts.prefill_chunk, calibration, linear,
                          _weight_bytes(manifest, layers, chunks, head), _weight_format(manifest, linear))
        if head is not None:
            head.table = _resident_embedding(model, budget)
        if tune:
            _tune(model, peers)
        stack.pop_all()
    return model


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but torch sees no CUDA device on this machine")
    return dev


def _rows_calibration(off, device: torch.device, dtype: torch.dtype, layers: list, cfg, threads: int,
                      peers: Peers) -> Calibration | None:
    """The rows mode with a GPU and no share configured: the share at which the offload path runs
    fastest, timed on synthetic blocks of this rank's shapes (one attention and one FFN block);
    None otherwise (a configured share, or no offload)."""
    if off.mode != "rows" or off.share is not None or device.type != "cuda":
        return None
    peers.meet()
    firsts = {s.key[1]: s for s in reversed(layers)}.values()
    blocks = [{t.name: tuple(t.shape) for t in s.tensors if is_projection(t.name) and len(t.shape) == 2}
              for s in firsts]
    if not any(blocks):
        return None
    return calibrate_rows(device, dtype, blocks, threads, COPY_SLOTS, max_copies=cfg.num_layers)[0]


def _load_on_gpu(device: torch.device, first: list, others: list, budget_setting, kv_bytes: int, reserve: int
                 ) -> dict[tuple, Weights]:
    """Blocks that fit the GPU budget after the KV cache and the offload's `reserve` bytes (copy
    slots, norms), loaded onto the GPU: of `first` in order, then of `others` largest first."""
    budget = parse_bytes(budget_setting, "gpu_memory_budget")
    if budget is None:
        budget = int(0.9 * torch.cuda.mem_get_info(device)[0])
    room = budget - kv_bytes - reserve
    if room < 0:
        raise ConfigError(f"gpu_memory_budget of {budget:,} bytes is too small for the KV cache ({kv_bytes:,} bytes) "
                          f"and the offload's copy slots ({reserve:,} bytes); lower --max-context or raise the budget")
    return {spec.key: {k: t.to(device) for k, t in read_block(spec).items()} for spec in place(first, others, room)}


def activation_bytes(cfg: ModelConfig, shard, rank: int, max_context: int, chunk: int) -> int:
    """A bound on one prefill chunk's temporaries (`chunk` tokens): projections, FFN columns,
    attention scores."""
    c = chunk
    per_token = 6 * cfg.hidden_size + 3 * shard.ffn_size + shard.num_heads * (max_context + 3 * cfg.head_dim)
    head = cfg.vocab_size if rank == 0 else 0
    return 4 * c * (per_token + head)


def _resident_embedding(model: RankModel, budget: int | None) -> list[tuple[int, int, Weights]] | None:
    """The embedding table as (first row, end row, "lm_head.*" tensors) pieces, if it may stay in
    memory: the resident LM-head chunks themselves when the embeddings are tied, else a copy when
    the budget holds it on top of everything else. None: rows are read from disk as needed."""
    if model.sched.res.window != 0:  # something streams: no room to keep the table
        return None
    head = model.head
    if model.cfg.tie_word_embeddings:  # a chunk on the GPU gives its rows from there
        return [(a, b, model.gpu_blocks.get(key) or model.sched.pinned(model.index[key])) for key, a, b in head.chunks]
    nbytes = sum(info.nbytes for info in head.embed.values())
    if budget is None or model.sched.res.planned_bytes + nbytes <= budget:
        rows = next(iter(head.embed.values())).shape[0]
        return [(0, rows, {f"lm_head.{part}": read_rows(head.fd, info, 0, rows) for part, info in head.embed.items()})]
    return None


def compute_mode(manifest: Manifest, opts: RankOptions) -> str:
    """How this rank computes: "exact" or "fast" on a quantized split (fast unless asked), "" on floats."""
    return (opts.compute or "fast") if manifest.quantized else ""


def _weight_bytes(manifest: Manifest, layers: list, chunks: list, head: Head | None) -> int:
    """The weights this rank holds or streams, as stored: its layer blocks, and on rank 0 the LM
    head, the final norm and an untied embedding table."""
    total = sum(s.nbytes for s in layers) + sum(s.nbytes for s, _, _ in chunks)
    if head is not None:
        total += head.norm.nbytes
        if not manifest.config.tie_word_embeddings:
            total += sum(info.nbytes for info in head.embed.values())
    return total


def _weight_format(manifest: Manifest, linear) -> str:
    if not manifest.quantized:
        return ""
    return f"{manifest.quant['format']}/{linear.compute}"


def _tune(model: RankModel, peers: Peers) -> None:
    """The blocks mode's share tuned by timing this rank's own step (calibrate.tune_share; the
    share predicted from the rates stays in the calibration); the offload is then planned at
    the share chosen, or at the prediction if tuning would take too long."""
    offload, predicted = model.offload, model.offload.plan.fraction
    attn = sum(s.nbytes for s in model.sched.blocks if s.key[1] == "attn")
    total = sum(s.nbytes for s in model.sched.blocks)
    fraction = lambda share: (attn + share * (total - attn)) / total if total else 1.0  # noqa: E731
    x = torch.randn(1, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    tuning = tune_share(lambda share: offload.replan(fraction(share), exact=False),
                        lambda: forward.timed_step(model, SingleRank(), x), peers, model.rank)
    offload.replan(fraction(tuning.share) if tuning else predicted)  # a new Offloader: nothing stays staged
    model.sched.counters = Counters()  # the tuning's walks are not the rank's work
    model._rope = (None, None)
    if tuning is not None:
        cal = model.calibration = model.calibration or Calibration()
        cal.fraction, cal.share, cal.step_s, cal.tune_s = fraction(tuning.share), tuning.share, \
            tuning.seconds[tuning.share], tuning.tune_s
        cal.tuned_ms = {round(fraction(s), 4): 1000 * t for s, t in tuning.seconds.items()}
