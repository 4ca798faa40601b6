"""Speed when streaming: decode ms/token of a LocalCluster whose weights stream from the disk,
against the floor the disk and the compute set.

Writes a seeded random ~850M-parameter Llama (hidden 2048, 16 layers, 16 heads, 4 KV heads, FFN
5632, vocab 32000) with common.write_llama, splits it for 3 ranks (``--dtype``, float32 by default) and
measures, with 1 torch thread per rank, three settings alive at once:

  (a) resident: no budget, every block pinned; page cache irrelevant (nothing is read after start);
  (b) half pinned: a per-rank budget of fixed + 2 × largest block + half the block bytes (from (a)'s
      stats), with drop_page_cache=True, so the streamed half is read from the disk each step;
  (c) streamed: stream_all=True, window 2, nothing pinned, drop_page_cache=True.

Each round runs every setting once, in a new random order (common.rounds), after one warm-up each;
the table quotes medians. Beside each setting: the floor max(disk floor, compute), where disk floor = bytes read per
step by all ranks (stats deltas around each timed generation) / the aggregate read bandwidth of
world-size concurrent sequential readers of the split files, page cache dropped (measured in the same
run; one reader too, for reference), and compute = (a)'s ms/token. All ranks share one disk and
two cores, so the disk floor uses the bytes of every rank. Also stall and allreduce per step per rank.

Writes the table to stdout and bench/out/streaming.md. Does not know: tpi's internals beyond
``LocalCluster``, ``split_cached`` and the stats records.

    python bench/streaming.py                       # float32, 16 new tokens, 3 rounds: ~10-15 min
    python bench/streaming.py --dtype bfloat16      # half the bytes to read
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    GB,
    MB,
    OUT_DIR,
    SHAPES,
    checkpoint_bytes,
    command_line,
    drop_page_cache,
    exit_on_sigterm,
    git_revision,
    rounds,
    table,
    write_llama,
    write_report,
)

from tpi.stats import RankStats

CHUNK = 64 << 20
TARGET_RATIO = 1.3
LLAMA_850M = SHAPES["llama850m"]  # 16 layers: ~850M parameters; no EOS id: every run makes all its tokens


# -- the disk ----------------------------------------------------------------------------------
def read_sequential(paths: list[Path], limit: int) -> int:
    """pread `paths` in order, 64 MB at a time, into one reused buffer, up to `limit` bytes."""
    buf = bytearray(CHUNK)
    done = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            off = 0
            while done < limit:
                n = os.preadv(fd, [memoryview(buf)[:min(CHUNK, limit - done)]], off)
                if n == 0:
                    break
                off, done = off + n, done + n
        finally:
            os.close(fd)
        if done >= limit:
            break
    return done


def device_read_bytes(path: Path) -> int | None:
    """Bytes read so far from the block device holding `path` (/proc/diskstats), None if unknown."""
    dev = os.stat(path).st_dev
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(dev), os.minor(dev)):
                return int(fields[5]) * 512  # sectors read
    return None


def best_bandwidth(groups: list[list[Path]], limit: int, trials: int) -> float:
    """The best of `trials` measurements: the floor is what the disk can do, not its bad moments."""
    return max(read_bandwidth(groups, limit) for _ in range(trials))


def read_bandwidth(groups: list[list[Path]], limit: int) -> float:
    """Bytes/s of one sequential reader per group, all at once, `limit` bytes in all, cache dropped."""
    drop_page_cache([p for g in groups for p in g])
    counts = [0] * len(groups)

    def reader(k: int) -> None:
        counts[k] = read_sequential(groups[k], limit // len(groups))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(len(groups))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    drop_page_cache([p for g in groups for p in g])
    return sum(counts) / seconds


# -- settings and samples ----------------------------------------------------------------------
@dataclass
class Sample:
    """One timed generation: decode ms/token and every rank's stats deltas over it."""

    ms_per_token: float
    ranks: list[dict]  # per rank: bytes_read, steps, stall_s, allreduce_s, compute_s deltas
    device_bytes: int | None  # read from the block device meanwhile (any process's reads)


@dataclass
class Setting:
    name: str
    page_cache: str
    cluster: object
    samples: list[Sample] = field(default_factory=list)
    plan: list[RankStats] = field(default_factory=list)  # the stats at start: residency
    budgets: list[int | None] = field(default_factory=list)  # per rank; None: no budget

    def median(self, fn) -> float:
        return statistics.median(fn(s) for s in self.samples)

    @property
    def ms_per_token(self) -> float:
        return self.median(lambda s: s.ms_per_token)

    @property
    def device_bytes_per_step(self) -> float | None:
        if any(x.device_bytes is None for x in self.samples):
            return None
        return self.median(lambda s: s.device_bytes / s.ranks[0]["steps"])

    @property
    def bytes_per_step(self) -> float:
        """Bytes read by all ranks per step (median over samples)."""
        return self.median(lambda s: sum(r["bytes_read"] / r["steps"] for r in s.ranks))

    def per_rank(self, key: str) -> list[float]:
        """Median of `key` per step, for each rank, in ms (seconds keys) or MB (bytes)."""
        scale = 1e3 if key.endswith("_s") else 1 / MB
        n = len(self.samples[0].ranks)
        return [self.median(lambda s, r=r: s.ranks[r][key] / s.ranks[r]["steps"]) * scale for r in range(n)]


DELTA_KEYS = ("bytes_read", "steps", "stall_s", "allreduce_s", "compute_s")


def timed_generation(cluster, ids: list[int], new_tokens: int, disk: Path) -> Sample:
    before = cluster.stats()
    dev0 = device_read_bytes(disk)
    res = cluster.generate_full(ids, max_new_tokens=new_tokens)
    dev1 = device_read_bytes(disk)
    after = cluster.stats()
    if len(res["ids"]) != new_tokens:
        raise RuntimeError(f"generated {len(res['ids'])} tokens, expected {new_tokens} (an EOS id?)")
    deltas = [{k: getattr(a, k) - getattr(b, k) for k in DELTA_KEYS} for b, a in zip(before, after)]
    dev = dev1 - dev0 if dev0 is not None and dev1 is not None else None
    return Sample(1000 * res["decode_s"] / (new_tokens - 1), deltas, dev)


def measure(settings: list[Setting], ids: list[int], args: argparse.Namespace) -> None:
    """Every setting in rounds (common.rounds: a warm-up each, then a new random order each round)."""
    def run(s: Setting):
        return lambda: timed_generation(s.cluster, ids, args.new_tokens, args.tmp)

    samples = rounds({s.name: run(s) for s in settings}, args.repeats, report=lambda k, name, x: print(
        f"  round {k + 1} {name}: {x.ms_per_token:.0f} ms/token", flush=True))
    for s in settings:
        s.samples = samples[s.name]


def half_pinned_budgets(stats: list[RankStats]) -> list[int]:
    """fixed + 2 × largest block + half the block bytes, per rank, from a fully resident run."""
    return [r.fixed_bytes + 2 * r.largest_block_bytes + r.block_bytes // 2 for r in stats]


def start_settings(stack: ExitStack, model_dir: Path, args: argparse.Namespace) -> list[Setting]:
    from tpi import LocalCluster

    kw = {"world_size": args.world_size, "dtype": args.dtype, "threads": 1, "max_context": args.max_context,
          "cache_dir": args.cache_dir, "start_timeout": 600, "step_timeout": 600}
    resident = stack.enter_context(LocalCluster(model_dir, **kw))
    budgets = half_pinned_budgets(resident.stats())
    half = stack.enter_context(LocalCluster(model_dir, memory_budget=budgets, drop_page_cache=True, **kw))
    streamed = stack.enter_context(LocalCluster(model_dir, stream_all=True, window=2, drop_page_cache=True, **kw))
    settings = [Setting("(a) resident", "not dropped; nothing read after start", resident),
                Setting("(b) half pinned", "dropped after each streamed read", half),
                Setting("(c) streamed, window 2", "dropped after each streamed read", streamed)]
    for s, b in zip(settings, [None, budgets, None]):
        s.plan = s.cluster.stats()
        s.budgets = list(b) if b else [None] * len(s.plan)
    return settings


# -- report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Disk:
    one_stream: float  # bytes/s
    concurrent: float  # bytes/s, world-size readers at once


def _ranks(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def row(s: Setting, disk: Disk, compute_ms: float) -> list[str]:
    disk_ms = 1000 * s.bytes_per_step / disk.concurrent
    floor = max(disk_ms, compute_ms)
    ratio = s.ms_per_token / floor
    lo, hi = min(x.ms_per_token for x in s.samples), max(x.ms_per_token for x in s.samples)
    pinned = _ranks([r.pinned_blocks for r in s.plan], "{}") + " of " + _ranks(
        [r.pinned_blocks + r.streamed_blocks for r in s.plan], "{}")
    dev = s.device_bytes_per_step
    return [s.name, s.page_cache, pinned, f"{s.ms_per_token:.0f} ({lo:.0f}-{hi:.0f})",
            f"{s.bytes_per_step / MB:,.0f}", "?" if dev is None else f"{dev / MB:,.0f}", f"{disk_ms:.0f}",
            f"{compute_ms:.0f}", f"{floor:.0f}",
            f"{ratio:.2f}", _ranks(s.per_rank("stall_s")), _ranks(s.per_rank("allreduce_s")),
            _ranks(s.per_rank("compute_s"))]


COLUMNS = ["setting", "page cache", "pinned blocks per rank", "ms/token median (min-max)",
           "MB read / step (all ranks)", "device MB read / step", "disk floor ms", "compute ms (= (a))", "floor ms",
           "measured ÷ floor",
           "stall ms/step per rank", "allreduce ms/step per rank", "compute ms/step per rank"]


def settings_table(settings: list[Setting], disk: Disk) -> str:
    compute = settings[0].ms_per_token
    return table(COLUMNS, [row(s, disk, compute) for s in settings])


def plan_table(settings: list[Setting]) -> str:
    cols = ["setting", "rank", "budget MB", "fixed MB", "largest block MB", "all blocks MB", "window",
            "pinned / streamed", "planned MB", "peak RSS MB"]
    cells = [[s.name, r.rank, f"{b / MB:,.0f}" if b else "none", f"{r.fixed_bytes / MB:,.0f}",
              f"{r.largest_block_bytes / MB:,.0f}", f"{r.block_bytes / MB:,.0f}", r.window,
              f"{r.pinned_blocks} / {r.streamed_blocks}", f"{r.planned_bytes / MB:,.0f}",
              f"{r.peak_rss_bytes / MB:,.0f}"] for s in settings for r, b in zip(s.plan, s.budgets)]
    return table(cols, cells)


def verdicts(settings: list[Setting], disk: Disk) -> list[str]:
    compute = settings[0].ms_per_token
    out = []
    for s in settings[1:]:
        ratio = s.ms_per_token / max(1000 * s.bytes_per_step / disk.concurrent, compute)
        out.append(f"{s.name}: {ratio:.2f}× its floor (target ≤ {TARGET_RATIO}): "
                   f"{'met' if ratio <= TARGET_RATIO else '**not met**'}")
    for s in settings[1:]:
        dev = s.device_bytes_per_step
        if dev:
            floor = max(1000 * dev / disk.concurrent, compute)
            out.append(f"{s.name}: the device served {dev / s.bytes_per_step:.0%} of the bytes tpi read (the rest "
                       f"came from the page cache); on the device's bytes the floor is {floor:.0f} ms and the "
                       f"ratio {s.ms_per_token / floor:.2f}")
    b, c = settings[1].ms_per_token, settings[2].ms_per_token
    out.append(f"half pinned vs streamed: {b:.0f} vs {c:.0f} ms/token ({c / b:.2f}× faster): "
               f"{'clearly faster' if c / b >= 1.2 else '**not clearly faster**'}")
    return out


def report(settings: list[Setting], disk: Disk, args: argparse.Namespace, model_bytes: int) -> str:
    bullets = [
        (f"{os.cpu_count()} logical CPUs, torch {torch.__version__}; random Llama, {args.layers} layers, "
         f"{model_bytes / 4 / 1e6:,.0f}M parameters ({model_bytes / GB:.2f} GB float32 checkpoint), "
         f"split dtype **{args.dtype}**; world size "
         f"{args.world_size}, 1 torch thread per rank, every rank its own process on this machine"),
        (f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy); ms/token = decode time / "
         f"{args.new_tokens - 1}; medians of {args.repeats} rounds after one warm-up each; the three clusters are "
         "alive at once and each round measures every one once, in a new random order"),
        (f"disk read bandwidth, page cache dropped (posix_fadvise DONTNEED after sync), sequential 64 MB preads of "
         f"the split files, {args.bw_bytes / GB:.1f} GB, best of {args.bw_trials}: one reader "
         f"{disk.one_stream / MB:,.0f} MB/s, {args.world_size} readers at once {disk.concurrent / MB:,.0f} MB/s in "
         "all (used for the disk floor)"),
        ("device MB read / step: what the block device served during the timed generations (/proc/diskstats, "
         "any process's reads, so other tenants' too): it checks that the streamed bytes came from the disk"),
        ("disk floor = MB read per step by all ranks (stats deltas, prefill step included: it reads the same "
         "blocks) / the concurrent bandwidth, since the ranks share one disk; compute = (a)'s ms/token; floor "
         "= max(disk floor, compute)"),
        (f"per-rank columns are rank 0 / 1 / ...; medians per step; targets: streamed settings within "
         f"{TARGET_RATIO}× of their floor, half pinned clearly faster than streamed"),
        f"tpi at {git_revision()}; command: `{command_line('streaming.py')}`",
    ]
    parts = ["# tpi speed when streaming weights from the disk", "", *(f"- {b}" for b in bullets), "",
             settings_table(settings, disk), "", *(f"- {v}" for v in verdicts(settings, disk)), "",
             "Residency of each setting at start:", "", plan_table(settings)]
    return "\n".join(parts) + "\n"


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="split dtype")
    p.add_argument("--world-size", type=int, default=3)
    p.add_argument("--layers", type=int, default=LLAMA_850M.layers, help="decoder layers (default 16; fewer: smoke)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--bw-bytes", type=int, default=2 * GB, help="bytes read to measure the disk (default 2e9)")
    p.add_argument("--bw-trials", type=int, default=3, help="disk measurements; the best counts (default 3)")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint goes")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The random checkpoint and its split (written back to the disk, so that it can be dropped)."""
    from tpi.split import split_cached

    t0 = time.perf_counter()
    model_dir = work / "model"
    write_llama(model_dir, LLAMA_850M.with_layers(args.layers), torch.float32)
    t1 = time.perf_counter()
    shard_dir = split_cached(model_dir, args.world_size, dtype=args.dtype, cache_dir=args.cache_dir, progress=False)
    os.sync()
    print(f"checkpoint written in {t1 - t0:.0f} s, split ({args.dtype}) in {time.perf_counter() - t1:.0f} s",
          flush=True)
    return model_dir, shard_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    need = checkpoint_bytes(LLAMA_850M.with_layers(args.layers), torch.float32) * 2 + 2 * GB
    if shutil.disk_usage(args.tmp).free < need:
        print(f"{args.tmp}: not enough free disk, need {need / GB:.1f} GB")
        return 1
    work = Path(tempfile.mkdtemp(prefix="tpi-streaming-bench-", dir=args.tmp))
    args.cache_dir = work / "splits"
    try:
        model_dir, shard_dir = build(work, args)
        ranks = [sorted((shard_dir / f"rank{r}").glob("*.safetensors")) for r in range(args.world_size)]
        disk = Disk(best_bandwidth([[p for g in ranks for p in g]], args.bw_bytes, args.bw_trials),
                    best_bandwidth(ranks, args.bw_bytes, args.bw_trials))
        print(f"disk: one reader {disk.one_stream / MB:,.0f} MB/s, {args.world_size} readers "
              f"{disk.concurrent / MB:,.0f} MB/s", flush=True)
        ids = torch.randint(LLAMA_850M.vocab, (args.prompt_tokens,),
                            generator=torch.Generator().manual_seed(1)).tolist()
        with ExitStack() as stack:
            settings = start_settings(stack, model_dir, args)
            drop_page_cache([p for g in ranks for p in g])
            print("clusters up; measuring", flush=True)
            measure(settings, ids, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", flush=True)
    text = report(settings, disk, args, checkpoint_bytes(LLAMA_850M.with_layers(args.layers), torch.float32))
    print(text)
    write_report(args.out, "streaming.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
