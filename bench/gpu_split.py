"""CPU/GPU offload on a machine with an NVIDIA GPU: ms/token for a ~1B random Llama whose GPU
budget holds a third of each rank's blocks, at world sizes 1 and 2, for

  cpu       every block on the CPU (no GPU),
  ondemand  GPU-resident blocks on the GPU; each other block copied to the GPU whole when it is
            used (rows mode at share 1, no prefetch), then computed there,
  stream    the same, but the next block's copy starts while this one computes (share 1, prefetch),
  blocks    the blocks mode (the default): attention blocks on the GPU from a copy, FFN blocks and
            LM-head chunks computed by the CPU (from host memory) and the GPU (from a copy) at once
            on disjoint columns (offload.plan.plan_shares, offload.blocks.divide_block), the copy
            engine bringing the next blocks' GPU parts over meanwhile; the GPU's share of the host
            bytes tuned at start by timing each rank's own step over a grid of shares,
  predicted the same at the share predicted at start from CPU and copy bandwidth, running at
            once, and the rank's dispatch (offload_tune=False: the prediction),
  blocks@f  the same at fixed shares f (the sweep), to compare the predicted share with the best,
  rows      every projection of the other blocks divided by output rows: the CPU computes its rows
            from host memory on a worker thread while the GPU's rows are copied over on a side
            stream and computed there; the share found at start by timing that path on synthetic
            blocks of the rank's shapes,
  rows@r    the same at fixed shares r.

All configurations of a world size are alive at once and measured in rounds (common.rounds), each
round in a new random order with a short pause before each generation; the table quotes medians
over rounds. Also probes CPU, copy and concurrent bandwidth, small copies beside weight copies and
the CPU matmul in bf16 vs fp32; with --calibrate shows the rows mode's start-up calibration in this
process, and with --profile times chosen settings in this process (world size 1) under
torch.profiler. Prints a table and writes bench/out/gpu_split.md, .json and .png. Does not know:
tpi's internals beyond LocalCluster, the offload's options and stats, and (for --calibrate and
--profile) open_rank.open_rank_model, forward's block functions and offload.calibrate.

Two shapes of about 1.1B parameters (common.SHAPES): ``llama7b`` (default), 4 layers of
Llama-2-7B's shape, where each block is hundreds of MB as in the models the offload is for, and
``tinyllama``, TinyLlama-1.1B's 22 small layers, where per-op dispatch on the host rather than
bytes bounds every GPU variant.

Run on the GPU machine:  python bench/gpu_split.py [--shape llama7b] [--dtype bfloat16] [--worlds 1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from common import OUT_DIR, SHAPES, command_line, rounds, save_plot, table, write_llama, write_report

from tpi.offload.offloader import OFFLOAD_COUNTERS

BASELINES = ("cpu", "ondemand")
FAMILIES = ("cpu", "ondemand", "stream", "blocks", "predicted", "rows")
GPU_SHAPES = ("llama7b", "tinyllama")


# -- settings ------------------------------------------------------------------------------------
def setting_keywords(name: str, budget: int) -> dict:
    """LocalCluster keywords of a setting: one of FAMILIES, or blocks@f / rows@r at a fixed share."""
    family, _, share = name.partition("@")
    if family not in FAMILIES or (share and family not in ("blocks", "rows")):
        raise ValueError(f"setting {name!r}: expected one of {', '.join(FAMILIES)}, blocks@F or rows@R")
    if family == "cpu":
        return {}
    kw = {"device": "cuda", "gpu_memory_budget": budget,
          "offload_mode": "blocks" if family in ("blocks", "predicted") else "rows"}
    if family in ("ondemand", "stream"):
        kw["offload_share"] = 1.0
    if share:
        kw["offload_share"] = float(share)
    if family == "ondemand":
        kw["offload_prefetch"] = False
    if family == "predicted":
        kw["offload_tune"] = False
    return kw


def setting_names(args: argparse.Namespace) -> list[str]:
    """The settings asked for: --settings, with "sweep" standing for every blocks@f and rows@r."""
    wanted = args.settings.split(",")
    names = [n for n in FAMILIES if n in wanted]
    if "sweep" in wanted:
        names += [f"blocks@{float(r):g}" for r in args.sweep.split(",") if r]
        names += [f"rows@{float(r):g}" for r in args.rows_sweep.split(",") if r]
    return names


# -- clusters ------------------------------------------------------------------------------------
def run_world(model: Path, cache: Path, world: int, args: argparse.Namespace, budget: int) -> list[dict]:
    """Every setting started (one after the other: each measures its share undisturbed), then
    `repeats` rounds of one generation each, each round in a new random order."""
    from tpi import LocalCluster

    ids = list(range(100, 132))
    threads = max(1, args.cores // world)
    with ExitStack() as stack:
        live = {}
        for name in setting_names(args):
            t0 = time.perf_counter()
            live[name] = stack.enter_context(LocalCluster(
                model, world_size=world, dtype=args.dtype, threads=threads, cache_dir=cache, max_context=512,
                start_timeout=900, step_timeout=600, **setting_keywords(name, budget)))
            print(f"  world {world}: started {name} in {time.perf_counter() - t0:.0f}s", flush=True)

        def generation(cluster: LocalCluster):
            def run() -> float:
                res = cluster.generate_full(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
                return 1000 * res["decode_s"] / (len(res["ids"]) - 1)

            return run

        ms = rounds({name: generation(c) for name, c in live.items()}, args.repeats, seed=world)
        rows = [stats_row(world, name, ms[name], cluster.stats()) for name, cluster in live.items()]
    for row in rows:
        print(describe(row), flush=True)
    return rows


def stats_row(world: int, name: str, ms: list[float], stats: list) -> dict:
    """One setting's ms/token and what every rank reports of its offload (tpi.stats.RankStats)."""
    return {"world": world, "setting": name, "ms": statistics.median(ms), "all_ms": ms,
            "share": stats[0].offload_share, "shares": [r.offload_share for r in stats],
            "gpu_share": [r.offload_gpu_share for r in stats], "host_ms": [1000 * r.offload_host_s for r in stats],
            "head_wait_ms": [1000 * r.offload_head_wait_s for r in stats],
            "cpu_GBps": [r.offload_cpu_Bps / 1e9 for r in stats],
            "copy_GBps": [r.offload_copy_Bps / 1e9 for r in stats],
            "predicted": [r.offload_predicted for r in stats], "tune_s": [r.offload_tune_s for r in stats],
            "step_ms": [1000 * r.offload_step_s for r in stats],
            "peak_rss_gb": [r.peak_rss_bytes / 1e9 for r in stats], "gpu_blocks": sum(r.gpu_blocks for r in stats),
            "host_blocks": sum(r.pinned_blocks + r.streamed_blocks for r in stats),
            "offload_ms_per_step": [{k: 1000 * getattr(r, f"offload_{k}") / max(1, r.steps) for k in OFFLOAD_COUNTERS}
                                    for r in stats]}


def describe(row: dict) -> str:
    """A log line: ms/token of every round, the shares, what each rank measured at start, rank 0's
    offload counters per step."""
    def per_rank(key: str, fmt: str = "{:.1f}") -> str:
        return "/".join(fmt.format(v) for v in row[key])

    host = (f"{per_rank('host_ms')} (+ head wait {per_rank('head_wait_ms')}), rates GB/s CPU/copy "
            + "/".join(f"{c:.0f}:{g:.0f}" for c, g in zip(row["cpu_GBps"], row["copy_GBps"])))
    tuned = "" if not any(row["tune_s"]) else (
        f" (tuned in {per_rank('tune_s')} s, step without allreduce {per_rank('step_ms')} ms; "
        f"predicted {per_rank('predicted', '{:.3g}')})")
    counters = ", ".join(f"{k} {v:.1f}" for k, v in row["offload_ms_per_step"][0].items())
    return (f"  world {row['world']} {row['setting']:>10}: {row['ms']:7.1f} ms/token "
            f"({', '.join(f'{v:.1f}' for v in row['all_ms'])}; share {per_rank('shares', '{:.3g}')}{tuned}, "
            f"dispatch counted {host} ms, {row['gpu_blocks']} GPU / {row['host_blocks']} host blocks; "
            f"rank 0 ms/step: {counters})")


def block_bytes(model: Path, cache: Path, world: int, dtype: str) -> list[int]:
    """Per rank, the bytes of its layer blocks (what the GPU budget is a third of)."""
    from tpi.split import split_cached
    from tpi.weights import Manifest

    shard = split_cached(model, world, None, dtype, cache, progress=False)
    files = Manifest.load(shard).raw["files"]
    return [sum(f["size"] for k, f in files.items() if k.startswith(f"rank{r}/layer")) for r in range(world)]


# -- probes --------------------------------------------------------------------------------------
def probe_bandwidth(dtype: torch.dtype, threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """GB/s of a one-row CPU matmul over a weight, of a pinned host-to-device copy, and of both at
    once (each on its own weight): whether the two paths add up or share the host's memory."""
    torch.set_num_threads(threads)
    cols = 4096
    rows = nbytes // (cols * dtype.itemsize)
    w_cpu, w_pin = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype).pin_memory()
    x, dev = torch.randn(1, cols).to(dtype), torch.empty(rows, cols, dtype=dtype, device="cuda")  # [1, C], [R, C]
    stream = torch.cuda.Stream()

    def cpu(w: torch.Tensor = w_cpu) -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        return repeats * w.nbytes / (time.perf_counter() - t0) / 1e9

    def copy() -> float:
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(repeats):
                dev.copy_(w_pin, non_blocking=True)
        stream.synchronize()
        return repeats * w_pin.nbytes / (time.perf_counter() - t0) / 1e9

    cpu(), copy()  # warm-up
    cpu(w_pin)
    alone = {"cpu_GBps": cpu(), "cpu_pinned_GBps": cpu(w_pin), "copy_GBps": copy()}
    both: dict = {}
    t = threading.Thread(target=lambda: both.update(copy_together=copy()))
    t.start()
    both["cpu_together"] = cpu()
    t.join()
    return {**alone, "cpu_GBps_while_copying": both["cpu_together"], "copy_GBps_while_cpu": both["copy_together"]}


def small_transfer_latency(nbytes: int = 512 << 20, repeats: int = 50) -> dict:
    """Microseconds for an 8 KB pinned copy each way (a projection's input to the host, the CPU's
    rows back), alone and while a side stream copies weights to the GPU: whether the offload's
    small copies wait behind the weights' on a copy engine."""
    big_src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    big_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.ones(2048, dtype=torch.float32).pin_memory()
    dev, side = torch.ones(2048, device="cuda"), torch.cuda.Stream()
    ways = {"h2d_copy": lambda: dev.copy_(host, non_blocking=True),
            "d2h_copy": lambda: host.copy_(dev, non_blocking=True)}

    def median_us(fn) -> float:
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.current_stream().synchronize()
            t.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(t)

    out = {}
    for name, fn in ways.items():
        median_us(fn)
        out[f"{name}_us"] = median_us(fn)
        with torch.cuda.stream(side):
            for _ in range(4):
                big_dst.copy_(big_src, non_blocking=True)
        out[f"{name}_us_during_weight_copy"] = median_us(fn)
        side.synchronize()
    return out


def cpu_dtypes(threads: int, nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """Billions of weights per second of a one-row CPU matmul in bfloat16 and in float32 (the CPU
    part's speed with each dtype on this host's oneDNN), and of torch.mm into a preallocated output
    as the offload's worker runs it."""
    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        rows = nbytes // (4096 * dtype.itemsize)
        w, x = torch.randn(rows, 4096).to(dtype), torch.randn(1, 4096).to(dtype)  # [R, 4096], [1, 4096]
        y = torch.empty(1, rows, dtype=dtype)
        for name in ("linear", "mm_out"):
            for i in range(repeats + 1):
                if i == 1:  # after a warm-up
                    t0 = time.perf_counter()
                torch.nn.functional.linear(x, w) if name == "linear" else torch.mm(x, w.t(), out=y)
            out[f"cpu_{name}_{str(dtype)[6:]}_Gweights_s"] = repeats * w.numel() / (time.perf_counter() - t0) / 1e9
    return out


# -- in this process: calibration and profiles ---------------------------------------------------
def calibrate_inproc(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """offload.calibrate.calibrate_rows on one attention and one FFN block of world size 1's
    shapes, at the threads of world sizes 1 and 2: the rows mode's ms per synthetic walk at each
    share; then two walks at fixed shares with the Offloader's counters."""
    from tpi.offload.calibrate import calibrate_rows, synthetic_blocks, time_rows

    s = SHAPES[args.shape]
    h, hd = s.hidden, s.dim
    blocks = [{"q_proj.weight": (s.heads * hd, h), "k_proj.weight": (s.kv_heads * hd, h),
               "v_proj.weight": (s.kv_heads * hd, h), "o_proj.weight": (h, s.heads * hd)},
              {"gate_proj.weight": (s.intermediate, h), "up_proj.weight": (s.intermediate, h),
               "down_proj.weight": (h, s.intermediate)}]
    out, cuda = {}, torch.device("cuda")
    for threads in (args.cores, args.cores // 2):
        t0 = time.perf_counter()
        cal, nbytes = calibrate_rows(cuda, dtype, blocks, threads)
        out[f"threads{threads}"] = {"bytes": nbytes, "share": cal.fraction,
                                    "ms": {str(r): m for r, m in cal.rows_ms.items()}}
        print(f"calibrate ({threads} threads, {nbytes / 1e6:.0f} MB, {time.perf_counter() - t0:.1f}s): best "
              f"{cal.fraction:.3f}; ms per walk " + ", ".join(f"{r:g}: {m:.2f}" for r, m in cal.rows_ms.items()),
              flush=True)
    host = synthetic_blocks(blocks, dtype, True, 1 << 30)
    for share in (0.3, 0.6):
        counters: dict = {}
        ms = 1000 * time_rows(cuda, dtype, host, share, threads=args.cores, counters=counters)
        print(f"synthetic walk over {sum(t.nbytes for b in host for t in b.values()) / 1e6:.0f} MB at {share}: "
              f"{ms:.2f} ms, " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in counters.items()), flush=True)
    return out


def _timed(m, comm, start: int, steps: int = 11) -> str:
    """ms/token of `steps` decode steps of RankModel m from position `start`, and the offload's
    counters per token."""
    from tpi.forward import logits, run_layers

    off = m.offload.offloader if m.offload else None
    before, times = dict(off.counters) if off else {}, []
    for pos in range(start, start + steps):
        t0 = time.perf_counter()
        logits(m, run_layers(m, comm, m.embed([7]), 1, pos, pos))
        times.append(1000 * (time.perf_counter() - t0))
    per = {k: 1000 * (v - before[k]) / steps for k, v in (off.counters if off else {}).items()}
    return (f"ms/token median {statistics.median(times):.1f} (min {min(times):.1f})"
            + "".join(f", {k[:-2]} {v:.1f} ms" for k, v in per.items()))


def _block_times(m, start: int, steps: int = 5) -> str:
    """Wall ms of each block in `steps` decode steps of RankModel m at world size 1, unprofiled,
    with where it ran: G (GPU-resident), C (CPU, whole), S (host block offloaded); H: the LM
    head. With one rank the allreduce is the identity, so the layer loop runs here block by block
    (forward.attention, forward.mlp, forward.logits; each returns its result on the CPU, so a GPU
    block's time is complete)."""
    from tpi import forward

    acc: dict = defaultdict(list)

    def clock(key: tuple, t0: float) -> None:
        acc[key].append(1000 * (time.perf_counter() - t0))

    for pos in range(start, start + steps):
        x = m.embed([7])  # [1, D]
        for layer in range(m.cfg.num_layers):
            t0 = time.perf_counter()
            x = x + forward.attention(m, layer, x, 1, pos)
            clock((layer, "attn"), t0)
            t0 = time.perf_counter()
            x = x + forward.mlp(m, layer, x)
            clock((layer, "ffn"), t0)
        t0 = time.perf_counter()
        forward.logits(m, x)
        clock((m.cfg.num_layers, "head"), t0)

    def where(key: tuple) -> str:
        if key[1] == "head":
            return "H"
        if key in m.gpu_blocks:
            return "G"
        return "C" if m.offload is None or m.offload.on_cpu(key) else "S"

    return ", ".join(f"{k[1]}{k[0]} {where(k)} {statistics.median(v):.2f}" for k, v in acc.items())


def _calibration(cal) -> str:
    """What a rank measured at start (offload.calibrate.Calibration), in words: the rows mode's
    timed walks, or the blocks mode's rates, dispatch, prediction and tuning."""
    if cal.rows_ms:
        return f"ms per walk {cal.rows_ms}"
    paths = " ".join(f"{k} {1e3 * v:.2f}" for k, v in cal.dispatch_s.items())
    tuned = f", tuned to {cal.fraction:.2f} in {cal.tune_s:.1f} s" if cal.tune_s else ""
    return (f"CPU {cal.cpu_Bps / 1e9:.1f} GB/s, copy {cal.copy_Bps / 1e9:.1f} GB/s, dispatch "
            f"{1000 * cal.host_s:.1f} ms/token ({paths}) -> predicted {cal.predicted:.2f}{tuned}")


def profile_inproc(model: Path, cache: Path, args: argparse.Namespace, budget: int) -> None:
    """World size 1 in this process: ms/token of each --profile setting, then one step under
    torch.profiler (CPU and CUDA): where the time goes. Tables go to bench/out/profile_<name>.txt,
    traces to trace_<name>.json."""
    from torch.profiler import ProfilerActivity, profile

    from tpi.comm.base import SingleRank
    from tpi.forward import logits, run_layers
    from tpi.open_rank import open_rank_model
    from tpi.options import RankOptions, from_keywords
    from tpi.split import split_cached
    from tpi.weights import Manifest

    torch.set_num_threads(args.cores)
    shard = split_cached(model, 1, None, args.dtype, cache, progress=False)
    manifest, comm = Manifest.load(shard), SingleRank()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.profile.split(","):
        ranks, _ = from_keywords(1, RankOptions(threads=args.cores, max_context=512), **setting_keywords(name, budget))
        m = open_rank_model(shard, manifest, 0, ranks[0])
        try:
            with torch.inference_mode():
                logits(m, run_layers(m, comm, m.embed(list(range(100, 132))), 1, 0, 0)[-1:])
                plain = _timed(m, comm, 32)
                print(f"  {name}: per block, ms (median of 5 steps): {_block_times(m, 60)}", flush=True)
                _thread_sweep(m, comm, name, args.profile_threads)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    logits(m, run_layers(m, comm, m.embed([7]), 1, 43, 43))
            _save_profile(prof, name)
            print(f"profile {name}: share {m.offload.share if m.offload else 0:.3f}, {len(m.gpu_blocks)} GPU blocks, "
                  f"{plain}" + (f"; calibration {_calibration(m.calibration)}" if m.calibration else ""), flush=True)
        finally:
            m.close()
            del m
            torch.cuda.empty_cache()


def _thread_sweep(m, comm, name: str, threads: str) -> None:
    """ms/token with the offload's CPU worker at each of `threads` (comma-separated) torch threads."""
    if m.offload is None or not threads:
        return
    off = m.offload.offloader
    default, pos = off.threads, 43
    for n in (int(t) for t in threads.split(",")):
        off.set_threads(n)
        print(f"  {name}: worker at {n} threads: {_timed(m, comm, pos)}", flush=True)
        pos += 11
    off.set_threads(default)


def _save_profile(prof, name: str) -> None:
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    by_cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12)
    tag = name.replace("@", "_")
    (OUT_DIR / f"profile_{tag}.txt").write_text(by_cpu + "\n" + by_cuda)
    prof.export_chrome_trace(str(OUT_DIR / f"trace_{tag}.json"))
    print(by_cpu[:3000], flush=True)


# -- report --------------------------------------------------------------------------------------
def _times(base: float, ms: float) -> str:
    """How many times faster than base; a dash where base was not run."""
    return "–" if math.isnan(base) else f"{base / ms:.2f}x"


def result_table(rows: list[dict]) -> str:
    cols = ["world", "setting", "ms/token", "offload share", "GPU share of host bytes", "GPU / host blocks",
            "vs best of cpu, ondemand", "vs stream", "peak RSS per rank (VmHWM, GB)"]
    cells = []
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        best = min((r["ms"] for r in mine if r["setting"] in BASELINES), default=float("nan"))
        stream = next((r["ms"] for r in mine if r["setting"] == "stream"), float("nan"))
        cells += [[world, r["setting"], f"{r['ms']:.1f}", f"{r['share']:.2f}",
                   "/".join(f"{v:.2f}" for v in r["gpu_share"]), f"{r['gpu_blocks']} / {r['host_blocks']}",
                   _times(best, r["ms"]), _times(stream, r["ms"]), "/".join(f"{v:.2f}" for v in r["peak_rss_gb"])]
                  for r in mine]
    return table(cols, cells)


def found_lines(rows: list[dict]) -> list[str]:
    """Per world size and mode: the share found at start against the fastest measured."""
    lines = []
    for world in sorted({r["world"] for r in rows}):
        for family in ("blocks", "rows"):
            runs = [r for r in rows if r["world"] == world and r["setting"].split("@")[0] == family]
            found = next((r for r in runs if r["setting"] == family), None)
            if found:
                fastest = min(runs, key=lambda r: r["ms"])
                lines.append(f"world {world}, {family}: share found at start {found['share']:.2f} "
                             f"({found['ms']:.1f} ms/token); fastest measured {fastest['share']:.2f} "
                             f"({fastest['ms']:.1f} ms/token)")
        bare = next((r for r in rows if r["world"] == world and r["setting"] == "predicted"), None)
        if bare:
            lines.append(f"world {world}, blocks: share predicted from the rates "
                         + "/".join(f"{v:.2f}" for v in bare["predicted"]) + f" ({bare['ms']:.1f} ms/token)")
    return lines


def report(rows: list[dict], args: argparse.Namespace, params: int, gpu: str, probes: dict) -> None:
    lines = [f"# CPU/GPU offload: {params / 1e9:.2f}B random Llama ({args.shape} shape), {args.dtype}, GPU budget = "
             f"1/3 of each rank's blocks, {gpu}, {args.cores} cores shared by the ranks, median of "
             f"{args.repeats} rounds x {args.new_tokens} tokens", "", f"`{command_line('gpu_split.py')}`", ""]
    if probes:
        lines += ["probe: " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()), ""]
    text = "\n".join([*lines, result_table(rows), "", *found_lines(rows)])
    print(text)
    write_report(OUT_DIR, "gpu_split.md", text)
    write_report(OUT_DIR, "gpu_split.json", json.dumps(rows, indent=1))
    plot(rows)


def plot(rows: list[dict]) -> bool:
    """ms/token against the offload share, the baselines as horizontal lines, one panel per world size."""
    worlds = sorted({r["world"] for r in rows})

    def draw(axes: list) -> None:
        for ax, world in zip(axes, worlds, strict=True):
            mine = [r for r in rows if r["world"] == world]
            for family, color in (("blocks", "C0"), ("rows", "C1")):
                sweep = sorted((r["share"], r["ms"]) for r in mine if r["setting"].split("@")[0] == family)
                ax.plot([s[0] for s in sweep], [s[1] for s in sweep], "o-", color=color, label=f"{family} mode")
                for r in mine:
                    if r["setting"] == family:
                        ax.plot([r["share"]], [r["ms"]], "*", color=color, markersize=14,
                                label=f"{family}: share found at start")
                    if family == "blocks" and r["setting"] == "predicted":
                        ax.plot([r["share"]], [r["ms"]], "D", color="C3", markersize=8, label="blocks: predicted share")
            for r in mine:
                if r["setting"] in ("cpu", "ondemand", "stream"):
                    color = {"cpu": "gray", "ondemand": "k", "stream": "g"}[r["setting"]]
                    ax.axhline(r["ms"], linestyle="--", color=color, label=r["setting"])
            ax.set(title=f"world size {world}", ylabel="ms/token", ylim=(0, None),
                   xlabel="offload share (blocks: GPU share of host bytes; rows: of each projection's rows)")
            ax.legend()

    return save_plot(OUT_DIR / "gpu_split.png", draw, panels=len(worlds), panel_size=(5.5, 4))


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", default="llama7b", choices=GPU_SHAPES)
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the table quotes medians)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--sweep", default="0.3,0.4,0.5,0.6", help="blocks mode: GPU shares of the host bytes to time")
    ap.add_argument("--rows-sweep", default="0.8", help="rows mode: shares to time")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="torch threads, shared by the ranks")
    ap.add_argument("--settings", default="cpu,ondemand,stream,blocks,rows,sweep",
                    help=f"which rows to run, from {','.join(FAMILIES)},sweep")
    ap.add_argument("--profile", default="", help="settings to profile in this process first (world 1)")
    ap.add_argument("--profile-threads", default="", help="with --profile: also time the offload's worker at these "
                    "torch thread counts (e.g. 15,8,4)")
    ap.add_argument("--calibrate", action="store_true",
                    help="first time the rows mode's path in this process (tpi.offload.calibrate.calibrate_rows)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="tpi-gpu-bench-"))
    model, cache = tmp / "model", tmp / "cache"
    rows, probes = [], {}
    try:
        n = write_llama(model, SHAPES[args.shape].with_layers(args.layers), dtype)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"random Llama ({args.shape}): {n / 1e9:.2f}B parameters, {args.dtype}; GPU: {gpu}; "
              f"{args.cores} cores", flush=True)
        if torch.cuda.is_available() and (args.worlds or args.profile):
            probes = {**probe_bandwidth(dtype, args.cores), **small_transfer_latency(), **cpu_dtypes(args.cores)}
            print("probe: " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()), flush=True)
            if args.calibrate:
                write_report(OUT_DIR, "gpu_split_calibrate.json", json.dumps(calibrate_inproc(args, dtype), indent=1))
        if args.profile:
            profile_inproc(model, cache, args, block_bytes(model, cache, 1, args.dtype)[0] // 3)
        for world in (int(w) for w in args.worlds.split(",") if w):
            budget = min(block_bytes(model, cache, world, args.dtype)) // 3
            rows += run_world(model, cache, world, args, budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        report(rows, args, n, gpu, probes)


if __name__ == "__main__":
    main()
