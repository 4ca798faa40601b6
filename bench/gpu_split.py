"""CPU/GPU split compute on a machine with an NVIDIA GPU: ms/token for a ~1B random Llama whose
GPU budget holds a third of each rank's blocks, at world sizes 1 and 2, for

  cpu       every block on the CPU (no GPU),
  ondemand  GPU-resident blocks on the GPU; each other block copied to the GPU whole when it is
            used (split ratio 1, no prefetch), then computed there,
  stream    the same, but the next block's copy starts while this one computes (ratio 1, prefetch),
  split     the other blocks split by output rows: the CPU computes its share from host memory
            while the GPU's share is copied over on a side stream (the next block's while this one
            computes) and computed there; the ratio measured at start (the prediction),
  split@r   the same at fixed ratios r (the sweep), to compare the predicted ratio with the best.

All configurations of a world size are alive at once and measured in rotating order, a round at a
time; the table quotes medians over rounds. Also probes CPU, copy and concurrent bandwidth, and with
--profile times chosen settings in this process (world size 1) under torch.profiler. Prints a table
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
import os
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

OUT = Path(__file__).resolve().parent / "out"
BASELINES = ("cpu", "ondemand")


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




def settings(budget: int, dtype: str, sweep: list[float], wanted: list[str]) -> list[tuple[str, dict, bool]]:
    """(name, LocalCluster keywords, prefetch) for each configuration asked for."""
    gpu = dict(dtype=dtype, device="cuda", gpu_memory_budget=budget)
    out = [("cpu", dict(dtype=dtype), True), ("ondemand", dict(gpu, split_ratio=1.0), False),
           ("stream", dict(gpu, split_ratio=1.0), True), ("split", gpu, True)]
    out += [(f"split@{r:g}", dict(gpu, split_ratio=r), True) for r in sweep]
    return [s for s in out if s[0] in wanted or ("sweep" in wanted and "@" in s[0])]


def start(model: Path, cache: Path, world: int, threads: int, kw: dict, prefetch: bool):
    from tpi import LocalCluster

    cluster = LocalCluster(model, world_size=world, threads=threads, cache_dir=cache, max_context=512,
                           start_timeout=900, step_timeout=600, **kw)
    # LocalCluster has no keyword for it: the per-rank MemoryOptions it will start the ranks with
    cluster.memory = [dataclasses.replace(m, gpu_prefetch=prefetch) for m in cluster.memory]
    cluster.start()
    return cluster


def run_world(model: Path, cache: Path, world: int, args, budget: int) -> list[dict]:
    """Every configuration started (one after the other: each measures its ratio undisturbed),
    then `repeats` rounds of one generation each, in rotating order."""
    ids = list(range(100, 132))
    chosen = settings(budget, args.dtype, [float(r) for r in args.sweep.split(",") if r], args.settings.split(","))
    threads = max(1, args.cores // world)
    with ExitStack() as stack:
        live = []
        for name, kw, prefetch in chosen:
            t0 = time.perf_counter()
            cluster = stack.enter_context(start(model, cache, world, threads, kw, prefetch))
            cluster.generate_full(ids, max_new_tokens=4)  # warm-up
            live.append((name, cluster))
            print(f"  world {world}: started {name} in {time.perf_counter() - t0:.0f}s", flush=True)
        ms: dict[str, list[float]] = {name: [] for name, _ in live}
        for r in range(args.repeats):
            for name, cluster in live[r % len(live):] + live[:r % len(live)]:
                res = cluster.generate_full(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
                ms[name].append(1000 * res["decode_s"] / (len(res["ids"]) - 1))
        rows = []
        for name, cluster in live:
            stats = cluster.stats()
            rows.append({"world": world, "setting": name, "ms": statistics.median(ms[name]), "all_ms": ms[name],
                         "ratio": stats[0]["split_ratio"], "gpu_blocks": sum(r["gpu_blocks"] for r in stats),
                         "host_blocks": sum(r["pinned_blocks"] + r["streamed_blocks"] for r in stats)})
            print(f"  world {world} {name:>10}: {rows[-1]['ms']:7.1f} ms/token "
                  f"({', '.join(f'{v:.1f}' for v in ms[name])}; ratio {rows[-1]['ratio']:.2f}, "
                  f"{rows[-1]['gpu_blocks']} GPU / {rows[-1]['host_blocks']} host blocks)", flush=True)
    return rows


def probe_bandwidth(dtype: torch.dtype, threads: int, nbytes: int = 512 << 20, repeats: int = 5) -> dict:
    """GB/s of a one-row CPU matmul over a weight, of a pinned host-to-device copy, and of both at
    once (each on its own weight): whether the two paths add up or share the host's memory."""
    import threading

    torch.set_num_threads(threads)
    cols = 4096
    rows = nbytes // (cols * dtype.itemsize)
    w_cpu, w_pin = torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype).pin_memory()
    x, dev = torch.randn(1, cols).to(dtype), torch.empty(rows, cols, dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()

    def cpu() -> float:
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w_cpu)
        return repeats * w_cpu.nbytes / (time.perf_counter() - t0) / 1e9

    def copy() -> float:
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(repeats):
                dev.copy_(w_pin, non_blocking=True)
        stream.synchronize()
        return repeats * w_pin.nbytes / (time.perf_counter() - t0) / 1e9

    cpu(), copy()  # warm-up
    alone = {"cpu_GBps": cpu(), "copy_GBps": copy()}
    both: dict = {}
    t = threading.Thread(target=lambda: both.update(copy_together=copy()))
    t.start()
    both["cpu_together"] = cpu()
    t.join()
    return {**alone, "cpu_GBps_while_copying": both["cpu_together"], "copy_GBps_while_cpu": both["copy_together"]}




def small_copy_latency(nbytes: int = 512 << 20, repeats: int = 50) -> dict:
    """Microseconds for an 8 KB pinned host-to-device copy on one stream, alone and while another
    stream copies a large buffer: whether small copies wait behind the weights' copies."""
    big_src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    big_dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    small_src, small_dst = torch.ones(8192, dtype=torch.uint8).pin_memory(), torch.empty(8192, dtype=torch.uint8,
                                                                                         device="cuda")
    side = torch.cuda.Stream()

    def small() -> float:
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            small_dst.copy_(small_src, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            t.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(t)

    small()
    alone = small()
    with torch.cuda.stream(side):
        for _ in range(4):
            big_dst.copy_(big_src, non_blocking=True)
    busy = small()
    side.synchronize()
    return {"small_copy_us": alone, "small_copy_us_during_big_copy": busy}


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
        ratio = None if name == "split" else 1.0 if name in ("ondemand", "stream") else float(name.split("@")[1])
        mem = MemoryOptions(device="cuda", gpu_memory_budget=budget, split_ratio=ratio,
                            gpu_prefetch=name != "ondemand")
        m = RankModel(shard, manifest, 0, 512, memory=mem, threads=args.cores)
        try:
            with torch.inference_mode():
                m.logits(run_layers(m, comm, m.embed(list(range(100, 132))), 1, 0, 0)[-1:])
                times = []
                for step in range(1, 12):
                    t0 = time.perf_counter()
                    m.logits(run_layers(m, comm, m.embed([7]), 1, step, 31 + step))
                    times.append(1000 * (time.perf_counter() - t0))
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    m.logits(run_layers(m, comm, m.embed([7]), 1, 12, 43))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            cuda = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12)
            tag = name.replace("@", "_")
            (OUT / f"profile_{tag}.txt").write_text(table + "\n" + cuda)
            prof.export_chrome_trace(str(OUT / f"trace_{tag}.json"))
            print(f"profile {name}: ratio {m.split.ratio if m.split else 0:.2f}, {len(m.gpu_blocks)} GPU blocks, "
                  f"ms/token median {statistics.median(times):.1f} (min {min(times):.1f})", flush=True)
            print(table[:6000], flush=True)
        finally:
            m.close()
            del m
            torch.cuda.empty_cache()


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
    ap.add_argument("--sweep", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="torch threads, shared by the ranks")
    ap.add_argument("--settings", default="cpu,ondemand,stream,split,sweep", help="which rows to run")
    ap.add_argument("--profile", default="", help="settings to profile in this process first (world 1)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="tpi-gpu-bench-"))
    rows, probes = [], {}
    try:
        n = write_llama(tmp / "model", args.shape, dtype, args.layers)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"random Llama ({args.shape}): {n / 1e9:.2f}B parameters, {args.dtype}; GPU: {gpu}; "
              f"{args.cores} cores", flush=True)
        if torch.cuda.is_available():
            probes = {**probe_bandwidth(dtype, args.cores), **small_copy_latency()}
            print("probe: " + ", ".join(f"{k} {v:.1f}" for k, v in probes.items()), flush=True)
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
    lines += ["| world | setting | ms/token | GPU share of host rows | GPU / host blocks | vs best of cpu, ondemand "
              "| vs stream |", "|---|---|---|---|---|---|---|"]
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        best = min((r["ms"] for r in mine if r["setting"] in BASELINES), default=float("nan"))
        stream = next((r["ms"] for r in mine if r["setting"] == "stream"), float("nan"))
        for r in mine:
            lines.append(f"| {world} | {r['setting']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['gpu_blocks']} / "
                         f"{r['host_blocks']} | {best / r['ms']:.2f}x | {stream / r['ms']:.2f}x |")
    lines.append("")
    for world in sorted({r["world"] for r in rows}):
        splits = [r for r in rows if r["world"] == world and r["setting"].startswith("split")]
        predicted = next((r for r in splits if r["setting"] == "split"), None)
        if splits and predicted:
            fastest = min(splits, key=lambda r: r["ms"])
            lines.append(f"world {world}: predicted ratio {predicted['ratio']:.2f} ({predicted['ms']:.1f} ms/token); "
                         f"fastest measured ratio {fastest['ratio']:.2f} ({fastest['ms']:.1f} ms/token)")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_split.md").write_text(text)
    (OUT / "gpu_split.json").write_text(json.dumps(rows, indent=1))
    plot(rows)


def plot(rows: list[dict]) -> None:
    """ms/token against the GPU share of host rows, the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        mine = [r for r in rows if r["world"] == world]
        sweep = sorted((r["ratio"], r["ms"]) for r in mine if r["setting"].startswith("split"))
        ax.plot([s[0] for s in sweep], [s[1] for s in sweep], "o-", label="split")
        for r in mine:
            if r["setting"] == "split":
                ax.plot([r["ratio"]], [r["ms"]], "r*", markersize=14, label="predicted ratio")
            elif not r["setting"].startswith("split"):
                ax.axhline(r["ms"], linestyle="--", color={"cpu": "gray", "ondemand": "k", "stream": "g"}[r["setting"]],
                           label=r["setting"])
        ax.set(title=f"world size {world}", xlabel="GPU share of host blocks' rows", ylabel="ms/token", ylim=(0, None))
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "gpu_split.png", dpi=110)


if __name__ == "__main__":
    main()
