"""Peak memory of `tpi.weights.split` on a checkpoint several times larger than the limit.

Writes a random-weight, Llama-shaped float32 checkpoint of about 3 GB under a temporary folder
(tensor by tensor, in shards of about 1 GB with a ``model.safetensors.index.json``, so this script
never holds the whole model either), splits it for 3 ranks in a child process, once to float32 and
once to bfloat16, and prints the child's peak resident memory (VmHWM, read by the child itself at
the end), the time and the throughput. Exits 1 if a split peaks at 1 GB or more. Knows nothing of
the cluster; measures only the split.

    python bench/split_memory.py [--layers 14] [--world-size 3] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LIMIT_BYTES = 10**9
SHARD_BYTES = 10**9
NEEDED_DISK = 7 * 10**9
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}
# run in the child: split, then report its own peak RSS and the times as one JSON line
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from tpi.weights import split
t1 = time.perf_counter()
if sys.argv[3] != "none":
    split(sys.argv[1], sys.argv[2], int(sys.argv[4]), dtype=sys.argv[3], progress=False)
t2 = time.perf_counter()
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_bytes": hwm * 1024, "import_s": t1 - t0, "split_s": t2 - t1}))
"""

Spec = tuple[str, tuple[int, ...]]


def tensor_specs(cfg: dict) -> list[Spec]:
    """Names and shapes of a Llama checkpoint's tensors, in the order HF writes them."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    specs: list[Spec] = [("model.embed_tokens.weight", (v, d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                  (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                  (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                  (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                  (p + "mlp.down_proj.weight", (d, f))]
    return specs + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 4  # float32


def group_shards(specs: list[Spec], limit: int) -> list[list[Spec]]:
    """Consecutive tensors in groups of at most `limit` bytes (a larger tensor alone)."""
    shards: list[list[Spec]] = [[]]
    for spec in specs:
        if shards[-1] and sum(nbytes(s) for _, s in shards[-1]) + nbytes(spec[1]) > limit:
            shards.append([])
        shards[-1].append(spec)
    return shards


def write_checkpoint(path: Path, cfg: dict, seed: int = 0) -> int:
    """Random float32 weights as sharded safetensors plus index and config; returns the bytes written."""
    gen = torch.Generator().manual_seed(seed)
    shards = group_shards(tensor_specs(cfg), SHARD_BYTES)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random(shape, n, gen) for n, shape in shard}  # [rows, cols], about 1 GB
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: name for n, _ in shard})
        total += (path / name).stat().st_size
    index = {"metadata": {"total_size": sum(nbytes(s) for _, s in tensor_specs(cfg))}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return total


def _random(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen)


@dataclass(frozen=True)
class Run:
    label: str
    peak_bytes: int
    import_s: float
    split_s: float
    out_bytes: int


def run_child(src: Path, out: Path, dtype: str, world_size: int) -> Run:
    """Split in a fresh interpreter (dtype "none": only import, for the baseline)."""
    cmd = [sys.executable, "-c", CHILD, str(src), str(out), dtype, str(world_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"split child failed ({done.returncode}):\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in out.rglob("*.safetensors")) if out.exists() else 0
    label = "import only" if dtype == "none" else f"split x{world_size} -> {dtype}"
    return Run(label, r["peak_bytes"], r["import_s"], r["split_s"], size)


def print_table(src_bytes: int, runs: list[Run]) -> None:
    gb, mb = 1e9, 1e6
    print(f"{'run':<26}{'output':>10}{'split time':>12}{'read rate':>12}{'peak RSS':>11}")
    for r in runs:
        rate = f"{src_bytes / r.split_s / mb:.0f} MB/s" if r.out_bytes else "-"
        out = f"{r.out_bytes / gb:.2f} GB" if r.out_bytes else "-"
        print(f"{r.label:<26}{out:>10}{r.split_s:>10.1f} s{rate:>12}{r.peak_bytes / mb:>8.0f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=14, help="14 layers: about 3.05 GB in float32")
    ap.add_argument("--world-size", type=int, default=3)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    free = shutil.disk_usage(args.tmp).free
    if free < NEEDED_DISK:
        sys.exit(f"{args.tmp}: {free / 1e9:.1f} GB free, need {NEEDED_DISK / 1e9:.0f} GB")
    work = Path(tempfile.mkdtemp(prefix="tpi-split-bench-", dir=args.tmp))
    try:
        src = work / "model"
        src.mkdir()
        t0 = time.perf_counter()
        src_bytes = write_checkpoint(src, {**CONFIG, "num_hidden_layers": args.layers})
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {args.layers} layers, {src_bytes / 1e9:.2f} GB float32 in {shards} shards, "
              f"written in {time.perf_counter() - t0:.1f} s (read back from a warm page cache)")
        runs = [run_child(src, work / "none", "none", args.world_size)]
        for dtype in ("float32", "bfloat16"):
            out = work / f"split-{dtype}"
            runs.append(run_child(src, out, dtype, args.world_size))
            shutil.rmtree(out)  # keep the disk footprint at source + one split
        print_table(src_bytes, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(r.peak_bytes for r in runs)
    print(f"worst peak RSS {worst / 1e6:.0f} MB; limit {LIMIT_BYTES / 1e6:.0f} MB: "
          f"{'ok' if worst < LIMIT_BYTES else 'EXCEEDED'}")
    return 0 if worst < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
