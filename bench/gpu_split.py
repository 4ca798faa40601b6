"""CPU/GPU split compute on a machine with an NVIDIA GPU: ms/token for a ~1B random Llama whose
GPU budget holds a third of each rank's blocks, at world sizes 1 and 2, for

  cpu       every block on the CPU (no GPU),
  ondemand  GPU-resident blocks on the GPU, the others copied to the GPU whole at each use,
  split     the others split by output rows: the CPU computes its share from host memory while the
            GPU's share is copied over on a side stream and computed (ratio measured at start),

plus a sweep of fixed ratios, to compare the ratio predicted from measured CPU and copy bandwidth
with the one that is fastest. Prints a table and writes bench/out/gpu_split.md.

Run on the GPU machine:  python bench/gpu_split.py [--dtype bfloat16] [--layers 22]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "out"


def write_llama(path: Path, layers: int, dtype: torch.dtype, seed: int = 0) -> int:
    """A TinyLlama-1.1B-shaped random checkpoint, one shard file per layer; returns its parameter count."""
    h, inter, heads, kv, vocab, hd = 2048, 5632, 32, 4, 32000, 64
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


def measure(model: Path, cache: Path, world: int, threads: int, repeats: int, new: int, **kw) -> dict:
    from tpi import LocalCluster

    ids = list(range(100, 132))
    with LocalCluster(model, world_size=world, dtype=kw.pop("dtype"), threads=threads, cache_dir=cache,
                      max_context=512, start_timeout=900, step_timeout=600, **kw) as cluster:
        cluster.generate_full(ids, max_new_tokens=4)  # warm-up
        runs = [cluster.generate_full(ids, max_new_tokens=new, ignore_eos=True) for _ in range(repeats)]
        stats = cluster.stats()
    ms = [1000 * r["decode_s"] / (len(r["ids"]) - 1) for r in runs]
    return {"ms": statistics.median(ms), "all_ms": ms, "ratio": stats[0]["split_ratio"],
            "gpu_blocks": sum(r["gpu_blocks"] for r in stats),
            "host_blocks": sum(r["pinned_blocks"] + r["streamed_blocks"] for r in stats)}


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


def block_bytes(model: Path, cache: Path, world: int, dtype: str) -> list[int]:
    """Per rank, the bytes of its layer blocks (what the GPU budget is a third of)."""
    from tpi.weights import Manifest, split_cached

    shard = split_cached(model, world, None, dtype, cache, progress=False)
    files = Manifest.load(shard).raw["files"]
    return [sum(f["size"] for k, f in files.items() if k.startswith(f"rank{r}/layer")) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--sweep", default="0.25,0.5,0.75")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--settings", default="cpu,ondemand,split,sweep", help="which rows to run")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tmp = Path(tempfile.mkdtemp(prefix="tpi-gpu-bench-"))
    rows = []
    try:
        n = write_llama(tmp / "model", args.layers, dtype)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"random Llama: {n / 1e9:.2f}B parameters, {args.dtype}; GPU: {gpu}; {args.cores} cores")
        if torch.cuda.is_available():
            probe = probe_bandwidth(dtype, args.cores)
            print("bandwidth (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in probe.items()), flush=True)
        for world in (int(w) for w in args.worlds.split(",")):
            threads = max(1, args.cores // world)
            budget = [b // 3 for b in block_bytes(tmp / "model", tmp / "cache", world, args.dtype)]
            common = dict(dtype=args.dtype, gpu_memory_budget=budget[0])
            settings = [("cpu", dict(dtype=args.dtype)), ("ondemand", dict(common, device="cuda", split_ratio=1.0)),
                        ("split", dict(common, device="cuda"))]
            settings += [(f"split@{r}", dict(common, device="cuda", split_ratio=float(r)))
                         for r in args.sweep.split(",")]
            wanted = args.settings.split(",")
            settings = [(n, kw) for n, kw in settings if n in wanted or ("sweep" in wanted and "@" in n)]
            for name, kw in settings:
                t0 = time.perf_counter()
                res = measure(tmp / "model", tmp / "cache", world, threads, args.repeats, args.new_tokens, **kw)
                rows.append({"world": world, "setting": name, **res})
                print(f"  world {world} {name:>10}: {res['ms']:7.1f} ms/token (ratio {res['ratio']:.2f}, "
                      f"{res['gpu_blocks']} GPU / {res['host_blocks']} host blocks; {time.perf_counter() - t0:.0f}s)",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args, n)


def report(rows: list[dict], args, params: int) -> None:
    lines = [f"# CPU/GPU split: {params / 1e9:.2f}B random Llama, {args.dtype}, GPU budget = 1/3 of each rank's "
             f"blocks, {args.cores} cores shared by the ranks, median of {args.repeats} x {args.new_tokens} tokens",
             "", "| world | setting | ms/token | GPU share of host blocks' rows | speed-up vs best of cpu/ondemand |",
             "|---|---|---|---|---|"]
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        best_other = min((r["ms"] for r in mine if r["setting"] in ("cpu", "ondemand")), default=float("nan"))
        for r in mine:
            speedup = best_other / r["ms"]
            lines.append(f"| {world} | {r['setting']} | {r['ms']:.1f} | {r['ratio']:.2f} | {speedup:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gpu_split.md").write_text(text)


if __name__ == "__main__":
    main()
