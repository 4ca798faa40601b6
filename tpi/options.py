"""The options a rank runs with, as frozen dataclasses validated once, wherever they come from.

Owns: the value sets of every named choice (``Collective``, ``PayloadName``, ``OffloadMode``,
``DType``: ``Literal`` types whose values argparse's ``choices`` and pydantic both read, through
``choices``), and the four option groups: ``MemoryOptions`` (budget, window, streaming),
``OffloadOptions`` (a GPU's budget and the CPU/GPU offload of the blocks it cannot hold),
``CommOptions`` (collective, payload, timeouts, CURVE keys) and ``RankOptions`` (threads, context,
the compute mode on quantized weights and the groups above). The command line (launcher/cli.py),
cluster configs (through the command lines launch.py writes) and ``LocalCluster``'s keywords all
build these same objects, and every value is checked in ``__post_init__`` with an error that
names it. Does not know: what the
options do (open_rank.py, the offload package, comm/).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Literal, get_args

from tpi.comm.security import Curve
from tpi.config import ConfigError, parse_bytes
from tpi.quant.kernels import Compute

Collective = Literal["star", "ring", "tree", "gloo", "auto"]
PayloadName = Literal["float32", "float16", "bfloat16", "q8", "q8_64"]
OffloadMode = Literal["blocks", "rows"]
DType = Literal["float32", "bfloat16", "float16"]
QuantName = Literal["none", "float", "int8", "int4"]  # the CLI's --quant: "none" keeps the checkpoint's format
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def choices(kind) -> tuple[str, ...]:
    """The values of a ``Literal`` type, in order (for argparse's ``choices``)."""
    return get_args(kind)


def check_choice(value: object, kind, name: str) -> None:
    if value not in choices(kind):
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices(kind))}")


@dataclass(frozen=True)
class MemoryOptions:
    """How a rank keeps its weights in host memory."""

    memory_budget: int | str | None = None  # None: keep every block resident
    window: int | None = None  # streamed buffers; None: chosen from the budget
    drop_page_cache: bool = False  # drop what streaming read from the page cache (measure the disk)
    stream_all: bool = False  # pin nothing whatever the budget: for measuring and testing streaming
    verify_shards: bool = True  # sha256 of this rank's files at start (sizes are always checked)

    def __post_init__(self) -> None:
        parse_bytes(self.memory_budget)
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ConfigError(f"window={self.window!r}: expected an integer >= 1")

    @property
    def budget_bytes(self) -> int | None:
        return parse_bytes(self.memory_budget)


@dataclass(frozen=True)
class OffloadOptions:
    """A rank with a GPU: what lives there, and how the blocks that do not fit are offloaded.

    Blocks that fit ``gpu_memory_budget`` (with the KV cache) stay on the GPU; the others stay in
    host memory (or stream from disk) and are offloaded: ``mode`` "blocks" computes attention
    blocks on the GPU from a copy and every other block (FFN, LM-head chunk) on both at once, on
    disjoint columns; "rows" divides every projection of every host block by output rows.
    ``share`` is the GPU's share of the host blocks (blocks: of their bytes; rows: of each
    projection's rows); None: measured at start with a GPU, no offload without one. With device
    "cpu" a share runs the offload with both parts on the CPU (how CI tests it)."""

    device: str = "cpu"  # "cuda" / "cuda:1": KV cache and the blocks that fit on the GPU
    gpu_memory_budget: int | str | None = None  # None with a GPU: 90% of its free memory
    mode: OffloadMode = "blocks"
    share: float | None = None
    prefetch: bool = True  # copy the next host blocks' GPU parts while this one computes
    # blocks mode on a GPU, no share given: time this rank's own step over a grid of shares (a few
    # seconds at start) and keep the fastest; False: the share predicted from the measured rates
    tune: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device={self.device!r}: expected cpu, cuda or cuda:N")
        check_choice(self.mode, OffloadMode, "offload_mode")
        parse_bytes(self.gpu_memory_budget, "gpu_memory_budget")
        if self.share is not None and not (isinstance(self.share, (int, float)) and 0.0 <= self.share <= 1.0):
            raise ConfigError(f"offload_share={self.share!r}: expected a number in [0, 1]")


@dataclass(frozen=True)
class CommOptions:
    """How a rank talks to the others."""

    # master: the allreduce it runs (None: the star); worker: None follows the master's choice,
    # "star" opens no link port, any other refuses a master that runs something else
    collective: Collective | None = None
    payload: PayloadName | None = None  # partials on the wire; None: the model's dtype
    step_timeout: float = 60.0  # seconds to wait for a peer within a step
    join_timeout: float = 300.0  # seconds to wait for the cluster to form
    lost_timeout: float = 3.0  # heartbeats: a peer silent this long is declared lost
    curve: Curve | None = None  # CURVE keys: this node's pair and its peers' public keys

    def __post_init__(self) -> None:
        if self.collective is not None:
            check_choice(self.collective, Collective, "collective")
        if self.payload is not None:
            check_choice(self.payload, PayloadName, "payload")
        if self.collective == "gloo" and self.payload in ("q8", "q8_64"):
            raise ConfigError("payload q8 cannot be summed by gloo: use collective star, ring or tree for q8")
        if self.curve is not None and self.collective not in (None, "star"):
            raise ConfigError(f"collective {self.collective!r} runs over links without CURVE: use the star with keys")
        for name in ("step_timeout", "join_timeout", "lost_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}={value!r}: expected a positive number of seconds")

    @property
    def master_collective(self) -> Collective:
        return self.collective or "star"


@dataclass(frozen=True)
class RankOptions:
    """Everything one rank needs to hold and run its share of the model."""

    threads: int = 1  # torch threads of the rank's process (and of its loader and offload threads)
    max_context: int | None = None  # KV cache length; None: min(model max, 4096)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    offload: OffloadOptions = field(default_factory=OffloadOptions)
    # (folder, n): the n ranks of this machine (LocalCluster's) meet there to measure the offload
    # at the same time, each seeing the others' load; None: measure alone
    peers: tuple[str, int] | None = None
    # quantized weights: "exact" (float32 activations, results as the dequantized weights give) or
    # "fast" (bfloat16 activations through torch's int4 kernel); None: fast. Float weights ignore it
    compute: Compute | None = None
    # tokens of a prompt run in one step: the bound on activations every rank's budget keeps room
    # for (a smaller chunk leaves more of a tight budget to the weights); every rank must use the same
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or not 1 <= self.threads <= 1024:
            raise ConfigError(f"threads={self.threads!r}: expected an integer from 1 to 1024")
        if self.compute is not None:
            check_choice(self.compute, Compute, "compute")
        if not isinstance(self.prefill_chunk, int) or isinstance(self.prefill_chunk, bool) or \
                not 1 <= self.prefill_chunk <= 65536:
            raise ConfigError(f"prefill_chunk={self.prefill_chunk!r}: expected an integer from 1 to 65536")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 1):
            raise ConfigError(f"max_context={self.max_context!r}: expected an integer >= 1")


# LocalCluster's keywords: each sets one field of one option group
KEYWORDS = {
    "threads": ("rank", "threads"), "max_context": ("rank", "max_context"), "compute": ("rank", "compute"),
    "prefill_chunk": ("rank", "prefill_chunk"),
    "memory_budget": ("memory", "memory_budget"), "window": ("memory", "window"),
    "drop_page_cache": ("memory", "drop_page_cache"), "stream_all": ("memory", "stream_all"),
    "verify_shards": ("memory", "verify_shards"),
    "device": ("offload", "device"), "gpu_memory_budget": ("offload", "gpu_memory_budget"),
    "offload_mode": ("offload", "mode"), "offload_share": ("offload", "share"), "offload_tune": ("offload", "tune"),
    "offload_prefetch": ("offload", "prefetch"),
    "collective": ("comm", "collective"), "payload": ("comm", "payload"), "step_timeout": ("comm", "step_timeout"),
    "start_timeout": ("comm", "join_timeout"), "lost_timeout": ("comm", "lost_timeout"),
}
DEPRECATED = {"split_mode": "offload_mode", "split_ratio": "offload_share"}  # old keyword -> its new name


def deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


def from_keywords(world_size: int, rank: RankOptions | None = None, comm: CommOptions | None = None,
                  **keywords) -> tuple[list[RankOptions], CommOptions]:
    """`rank` and `comm` (defaults if None) with the fields `keywords` name (``KEYWORDS``) set: one
    RankOptions per rank (memory_budget may also be a list, one budget per rank) and the
    CommOptions. An unknown keyword is refused with the ones there are."""
    rank, comm = rank or RankOptions(), comm or CommOptions()
    groups: dict[str, dict] = {"rank": {}, "memory": {}, "offload": {}, "comm": {}}
    for name, value in keywords.items():
        if name in DEPRECATED:
            deprecated(name, DEPRECATED[name])
            name = DEPRECATED[name]
        if name not in KEYWORDS:
            raise ConfigError(f"unknown option {name!r}; expected one of {', '.join(KEYWORDS)}")
        group, fld = KEYWORDS[name]
        groups[group][fld] = value
    budgets = groups["memory"].pop("memory_budget", rank.memory.memory_budget)
    budgets = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets] * world_size
    if len(budgets) != world_size:
        raise ConfigError(f"memory_budget has {len(budgets)} values; expected one per rank, {world_size}")
    offload = dataclasses.replace(rank.offload, **groups["offload"])
    ranks = [dataclasses.replace(rank, memory=dataclasses.replace(rank.memory, memory_budget=b, **groups["memory"]),
                                 offload=offload, **groups["rank"]) for b in budgets]
    return ranks, dataclasses.replace(comm, **groups["comm"])
