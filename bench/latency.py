"""Latency of tpi's ``LocalCluster`` against transformers on the same weights, on one machine.

Measures, for each model and world size, the time to first token (prefill of a fixed prompt of
token ids, final norm + head, argmax) and the decode time per token of greedy generation, as
medians over repeats after one warm-up. tpi runs every rank as its own spawned process on
loopback, each pinned to ``--threads`` torch threads; transformers runs the same checkpoint in
this process, pinned to each count of ``--hf-threads``, and does the same work (prefill with
``logits_to_keep=1``, then one token at a time through ``past_key_values``). It also checks that
tpi's greedy tokens equal transformers'.

On one machine the ranks share the same cores, so this measures tpi's overhead (process hops,
allreduces over ZeroMQ on loopback), not the speed-up of separate devices.

Writes the table to stdout and bench/out/latency.md, and a plot to bench/out/latency.png
(when matplotlib is installed). Does not know: tpi's internals beyond ``LocalCluster``.

    python bench/latency.py                     # full run, a few minutes
    python bench/latency.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    OUT_DIR,
    SHAPES,
    choice_list,
    command_line,
    int_list,
    rounds,
    save_plot,
    table,
    write_llama,
    write_report,
)

MODELS = ("smollm2", "random100m")
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a "
    "notebook and a flask of tea. From the gallery he could see the fishing boats returning to the "
    "harbour, the gulls circling above the nets, and the long grey line of the coast to the south."
)


@dataclass(frozen=True)
class Sample:
    """One greedy generation: seconds to the first token, seconds from it to the last, new ids."""

    ttft_s: float
    decode_s: float
    ids: list[int]

    @property
    def ms_per_token(self) -> float:
        n = len(self.ids) - 1
        return 1000 * self.decode_s / n if n > 0 else float("nan")


@dataclass
class Row:
    """Every repeat of one configuration: a model on one runtime, world size and thread count."""

    model: str
    runtime: str  # "transformers" or "tpi"
    world_size: int  # processes
    threads: int  # torch threads per process
    samples: list[Sample] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        return 1000 * statistics.median(s.ttft_s for s in self.samples)

    @property
    def ms_per_token(self) -> float:
        return statistics.median(s.ms_per_token for s in self.samples)

    @property
    def ids(self) -> list[int]:
        return self.samples[0].ids

    def identical_to(self, ref: Row) -> bool:
        return all(s.ids == ref.ids for s in self.samples)


# -- models and prompts ------------------------------------------------------------------------
def model_dir(name: str, scratch: Path) -> Path:
    """The checkpoint folder for `name`: the embedded SmolLM2, or a random Llama built in `scratch`."""
    if name == "smollm2":
        from tpi.embedded import default_model_dir

        return default_model_dir()
    path = scratch / name
    n = write_llama(path, SHAPES[name])
    print(f"[{name}] built a seeded random Llama with {n / 1e6:.1f}M parameters in {path}", flush=True)
    return path


def prompt_ids(name: str, path: Path, n: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`n` fixed prompt ids: English text for a model with a tokenizer, seeded random ids otherwise."""
    if name == "smollm2":
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(path)(PROMPT_TEXT)["input_ids"]
        if len(ids) < n:
            raise ValueError(f"the prompt text has {len(ids)} tokens; --prompt-tokens={n} asks for more")
        return ids[:n]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n,), generator=gen).tolist()


# -- measurement -------------------------------------------------------------------------------
Runner = Callable[[], Sample]


def eos_ids(model) -> set[int]:
    """EOS ids from the config and the generation config, as tpi's engine gathers them."""
    out: set[int] = set()
    for value in (model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        out |= {value} if isinstance(value, int) else set(value or [])
    return out


@torch.inference_mode()
def hf_greedy(model, ids: list[int], new_tokens: int, eos: set[int]) -> Sample:
    """Prefill + argmax, then greedy decode with the KV cache, stopping at EOS as tpi does."""
    t0 = time.perf_counter()
    out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    first = time.perf_counter()
    new = [token]
    while token not in eos and len(new) < new_tokens:
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        new.append(token)
    return Sample(first - t0, time.perf_counter() - first, new)


def hf_runner(model, ids: list[int], new_tokens: int, threads: int) -> Runner:
    eos = eos_ids(model)

    def run() -> Sample:
        torch.set_num_threads(threads)  # this process's count changes between transformers rows
        return hf_greedy(model, ids, new_tokens, eos)

    return run


def tpi_runner(cluster, ids: list[int], new_tokens: int) -> Runner:
    def run() -> Sample:
        r = cluster.generate_full(ids, max_new_tokens=new_tokens, temperature=0.0)
        return Sample(r["ttft_s"], r["decode_s"], list(r["ids"]))

    return run


def measure(configs: list[tuple[Row, Runner]], repeats: int) -> list[Row]:
    """Every configuration in rounds (common.rounds: a warm-up, then a new random order each round)."""
    samples = rounds({f"{row.runtime}/{row.world_size}/{row.threads}": run for row, run in configs}, repeats)
    for (row, _), got in zip(configs, samples.values()):
        row.samples = got
        print(f"  {row.runtime:12s} {row.world_size} × {row.threads}: TTFT {row.ttft_ms:8.1f} ms, "
              f"{row.ms_per_token:7.2f} ms/token", flush=True)
    return [row for row, _ in configs]


def bench_model(name: str, args: argparse.Namespace, scratch: Path) -> list[Row]:
    """Every transformers thread count and every world size of one model, all alive at once."""
    from transformers import AutoModelForCausalLM

    from tpi import LocalCluster

    path = model_dir(name, scratch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = prompt_ids(name, path, args.prompt_tokens, model.config.vocab_size)
    print(f"[{name}] {model.num_parameters() / 1e6:.1f}M parameters, prompt of {len(ids)} tokens", flush=True)
    configs = [(Row(name, "transformers", 1, t), hf_runner(model, ids, args.new_tokens, t))
               for t in args.hf_threads]
    # random checkpoints are split into the scratch folder, not into the shared cache
    cache_dir = None if name == "smollm2" else scratch / "splits"
    with ExitStack() as stack:
        for ws in args.world_sizes:
            cluster = stack.enter_context(LocalCluster(path, world_size=ws, threads=args.threads,
                                                       cache_dir=cache_dir))
            configs.append((Row(name, "tpi", ws, args.threads), tpi_runner(cluster, ids, args.new_tokens)))
        print(f"[{name}] clusters up: world sizes {args.world_sizes}; measuring", flush=True)
        return measure(configs, args.repeats)


# -- report ------------------------------------------------------------------------------------
def header(args: argparse.Namespace) -> str:
    cpus = os.cpu_count()
    hf_threads = ", ".join(map(str, args.hf_threads))
    bullets = [
        (f"{platform.machine()}, {cpus} logical CPUs, torch {torch.__version__}, "
         f"transformers {_transformers_version()}, float32"),
        (f"prompt {args.prompt_tokens} tokens, up to {args.new_tokens} new tokens (greedy); medians of "
         f"{args.repeats} rounds after one warm-up; every configuration is alive at once and each round measures "
         "every one once, in a new random order, so that the machine's drifts hit them alike"),
        (f"tpi: every rank its own process on loopback, {args.threads} torch thread(s) each; "
         f"transformers: one process, {hf_threads} thread(s)"),
        (f"**All processes share this machine's {cpus} cores: this measures tpi's overhead "
         "(process hops, ZeroMQ allreduces), not the speed-up of separate devices.**"),
        ("ratio = tpi / transformers with the thread count named (< 1: tpi is faster); tokens identical: "
         "every repeat's greedy tokens equal transformers' (the first thread count's)"),
        f"command: `{command_line('latency.py')}`",
    ]
    title = "# tpi latency: LocalCluster vs transformers, same weights"
    return "\n".join([title, "", *(f"- {b}" for b in bullets)])


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def latency_table(rows: list[Row], hf_threads: list[int]) -> str:
    """One markdown table: transformers rows first per model, tpi rows with ratios against them."""
    ratio_cols = [f"{what} ÷ HF {t}t" for t in hf_threads for what in ("TTFT", "ms/token")]
    cols = ["model", "runtime", "procs × threads", "TTFT ms", "ms/token", *ratio_cols, "new tokens",
            "tokens identical"]
    cells = []
    for row in rows:
        refs = [r for r in rows if r.model == row.model and r.runtime == "transformers"]
        ratios = [f"{v:.2f}" for ref in refs
                  for v in (row.ttft_ms / ref.ttft_ms, row.ms_per_token / ref.ms_per_token)]
        cells.append([row.model, row.runtime, f"{row.world_size} × {row.threads}", f"{row.ttft_ms:.1f}",
                      f"{row.ms_per_token:.2f}", *ratios, len(row.ids), "yes" if row.identical_to(refs[0]) else "no"])
    return table(cols, cells)


def plot(rows: list[Row], path: Path) -> bool:
    """ms/token against world size, one panel per model, transformers as horizontal lines."""
    models = list(dict.fromkeys(r.model for r in rows))

    def draw(axes: list) -> None:
        for ax, name in zip(axes, models):
            tpi = [r for r in rows if r.model == name and r.runtime == "tpi"]
            ax.plot([r.world_size for r in tpi], [r.ms_per_token for r in tpi], "o-", label="tpi LocalCluster")
            for i, r in enumerate(r for r in rows if r.model == name and r.runtime == "transformers"):
                ax.axhline(r.ms_per_token, color=f"C{i + 1}", ls="--", label=f"transformers, {r.threads} thread(s)")
            ax.set(title=name, xlabel="world size (processes)", ylabel="decode ms/token",
                   xticks=[r.world_size for r in tpi], ylim=(0, None))
            ax.legend(fontsize=8)

    return save_plot(path, draw, panels=len(models), panel_size=(5, 4),
                     title="Decode latency on one machine (ranks share the cores)")


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, help="timed runs per configuration (default 5; --quick: 1)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens to generate (default 32; --quick: 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    p.add_argument("--world-sizes", type=int_list, help="comma-separated (default 1,2,3; --quick: 1,2)")
    p.add_argument("--models", type=choice_list(MODELS), help=f"comma-separated from {','.join(MODELS)} "
                   "(default both; --quick: smollm2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per tpi rank process (default 1)")
    p.add_argument("--hf-threads", type=int_list, help="comma-separated thread counts for transformers "
                   "(default: the value of --threads), e.g. 1,2")
    p.add_argument("--quick", action="store_true", help="a fast smoke run")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 5)
    args.new_tokens = args.new_tokens or (8 if quick else 32)
    args.world_sizes = args.world_sizes or ([1, 2] if quick else [1, 2, 3])
    args.models = args.models or (["smollm2"] if quick else list(MODELS))
    args.hf_threads = args.hf_threads or [args.threads]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpi-bench-") as scratch:
        rows = [row for name in args.models for row in bench_model(name, args, Path(scratch))]
    report = f"{header(args)}\n\n{latency_table(rows, args.hf_threads)}\n"
    print("\n" + report)
    write_report(args.out, "latency.md", report)
    plot(rows, args.out / "latency.png")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
