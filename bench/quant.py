"""Quantized weights against float32: bytes on disk and fetched per rank, and decode speed with every
block streamed from the disk, side by side in one run.

Writes the seeded random ~850M Llama of streaming.py (common.write_llama: hidden 2048, 16 layers,
16 heads, 4 KV heads, FFN 5632, vocab 32000), splits it for 3 ranks in each format (``--formats``,
default float32, int8, int4, int4-head; group 32, the LM head and embedding kept float32 but in
int4-head, fast compute) and measures, with 1 torch thread per rank:

  disk:      the split's bytes per rank (rank 0 holds the LM head and the embedding table);
  fetch:     a LocalCluster whose workers fetch their shards from the master into an empty folder
             (``worker_cache_dir``): each worker's ``fetched_bytes``, and the seconds to start;
  streamed:  a LocalCluster per format with every block streamed (stream_all, window 2,
             drop_page_cache): decode ms/token and the bytes read per token from the disk, every
             format measured once per round in a new random order (common.rounds), medians;
  resident:  the same with every block in memory (its compute alone; nothing read per token).

The target (issue 20): int4 streamed at most 0.25x float32's ms/token (it reads ~5x fewer bytes).
The disk's bandwidth is measured as in streaming.py (world-size readers at once, page cache
dropped) to give each format's disk floor. Writes the tables to stdout and bench/out/quant.md, a
plot to bench/out/quant.png. Does not know: tpi's internals beyond LocalCluster, split_cached and
the stats records.

    python bench/quant.py                    # ~15-25 min on 2 cores
    python bench/quant.py --layers 4 --repeats 2 --new-tokens 6     # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    GB,
    MB,
    OUT_DIR,
    checkpoint_bytes,
    command_line,
    drop_page_cache,
    exit_on_sigterm,
    git_revision,
    rounds,
    save_plot,
    table,
    write_llama,
    write_report,
)
from streaming import LLAMA_850M, Sample, best_bandwidth, timed_generation

TARGET = 0.25  # int4 streamed ms/token over float32's


@dataclass
class Format:
    name: str  # float32, int8, int4; "-head": the LM head and embedding quantized too (int4-head)
    shard_dir: Path | None = None
    disk_bytes: list[int] = field(default_factory=list)  # per rank
    fetched: list[int] = field(default_factory=list)  # per worker rank
    fetch_start_s: float = 0.0
    weight_format: str = ""
    streamed: list[Sample] = field(default_factory=list)
    resident: list[Sample] = field(default_factory=list)

    @property
    def quant(self) -> str | None:
        return None if self.name == "float32" else self.name.removesuffix("-head")

    @property
    def head(self) -> bool:
        return self.name.endswith("-head")


def median_ms(samples: list[Sample]) -> float:
    return statistics.median(s.ms_per_token for s in samples)


def bytes_per_token(samples: list[Sample]) -> float:
    """Bytes read by all ranks per step, median over samples (every step reads every block)."""
    return statistics.median(sum(r["bytes_read"] / r["steps"] for r in s.ranks) for s in samples)


# -- the runs ----------------------------------------------------------------------------------
def split_all(model_dir: Path, formats: list[Format], args: argparse.Namespace) -> None:
    from tpi.split import Quant, split_cached

    for f in formats:
        t0 = time.perf_counter()
        f.shard_dir = split_cached(model_dir, args.world_size, cache_dir=args.cache_dir, progress=False,
                                   quant=Quant(f.quant, head=f.head))
        f.disk_bytes = [sum(p.stat().st_size for p in (f.shard_dir / f"rank{r}").glob("*.safetensors"))
                        for r in range(args.world_size)]
        print(f"{f.name}: split in {time.perf_counter() - t0:.0f} s, {sum(f.disk_bytes) / GB:.2f} GB", flush=True)
    os.sync()


def fetch_all(model_dir: Path, formats: list[Format], work: Path, args: argparse.Namespace) -> None:
    """Workers that fetch their shards from the master into empty folders: bytes and start time."""
    from tpi import LocalCluster

    for f in formats:
        t0 = time.perf_counter()
        with LocalCluster(model_dir, args.world_size, quant=f.quant, quant_head=f.head, threads=1,
                          cache_dir=args.cache_dir, worker_cache_dir=work / f"fetched-{f.name}",
                          max_context=args.max_context) as cluster:
            f.fetch_start_s = time.perf_counter() - t0
            stats = cluster.stats()
        f.fetched = [r.fetched_bytes for r in stats[1:]]
        f.weight_format = stats[0].weight_format or "float32"
        shutil.rmtree(work / f"fetched-{f.name}", ignore_errors=True)
        print(f"{f.name}: workers fetched {sum(f.fetched) / GB:.2f} GB, cluster up in {f.fetch_start_s:.0f} s",
              flush=True)


def measure(model_dir: Path, formats: list[Format], ids: list[int], args: argparse.Namespace) -> None:
    from tpi import LocalCluster

    kw = {"world_size": args.world_size, "threads": 1, "max_context": args.max_context, "cache_dir": args.cache_dir,
          "start_timeout": 600, "step_timeout": 600}
    with ExitStack() as stack:
        runs = {}
        for f in formats:
            streamed = stack.enter_context(LocalCluster(model_dir, quant=f.quant, quant_head=f.head, stream_all=True,
                                                        window=2, drop_page_cache=True, **kw))
            resident = stack.enter_context(LocalCluster(model_dir, quant=f.quant, quant_head=f.head, **kw))
            runs[f"{f.name} streamed"] = lambda c=streamed: timed_generation(c, ids, args.new_tokens, args.tmp)
            runs[f"{f.name} resident"] = lambda c=resident: timed_generation(c, ids, args.new_tokens, args.tmp)
        drop_page_cache([p for f in formats for p in f.shard_dir.rglob("*.safetensors")])
        print("clusters up; measuring", flush=True)
        samples = rounds(runs, args.repeats, report=lambda k, name, x: print(
            f"  round {k + 1} {name}: {x.ms_per_token:.0f} ms/token", flush=True))
    for f in formats:
        f.streamed, f.resident = samples[f"{f.name} streamed"], samples[f"{f.name} resident"]


# -- report ------------------------------------------------------------------------------------
def disk_table(formats: list[Format]) -> str:
    base = formats[0]
    rows = []
    for f in formats:
        rows.append([f.name, f.weight_format, " / ".join(f"{b / MB:,.0f}" for b in f.disk_bytes),
                     f"{sum(f.disk_bytes) / MB:,.0f}", f"{sum(f.disk_bytes) / sum(base.disk_bytes):.3f}x",
                     " / ".join(f"{b / MB:,.0f}" for b in f.fetched),
                     f"{sum(f.fetched) / max(sum(base.fetched), 1):.3f}x", f"{f.fetch_start_s:.0f}"])
    cols = ["format", "weights (compute)", "on disk MB per rank (0 / 1 / 2)", "on disk MB, all", f"vs {base.name}",
            "fetched by workers MB (1 / 2)", f"fetched vs {base.name}", "start with fetch s"]
    return table(cols, rows)


def speed_table(formats: list[Format], bandwidth: float) -> str:
    base = formats[0]
    rows = []
    for f in formats:
        ms, read = median_ms(f.streamed), bytes_per_token(f.streamed)
        lo, hi = min(s.ms_per_token for s in f.streamed), max(s.ms_per_token for s in f.streamed)
        rows.append([f.name, f"{ms:.0f} ({lo:.0f}-{hi:.0f})", f"{ms / median_ms(base.streamed):.3f}x",
                     f"{read / MB:,.0f}", f"{read / bytes_per_token(base.streamed):.3f}x",
                     f"{1000 * read / bandwidth:.0f}", f"{median_ms(f.resident):.0f}",
                     f"{median_ms(f.resident) / median_ms(base.resident):.2f}x"])
    cols = ["format", "streamed ms/token median (min-max)", f"vs {base.name}", "MB read / token (all ranks)",
            f"vs {base.name}", "disk floor ms", "resident ms/token", f"vs {base.name}"]
    return table(cols, rows)


def verdict(formats: list[Format]) -> str:
    by = {f.name: f for f in formats}
    if "int4" not in by or "float32" not in by:
        return "int4 or float32 not run: no verdict."
    ratio = median_ms(by["int4"].streamed) / median_ms(by["float32"].streamed)
    return (f"int4 streamed: {ratio:.3f}x float32's ms/token (target <= {TARGET}): "
            f"{'met' if ratio <= TARGET else '**not met**'}")


def report(formats: list[Format], args: argparse.Namespace, bandwidth: float, model_bytes: int) -> str:
    bullets = [
        (f"{os.cpu_count()} logical CPUs, torch {torch.__version__}; random Llama, {args.layers} layers, "
         f"{model_bytes / 4 / 1e6:,.0f}M parameters ({model_bytes / GB:.2f} GB float32); world size "
         f"{args.world_size}, 1 torch thread per rank, every rank its own process on this machine"),
        ("formats: float32; int8 and int4 with groups of 32 input columns (float16 scales, int4 minima), the "
         "LM head and embedding float32 (int4-head: int4 too); quantized compute fast (bfloat16 through "
         "torch's int4 kernel; int8 dequantized per projection)"),
        (f"streamed: stream_all, window 2, page cache dropped after each read; prompt {args.prompt_tokens} tokens, "
         f"{args.new_tokens} new tokens, ms/token = decode time / {args.new_tokens - 1}; medians of "
         f"{args.repeats} rounds after a warm-up each, every cluster once per round in a new random order"),
        (f"disk: {args.world_size} sequential readers at once, page cache dropped: {bandwidth / MB:,.0f} MB/s in "
         "all; disk floor = MB read per token / that"),
        f"tpi at {git_revision()}; command: `{command_line('quant.py')}`",
    ]
    return "\n".join(["# Quantized weights: disk, fetch and streaming speed", "", *(f"- {b}" for b in bullets),
                      "", "## Bytes on disk and fetched by workers", "", disk_table(formats), "",
                      "## Decode speed", "", speed_table(formats, bandwidth), "", f"- {verdict(formats)}"]) + "\n"


def plot(formats: list[Format], path: Path) -> None:
    def draw(axes: list) -> None:
        names = [f.name for f in formats]
        axes[0].bar(names, [sum(f.disk_bytes) / GB for f in formats], color="tab:blue")
        axes[0].set(ylabel="GB on disk (all ranks)", title="split size")
        axes[1].bar(names, [median_ms(f.streamed) for f in formats], color="tab:orange", label="streamed")
        axes[1].bar(names, [median_ms(f.resident) for f in formats], color="tab:green", label="resident", width=0.4)
        axes[1].set(ylabel="ms/token (median)", title="decode, world size 3")
        axes[1].legend()

    save_plot(path, draw, panels=2)


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", type=lambda s: s.split(","), default=["float32", "int8", "int4", "int4-head"],
                   help="comma-separated from float32, int8, int4, int4-head (default all)")
    p.add_argument("--world-size", type=int, default=3)
    p.add_argument("--layers", type=int, default=LLAMA_850M.layers)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--bw-bytes", type=int, default=2 * GB, help="bytes read to measure the disk (default 2e9)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint goes")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    shape = LLAMA_850M.with_layers(args.layers)
    work = Path(tempfile.mkdtemp(prefix="tpi-quant-bench-", dir=args.tmp))
    args.cache_dir = work / "splits"
    formats = [Format(name) for name in args.formats]
    try:
        write_llama(work / "model", shape, torch.float32)
        split_all(work / "model", formats, args)
        base = formats[0].shard_dir
        ranks = [sorted((base / f"rank{r}").glob("*.safetensors")) for r in range(args.world_size)]
        bandwidth = best_bandwidth(ranks, args.bw_bytes, 2)
        print(f"disk: {args.world_size} readers {bandwidth / MB:,.0f} MB/s", flush=True)
        fetch_all(work / "model", formats, work, args)
        ids = torch.randint(shape.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        measure(work / "model", formats, ids, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", flush=True)
    text = report(formats, args, bandwidth, checkpoint_bytes(shape, torch.float32))
    print(text)
    write_report(args.out, "quant.md", text)
    plot(formats, args.out / "quant.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
