"""Peak memory of `tpi.split.split` on a checkpoint several times larger than the limit.

Writes a random-weight, Llama-shaped float32 checkpoint of about 3 GB under a temporary folder
(common.write_llama: tensor by tensor, in shards of about 1 GB with a
``model.safetensors.index.json``, so this script never holds the whole model either), splits it
for 3 ranks in a child process, once to float32 and once to bfloat16, and prints the child's peak
resident memory (VmHWM, read by the child itself at the end), the time and the throughput, as a
table also written to bench/out/split_memory.md. Exits 1 if a split peaks at 1 GB or more. Knows
nothing of the cluster; measures only the split.

    python bench/split_memory.py [--layers 14] [--world-size 3] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import OUT_DIR, SHAPES, table, write_llama, write_report

LIMIT_BYTES = 10**9
SHARD_BYTES = 10**9
NEEDED_DISK = 7 * 10**9
SHAPE = SHAPES["llama850m"]  # hidden 2048, FFN 5632, 16 heads, 4 KV heads: 14 layers are about 3.05 GB in float32
# run in the child: split, then report its own peak RSS and the times as one JSON line
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from tpi.split import split
t1 = time.perf_counter()
if sys.argv[3] != "none":
    split(sys.argv[1], sys.argv[2], int(sys.argv[4]), dtype=sys.argv[3], progress=False)
t2 = time.perf_counter()
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_bytes": hwm * 1024, "import_s": t1 - t0, "split_s": t2 - t1}))
"""


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


def split_table(src_bytes: int, runs: list[Run]) -> str:
    cells = [[r.label, f"{r.out_bytes / 1e9:.2f} GB" if r.out_bytes else "-", f"{r.split_s:.1f} s",
              f"{src_bytes / r.split_s / 1e6:.0f} MB/s" if r.out_bytes else "-", f"{r.peak_bytes / 1e6:.0f} MB"]
             for r in runs]
    return table(["run", "output", "split time", "read rate", "peak RSS"], cells, "lrrrr")


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
        t0 = time.perf_counter()
        write_llama(src, SHAPE.with_layers(args.layers), torch.float32, shard_bytes=SHARD_BYTES)
        src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {args.layers} layers, {src_bytes / 1e9:.2f} GB float32 in {shards} shards, "
              f"written in {time.perf_counter() - t0:.1f} s (read back from a warm page cache)")
        runs = [run_child(src, work / "none", "none", args.world_size)]
        for dtype in ("float32", "bfloat16"):
            out = work / f"split-{dtype}"
            runs.append(run_child(src, out, dtype, args.world_size))
            shutil.rmtree(out)  # keep the disk footprint at source + one split
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst = max(r.peak_bytes for r in runs)
    text = (f"# Peak RSS of `tpi split`: {args.layers} layers, {src_bytes / 1e9:.2f} GB float32 in {shards} shards, "
            f"{args.world_size} ranks\n\n{split_table(src_bytes, runs)}\n\nworst peak RSS {worst / 1e6:.0f} MB; "
            f"limit {LIMIT_BYTES / 1e6:.0f} MB: {'ok' if worst < LIMIT_BYTES else 'EXCEEDED'}")
    print(text)
    write_report(OUT_DIR, "split_memory.md", text)
    return 0 if worst < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
