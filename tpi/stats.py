"""What a rank reports about itself and what the master knows of its workers, as dataclasses.

Owns: ``RankStats`` (one rank's counters since start: memory as the OS sees it, weights read and
waited for, compute, allreduce, residency, the CPU/GPU offload) and ``Health`` (which workers are
connected, which are missing and why, their hosts and pids). Dicts appear only at the edges:
``to_wire`` / ``from_wire`` for a STATS_REPLY's info map (every field's type checked when read
back) and ``to_dict`` for HTTP and the local control channel. Does not know: how the figures are
measured (rank_model.py, the scheduler, comm/), sockets.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, fields

# names of the CPU/GPU offload's fields before it was called "offload" (deprecated dict keys)
_OLD_NAMES = {"split_ratio": "offload_share", "split_mode": "offload_mode", "split_gpu_share": "offload_gpu_share",
              "split_slot_bytes": "offload_slot_bytes"}


@dataclass(frozen=True)
class RankStats:
    """One rank's figures since start (per token: divide by the tokens generated)."""

    rank: int
    peak_rss_bytes: int  # VmHWM: the peak resident set as the OS counts it
    rss_bytes: int
    bytes_read: int  # weight bytes read from disk since start (the start-up load not counted)
    stall_s: float  # time waiting for streamed weights
    allreduce_s: float
    allreduce_calls: int
    steps: int
    loads: int  # streamed block loads
    compute_s: float  # time in steps less the stall and the allreduce
    pinned_blocks: int
    streamed_blocks: int
    window: int  # streamed buffers (0: everything resident)
    max_streamed_held: int  # the most window buffers ever holding or loading a block
    planned_bytes: int  # fixed + pinned + window buffers (+ a resident embedding's copy)
    fixed_bytes: int  # runtime, KV cache, activations
    activation_bytes: int  # of fixed_bytes: the bound on one prefill chunk's temporaries
    needed_min_bytes: int  # the least budget that works
    block_bytes: int  # this rank's host blocks
    largest_block_bytes: int
    kv_cache_bytes: int
    device: str = "cpu"
    gpu_blocks: int = 0  # blocks resident on the accelerator
    fetched_bytes: int = 0  # shard bytes this worker downloaded from the master at start
    weight_bytes: int = 0  # weights this rank holds or streams, as stored (quantized or not)
    weight_format: str = ""  # "int8", "int4", "gguf" (and the compute mode: "int4/fast"); "": floats
    refused_messages: int = 0  # on the master: hostile or malformed input refused
    offload_mode: str = ""  # "blocks" or "rows"; "": no offload
    offload_share: float = 0.0  # the accelerator's share of the host blocks (as configured or chosen)
    offload_gpu_share: float = 0.0  # the share of host-block bytes the accelerator computes
    offload_slot_bytes: int = 0  # the copy ring
    # measured at start (blocks mode with a GPU): the rank's dispatch per token counted on the CPU's
    # side, the wait for rank 0's LM head, the CPU's and the copy engine's rates, the share they
    # predict, the seconds spent tuning it and the step's seconds at the share kept
    offload_host_s: float = 0.0
    offload_head_wait_s: float = 0.0
    offload_cpu_Bps: float = 0.0
    offload_copy_Bps: float = 0.0
    offload_predicted: float = 0.0
    offload_tune_s: float = 0.0
    offload_step_s: float = 0.0
    # the offload's own counters: the worker computing the CPU's rows, the launching thread waiting
    offload_cpu_s: float = 0.0
    offload_wait_input_s: float = 0.0
    offload_wait_cpu_s: float = 0.0

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, info: dict) -> RankStats:
        """A STATS_REPLY's info map back as RankStats; ValueError names a missing or mistyped field."""
        out = {}
        for f in fields(cls):
            if f.name not in info:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"stats: field {f.name!r} is missing")
                continue
            value, kind = info[f.name], {"int": int, "float": (int, float), "str": str}[f.type]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"stats: {f.name}={value!r}: expected {f.type}")
            out[f.name] = float(value) if f.type == "float" else value
        return cls(**out)

    def __getitem__(self, key: str):
        """Deprecated: stats were dicts; read the attribute instead."""
        warnings.warn(f"stats[{key!r}] is deprecated: read the attribute", DeprecationWarning, stacklevel=2)
        key = _OLD_NAMES.get(key, key.replace("split_", "offload_", 1) if key.startswith("split_") else key)
        return getattr(self, key)


@dataclass(frozen=True)
class Health:
    """The workers as the master sees them now."""

    world_size: int
    missing: tuple[int, ...] = ()  # worker ranks not connected now: never joined, or lost
    reasons: dict[int, str] = field(default_factory=dict)  # missing rank -> why
    pids: dict[int, int] = field(default_factory=dict)  # connected rank -> its process id
    hosts: dict[int, str] = field(default_factory=dict)  # joined rank -> "host pid N"

    @property
    def ok(self) -> bool:
        return not self.missing

    def to_dict(self) -> dict:
        """Plain values with string keys (msgpack, JSON)."""
        return {"world_size": self.world_size, "missing": list(self.missing),
                "reasons": {str(r): v for r, v in self.reasons.items()},
                "pids": {str(r): v for r, v in self.pids.items()},
                "hosts": {str(r): v for r, v in self.hosts.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Health:
        return cls(int(d["world_size"]), tuple(int(r) for r in d["missing"]),
                   {int(r): str(v) for r, v in d["reasons"].items()}, {int(r): int(v) for r, v in d["pids"].items()},
                   {int(r): str(v) for r, v in d.get("hosts", {}).items()})
