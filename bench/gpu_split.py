"""CPU/GPU split compute on a machine with an NVIDIA GPU: ms/token for a ~1B random Llama whose
GPU budget holds a third of each rank's blocks, at world sizes 1 and 2, for

  cpu       every block on the CPU (no GPU),
  ondemand  GPU-resident blocks on the GPU; each other block copied to the GPU whole when it is
            used (split ratio 1, no prefetch), then computed there,
  stream    the same, but the next block's copy starts while this one computes (ratio 1, prefetch),
  blocks    the block split (the default): attention blocks on the GPU from a copy, FFN blocks and
            LM-head chunks computed by the CPU (from host memory) and the GPU (from a copy) at once
            on disjoint columns (hetero.plan_shares, split_block), the copy engine bringing the next
            blocks' GPU parts over meanwhile; the GPU's share of the host bytes tuned at start by
            timing each rank's own step over a grid of shares (RankModel._tune_share),
  predicted the same at the share predicted at start from CPU and copy bandwidth, running at
            once, and the rank's dispatch (split_tune off: the prediction),
  blocks@f  the same at fixed shares f (the sweep), to compare the predicted share with the best,
  rows      every projection of the other blocks split by output rows: the CPU computes its rows
            from host memory on a worker thread while the GPU's rows are copied over on a side
            stream and computed there; the ratio found at start by timing that path on synthetic
            blocks of the rank's shapes,
  rows@r    the same at fixed ratios r.

All configurations of a world size are alive at once and measured a round at a time, each round
in a new random order with a short pause before each generation; the table quotes medians over
rounds. Also probes CPU, copy and concurrent bandwidth, small
copies beside weight copies and the CPU matmul in bf16 vs fp32;
with --calibrate shows the start-up calibration's timings in this process, and
with --profile times chosen settings in this process (world size 1) under torch.profiler. Prints a table
and writes bench/out/gpu_split.md and bench/out/gpu_split.png. Does not know: tpi's internals beyond
LocalCluster, MemoryOptions and (for --profile) RankModel.

Two shapes of about 1.1B parameters: ``llama7b`` (default), 4 layers of Llama-2-7B's shape, where
each block is hundreds of MB as in the models the split is for, and ``tinyllama``, TinyLlama-1.1B's
22 small layers, where per-op dispatch on the host rather than bytes bounds every GPU variant.

Run on the GPU machine:  python bench/gpu_split.py [--shape llama7b] [--dtype bfloat16] [--worlds 1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from tpi.hetero import SPLIT_COUNTERS

OUT = Path(__file__).resolve().parent / "out"
BASELINES = ("cpu", "ondemand")
PAUSE_S = 0.3  # idle before each timed generation: the last one's threads stop spinning


# hidden, intermediate, heads, KV heads, head_dim, layers; vocabulary 32000: both about 1.1B parameters
SHAPES = {"tinyllama": (2048, 5632, 32, 4, 64, 22),  # TinyLlama-1.1B: 44 blocks of 19 or 69 MB (bf16)
          "llama7b": (4096, 11008, 32, 32, 128, 4)}  # 4 layers of Llama-2-7B: 8 blocks of 134 or 270 MB


def write_llama(path: Path, shape: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0) -> int:
    """A random Llama checkpoint of `shape`, one shard file per layer; returns its parameter count."""
    h, inter, heads, kv, hd, default_layers = SHAPES[shape]
    layers, vocab = layers or default_layers, 32000
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(dtype)  # noqa: E731
    weight_map, count = {}, 0

    def save(name: str, tensors: dict) -> None:
        nonlocal count
        save_file(tensors, str(path / name))
        for k, t in tensors.items():
            weight_map[k] = name
            count += t.numel()

    path.mkdir(parents=True, exist_ok=True)
    save("embed.safetensors", {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
                               "model.norm.weight": torch.ones(h, dtype=dtype)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(f"layer{i:02d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(heads * hd, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
            p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, heads * hd),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu"}))
    return count




def settings(budget: int, dtype: str, sweep: list[float], rows_sweep: list[float], wanted: list[str]
             ) -> list[tuple[str, dict, dict]]:
    """(name, LocalCluster keywords, MemoryOptions fields it has no keyword for) for each
    configuration asked for."""
    gpu = dict(dtype=dtype, device="cuda", gpu_memory_budget=budget)
    no_prefetch = {"gpu_prefetch": False}
    out = [("cpu", dict(dtype=dtype), {}), ("ondemand", dict(gpu, split_mode="rows", split_ratio=1.0), no_prefetch),
           ("stream", dict(gpu, split_mode="rows", split_ratio=1.0), {}),
           ("blocks", dict(gpu, split_mode="blocks"), {}),
           ("predicted", dict(gpu, split_mode="blocks"), {"split_tune": False}),
           ("rows", dict(gpu, split_mode="rows"), {})]
    out += [(f"blocks@{r:g}", dict(gpu, split_mode="blocks", split_ratio=r), {}) for r in sweep]
    out += [(f"rows@{r:g}", dict(gpu, split_mode="rows", split_ratio=r), {}) for r in rows_sweep]
    return [s for s in out if s[0] in wanted or ("sweep" in wanted and "@" in s[0])]


def start(model: Path, cache: Path, world: int, threads: int, kw: dict, fields: dict):
    from tpi import LocalCluster

    cluster = LocalCluster(model, world_size=world, threads=threads, cache_dir=cache, max_context=512,
                           start_timeout=900, step_timeout=600, **kw)
    # LocalCluster has no keyword for it: the per-rank MemoryOptions it will start the ranks with
    cluster.memory = [dataclasses.replace(m, **fields) for m in cluster.memory]
    cluster.start()
    return cluster


def run_world(model: Path, cache: Path, world: int, args, budget: int) -> list[dict]:
    """Every configuration started (one after the other: each measures its ratio undisturbed),
    then `repeats` rounds of one generation each, each round in a new random order."""
    ids = list(range(100, 132))
    chosen = settings(budget, args.dtype, [float(r) for r in args.sweep.split(",") if r],
                      [float(r) for r in args.rows_sweep.split(",") if r], args.settings.split(","))
    threads = max(1, args.cores // world)
    with ExitStack() as stack:
        live = []
        for name, kw, fields in chosen:
            t0 = time.perf_counter()
            cluster = stack.enter_context(start(model, cache, world, threads, kw, fields))
            cluster.generate_full(ids, max_new_tokens=4)  # warm-up
            live.append((name, cluster))
            print(f"  world {world}: started {name} in {time.perf_counter() - t0:.0f}s", flush=True)
        ms: dict[str, list[float]] = {name: [] for name, _ in live}
        order = random.Random(world)
        for _ in range(args.repeats):
            # a new order each round: in a fixed rotation each setting would always follow the same
            # one and pay for its aftermath (threads still spinning, caches evicted)
            for name, cluster in order.sample(live, len(live)):
                time.sleep(PAUSE_S)
                res = cluster.generate_full(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
                ms[name].append(1000 * res["decode_s"] / (len(res["ids"]) - 1))
        rows = []
        for name, cluster in live:
            stats = cluster.stats()
            rows.append({"world": world, "setting": name, "ms": statistics.median(ms[name]), "all_ms": ms[name],
                         "ratio": stats[0]["split_ratio"], "ratios": [r["split_ratio"] for r in stats],
                         "gpu_share": [r["split_gpu_share"] for r in stats],
                         "host_ms": [1000 * r["split_host_s"] for r in stats],
                         "predicted": [r["split_predicted"] for r in stats],
                         "tune_s": [r["split_tune_s"] for r in stats],
                         "step_ms": [1000 * r["split_step_s"] for r in stats],
                         "measured": [{k: r[f"split_{k}"] for k in ("cpu_Bps", "copy_Bps", "head_wait_s")}
                                      for r in stats],
                         "peak_rss_gb": [r["peak_rss_bytes"] / 1e9 for r in stats],
                         "gpu_blocks": sum(r["gpu_blocks"] for r in stats),
                         "host_blocks": sum(r["pinned_blocks"] + r["streamed_blocks"] for r in stats)})
            ratios = "/".join(f"{r:.3g}" for r in rows[-1]["ratios"])
            rows[-1]["split_ms_per_step"] = [{k: 1000 * r[f"split_{k}"] / max(1, r["steps"]) for k in SPLIT_COUNTERS}
                                             for r in stats]
            host = "/".join(f"{v:.1f}" for v in rows[-1]["host_ms"]) + " (+ head wait " + "/".join(
                f"{1000 * m['head_wait_s']:.1f}" for m in rows[-1]["measured"]) + "), rates GB/s CPU/copy " + "/".join(
                f"{m['cpu_Bps'] / 1e9:.0f}:{m['copy_Bps'] / 1e9:.0f}" for m in rows[-1]["measured"])
            tuned = "" if not any(rows[-1]["tune_s"]) else " (tuned in " + "/".join(
                f"{v:.1f}" for v in rows[-1]["tune_s"]) + " s, step without allreduce " + "/".join(
                f"{v:.1f}" for v in rows[-1]["step_ms"]) + " ms; predicted " + "/".join(
                f"{v:.3g}" for v in rows[-1]["predicted"]) + ")"
            print(f"  world {world} {name:>10}: {rows[-1]['ms']:7.1f} ms/token "
                  f"({', '.join(f'{v:.1f}' for v in ms[name])}; ratio {ratios}{tuned}, dispatch counted {host} ms, "
                  f"{rows[-1]['gpu_blocks']} GPU / {rows[-1]['host_blocks']} host blocks; rank 0 ms/step: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1]["split_ms_per_step"][0].items()) + ")", flush=True)
    return rows


def probe_bandwidth(dtype: torch.dtype, threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """GB/s of a one-row CPU matmul over a weight, of a pinned host-to-device copy, and of both at
    once (each on its own weight): whether the two paths add up or share the host's memory."""
    import threading

    torch.set_num_threads(threads)
    cols = 4096
    rows = nbytes // (cols * dtype.itemsize)
    w_cpu, w_pin = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype).pin_memory()
    x, dev = torch.randn(1, cols).to(dtype), torch.empty(rows, cols, dtype=dtype, device="cuda")
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
    rows back), alone and while a side stream copies weights to the GPU: whether the split's small
    copies wait behind the weights' on a copy engine."""
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
    half's speed with each dtype on this host's oneDNN), and of torch.mm into a preallocated output
    as the split's worker runs it."""
    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        rows = nbytes // (4096 * dtype.itemsize)
        w, x = torch.randn(rows, 4096).to(dtype), torch.randn(1, 4096).to(dtype)
        y = torch.empty(1, rows, dtype=dtype)
        for name in ("linear", "mm_out"):
            for i in range(repeats + 1):
                if i == 1:  # after a warm-up
                    t0 = time.perf_counter()
                torch.nn.functional.linear(x, w) if name == "linear" else torch.mm(x, w.t(), out=y)
            out[f"cpu_{name}_{str(dtype)[6:]}_Gweights_s"] = repeats * w.numel() / (time.perf_counter() - t0) / 1e9
    return out


def calibrate_inproc(args, dtype: torch.dtype) -> dict:
    """tpi.hetero.calibrate on one attention and one FFN block of world size 1's shapes, at the
    threads of world sizes 1 and 2: the synthetic split path's ms per walk at each ratio."""
    from tpi.hetero import _synthetic_blocks, calibrate, time_split

    h, inter, heads, kv, hd, _ = SHAPES[args.shape]
    blocks = [{"q_proj.weight": (heads * hd, h), "k_proj.weight": (kv * hd, h), "v_proj.weight": (kv * hd, h),
               "o_proj.weight": (h, heads * hd)},
              {"gate_proj.weight": (inter, h), "up_proj.weight": (inter, h), "down_proj.weight": (h, inter)}]
    out = {}
    for threads in (args.cores, args.cores // 2):
        t0 = time.perf_counter()
        r = calibrate(torch.device("cuda"), dtype, blocks, threads)
        out[f"threads{threads}"] = r
        print(f"calibrate ({threads} threads, {r['bytes'] / 1e6:.0f} MB, "
              f"{time.perf_counter() - t0:.1f}s): best {r['ratio']:.3f}; ms per walk "
              + ", ".join(f"{k:g}: {v:.2f}" for k, v in r["ms"].items()), flush=True)
    host = _synthetic_blocks(blocks, dtype, True, 1 << 30)
    for ratio in (0.3, 0.6):
        counters: dict = {}
        ms = 1000 * time_split(torch.device("cuda"), dtype, host, ratio, threads=args.cores, counters=counters)
        print(f"synthetic walk over {sum(t.nbytes for b in host for t in b.values()) / 1e6:.0f} MB at {ratio}: "
              f"{ms:.2f} ms, " + ", ".join(f"{k} {1000 * v:.2f} ms" for k, v in counters.items()), flush=True)
    return out


def _timed(m, comm, start: int, steps: int = 11) -> str:
    """ms/token of `steps` decode steps of RankModel m from position `start`, and the split's
    counters per token."""
    from tpi.forward import run_layers

    before, times = dict(m.split.counters) if m.split else {}, []
    for pos in range(start, start + steps):
        t0 = time.perf_counter()
        m.logits(run_layers(m, comm, m.embed([7]), 1, pos, pos))
        times.append(1000 * (time.perf_counter() - t0))
    per = {k: 1000 * (v - before[k]) / steps for k, v in (m.split.counters if m.split else {}).items()}
    return (f"ms/token median {statistics.median(times):.1f} (min {min(times):.1f})"
            + "".join(f", {k[:-2]} {v:.1f} ms" for k, v in per.items()))


def _block_times(m, comm, start: int, steps: int = 5) -> str:
    """Wall ms of each block in `steps` decode steps of RankModel m, unprofiled, with where it ran:
    G (GPU-resident), C (CPU, whole), S (host block computed on the GPU or split); H: the LM head."""
    from collections import defaultdict

    from tpi.forward import run_layers

    acc: dict = defaultdict(list)
    block, logits = m._block, m.logits

    def timed_block(key, x, run):
        t0 = time.perf_counter()
        y = block(key, x, run)  # x on the CPU: a GPU block's result is back, so its time is complete
        acc[key].append(1000 * (time.perf_counter() - t0))
        return y

    def timed_logits(h):
        t0 = time.perf_counter()
        y = logits(h)
        acc[(m.cfg.num_layers, "head")].append(1000 * (time.perf_counter() - t0))
        return y

    m._block, m.logits = timed_block, timed_logits
    try:
        for pos in range(start, start + steps):
            m.logits(run_layers(m, comm, m.embed([7]), 1, pos, pos))
    finally:
        del m._block, m.logits

    def where(key) -> str:
        if key[1] == "head":
            return "H"
        if key in m.gpu_blocks:
            return "G"
        return "C" if m.split is None or m.split.on_cpu(key) else "S"

    return ", ".join(f"{k[1]}{k[0]} {where(k)} {statistics.median(v):.2f}" for k, v in acc.items())


def profile_inproc(model: Path, cache: Path, args, budget: int) -> None:
    """World size 1 in this process: ms/token of each --profile setting, then one step under
    torch.profiler (CPU and CUDA): where the time goes. Tables go to bench/out/profile_<name>.txt,
    traces to trace_<name>.json."""
    from torch.profiler import ProfilerActivity, profile

    from tpi.comm.base import SingleRank
    from tpi.forward import MemoryOptions, RankModel, run_layers
    from tpi.weights import Manifest, split_cached

    torch.set_num_threads(args.cores)
    shard = split_cached(model, 1, None, args.dtype, cache, progress=False)
    manifest, comm = Manifest.load(shard), SingleRank()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.profile.split(","):
        family = name.split("@")[0]
        ratio = 1.0 if family in ("ondemand", "stream") else float(name.split("@")[1]) if "@" in name else None
        mem = MemoryOptions() if name == "cpu" else MemoryOptions(
            device="cuda", gpu_memory_budget=budget, split_ratio=ratio, gpu_prefetch=name != "ondemand",
            split_mode="blocks" if family in ("blocks", "predicted") else "rows", split_tune=name != "predicted")
        m = RankModel(shard, manifest, 0, 512, memory=mem, threads=args.cores)
        try:
            with torch.inference_mode():
                m.logits(run_layers(m, comm, m.embed(list(range(100, 132))), 1, 0, 0)[-1:])
                plain = _timed(m, comm, 32)
                print(f"  {name}: per block, ms (median of 5 steps): {_block_times(m, comm, 60)}", flush=True)
                if m.split is not None and args.profile_threads:
                    default, pos = m.split.threads, 43
                    for n in (int(t) for t in args.profile_threads.split(",")):
                        m.split.set_threads(n)
                        print(f"  {name}: worker at {n} threads: {_timed(m, comm, pos)}", flush=True)
                        pos += 11
                    m.split.set_threads(default)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    m.logits(run_layers(m, comm, m.embed([7]), 1, 43, 43))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12)
            tag = name.replace("@", "_")
            (OUT / f"profile_{tag}.txt").write_text(table + "\n" + cuda)
            prof.export_chrome_trace(str(OUT / f"trace_{tag}.json"))
            cal = getattr(m, "calibration", None)
            print(f"profile {name}: ratio {m.split.ratio if m.split else 0:.3f}, {len(m.gpu_blocks)} GPU blocks, "
                  f"{plain}"
                  + (f"; calibration {_calibration(cal)}" if cal else ""), flush=True)
            print(table[:3000], flush=True)
        finally:
            m.close()
            del m
            torch.cuda.empty_cache()


def _calibration(cal: dict) -> str:
    """What a rank measured at start, in words: the row split's timed walks, or the block split's
    rates and dispatch."""
    if "ms" in cal:
        return f"ms per walk {cal['ms']}"
    paths = " ".join(f"{k} {1e3 * v:.2f}" for k, v in cal.get("dispatch_s", {}).items())
    return (f"CPU {cal['cpu_Bps'] / 1e9:.1f} GB/s, copy {cal['copy_Bps'] / 1e9:.1f} GB/s (bandwidths alone: "
            f"{cal.get('bandwidth_fraction', cal['fraction']):.2f}), dispatch {1000 * cal.get('host_s', 0):.1f} "
            f"ms/token ({paths}) -> {cal['fraction']:.2f}")


def block_bytes(model: Path, cache: Path, world: int, dtype: str) -> list[int]:
    """Per rank, the bytes of its layer blocks (what the GPU budget is a third of)."""
    from tpi.weights import Manifest, split_cached

    shard = split_cached(model, world, None, dtype, cache, progress=False)
    files = Manifest.load(shard).raw["files"]
    return [sum(f["size"] for k, f in files.items() if k.startswith(f"rank{r}/layer")) for r in range(world)]




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", default="llama7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the table quotes medians)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--sweep", default="0.3,0.4,0.5,0.6", help="block split: GPU shares of the host bytes to time")
    ap.add_argument("--rows-sweep", default="0.8", help="row split: ratios to time")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="torch threads, shared by the ranks")
    ap.add_argument("--settings", default="cpu,ondemand,stream,blocks,rows,sweep", help="which rows to run")
    ap.add_argument("--profile", default="", help="settings to profile in this process first (world 1)")
    ap.add_argument("--profile-threads", default="", help="with --profile: also time the split's worker at these "
                    "torch thread counts (e.g. 15,8,4)")
    ap.add_argument("--calibrate", action="store_true",
                    help="first time the split path in this process (tpi.hetero.calibrate)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="tpi-gpu-bench-"))
    rows, probes = [], {}
    try:
        n = write_llama(tmp / "model", args.shape, dtype, args.layers)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"random Llama ({args.shape}): {n / 1e9:.2f}B parameters, {args.dtype}; GPU: {gpu}; "
              f"{args.cores} cores", flush=True)
        if torch.cuda.is_available() and (args.worlds or args.profile):
            probes = {**probe_bandwidth(dtype, args.cores), **small_transfer_latency(), **cpu_dtypes(args.cores)}
            print("probe: " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()), flush=True)
            if args.calibrate:
                OUT.mkdir(parents=True, exist_ok=True)
                cal = calibrate_inproc(args, dtype)
                (OUT / "gpu_split_calibrate.json").write_text(json.dumps(
                    {k: {**v, "ms": {str(r): m for r, m in v["ms"].items()}} for k, v in cal.items()}, indent=1))
        if args.profile:
            profile_inproc(tmp / "model", tmp / "cache", args, block_bytes(tmp / "model", tmp / "cache", 1,
                                                                           args.dtype)[0] // 3)
        for world in (int(w) for w in args.worlds.split(",") if w):
            budget = min(block_bytes(tmp / "model", tmp / "cache", world, args.dtype)) // 3
            rows += run_world(tmp / "model", tmp / "cache", world, args, budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        report(rows, args, n, gpu, probes)


def report(rows: list[dict], args, params: int, gpu: str, probes: dict) -> None:
    lines = [f"# CPU/GPU split: {params / 1e9:.2f}B random Llama ({args.shape} shape), {args.dtype}, GPU budget = "
             f"1/3 of each rank's blocks, {gpu}, {args.cores} cores shared by the ranks, median of "
             f"{args.repeats} rounds x {args.new_tokens} tokens", "", f"`{shlex.join(['python', *sys.argv])}`", ""]
    if probes:
        lines += ["probe: " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()), ""]
    lines += ["| world | setting | ms/token | split ratio | GPU share of host bytes | GPU / host blocks "
              "| vs best of cpu, ondemand | vs stream | peak RSS per rank (VmHWM, GB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        best = min((r["ms"] for r in mine if r["setting"] in BASELINES), default=float("nan"))
        stream = next((r["ms"] for r in mine if r["setting"] == "stream"), float("nan"))
        for r in mine:
            shares = "/".join(f"{v:.2f}" for v in r["gpu_share"])
            lines.append(f"| {world} | {r['setting']} | {r['ms']:.1f} | {r['ratio']:.2f} | {shares} | "
                         f"{r['gpu_blocks']} / {r['host_blocks']} | {_times(best, r['ms'])} | "
                         f"{_times(stream, r['ms'])} | "
                         + "/".join(f"{v:.2f}" for v in r["peak_rss_gb"]) + " |")
    lines.append("")
    for world in sorted({r["world"] for r in rows}):
        for family in ("blocks", "rows"):
            splits = [r for r in rows if r["world"] == world and r["setting"].split("@")[0] == family]
            predicted = next((r for r in splits if r["setting"] == family), None)
            if splits and predicted:
                fastest = min(splits, key=lambda r: r["ms"])
                lines.append(f"world {world}, {family}: ratio found at start {predicted['ratio']:.2f} "
                             f"({predicted['ms']:.1f} ms/token); fastest measured {fastest['ratio']:.2f} "
                             f"({fastest['ms']:.1f} ms/token)")
        bare = next((r for r in rows if r["world"] == world and r["setting"] == "predicted"), None)
        if bare:
            lines.append(f"world {world}, blocks: share predicted from the rates "
                         + "/".join(f"{v:.2f}" for v in bare["predicted"]) + f" ({bare['ms']:.1f} ms/token)")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_split.md").write_text(text)
    (OUT / "gpu_split.json").write_text(json.dumps(rows, indent=1))
    plot(rows)


def _times(base: float, ms: float) -> str:
    """How many times faster than base; a dash where base was not run."""
    return "–" if math.isnan(base) else f"{base / ms:.2f}x"


def plot(rows: list[dict]) -> None:
    """ms/token against the GPU share of host rows, the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        mine = [r for r in rows if r["world"] == world]
        for family, color in (("blocks", "C0"), ("rows", "C1")):
            sweep = sorted((r["ratio"], r["ms"]) for r in mine if r["setting"].split("@")[0] == family)
            ax.plot([s[0] for s in sweep], [s[1] for s in sweep], "o-", color=color, label=f"{family} split")
            for r in mine:
                if r["setting"] == family:
                    ax.plot([r["ratio"]], [r["ms"]], "*", color=color, markersize=14,
                            label=f"{family}: ratio found at start")
                if family == "blocks" and r["setting"] == "predicted":
                    ax.plot([r["ratio"]], [r["ms"]], "D", color="C3", markersize=8, label="blocks: predicted share")
        for r in mine:
            if r["setting"] in ("cpu", "ondemand", "stream"):
                ax.axhline(r["ms"], linestyle="--", color={"cpu": "gray", "ondemand": "k", "stream": "g"}[r["setting"]],
                           label=r["setting"])
        ax.set(title=f"world size {world}", ylabel="ms/token", ylim=(0, None),
               xlabel="split ratio (blocks: GPU share of host bytes; rows: of each projection's rows)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "gpu_split.png", dpi=110)


if __name__ == "__main__":
    main()
