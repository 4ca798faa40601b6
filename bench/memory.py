"""Memory at 70B scale: per-rank peak RSS of a LocalCluster at world size 8, float16 under a 1 GB
budget beside int4 under 500 MB.

Writes a seeded random-weight checkpoint with Llama-2-70B's layer shape (hidden 8192, 64 heads,
8 KV heads, FFN 28672, vocab 32000, float16) but only 4 layers (about 7.9 GB), then 6 layers when
the disk has room, with common.write_llama: one layer per safetensors file, never the whole model in
memory. The 4-layer checkpoint is the first 4 layers of the 6-layer one (hard links). For each layer
count and each format (``--formats``): split for 8 ranks, start ``LocalCluster(world_size=8,
window=2, max_context=4096, threads=1)`` with the format's budget, generate 3 tokens from an
8-token prompt (prefill + 2 decode steps), and read every rank's stats: peak RSS (VmHWM), the
residency plan, the weights held and the bytes read.

  float16: the checkpoint's own, memory_budget="1GB" on every rank, prefill chunk 512; targets:
           workers under 1.0 GB, master under 1.5 GB.
  int4:    quant="int4" (group 32, the LM head float16), fast compute, memory_budget 500 MB on the
           workers and 950 MB on the master, prefill chunk 64 (its activation reserve: 25 MB against
           196 MB at 512); targets: workers at most 0.5 GB, master at most 1.0 GB. (The master's
           peak ran 16 MB over a 1 GB budget: it grows ~48 MB past its plan, where the plan keeps 32.)

TPI-LLM reports 3.1 GB per device for Llama 2-70B at world size 8; per-device peak memory should
not grow from 4 to 6 layers.
The page cache is not dropped: peak RSS is the processes' own memory; the page cache holding the
block files is the kernel's, reclaimable, and not counted in it.

Writes the tables to stdout and bench/out/memory.md, and a plot to bench/out/memory.png. Does not
know: tpi's internals beyond ``LocalCluster``, ``split_cached`` and the stats each rank reports.

    python bench/memory.py                      # 4 and 6 layers, about 10-20 minutes
    python bench/memory.py --layers 4           # one layer count
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    GB,
    MB,
    OUT_DIR,
    SHAPES,
    checkpoint_bytes,
    command_line,
    exit_on_sigterm,
    git_revision,
    int_list,
    save_plot,
    table,
    write_llama,
    write_report,
)

from tpi.stats import RankStats

WORKER_TARGET, MASTER_TARGET, TPI_LLM_70B = 1.0 * GB, 1.5 * GB, 3.1 * GB
LLAMA2_70B = SHAPES["llama70b"]


@dataclass(frozen=True)
class Format:
    """A weight format and what it runs under: budgets (workers, master), prefill chunk, targets."""

    name: str
    quant: str | None
    worker_budget: str
    master_budget: str
    prefill_chunk: int
    worker_target: float
    master_target: float


FORMATS = {"float16": Format("float16", None, "1GB", "1GB", 512, WORKER_TARGET, MASTER_TARGET),
           "int4": Format("int4", "int4", "500MB", "950MB", 64, 0.5 * GB, 1.0 * GB)}


# -- the run -----------------------------------------------------------------------------------
@dataclass
class LayerRun:
    """One layer count: every rank's stats after generating, and what was spent on the way."""

    layers: int
    fmt: Format
    checkpoint_bytes: int
    split_bytes: int
    split_s: float
    start_s: float
    generate_s: float
    ttft_s: float
    decode_s: float
    ids: list[int]
    ranks: list[RankStats]


def run_layer_count(model_dir: Path, cache_dir: Path, layers: int, fmt: Format, args: argparse.Namespace
                    ) -> LayerRun:
    """Split, start the 8-rank cluster under the format's budgets, generate, read the stats."""
    from tpi import LocalCluster
    from tpi.split import Quant, split_cached

    tag = f"[{layers} layers, {fmt.name}]"
    t0 = time.perf_counter()
    shard_dir = split_cached(model_dir, args.world_size, dtype="float16", cache_dir=cache_dir, progress=False,
                             quant=Quant(fmt.quant))
    split_s = time.perf_counter() - t0
    split_bytes = sum(p.stat().st_size for p in shard_dir.rglob("*.safetensors"))
    print(f"{tag} split for {args.world_size} ranks: {split_bytes / GB:.2f} GB in {split_s:.0f} s", flush=True)
    prompt = torch.randint(LLAMA2_70B.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    budgets = [fmt.master_budget] + [fmt.worker_budget] * (args.world_size - 1)
    t0 = time.perf_counter()
    with LocalCluster(model_dir, world_size=args.world_size, dtype="float16", quant=fmt.quant, window=args.window,
                      memory_budget=budgets, max_context=args.max_context, threads=1, cache_dir=cache_dir,
                      prefill_chunk=fmt.prefill_chunk, start_timeout=args.timeout,
                      step_timeout=args.timeout) as cluster:
        start_s = time.perf_counter() - t0
        print(f"{tag} cluster up in {start_s:.0f} s; generating {args.new_tokens} tokens", flush=True)
        t0 = time.perf_counter()
        res = cluster.generate_full(prompt, max_new_tokens=args.new_tokens)
        generate_s = time.perf_counter() - t0
        ranks = cluster.stats()
    ckpt = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    shutil.rmtree(shard_dir, ignore_errors=True)  # keep the disk at one split at a time
    return LayerRun(layers, fmt, ckpt, split_bytes, split_s, start_s, generate_s, res["ttft_s"], res["decode_s"],
                    list(res["ids"]), ranks)


# -- report ------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / MB:,.0f}"


def target(fmt: Format, r: RankStats) -> float:
    return fmt.master_target if r.rank == 0 else fmt.worker_target


def rank_row(fmt: Format, r: RankStats) -> list[str]:
    runtime = r.fixed_bytes - r.kv_cache_bytes - r.activation_bytes
    held = r.planned_bytes - r.fixed_bytes  # pinned blocks + window x slot
    expected = runtime + held + r.kv_cache_bytes
    ok = "yes" if r.peak_rss_bytes <= target(fmt, r) else "**NO**"
    return [f"{r.rank}{' (master)' if r.rank == 0 else ''}", _mb(r.peak_rss_bytes), f"{target(fmt, r) / GB:.1f} GB",
            ok, _mb(r.weight_bytes),
            _mb(runtime), _mb(r.kv_cache_bytes), _mb(r.activation_bytes), _mb(r.fixed_bytes),
            _mb(r.largest_block_bytes),
            str(r.window), _mb(r.window * r.largest_block_bytes), f"{r.pinned_blocks} / {r.streamed_blocks}",
            _mb(r.block_bytes), _mb(held), _mb(expected), _mb(r.planned_bytes), _mb(r.bytes_read), str(r.steps)]


COLUMNS = ["rank", "peak RSS MB (VmHWM)", "target", "within", "weights MB", "runtime MB", "KV MB", "act. reserve MB",
           "fixed MB (runtime+KV+act.)", "largest block MB", "window", "window × largest MB",
           "pinned / streamed blocks", "all blocks MB", "weights held MB (pinned + window)",
           "runtime + weights held + KV MB", "planned MB (fixed + weights held)", "bytes read MB", "steps"]


def rank_table(run: LayerRun) -> str:
    return table(COLUMNS, [rank_row(run.fmt, r) for r in run.ranks])


def run_summary(run: LayerRun) -> str:
    workers = [r.peak_rss_bytes for r in run.ranks[1:]]
    master = run.ranks[0].peak_rss_bytes
    f = run.fmt
    return (f"{f.name}: budget {f.worker_budget} per worker, {f.master_budget} on the master, prefill chunk "
            f"{f.prefill_chunk}; checkpoint {run.checkpoint_bytes / GB:.2f} GB float16, split "
            f"{run.split_bytes / GB:.2f} GB in "
            f"{run.split_s:.0f} s; cluster start {run.start_s:.0f} s; generate {len(run.ids)} tokens in "
            f"{run.generate_s:.0f} s (TTFT {run.ttft_s:.1f} s, decode {run.decode_s:.1f} s). "
            f"Master peak {master / MB:,.0f} MB (target {f.master_target / MB:,.0f}); workers peak "
            f"{min(workers, default=0) / MB:,.0f}-{max(workers, default=0) / MB:,.0f} MB "
            f"(target {f.worker_target / MB:,.0f}); TPI-LLM: {TPI_LLM_70B / MB:,.0f} MB per device for the full "
            "80 layers.")


def growth(runs: list[LayerRun]) -> str:
    """Per-rank peak change from the fewest to the most layers, per format."""
    return "\n\n".join(_growth([r for r in runs if r.fmt == f]) for f in dict.fromkeys(r.fmt for r in runs))


def side_by_side(runs: list[LayerRun]) -> str:
    """Per layer count: each rank's peak RSS and weights in every format, and the ratio to float16's."""
    rows, cols = [], []
    for layers in dict.fromkeys(r.layers for r in runs):
        same = [r for r in runs if r.layers == layers]
        base = next((r for r in same if r.fmt.name == "float16"), same[0])
        for rank in range(len(base.ranks)):
            cells = [str(layers), str(rank)]
            for run in same:
                r = run.ranks[rank]
                cells += [f"{r.peak_rss_bytes / MB:,.0f} ({r.peak_rss_bytes / base.ranks[rank].peak_rss_bytes:.2f}x)",
                          f"{r.weight_bytes / MB:,.0f}"]
            rows.append(cells)
        cols = ["layers", "rank"] + [c for run in same for c in (f"{run.fmt.name} peak RSS MB (vs float16)",
                                                                 f"{run.fmt.name} weights MB")]
    return table(cols, rows) if rows else ""


def _growth(runs: list[LayerRun]) -> str:
    if len(runs) < 2:
        return f"{runs[0].fmt.name}: only one layer count ran, no growth comparison."
    a, b = runs[0], runs[-1]
    deltas = [rb.peak_rss_bytes - ra.peak_rss_bytes for ra, rb in zip(a.ranks, b.ranks)]
    worst = max(deltas, key=abs)
    added = sum(rb.weight_bytes - ra.weight_bytes for ra, rb in zip(a.ranks, b.ranks)) / len(a.ranks)
    within = all(r.peak_rss_bytes <= r.planned_bytes for run in (a, b) for r in run.ranks)
    return (f"{a.fmt.name}: per-rank peak RSS change from {a.layers} to {b.layers} layers: "
            f"{', '.join(f'{d / MB:+.0f}' for d in deltas)} MB (largest {worst / MB:+.0f} MB; the weights grew by "
            f"{added / MB:,.0f} MB per rank, as stored). Does not grow: "
            f"{'yes' if max(deltas) < 0.05 * added else 'NO'} (criterion: every rank grows by < 5% of the weights "
            f"added per rank). Every rank's peak within its plan: {'yes' if within else 'NO'}.")


def report(runs: list[LayerRun], args: argparse.Namespace, notes: list[str]) -> str:
    bullets = [
        (f"{os.cpu_count()} logical CPUs, torch {torch.__version__}; world size {args.world_size}, every rank its own "
         f"process on this machine, 1 torch thread each; the float weights float16; formats "
         f"{', '.join(args.formats)}"),
        (f"Llama-2-70B layer shape (hidden 8192, 64 heads, 8 KV heads, FFN 28672, vocab 32000), random weights, "
         f"fewer layers; window={args.window}, max_context={args.max_context}; "
         f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (prefill + {args.new_tokens - 1} decode "
         "steps)"),
        ("**page cache: not dropped** (drop_page_cache=False). Peak RSS is VmHWM, each process's own resident "
         "memory; the block files cached by the kernel are not counted in it and are reclaimable"),
        ("runtime = fixed − KV − activation reserve (RSS of the rank when it planned, before any weight); "
         "fixed = runtime + KV cache + activation reserve (a bound for one 512-token prefill chunk, mostly unused "
         "by this short prompt); weights held = pinned blocks + window × largest streamed block = planned − "
         "fixed; the expected peak is about runtime + weights held + KV (+ this prompt's small activations)"),
        ("; ".join(f"{f.name}: budget {f.worker_budget} per worker and {f.master_budget} on the master, prefill "
                   f"chunk {f.prefill_chunk}, targets workers <= {f.worker_target / GB:.1f} GB and master <= "
                   f"{f.master_target / GB:.1f} GB" for f in (FORMATS[n] for n in args.formats))
         + f"; TPI-LLM reports {TPI_LLM_70B / GB:.1f} GB per device for Llama 2-70B at world size 8"),
        f"tpi at {git_revision()}; command: `{command_line('memory.py')}`",
    ]
    parts = ["# tpi memory at 70B scale (world size 8)", "", *(f"- {b}" for b in bullets + notes)]
    parts += ["", "## Side by side", "", side_by_side(runs)]
    for run in runs:
        parts += ["", f"## {run.layers} layers, {run.fmt.name}", "", run_summary(run), "", rank_table(run)]
    parts += ["", growth(runs)]
    return "\n".join(parts) + "\n"


def plot(runs: list[LayerRun], path: Path) -> bool:
    """Peak RSS per rank, one bar per (layer count, format), with each format's worker target."""
    def draw(axes: list) -> None:
        ax, width = axes[0], 0.8 / len(runs)
        for k, run in enumerate(runs):
            xs = [r.rank + (k - (len(runs) - 1) / 2) * width for r in run.ranks]
            ax.bar(xs, [r.peak_rss_bytes / GB for r in run.ranks], width, label=f"{run.fmt.name}, {run.layers} layers")
        for f, color in zip(dict.fromkeys(r.fmt for r in runs), ("red", "purple")):
            ax.axhline(f.worker_target / GB, color=color, ls="--", label=f"{f.worker_target / GB:.1f} GB ({f.name} "
                       "worker target)")
        ax.set(xlabel="rank (0 = master)", ylabel="peak RSS, GB (VmHWM)", xticks=[r.rank for r in runs[0].ranks],
               title="Llama-2-70B layer shape, world size 8, window 2")
        ax.set_ylim(0, 1.9)
        ax.legend(fontsize=8, loc="upper left", ncol=2)

    return save_plot(path, draw, panel_size=(8, 4))


# -- command line ------------------------------------------------------------------------------
def plan_layers(wanted: list[int], tmp: Path) -> tuple[list[int], list[str]]:
    """The layer counts the disk has room for: the largest checkpoint + its split (+ 2 GB slack)."""
    free = shutil.disk_usage(tmp).free
    kept, notes = [], []
    for n in sorted(wanted):
        need = 2 * checkpoint_bytes(LLAMA2_70B.with_layers(n), torch.float16) + 2 * GB
        if need <= free:
            kept.append(n)
        else:
            msg = f"{n} layers skipped: {tmp} has {free / GB:.1f} GB free, checkpoint + split need {need / GB:.1f} GB"
            print(msg, flush=True)
            notes.append(msg)
    return kept, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int_list, default=[4, 6], help="comma-separated layer counts (default 4,6)")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--formats", type=lambda s: s.split(","), default=["float16", "int4"],
                   help=f"comma-separated, of {', '.join(FORMATS)} (default: both)")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="start and step timeout, seconds")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoints go")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


def write_models(work: Path, layers: list[int]) -> dict[int, Path]:
    """A checkpoint per layer count: the largest written, the others hard links to its first layers."""
    t0 = time.perf_counter()
    big = max(layers)
    dirs = {n: work / f"model-{n}L" for n in layers}
    write_llama(dirs[big], LLAMA2_70B.with_layers(big), torch.float16)
    for n in layers:
        if n != big:
            write_llama(dirs[n], LLAMA2_70B.with_layers(n), torch.float16, link_from=dirs[big])
    print(f"wrote the {big}-layer float16 checkpoint "
          f"({checkpoint_bytes(LLAMA2_70B.with_layers(big), torch.float16) / GB:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s under {work}", flush=True)
    return dirs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    layers, notes = plan_layers(args.layers, args.tmp)
    if not layers:
        print("nothing to run")
        return 1
    work = Path(tempfile.mkdtemp(prefix="tpi-memory-bench-", dir=args.tmp))
    runs: list[LayerRun] = []
    try:
        dirs = write_models(work, layers)
        for n in layers:
            for name in args.formats:
                runs.append(run_layer_count(dirs[n], work / "splits", n, FORMATS[name], args))
                print(f"\n## {n} layers\n{run_summary(runs[-1])}\n{rank_table(runs[-1])}\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}", flush=True)
    text = report(runs, args, notes)
    print(text)
    write_report(args.out, "memory.md", text)
    plot(runs, args.out / "memory.png")
    bad = [r for run in runs for r in run.ranks if r.peak_rss_bytes > target(run.fmt, r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
