"""Cluster configs: the YAML file that says which machine runs which rank, validated once.

Owns: the schema of ``cluster_configs/*.yaml`` (master address and ports, each worker's host,
rank, device, memory budget and share ratio, the model, the scheduler window, optional link
emulation), its validation with errors that name the field and the value, and the derived
numbers the launchers need (world size, ratios in rank order, link delay and rate in SI units).
Does not know: how processes are started (``launch.py``, ``emulate.py``), sockets, torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tpi.comm.security import LOCAL_HOSTS, check_public_key
from tpi.config import ConfigError, ModelConfig, parse_bytes
from tpi.options import Collective, Compute, DType, PayloadName, QuantName

_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
_DELAY = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*")
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit)\s*", re.IGNORECASE)
_HOST = re.compile(r"[A-Za-z0-9_.:\-\[\]]+")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Link(_Strict):
    """An emulated link between every node and the switch: one-way delay and rate."""

    delay: str = "0ms"  # one way, e.g. 2ms, 500us
    rate: str | None = None  # e.g. 100mbit, 1gbit; None: unlimited

    @field_validator("delay")
    @classmethod
    def _delay(cls, v: str) -> str:
        if not _DELAY.fullmatch(v):
            raise ValueError(f"delay={v!r}: expected a duration such as 0ms, 500us or 5ms")
        return v

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None and (not _RATE.fullmatch(v) or float(_RATE.fullmatch(v).group(1)) <= 0):
            raise ValueError(f"rate={v!r}: expected a rate such as 100mbit or 1gbit")
        return v

    @property
    def delay_s(self) -> float:
        num, unit = _DELAY.fullmatch(self.delay).groups()
        return float(num) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]

    @property
    def rate_bps(self) -> float | None:
        """Bits per second, or None for an unlimited link."""
        if self.rate is None:
            return None
        num, unit = _RATE.fullmatch(self.rate).groups()
        return float(num) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit.lower()]


class Node(_Strict):
    """What every rank has: where it runs and what it may use."""

    host: str = "127.0.0.1"  # the address others reach this machine at (the master's: where workers dial)
    ssh: str | None = None  # ssh destination when it differs from host, e.g. pi@kitchen.local
    device: str = "cpu"
    memory_budget: str | int | None = None  # None: every block resident
    gpu_memory_budget: str | int | None = None
    ratio: float = Field(1.0, ge=0)  # share of heads and FFN columns, relative to the others
    threads: int = Field(1, ge=1, le=256)
    tpi: str = "tpi"  # how to run tpi on that machine, e.g. ~/venv/bin/tpi
    public_key: str | None = None  # its CURVE public key, as `tpi keys` prints it

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return v if v is None else check_public_key(v, "public_key")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not _HOST.fullmatch(v):
            raise ValueError(f"host={v!r}: expected a host name or an IP address")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError(f"device={v!r}: expected cpu, cuda or cuda:N")
        return v

    @field_validator("memory_budget", "gpu_memory_budget")
    @classmethod
    def _budget(cls, v, info):
        parse_bytes(v, info.field_name)  # the same parser the ranks use: what loads here runs there
        return v

    @property
    def local(self) -> bool:
        return self.ssh is None and self.host in LOCAL_HOSTS


class MasterSpec(Node):
    port: int = Field(5555, ge=1, le=65535)  # where workers connect
    # the interface that port listens on; None: loopback when the master's host is loopback (its
    # workers are on this machine), else every interface
    bind: str | None = None
    http_host: str = "127.0.0.1"  # the HTTP API; 0.0.0.0 to reach it from other machines
    http_port: int = Field(8000, ge=0, le=65535)

    @property
    def bind_address(self) -> str:
        if self.bind is not None:
            return self.bind
        return "127.0.0.1" if self.host in LOCAL_HOSTS else "0.0.0.0"


class WorkerSpec(Node):
    rank: int = Field(ge=1)
    cache_dir: str | None = None  # where the worker keeps fetched shards (default ~/.cache/tpi)


class Security(_Strict):
    """CURVE between master and workers: on (None) whenever a host is not loopback."""

    curve: bool | None = None  # False: plain TCP, only when asked for (a warning says so)
    keys_dir: str = "~/.config/tpi/keys"  # on each machine: <keys_dir>/<node name>.key from `tpi keys`


class ClusterConfig(_Strict):
    """One cluster: rank 0 is the master, workers are ranks 1..N-1."""

    name: str = "cluster"
    model: str = "embedded"  # a HF folder or .gguf file on the master, or "embedded" (SmolLM2-135M-Instruct)
    dtype: DType = "float32"
    quant: QuantName = "none"  # the weights' format (README: quantized weights); none: the checkpoint's own
    group_size: int = Field(32, ge=2)
    quant_head: bool = False
    compute: Compute | None = None  # on quantized weights: exact or fast (the default)
    prefill_chunk: int = Field(512, ge=1, le=65536)
    window: int | None = Field(None, ge=1)  # streamed blocks held at once on every rank
    max_context: int | None = Field(None, ge=1)
    step_timeout: float = Field(60.0, gt=0)
    join_timeout: float = Field(300.0, gt=0)
    link: Link | None = None  # emulated link (tpi emulate, docker-compose); ignored by tpi launch
    collective: Collective = "star"  # the allreduce (README: collectives)
    payload: PayloadName | None = None  # None: the model's dtype
    master: MasterSpec = MasterSpec()
    workers: list[WorkerSpec] = []
    security: Security = Security()

    @model_validator(mode="after")
    def _ranks(self) -> ClusterConfig:
        ranks = sorted(w.rank for w in self.workers)
        if ranks != list(range(1, len(self.workers) + 1)):
            raise ValueError(f"workers: ranks {ranks} must be 1..{len(self.workers)}, each once")
        if sum(n.ratio for n in self.nodes) <= 0:
            raise ValueError("ratio: at least one node needs a positive ratio")
        if self.curve and self.collective != "star":
            raise ValueError(f"collective: {self.collective!r} links are not encrypted; with CURVE (a host is not "
                             f"loopback) use star, or set security.curve: false")
        if self.curve:
            missing = [name for name, n in zip(self.node_names, self.nodes) if n.public_key is None]
            if missing:
                raise ValueError(
                    f"security: links are encrypted (CURVE) because a host is not loopback, but "
                    f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no public_key: run "
                    f"`tpi keys --name NAME` on each machine and paste the key it prints, or set "
                    f"security.curve: false for plain TCP")
        return self

    @property
    def curve(self) -> bool:
        """Whether links are encrypted: as configured, else whenever a host is not loopback."""
        if self.security.curve is not None:
            return self.security.curve
        return any(n.host not in LOCAL_HOSTS for n in self.nodes)

    @property
    def node_names(self) -> list[str]:
        """Rank order: master, worker1, worker2, ... (also the key file names)."""
        return ["master", *(f"worker{w.rank}" for w in sorted(self.workers, key=lambda w: w.rank))]

    def key_file(self, rank: int) -> str:
        return f"{self.security.keys_dir.rstrip('/')}/{self.node_names[rank]}.key"

    @property
    def world_size(self) -> int:
        return 1 + len(self.workers)

    @property
    def nodes(self) -> list[Node]:
        """Rank order: the master, then workers by rank."""
        return [self.master, *sorted(self.workers, key=lambda w: w.rank)]

    @property
    def ratios(self) -> list[float]:
        return [n.ratio for n in self.nodes]

    @property
    def master_address(self) -> str:
        """Where workers connect."""
        return f"tcp://{self.master.host}:{self.master.port}"


def check_shares(cfg: ClusterConfig, source: str = "config") -> None:
    """Refuse, before anything starts, ratios the model cannot be split by (more ranks with a
    share than it has KV heads), when the model's config.json is readable here (the master's
    machine; the embedded model once converted). The error names the config's ratio fields."""
    import json

    from tpi.partition import make_plan

    folder = _model_folder(cfg.model)
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        make_plan(ModelConfig.from_hf(json.loads((folder / "config.json").read_text())), cfg.world_size, cfg.ratios)
    except ConfigError as e:
        raise ConfigError(f"{source}: master.ratio and workers' ratio: {e}") from None


def _model_folder(model: str) -> Path | None:
    if model != "embedded":
        return Path(model).expanduser()
    from tpi.embedded import converted_dir

    return converted_dir()


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster config; ConfigError names the file, the field and the value."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {str(path)!r}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_cluster_config(raw, str(path))


def parse_cluster_config(raw: object, source: str = "config") -> ClusterConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    value = err.get("input")
    if isinstance(value, (str, int, float)) and str(value) not in msg:
        msg = f"got {value!r}: {msg}"
    return f"{loc}: {msg}" if loc else msg
