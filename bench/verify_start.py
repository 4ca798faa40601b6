"""What checking shard files at start costs: the embedded SmolLM2-135M split for 3 ranks.

Per rank: `verify_rank_files` with sizes only (always done) and with sha256 (the default,
`--no-verify` turns it off), from the page cache and with the page cache dropped for the rank's
files first (posix_fadvise DONTNEED: a cold start from disk). Then the whole cluster: LocalCluster
start to ready with verification on and off, in rounds of a new random order (common.rounds), in
the same run. Medians over --rounds. Prints a table and writes bench/out/verify_start.md. Knows
nothing of the network or the model math; measures only the start.

    python bench/verify_start.py [--rounds 5] [--world-size 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from common import OUT_DIR, drop_page_cache, rounds, table, write_report

from tpi import LocalCluster
from tpi.embedded import default_model_dir
from tpi.split import split_cached
from tpi.weights import Manifest, verify_rank_files


def time_verify(shard_dir: Path, manifest: Manifest, rank: int, checksums: bool, cold: bool, n: int) -> float:
    """Median seconds of `n` checks of rank's files (`cold`: their page cache dropped first)."""
    times = []
    for _ in range(n):
        if cold:
            drop_page_cache(shard_dir / rel for rel in manifest.rank_files(rank))
        t0 = time.perf_counter()
        verify_rank_files(shard_dir, manifest, rank, checksums=checksums)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_starts(model: Path, world: int, n: int) -> dict[str, float]:
    """Median seconds from LocalCluster start to ready, verification on and off."""
    def start(verify: bool) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            with LocalCluster(model, world_size=world, verify_shards=verify):
                return time.perf_counter() - t0

        return run

    got = rounds({"on": start(True), "off": start(False)}, n)
    return {k: statistics.median(v) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=3)
    args = ap.parse_args()
    model = default_model_dir()
    shard_dir = split_cached(model, args.world_size)
    manifest = Manifest.load(shard_dir)
    cells = []
    for rank in range(args.world_size):
        files = manifest.rank_files(rank)
        mb = sum(f["size"] for f in files.values()) / 1e6
        sizes = time_verify(shard_dir, manifest, rank, False, False, args.rounds)
        warm = time_verify(shard_dir, manifest, rank, True, False, args.rounds)
        cold = time_verify(shard_dir, manifest, rank, True, True, args.rounds)
        cells.append([rank, len(files), f"{mb:.1f}", f"{1e3 * sizes:.2f}", f"{1e3 * warm:.0f}", f"{1e3 * cold:.0f}",
                      f"{mb / cold:.0f}"])
    starts = time_starts(model, args.world_size, args.rounds)
    text = "\n".join([
        f"# Shard verification at start: {model.name}, {args.world_size} ranks, medians of {args.rounds}", "",
        table(["rank", "files", "MB", "sizes only ms", "sha256 warm ms", "sha256 cold ms", "MB/s cold"], cells,
              "rrrrrrr"), "",
        table(["LocalCluster start to ready", "verify on s", "verify off s", "on / off"],
              [[f"{args.world_size} ranks, {os.cpu_count()} cores", f"{starts['on']:.2f}", f"{starts['off']:.2f}",
                f"{starts['on'] / starts['off']:.2f}"]], "lrrr")])
    print(text)
    write_report(OUT_DIR, "verify_start.md", text)


if __name__ == "__main__":
    main()
