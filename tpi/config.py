"""Model configuration: a frozen dataclass read from a Hugging Face ``config.json`` dict.

Owns: which architectures tpi supports, how their config fields map onto one set of numbers
(heads, head_dim, rotary settings in either the old ``rope_theta``/``rope_scaling`` form or the
``rope_parameters`` form of transformers 5, sliding windows per layer), and the errors for what is
not supported. Does not know: torch, files, sockets. Workers parse configs with this module, so it
must never import transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tpi.errors import TpiError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)
SPLIT_MODES = ("blocks", "rows")  # how a GPU rank shares its host blocks with the CPU (forward.MemoryOptions)


class ConfigError(TpiError, ValueError):
    """A model or cluster setting that tpi cannot honour; the message names the value."""


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: int | str | None, name: str = "memory_budget") -> int | None:
    """`2GB` = 2e9 bytes, `2GiB` = 2**30 * 2, a plain number is bytes; None means no limit.
    `name` is the setting the error names."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise ConfigError(f"{name}={value}: expected a positive number of bytes")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{name}={value!r}: expected bytes or a size such as 800MB, 2GB or 1.5GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k
    hidden_act: str = "silu"
    # per layer: None for full attention, else the number of most recent keys each query sees
    sliding_windows: tuple[int | None, ...] = field(default=())
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = _architecture(cfg)
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        kv_heads = _int(cfg, "num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
        head_dim = _int(cfg, "head_dim") if cfg.get("head_dim") is not None else hidden // heads
        layers = _int(cfg, "num_hidden_layers")
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim}: expected an even number (rotary embeddings pair dimensions)")
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        act = cfg.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act={act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = arch == "Qwen2ForCausalLM" or attention_bias
        return cls(
            architecture=arch,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=parse_rope(cfg, head_dim),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qkv_bias=qkv_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            hidden_act=act,
            sliding_windows=_sliding_windows(cfg, arch, layers),
            eos_token_ids=_ids(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
        )


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        model_type = cfg.get("model_type")
        if model_type in by_type:
            return by_type[model_type]
        raise ConfigError(f"config names no architecture (model_type={model_type!r}); "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"architecture {archs[0]!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return archs[0]


def _int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config field {key}={value!r}: expected a positive integer")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_rope(cfg: dict[str, Any], head_dim: int) -> RopeConfig:
    """Rotary settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if not params:
        params = dict(scaling)
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported; expected 1.0")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"rope_theta={theta}: expected a positive number")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _sliding_windows(cfg: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer window as transformers applies it: Mistral on every layer, Qwen2/3 where enabled."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if arch == "MistralForCausalLM":
        return (int(window) if window else None,) * layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not cfg.get("use_sliding_window") or not window:
            return (None,) * layers
        if layer_types is None:
            first = int(cfg.get("max_window_layers", layers))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * layers
