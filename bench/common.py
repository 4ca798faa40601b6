"""What tpi's benchmarks share, so that each script holds only what it measures.

Owns:
- ``write_llama``: the one seeded random checkpoint factory. A Llama of a ``LlamaShape`` saved as
  a transformers folder (``LlamaConfig.save_pretrained`` and safetensors files with an index),
  written tensor by tensor so that even a 70B-shaped layer set never sits whole in memory; each
  tensor's values depend only on (seed, name, shape, dtype), so a shorter model of the same
  shape is a prefix of a longer one and can hard-link its files (``link_from``).
- ``rounds``: the rounds harness. A warm-up, then every configuration once per round, in a new
  random order each round with a short settle pause before each run; callers quote medians.
- ``table`` and ``write_report``: markdown tables and the files under ``bench/out``.
- ``save_plot``: a PNG through matplotlib when it is installed, a message when it is not.
- ``spawn_ranks``: rank processes, spawned (not forked), each with its torch threads set (and
  optionally pinned to a core) before it builds anything, exchanging addresses through the parent.
- Small helpers several scripts need: ``git_revision``, ``exit_on_sigterm``, ``drop_page_cache``,
  ``int_list``, the embedded model's chat prompt ids.

Does not know: what any benchmark measures, or tpi (nothing here imports it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import random
import shlex
import signal
import subprocess
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
SETTLE_S = 0.3  # idle before each timed run: the last run's OpenMP threads stop spinning and steal no core
GB, MB = 10**9, 10**6
# a SmolLM2 chat prompt, "What is ...", as token ids (the embedded model's tokenizer)
EMBEDDED_PROMPT_IDS = [1, 9690, 314, 253, 3575, 282, 4649, 47, 2]


# -- the random checkpoint ---------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """A Llama's dimensions; `head_dim` None: hidden // heads."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    head_dim: int | None = None
    tie_embeddings: bool = False
    max_position: int = 2048

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def with_layers(self, layers: int | None) -> LlamaShape:
        return self if layers is None else dataclasses.replace(self, layers=layers)


SHAPES = {
    "random100m": LlamaShape(768, 2048, 12, 12, 4, tie_embeddings=True),  # ~100M, latency.py
    "llama850m": LlamaShape(2048, 5632, 16, 16, 4),  # ~850M at 16 layers: streaming.py, split_memory.py
    "tinyllama": LlamaShape(2048, 5632, 22, 32, 4),  # TinyLlama-1.1B: blocks of 19/69 MB in bf16
    "llama7b": LlamaShape(4096, 11008, 4, 32, 32),  # 4 layers of Llama-2-7B: blocks of 134/270 MB in bf16
    "llama70b": LlamaShape(8192, 28672, 80, 64, 8, max_position=4096),  # Llama-2-70B's layers
}
Spec = tuple[str, tuple[int, ...]]


def tensor_specs(shape: LlamaShape) -> list[Spec]:
    """Names and shapes of the checkpoint's tensors, in the order transformers writes them."""
    d, f, hd = shape.hidden, shape.intermediate, shape.dim
    specs: list[Spec] = [("model.embed_tokens.weight", (shape.vocab, d))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (shape.heads * hd, d)),
                  (p + "self_attn.k_proj.weight", (shape.kv_heads * hd, d)),
                  (p + "self_attn.v_proj.weight", (shape.kv_heads * hd, d)),
                  (p + "self_attn.o_proj.weight", (d, shape.heads * hd)),
                  (p + "post_attention_layernorm.weight", (d,)), (p + "mlp.gate_proj.weight", (f, d)),
                  (p + "mlp.up_proj.weight", (f, d)), (p + "mlp.down_proj.weight", (d, f))]
    specs.append(("model.norm.weight", (d,)))
    return specs if shape.tie_embeddings else [*specs, ("lm_head.weight", (shape.vocab, d))]


def checkpoint_bytes(shape: LlamaShape, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for _, s in tensor_specs(shape)) * dtype.itemsize


def _file_groups(specs: list[Spec], dtype: torch.dtype, shard_bytes: int | None) -> dict[str, list[Spec]]:
    """File name -> its tensors: the embedding, one file per layer, the head (`shard_bytes` None);
    else consecutive tensors in files of at most `shard_bytes` (a larger tensor alone)."""
    if shard_bytes is None:
        groups: dict[str, list[Spec]] = {}
        for spec in specs:
            groups.setdefault(_own_file(spec[0]), []).append(spec)
        return groups
    chunks: list[list[Spec]] = [[]]
    for spec in specs:
        size = sum(math.prod(s) for _, s in chunks[-1]) * dtype.itemsize
        if chunks[-1] and size + math.prod(spec[1]) * dtype.itemsize > shard_bytes:
            chunks.append([])
        chunks[-1].append(spec)
    return {f"model-{i:05d}-of-{len(chunks):05d}.safetensors": c for i, c in enumerate(chunks, 1)}


def _own_file(tensor: str) -> str:
    if tensor.startswith("model.layers."):
        return f"layer-{int(tensor.split('.')[2]):03d}.safetensors"
    return "embed.safetensors" if "embed_tokens" in tensor else "head.safetensors"


def _draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One tensor: norms 1, everything else N(0, 0.02) drawn in float32 from a generator seeded by
    (seed, name) alone, as transformers initialises a Llama."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(0.02).to(dtype)


def write_llama(path: str | os.PathLike, shape: LlamaShape, dtype: torch.dtype = torch.float32, seed: int = 0,
                shard_bytes: int | None = None, link_from: Path | None = None) -> int:
    """Save a seeded random Llama of `shape` in `dtype` to the folder `path` (config, safetensors
    files, index), one file at a time; return its parameter count. `shard_bytes`: files of at most
    that many bytes instead of one per layer. `link_from`: a folder written by this function with
    the same shape (but more layers), dtype and seed, whose files of the same name are hard-linked
    instead of written (one per layer only)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=shape.dim, vocab_size=shape.vocab, max_position_embeddings=shape.max_position,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shape.tie_embeddings,
                bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no EOS: every run makes all its tokens
                dtype=str(dtype).removeprefix("torch.")).save_pretrained(path)
    specs = tensor_specs(shape)
    weight_map = {}
    for name, group in _file_groups(specs, dtype, shard_bytes).items():
        if link_from is not None and shard_bytes is None and (Path(link_from) / name).exists():
            os.link(Path(link_from) / name, path / name)
        else:
            save_file({n: _draw(n, s, dtype, seed) for n, s in group}, str(path / name), metadata={"format": "pt"})
        weight_map.update({n: name for n, _ in group})
    index = {"metadata": {"total_size": checkpoint_bytes(shape, dtype)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return sum(math.prod(s) for _, s in specs)


# -- rounds --------------------------------------------------------------------------------------
T = TypeVar("T")


def rounds(runs: Mapping[str, Callable[[], T]], n: int, *, warmup: int = 1, settle_s: float = SETTLE_S,
           seed: int = 0, report: Callable[[int, str, T], None] | None = None) -> dict[str, list[T]]:
    """Each run's samples, in round order: `warmup` passes over every run (not kept), then `n`
    rounds, each visiting every run once in a new random order (seeded: the same on every rank
    that calls this with the same names), with `settle_s` of idle before each. A new order each
    round makes the machine's drifts hit every configuration alike, and no run always pays for
    the same predecessor's aftermath (threads still spinning, caches it evicted), as a fixed
    rotation would make it. `report(round, name, sample)` after each timed run."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    order, names = random.Random(seed), list(runs)
    out: dict[str, list[T]] = {name: [] for name in names}
    for k in range(n):
        for name in order.sample(names, len(names)):
            if settle_s:
                time.sleep(settle_s)
            out[name].append(runs[name]())
            if report is not None:
                report(k, name, out[name][-1])
    return out


# -- reports -------------------------------------------------------------------------------------
def table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; `align`: one letter per column, "l" or "r" (default: neither)."""
    rule = [{"l": ":---", "r": "---:"}.get(a, "---") for a in (align or "-" * len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, text: str) -> Path:
    """`text` into out_dir/name (the folder made if needed); says where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote {path}", flush=True)
    return path


def save_plot(path: Path, draw: Callable[[list], None], panels: int = 1, panel_size: tuple[float, float] = (5.5, 4.2),
              title: str | None = None) -> bool:
    """A PNG of `panels` axes side by side, drawn by `draw(axes)`; False, with a message, when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (pip install matplotlib)", flush=True)
        return False
    fig, axes = plt.subplots(1, panels, figsize=(panel_size[0] * panels, panel_size[1]), squeeze=False)
    draw(list(axes[0]))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return True


def git_revision() -> str:
    """The repository's commit, with "+ uncommitted changes" when tpi/ or launcher/ differ from it."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tpi", "launcher"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision"
    return f"commit {rev}" + (" + uncommitted changes in tpi/ or launcher/" if dirty else "")


def command_line(script: str) -> str:
    """How this script was run, for a report: `python bench/<script> <args>`."""
    return shlex.join(["python", f"bench/{script}", *sys.argv[1:]])


# -- small helpers -------------------------------------------------------------------------------
def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so that `finally` blocks (temporary files, child processes) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Write back, then ask the kernel to forget the cached pages of `paths` (posix_fadvise)."""
    os.sync()  # dirty pages cannot be dropped
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def int_list(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (for argparse)."""
    return [int(x) for x in text.split(",") if x.strip()]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: "a,b" -> ["a", "b"], each one of `choices` (else a message naming them)."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return names

    return parse


# -- rank processes ------------------------------------------------------------------------------
class RankLink:
    """A spawned rank's line to the parent: ``allgather(value)`` gives every rank's value, in rank
    order, once every rank has sent its own (addresses, before connecting)."""

    def __init__(self, rank: int, world_size: int, up, down, timeout: float):
        self.rank, self.world_size, self._up, self._down, self._timeout = rank, world_size, up, down, timeout

    def allgather(self, value: Any) -> list:
        self._up.put(("gather", self.rank, value))
        return self._down.get(timeout=self._timeout)


def _rank_entry(target: Callable, rank: int, world_size: int, args: Any, threads: int, pin: bool, up, down,
                timeout: float) -> None:
    """A spawned rank: torch threads set and the core pinned before anything is built (ZeroMQ's I/O
    thread inherits the affinity), then target(rank, world_size, args, link); its return value or
    its traceback goes to the parent."""
    try:
        torch.set_num_threads(threads)
        if pin and hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[rank % len(cores)]})
        up.put(("result", rank, target(rank, world_size, args, RankLink(rank, world_size, up, down, timeout))))
    except BaseException:
        up.put(("error", rank, traceback.format_exc()))


def spawn_ranks(target: Callable, world_size: int, args: Any, *, threads: int = 1, pin: bool = False,
                timeout: float = 1800.0) -> list:
    """Every rank's return value of `target(rank, world_size, args, link)`, each rank a spawned
    process with `threads` torch threads (`pin`: on core rank mod cores). `target` and `args` must
    pickle (a module-level function). A rank that fails or dies raises here, naming it."""
    ctx = mp.get_context("spawn")
    up, downs = ctx.Queue(), [ctx.Queue() for _ in range(world_size)]
    procs = [ctx.Process(target=_rank_entry, args=(target, r, world_size, args, threads, pin, up, downs[r], timeout),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _serve_ranks(procs, up, downs, timeout)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _serve_ranks(procs: list, up, downs: list, timeout: float) -> list:
    """The parent's side: answer allgathers, collect results, notice a rank that died silently."""
    world_size, gathered, results = len(procs), {}, {}
    deadline = time.monotonic() + timeout
    while len(results) < world_size:
        try:
            kind, rank, value = up.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"rank(s) {dead} exited with {[procs[r].exitcode for r in dead]}" if dead
                                   else f"the ranks did not finish within {timeout:.0f}s") from None
            continue
        if kind == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        if kind == "result":
            results[rank] = value
            continue
        gathered[rank] = value
        if len(gathered) == world_size:
            for d in downs:
                d.put([gathered[r] for r in range(world_size)])
            gathered = {}
    return [results[r] for r in range(world_size)]
