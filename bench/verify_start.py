"""What checking shard files at start costs: the embedded SmolLM2-135M split for 3 ranks.

Per rank: `verify_rank_files` with sizes only (always done) and with sha256 (the default,
`--no-verify` turns it off), from the page cache and with the page cache dropped for the rank's
files first (posix_fadvise DONTNEED: a cold start from disk). Then the whole cluster: LocalCluster
start to ready with verification on and off, alternating, in the same run. Medians over --rounds.
Prints a table and writes bench/out/verify_start.md. Knows nothing of the network or the model
math; measures only the start.

    python bench/verify_start.py [--rounds 5] [--world-size 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from tpi import LocalCluster
from tpi.embedded import default_model_dir
from tpi.weights import Manifest, split_cached, verify_rank_files


def drop_cache(shard_dir: Path, files: dict) -> None:
    for rel in files:
        fd = os.open(shard_dir / rel, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_verify(shard_dir: Path, manifest: Manifest, rank: int, checksums: bool, cold: bool, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        if cold:
            drop_cache(shard_dir, manifest.rank_files(rank))
        t0 = time.perf_counter()
        verify_rank_files(shard_dir, manifest, rank, checksums=checksums)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_starts(model: Path, world: int, rounds: int) -> dict[bool, float]:
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            with LocalCluster(model, world_size=world, verify_shards=verify):
                times[verify].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=3)
    args = ap.parse_args()
    model = default_model_dir()
    shard_dir = split_cached(model, args.world_size)
    manifest = Manifest.load(shard_dir)
    lines = [f"# Shard verification at start: {model.name}, {args.world_size} ranks, medians of {args.rounds}", "",
             "| rank | files | MB | sizes only ms | sha256 warm ms | sha256 cold ms | MB/s cold |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for rank in range(args.world_size):
        files = manifest.rank_files(rank)
        mb = sum(f["size"] for f in files.values()) / 1e6
        sizes = time_verify(shard_dir, manifest, rank, False, False, args.rounds)
        warm = time_verify(shard_dir, manifest, rank, True, False, args.rounds)
        cold = time_verify(shard_dir, manifest, rank, True, True, args.rounds)
        lines.append(f"| {rank} | {len(files)} | {mb:.1f} | {1e3 * sizes:.2f} | {1e3 * warm:.0f} | "
                     f"{1e3 * cold:.0f} | {mb / cold:.0f} |")
    starts = time_starts(model, args.world_size, args.rounds)
    lines += ["", "| LocalCluster start to ready | verify on s | verify off s | on / off |", "|---|---:|---:|---:|",
              f"| {args.world_size} ranks, {os.cpu_count()} cores | {starts[True]:.2f} | {starts[False]:.2f} | "
              f"{starts[True] / starts[False]:.2f} |"]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "verify_start.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
