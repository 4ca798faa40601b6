"""Choosing a rank's offload share by measuring this machine.

Owns: what a rank measures at start and the ``Calibration`` it keeps: ``measure_bandwidths`` (the
CPU's matmul rate and the copy engine's rate, each measured while the other runs),
``dispatch_seconds`` (the host time per block of each path a block can take, on tiny blocks of
the model's structure), ``predict_share`` (the blocks mode's share those predict,
``plan.balance_share``), ``tune_share`` (the share at which a step the caller times is fastest,
over ``plan.search_share``'s grid, with the other ranks of this machine timing at the same time
through ``peers.Peers``), and for the rows mode ``calibrate_rows`` (the offload path itself timed
on synthetic blocks of the rank's shapes). Does not know: the rank's model (it gets shapes,
specs and a ``step`` callable), the network.
"""

from __future__ import annotations

import glob
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tpi.config import ModelConfig
from tpi.kv_cache import LayerCache
from tpi.layers import attention_partial, dense, ffn_partial, lm_head, rope_cos_sin, rope_inv_freq
from tpi.offload.blocks import divide_block
from tpi.offload.offloader import OFFLOAD_COUNTERS, STAGES, Offloader, offload_step
from tpi.offload.plan import COPY_SLOTS, balance_share, is_projection, search_share, search_steps, share_bytes
from tpi.peers import Peers

TUNE_ROUNDS = 3  # timed steps per share when the blocks mode's share is tuned at start
TUNE_STEPS = search_steps(TUNE_ROUNDS)  # steps the tuning takes
TUNE_MAX_S = 20.0  # a rank whose steps would take longer to tune (blocks streamed from disk) keeps the prediction
# dispatch_seconds' key for the path each kind of host block takes in the blocks mode
HOST_PATHS = {"attn": "copied_attn", "ffn": "divided", "head": "divided_head"}


@dataclass
class Calibration:
    """What a rank measured at start to choose its offload share (zeros: not measured)."""

    fraction: float = 0.0  # the share of the host bytes chosen for the accelerator (rows mode: of each projection)
    cpu_Bps: float = 0.0  # the CPU's matmul rate, measured while the copy engine runs
    copy_Bps: float = 0.0  # the copy engine's rate, measured while the CPU computes
    dispatch_s: dict[str, float] = field(default_factory=dict)  # host seconds per block of each path
    host_s: float = 0.0  # the rank's dispatch per token, counted on the CPU's side
    head_wait_s: float = 0.0  # a rank other than 0: its wait each token while rank 0 computes the LM head
    predicted: float = 0.0  # the fraction the rates predict
    share: float = 0.0  # tuned: the share of the FFN and LM-head bytes kept
    step_s: float = 0.0  # tuned: the step's seconds at that share (the slowest rank of this machine's)
    tune_s: float = 0.0  # seconds spent tuning
    tuned_ms: dict[float, float] = field(default_factory=dict)  # fraction -> ms of the step timed at it
    rows_ms: dict[float, float] = field(default_factory=dict)  # rows mode: share -> ms per synthetic walk


# -- rates ----------------------------------------------------------------------------------------
def measure_bandwidths(device: torch.device, dtype: torch.dtype, shape: tuple[int, int], threads: int | None = None,
                       nbytes: int | None = None, repeats: int = 5, ready: Callable[[], None] | None = None
                       ) -> tuple[float, float]:
    """(cpu_Bps, copy_Bps): bytes per second of the two halves of the blocks mode running at once,
    as they do: one-row CPU matmuls over host weights of `shape` ([out, in], past the CPU's
    caches) in this thread, and pinned host-to-device copies queued on a side stream (the copy
    engine needs no thread); each measured while the other runs, since both draw on the host's
    memory. Medians over `repeats`. `ready`, if given, is called once the buffers exist, just
    before the timing (where ranks that share the machine meet, so that they measure at once)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device={device}: measuring copy bandwidth needs a CUDA device")
    old = torch.get_num_threads()
    torch.set_num_threads(threads or old)
    try:
        total = _past_caches() if nbytes is None else nbytes
        one = math.prod(shape) * dtype.itemsize
        weights = [torch.empty(shape, dtype=dtype).fill_(1.0 / shape[1]) for _ in range(max(1, total // one))]
        src = torch.empty(len(weights) * one, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(one, dtype=torch.uint8, device=device)
        x, stream = torch.ones(1, shape[1], dtype=dtype), torch.cuda.Stream(device)
        cpu, copy = [], []
        if ready is not None:
            ready()
        for _ in range(repeats + 1):  # the first: warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                for k in range(len(weights)):
                    dst.copy_(src[k * one:(k + 1) * one], non_blocking=True)
                end.record(stream)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for w in weights:
                    F.linear(x, w)
            cpu.append(len(weights) * one / (time.perf_counter() - t0))
            end.synchronize()
            copy.append(len(weights) * one / (start.elapsed_time(end) / 1000))
        return statistics.median(cpu[1:]), statistics.median(copy[1:])
    finally:
        torch.set_num_threads(old)
        weights = src = dst = None
        give_back_cuda_memory()


def give_back_cuda_memory() -> None:
    """Cached device memory and pinned host memory (torch keeps both for reuse) go back to the
    system: a start-up measurement's buffers must not count against the rank's budgets."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def _past_caches() -> int:
    """Bytes of weights that a walk must touch so that the CPU's caches cannot hold them: twice
    the largest cache Linux reports (hosts with a 300 MB L3 exist), at least 512 MB."""
    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(f) as fh:
            text = fh.read().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max([512 << 20, *(2 * s for s in sizes)])


# -- the rank's dispatch ----------------------------------------------------------------------------
def dispatch_seconds(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, repeats: int = 20
                     ) -> dict[str, float]:
    """Host seconds per block of one decode token along each path a block of this model can take,
    timed on tiny blocks of its structure (head_dim, grouped KV heads, biases, q/k norms), whose
    bytes cost next to nothing: what is left is the work of the thread that runs the blocks
    (Python, op dispatch, kernel launches, the sync that brings each result back). Keys: "gpu_attn",
    "gpu_ffn" (resident on the accelerator), "copied_attn" (from the copy ring), "divided" and
    "divided_head" (an FFN block, an LM-head chunk, in a CPU part and an accelerator part, as the
    blocks mode runs them). Medians of `repeats`."""
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
    cpu_ffn, gpu_ffn = divide_block(host[1], "ffn", inter // 2)
    head = rand(inter, d)
    cpu_head, gpu_head = {"lm_head.weight": head[: inter // 2]}, {"lm_head.weight": head.pin_memory() if pin else head}
    on_dev = [{k: t.to(device) for k, t in b.items()} for b in (attn, ffn)]
    start = 8
    cache = LayerCache(*(torch.zeros(hkv, 2 * start, hd, dtype=dtype, device=device) for _ in range(2)))
    rope = rope_cos_sin(rope_inv_freq(cfg.rope, hd).to(device), torch.tensor([start], device=device), dtype)
    run_attn = lambda x, w, linear=dense: attention_partial(x, w, cache, start, cfg, rope, None, linear)  # noqa: E731
    run_ffn = lambda x, w, linear=dense: ffn_partial(x, w, cfg, linear)  # noqa: E731
    x = rand(1, d)
    slot = max(share_bytes([(n, tuple(t.shape), t.dtype) for n, t in b.items()], 1.0)[0] for b in host)
    cat = lambda c, y: torch.cat([c, y], dim=1)  # noqa: E731
    walk = [("attn", None, host[0], run_attn, None), ("ffn", cpu_ffn, gpu_ffn, run_ffn, torch.add),
            ("head", cpu_head, gpu_head, lm_head, cat)]
    times: dict[str, list[float]] = {k: [] for k in ("gpu_attn", "gpu_ffn", *HOST_PATHS.values())}
    with torch.inference_mode(), Offloader(device, 1.0, slot, COPY_SLOTS, 1) as off:
        for _ in range(repeats + 2):  # two warm-up rounds
            for name, run, w in (("gpu_attn", run_attn, on_dev[0]), ("gpu_ffn", run_ffn, on_dev[1])):
                t0 = time.perf_counter()
                run(x.to(device), w).to("cpu")
                times[name].append(time.perf_counter() - t0)
            for j, (key, cpu_w, gpu_w, run, join) in enumerate(walk):
                after = walk[(j + 1) % len(walk)]
                t0 = time.perf_counter()
                offload_step(off, key, x, cpu_w, gpu_w, run, join, lambda a=after: off.upcoming(a[0], a[2]))
                times[HOST_PATHS[key]].append(time.perf_counter() - t0)
    return {k: statistics.median(v[2:]) for k, v in times.items()}


# -- the blocks mode: predicted, then tuned -----------------------------------------------------------
def predict_share(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, all_specs: Sequence,
                  host_specs: Sequence, gpu_keys: Sequence, rank: int, threads: int, ring_bytes: int,
                  peers: Peers) -> Calibration | None:
    """The blocks mode's share of the host bytes (`host_specs`) for the GPU, predicted from what
    this rank measures: the CPU's and the copy engine's rates running at once (on the largest
    projection's shape, the ranks that share this machine measuring at the same time), and its
    own work per token on the thread that runs the blocks, which the CPU's part has to share: the
    dispatch of its GPU-resident blocks (`gpu_keys`) and of its host blocks, timed on tiny blocks
    of the model. A rank other than 0 also waits each token while rank 0 computes the LM head
    (estimated at this rank's rates, both sides at once), with its thread idle but its copy
    engine filling the copy ring (`ring_bytes`) with the next blocks: that much copying is free.
    None for a rank with no share of any layer (nothing to offload)."""
    shapes = [tuple(t.shape) for s in all_specs for t in s.tensors if is_projection(t.name) and len(t.shape) == 2]
    if not shapes:
        peers.meet()  # the others' measurement meets this rank's: keep count with them
        return None
    cpu_bps, copy_bps = measure_bandwidths(device, dtype, max(shapes, key=math.prod), threads, ready=peers.meet)
    d = dispatch_seconds(cfg, device, dtype)
    host_s = (sum(d["gpu_attn" if k[1] == "attn" else "gpu_ffn"] for k in gpu_keys if k[1] != "head")
              + sum(d[HOST_PATHS[s.key[1]]] for s in host_specs))
    head_wait_s = 0.0
    if rank != 0:
        head = cfg.vocab_size * cfg.hidden_size * dtype.itemsize
        head_wait_s = min(head / (cpu_bps + copy_bps), ring_bytes / copy_bps)
    attn = sum(s.nbytes for s in host_specs if s.key[1] == "attn")
    fraction = balance_share(attn, sum(s.nbytes for s in host_specs) - attn, cpu_bps, copy_bps, host_s + head_wait_s)
    return Calibration(fraction, cpu_bps, copy_bps, d, host_s, head_wait_s, predicted=fraction)


@dataclass(frozen=True)
class Tuning:
    share: float  # of the shared (FFN and LM-head) bytes, where the slowest rank of the machine was fastest
    seconds: dict[float, float]  # share -> that rank's step seconds, for every share timed
    tune_s: float


def tune_share(plan_at: Callable[[float], None], step: Callable[[], float], peers: Peers, rank: int,
               max_s: float | None = None) -> Tuning | None:
    """The share at which `step` (seconds of one step of the rank, as planned by `plan_at(share)`)
    is fastest, over ``search_share``'s grid: each share timed after one untimed step at the same
    share (the copy ring then starts full, as it does from one token to the next), TUNE_ROUNDS
    rounds in rotating order. The ranks of this machine (`peers`) time the same share at once,
    start each timed step together (a rank other than 0 waits while rank 0 computes the LM head,
    as it does when serving) and keep the share at which the slowest of them is fastest. The
    first step is timed as planned: if the tuning would take more than `max_s` seconds (blocks
    streamed from disk) it returns None, every rank of the machine deciding alike."""
    max_s = TUNE_MAX_S if max_s is None else max_s
    t0 = time.perf_counter()

    def step_at(share: float) -> float:
        plan_at(share)
        step()
        peers.meet("tuning the offload")
        return step()

    def time_at(shares: list[float]) -> list[float]:
        times: dict[float, list[float]] = {s: [] for s in shares}
        for r in range(TUNE_ROUNDS):
            for share in shares[r % len(shares):] + shares[:r % len(shares)]:
                times[share].append(step_at(share))
        mine = [statistics.median(times[s]) for s in shares]
        return [max(ranks) for ranks in zip(*peers.share(mine), strict=True)]

    first = step()  # warm-up: pinned blocks in place, kernels chosen
    slowest = max(v[0] for v in peers.share([first]))
    if slowest * TUNE_STEPS > max_s:
        print(f"rank {rank}: offload: a step takes {slowest:.2f}s, so tuning would take about "
              f"{slowest * TUNE_STEPS:.0f}s: keeping the share predicted from the rates", file=sys.stderr, flush=True)
        return None
    best, seconds = search_share(time_at)
    return Tuning(best, seconds, time.perf_counter() - t0)


# -- the rows mode: the offload path timed on synthetic blocks ------------------------------------------
def synthetic_blocks(blocks: list[dict[str, tuple[int, int]]], dtype: torch.dtype, pin: bool,
                      min_bytes: int, max_copies: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Host blocks of these projection shapes, repeated until they hold `min_bytes` (more than the
    CPU's caches) or `max_copies` times (the model's layers: a small model's walk is as short as
    its own); weights 1/in, so that activations of ones stay ones."""
    unit = sum(math.prod(s) * dtype.itemsize for b in blocks for s in b.values())
    copies = max(1, math.ceil(min_bytes / max(unit, 1)))
    out = []
    for _ in range(copies if max_copies is None else max(1, min(copies, max_copies))):
        for b in blocks:
            out.append({n: torch.empty(s, dtype=dtype, pin_memory=pin).fill_(1.0 / s[1]) for n, s in b.items()})
    return out


def _synthetic_pass(off: Offloader, blocks: list[dict[str, torch.Tensor]], x: torch.Tensor) -> float:
    """Seconds for one walk over `blocks` as a rank walks host blocks: input from the host, next
    block queued, stages in order (each stage's first output is the next stage's input), output
    back to the host."""
    t0 = time.perf_counter()
    for i, w in enumerate(blocks):
        ws = off.weights(i, w)
        off.upcoming((i + 1) % len(blocks), blocks[(i + 1) % len(blocks)])
        h = x.to(off.device)
        for stage in STAGES:
            names = [p for p in stage if f"{p}.weight" in ws]
            if names:
                h = [off.linear(h, ws, n) for n in names][0]
        h.to("cpu")
        off.finish(i)
    return time.perf_counter() - t0


def time_rows(device: torch.device, dtype: torch.dtype, blocks: list[dict[str, torch.Tensor]], share: float,
              slots: int = COPY_SLOTS, threads: int | None = None, passes: int = 3,
              counters: dict | None = None) -> float:
    """Median seconds per walk over host `blocks` with each projection's rows divided at `share`
    (after one warm-up walk); `counters`, if given, gets the Offloader's counters per walk."""
    slot = max(share_bytes([(n, tuple(t.shape), t.dtype) for n, t in b.items()], share)[0] for b in blocks)
    first = next(n for n in blocks[0] if is_projection(n))
    x = torch.ones(1, blocks[0][first].shape[1], dtype=dtype)  # the residual stream's width
    with torch.inference_mode(), Offloader(device, share, slot, slots, threads) as off:
        _synthetic_pass(off, blocks, x)
        off.counters = dict.fromkeys(OFFLOAD_COUNTERS, 0.0)
        seconds = statistics.median(_synthetic_pass(off, blocks, x) for _ in range(passes))
        if counters is not None:
            counters.update({k: v / passes for k, v in off.counters.items()})
        return seconds


def calibrate_rows(device: torch.device, dtype: torch.dtype, blocks: list[dict[str, tuple[int, int]]],
                   threads: int | None = None, slots: int = COPY_SLOTS, min_bytes: int | None = None,
                   passes: int = 3, max_copies: int | None = None) -> tuple[Calibration, int]:
    """The rows mode's share at which the offload path runs fastest on this machine, found by
    timing it: host blocks of these projection shapes ({"q_proj.weight": (out, in), ...}: one
    attention and one FFN block of the rank), repeated past `min_bytes` (default: twice the
    largest CPU cache) but at most `max_copies` times (the rank's layers), walked at shares 0,
    0.1, ..., 1, then at +-0.05 and +-0.025 around the best. Returns (the calibration: its
    fraction and ms per walk at each share timed; the bytes walked)."""
    device = torch.device(device)
    host = synthetic_blocks(blocks, dtype, device.type == "cuda", _past_caches() if min_bytes is None else min_bytes,
                             max_copies)
    ms: dict[float, float] = {}

    def at(r: float) -> float:
        r = round(min(1.0, max(0.0, r)), 3)
        if r not in ms:
            ms[r] = 1000 * time_rows(device, dtype, host, r, slots, threads, passes)
        return ms[r]

    for r in (i / 10 for i in range(11)):
        at(r)
    for step in (0.05, 0.025):
        best = min(ms, key=ms.get)
        at(best - step), at(best + step)
    nbytes = sum(t.nbytes for b in host for t in b.values())
    host.clear()
    if device.type == "cuda":  # the synthetic blocks' pinned memory and the ring go back
        give_back_cuda_memory()
    best = min(ms, key=ms.get)
    return Calibration(best, predicted=best, rows_ms=dict(sorted(ms.items()))), nbytes
