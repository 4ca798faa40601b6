"""Quality of quantized weights: perplexity on a fixed English text, and whether the fast path's
greedy tokens are the exact path's.

Measures, for each model (the embedded SmolLM2-135M-Instruct, and a seeded random Llama with
SmolLM2's vocabulary so that the text tokenizes the same) and each weight setting (``--settings``:
float32; int8 at group size 32 and int4 at 32, 64 and 128; int4 at group 32 with the embedding
and LM head quantized too; the embedded model's GGUF file as shipped), in each compute mode
(``--computes``: "exact", float32 activations; "fast", bfloat16 through torch's int4 kernel;
float32 weights compute one way only):

- perplexity on ``bench/data/pride_and_prejudice.txt`` (chapters I-IV of Pride and Prejudice,
  5,800 SmolLM2 tokens; bench/data/README.md), in consecutive windows of ``--window`` tokens (1024),
  each a fresh sequence starting where the previous one ended: every token of a window but its
  first is predicted from the window's tokens before it; perplexity = exp(mean NLL) over all of
  them. Each window is prefilled in steps of ``--prefill-chunk`` tokens (64): fast compute uses
  torch's int4 kernel on steps of at most 64 tokens and dequantizes (as exact) beyond, so steps of
  64 score the text as decoding computes each token. Beside it, against float32 on the same
  positions: how often the top-1 token is float32's, and the mean |NLL - float32's NLL| per token
  (a random model's perplexity sits near its vocabulary size, so these show its relative error
  where the ratio of perplexities cannot);
- greedy agreement of fast with exact (settings in ``--greedy``: int4 g32 and the GGUF): up to
  ``--new-tokens`` (64) greedy tokens after each of 10 chat prompts, counting the tokens identical
  before the first divergence and the prompts whose tokens are identical throughout.

One ``InProcessCluster`` per (setting, compute), world size 1 by default, its split cached in a
temporary folder (exact and fast share a split); the split's bytes on disk are reported.

Writes the tables to stdout and bench/out/quality.md (rewritten after every run, so a long run
leaves what it has). Does not know: tpi's internals beyond ``InProcessCluster``.

    python bench/quality.py                     # both models, every setting: about half an hour
    python bench/quality.py --quick             # smoke run: SmolLM2, 128 tokens, 2 prompts, about a minute
    python bench/quality.py --models random --settings float32,int8
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    BENCH_DIR,
    OUT_DIR,
    LlamaShape,
    choice_list,
    command_line,
    git_revision,
    table,
    write_llama,
    write_report,
)

TEXT = BENCH_DIR / "data" / "pride_and_prejudice.txt"
MODELS = ("smollm2", "random")
# the random model: SmolLM2's vocabulary (49152) and tied embedding, hidden 512, 4 layers (~38M parameters)
RANDOM = LlamaShape(512, 1536, 4, 8, 4, vocab=49152, tie_embeddings=True)
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "Write a short story about a lighthouse keeper.",
    "How do I make a good cup of tea?",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "Summarize the plot of Romeo and Juliet.",
)


@dataclass(frozen=True)
class Setting:
    """A weight format as InProcessCluster takes it; `gguf`: the embedded model's .gguf file as shipped."""

    label: str
    quant: str | None = None
    group_size: int = 32
    head: bool = False
    gguf: bool = False

    @property
    def computes(self) -> tuple[str, ...]:
        return ("exact",) if self.quant is None and not self.gguf else ("exact", "fast")


SETTINGS = {
    "float32": Setting("float32"),
    "int8": Setting("int8 g32", "int8"),
    "int4-g32": Setting("int4 g32", "int4"),
    "int4-g64": Setting("int4 g64", "int4", 64),
    "int4-g128": Setting("int4 g128", "int4", 128),
    "int4-g32-head": Setting("int4 g32 + head", "int4", head=True),
    "gguf": Setting("GGUF Q4_1 (as shipped)", gguf=True),
}


@dataclass
class Result:
    """One (model, setting, compute): per predicted token its NLL and top-1 id, and the greedy tokens."""

    model: str
    key: str
    compute: str
    split_bytes: int
    seconds: float
    nll: torch.Tensor  # [tokens predicted] float64
    top1: torch.Tensor  # [tokens predicted] int64
    greedy: list[list[int]] = field(default_factory=list)
    refused: str | None = None  # tpi's ConfigError: the setting does not fit the model (a group cuts a slice)

    @property
    def setting(self) -> Setting:
        return SETTINGS[self.key]

    @property
    def perplexity(self) -> float:
        return float(self.nll.mean().exp())


# -- inputs --------------------------------------------------------------------------------------
def tokenizer():
    from transformers import AutoTokenizer

    from tpi.embedded import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def text_ids(tok, limit: int | None) -> list[int]:
    """The text's token ids (no BOS: SmolLM2's tokenizer adds none), the first `limit` of them."""
    ids = tok(TEXT.read_text(encoding="utf-8"))["input_ids"]
    return ids[:limit] if limit else ids


def prompt_ids(tok, n: int) -> list[list[int]]:
    """The first `n` prompts, each as a user message under SmolLM2's chat template."""
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in PROMPTS[:n]]


def model_path(name: str, setting: Setting, scratch: Path) -> Path:
    """The checkpoint a setting starts from: the embedded model's float32 folder or its .gguf file,
    or the random Llama (written once into `scratch`)."""
    if name == "smollm2":
        from tpi.embedded import default_model_dir, gguf_path

        return gguf_path() if setting.gguf else default_model_dir()
    path = scratch / "random"
    if not (path / "config.json").is_file():
        n = write_llama(path, RANDOM, seed=0)
        print(f"[random] wrote a seeded random Llama of {n / 1e6:.1f}M parameters in {path}", flush=True)
    return path


# -- measurement ---------------------------------------------------------------------------------
@torch.inference_mode()
def score(cluster, ids: Sequence[int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted token: NLL and the top-1 id, over consecutive windows of `window` tokens."""
    nll, top1 = [], []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = cluster.forward(chunk)  # [L, V] float32
        target = torch.tensor(chunk[1:])
        nll.append(F.cross_entropy(logits[:-1].double(), target, reduction="none"))
        top1.append(logits[:-1].argmax(-1))
    return torch.cat(nll), torch.cat(top1)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix != ".lock")


def run_setting(name: str, key: str, compute: str, ids: list[int], prompts: list[list[int]], args: argparse.Namespace,
                scratch: Path) -> Result:
    """One cluster: the text's scores, then (for a setting in --greedy) the greedy tokens of every prompt."""
    from tpi.config import ConfigError
    from tpi.inprocess import InProcessCluster

    setting = SETTINGS[key]
    cache = scratch / "splits" / name / key  # exact and fast share it; one split per folder
    greedy = key in args.greedy and len(setting.computes) > 1
    context = max([args.window, *(len(p) + args.new_tokens for p in prompts)]) if greedy else args.window
    t0 = time.perf_counter()
    cluster = InProcessCluster(model_path(name, setting, scratch), args.world_size, quant=setting.quant,
                               group_size=setting.group_size, quant_head=setting.head, cache_dir=cache,
                               compute=compute if len(setting.computes) > 1 else None, threads=args.threads,
                               max_context=context, prefill_chunk=args.prefill_chunk)
    try:
        cluster.start()
    except ConfigError as e:
        print(f"[{name}] {setting.label:24s} {compute:5s} refused: {e}", flush=True)
        return Result(name, key, compute, 0, 0.0, torch.empty(0), torch.empty(0), refused=str(e))
    with cluster:
        t1 = time.perf_counter()
        nll, top1 = score(cluster, ids, args.window)
        t2 = time.perf_counter()
        tokens = [cluster.generate(p, args.new_tokens) for p in prompts] if greedy else []
    result = Result(name, key, compute, dir_bytes(cache), t2 - t1, nll, top1, tokens)
    print(f"[{name}] {setting.label:24s} {compute:5s} perplexity {result.perplexity:10.4f}  start {t1 - t0:5.1f} s, "
          f"text {t2 - t1:6.1f} s" + (f", greedy {time.perf_counter() - t2:5.1f} s" if greedy else ""), flush=True)
    return result


def runs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(model, setting, compute) in run order; a GGUF only for the embedded model."""
    return [(name, key, compute) for name in args.models for key in args.settings
            if not (SETTINGS[key].gguf and name != "smollm2") for compute in SETTINGS[key].computes
            if compute in args.computes]


# -- report --------------------------------------------------------------------------------------
def perplexity_table(results: list[Result]) -> str:
    cols = ["model", "setting", "compute", "split MB", "perplexity", "÷ float32", "top-1 = float32",
            "mean abs ΔNLL", "text s"]
    rows = []
    for r in (r for r in results if r.refused is None):
        ref = next((b for b in results if b.model == r.model and b.key == "float32"), None)
        same = ref is not None and len(ref.nll) == len(r.nll)
        rows.append([r.model, r.setting.label, r.compute, f"{r.split_bytes / 1e6:.1f}", f"{r.perplexity:.4f}",
                     f"{r.perplexity / ref.perplexity:.4f}" if same else "-",
                     f"{(r.top1 == ref.top1).double().mean():.2%}" if same else "-",
                     f"{(r.nll - ref.nll).abs().mean():.5f}" if same else "-", f"{r.seconds:.0f}"])
    return table(cols, rows, "lllrrrrrr")


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement_table(results: list[Result]) -> str:
    cols = ["model", "setting", "identical before divergence", "prompts identical", "per prompt (exact tokens)"]
    rows = []
    for fast in (r for r in results if r.compute == "fast" and r.greedy):
        exact = next((r for r in results if (r.model, r.key, r.compute) == (fast.model, fast.key, "exact")), None)
        if exact is None:
            continue
        prefix = [common_prefix(e, f) for e, f in zip(exact.greedy, fast.greedy)]
        total = sum(len(e) for e in exact.greedy)
        same = sum(e == f for e, f in zip(exact.greedy, fast.greedy))
        per = ", ".join(f"{p}/{len(e)}" for p, e in zip(prefix, exact.greedy))
        rows.append([fast.model, fast.setting.label, f"{sum(prefix)}/{total} ({sum(prefix) / total:.0%})",
                     f"{same}/{len(prefix)}", per])
    return table(cols, rows, "llrrl")


def int8_check(results: list[Result]) -> list[str]:
    """The issue's bar: int8 within 1% of float32's perplexity."""
    out = []
    for r in (r for r in results if r.key == "int8"):
        ref = next((b for b in results if b.model == r.model and b.key == "float32"), None)
        if ref is not None:
            rel = r.perplexity / ref.perplexity - 1
            out.append(f"{r.model}, int8 {r.compute}: {rel:+.3%} against float32 "
                       f"({'within' if abs(rel) <= 0.01 else 'NOT within'} 1%)")
    return out


def report(results: list[Result], args: argparse.Namespace, n_tokens: int, revision: str, seconds: float,
           done: bool) -> str:
    windows = -(-n_tokens // args.window)
    bullets = [
        f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, tpi at {revision} (at start)",
        (f"text: {TEXT.relative_to(BENCH_DIR.parent)}, {n_tokens} SmolLM2 tokens in {windows} consecutive windows "
         f"of {args.window} (each a fresh sequence starting where the previous ended; every token but a window's "
         f"first is predicted: {n_tokens - windows} in all)"),
        (f"InProcessCluster, world size {args.world_size}, {args.threads} torch thread(s), prefill in steps of "
         f"{args.prefill_chunk} tokens; compute exact = weights dequantized, float32 activations; fast = bfloat16 "
         "through torch's int4 kernel for int4 weights in steps of at most 64 tokens (beyond, and for int8 or "
         "Q8_0 weights, as exact); float32 weights compute one way"),
        (f"models: smollm2 = the embedded SmolLM2-135M-Instruct (its float32 folder is the Q4_1 GGUF dequantized); "
         f"random = a seeded random Llama (hidden {RANDOM.hidden}, FFN {RANDOM.intermediate}, {RANDOM.layers} layers, "
         f"{RANDOM.heads} heads, {RANDOM.kv_heads} KV heads, vocab {RANDOM.vocab}, tied), whose perplexity sits near "
         "its vocabulary size: read it for relative error"),
        (f"greedy: up to {args.new_tokens} new tokens after each of {args.prompts} chat prompts, fast against exact; "
         "identical before divergence = tokens before the first that differs (summed), prompts identical = every "
         "token equal"),
        ("split MB: the split's files on disk; text s: seconds to score the text; top-1 = float32: predicted "
         "positions whose top-1 token is float32's; mean abs ΔNLL: per token, against float32"),
        f"command: `{command_line('quality.py')}`; {seconds / 60:.1f} min" + ("" if done else " so far (partial)"),
    ]
    parts = ["# tpi quality: perplexity and greedy agreement of quantized weights", "",
             *(f"- {b}" for b in bullets), "", "## Perplexity", "", perplexity_table(results)]
    notes = [*int8_check(results), *(f"{r.model}, {r.setting.label}: refused by tpi: {r.refused}"
                                      for r in results if r.refused)]
    if notes:
        parts += ["", *(f"- {n}" for n in notes)]
    if any(r.greedy for r in results):
        parts += ["", "## Greedy agreement, fast against exact", "", agreement_table(results)]
    return "\n".join(parts) + "\n"


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=choice_list(MODELS), help=f"comma-separated from {','.join(MODELS)} "
                   "(default both; --quick: smollm2)")
    p.add_argument("--settings", type=choice_list(list(SETTINGS)), help=f"comma-separated from {','.join(SETTINGS)} "
                   "(default all; --quick: float32,int4-g32,gguf)")
    p.add_argument("--computes", type=choice_list(["exact", "fast"]), default=["exact", "fast"],
                   help="comma-separated (default exact,fast)")
    p.add_argument("--greedy", type=choice_list(list(SETTINGS)), default=["int4-g32", "gguf"],
                   help="settings whose fast and exact greedy tokens are compared (default int4-g32,gguf)")
    p.add_argument("--window", type=int, help="tokens per window (default 1024; --quick: 128)")
    p.add_argument("--prefill-chunk", type=int, default=64, help="tokens per prefill step (default 64: fast compute "
                   "uses the int4 kernel up to 64 rows and is exact beyond, so 64 scores what decoding computes)")
    p.add_argument("--tokens", type=int, help="score only the text's first N tokens (default all; --quick: 128)")
    p.add_argument("--prompts", type=int, help=f"greedy prompts, at most {len(PROMPTS)} (default all; --quick: 2)")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default 64; --quick: 8)")
    p.add_argument("--world-size", type=int, default=1, help="ranks (default 1; changes nothing beyond ~1e-6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = p.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["smollm2"] if quick else list(MODELS))
    args.settings = args.settings or (["float32", "int4-g32", "gguf"] if quick else list(SETTINGS))
    args.window = args.window or (128 if quick else 1024)
    args.tokens = args.tokens or (128 if quick else None)
    args.prompts = min(args.prompts or (2 if quick else len(PROMPTS)), len(PROMPTS))
    args.new_tokens = args.new_tokens or (8 if quick else 64)
    if args.window < 2:
        p.error(f"--window={args.window}: expected at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    tok = tokenizer()
    ids, prompts = text_ids(tok, args.tokens), prompt_ids(tok, args.prompts)
    revision, results = git_revision(), []
    todo = runs(args)
    print(f"{len(ids)} tokens in windows of {args.window}; {len(todo)} runs", flush=True)
    with tempfile.TemporaryDirectory(prefix="tpi-quality-") as scratch:
        for i, (name, key, compute) in enumerate(todo):
            if any(r.refused and (r.model, r.key) == (name, key) for r in results):
                continue  # refused at the split: the other compute would be too
            results.append(run_setting(name, key, compute, ids, prompts, args, Path(scratch)))
            text = report(results, args, len(ids), revision, time.perf_counter() - start, done=i == len(todo) - 1)
            write_report(args.out, "quality.md", text)  # after every run: a long run leaves what it has
    print("\n" + text)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
