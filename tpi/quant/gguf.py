"""GGUF files in: llama.cpp's quantized checkpoints read tensor by tensor, converted without loss.

Owns: ``GGUFCheckpoint``, a checkpoint source over one ``.gguf`` file (the ``gguf`` package's
reader maps the file; rows are read as they are asked for, never the whole file): its config and
tokenizer from the file's metadata (through transformers, which reads GGUF metadata), its tensors
under Hugging Face names, llama.cpp's row permutation of Llama's q and k projections undone, and
each quantized type mapped to group-wise codes, float32 scales and minima (formats.py) that
dequantize to exactly what the ``gguf`` package dequantizes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (groups
of 32), Q4_K and Q5_K (super-blocks of 256: a float16 scale times a 6-bit integer per group of 32
is one float32), Q6_K (groups of 16). F32, F16 and BF16 tensors stay floats; any other type is
refused with its name. Does not know: splitting (weights.py), matmuls.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from tpi.config import ConfigError, ModelConfig
from tpi.quant.formats import QuantTensor, pack_int4

SUPER = 256  # QK_K: elements of a K-quant super-block
NAMES = {  # GGUF name -> Hugging Face name ({} is the layer)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_output.bias": "model.layers.{}.self_attn.o_proj.bias",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    **{f"blk.{{}}.attn_{p}.{kind}": f"model.layers.{{}}.self_attn.{p}_proj.{kind}"
       for p in "qkv" for kind in ("weight", "bias")},
    **{f"blk.{{}}.ffn_{p}.{kind}": f"model.layers.{{}}.mlp.{p}_proj.{kind}"
       for p in ("gate", "up", "down") for kind in ("weight", "bias")},
}
_LAYER = re.compile(r"blk\.(\d+)\.")


def _f16(raw: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n, 1] float32."""
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[n, bytes] packed 4-bit -> [n, groups, width] uint8: each run of `width` bytes gives
    `width` low nibbles, then `width` high nibbles (llama.cpp's order)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(n, -1, width)


def _q8_0(b: np.ndarray):
    return b[:, 2:].copy().view(np.int8), _f16(b[:, :2]), None, 32


def _q4_0(b: np.ndarray):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 16).reshape(len(b), 32), d, -8 * d, 32


def _q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:], 16).reshape(len(b), 32), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _five_bits(qh: np.ndarray, ql: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the high bits (a uint32 per block, bit i for element i) over the low nibbles."""
    h = (qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & 1
    return _nibbles(ql, 16).reshape(len(ql), 32) | (h.astype(np.uint8) << 4)


def _q5_0(b: np.ndarray):
    return (_five_bits(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16)), _f16(b[:, :2]), None, 32


def _q5_1(b: np.ndarray):
    return _five_bits(b[:, 4:8], b[:, 8:]).astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the 12 bytes of 6-bit scales and minima -> ([n, 8], [n, 8]) integers."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    return _nibbles(b[:, 16:], 32).reshape(len(b), SUPER), d * sc, -(dmin * mn), 32


def _q5_k(b: np.ndarray):
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # [n, 8, 32]
    q = _nibbles(b[:, 48:], 32) | ((qh & 1) << 4)
    return q.reshape(len(b), SUPER).astype(np.int8), d * sc, -(dmin * mn), 32


def _q6_k(b: np.ndarray):
    n = len(b)
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    lo = _nibbles(ql, 64).reshape(n, 8, 32)  # [n, 2 halves x 2 nibbles x 64] in runs of 32
    hi = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo | (hi.reshape(n, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, SUPER), d * scales.copy().view(np.int8).astype(np.float32), None, 16


# type name -> (elements per block, bytes per block, decoder: blocks -> codes, scales, mins, group)
QUANT_TYPES = {"Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
               "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1), "Q4_K": (SUPER, 144, _q4_k),
               "Q5_K": (SUPER, 176, _q5_k), "Q6_K": (SUPER, 210, _q6_k)}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def decode(raw: np.ndarray, type_name: str, cols: int) -> QuantTensor:
    """Rows of one quantized tensor as stored ([rows, row bytes] uint8) -> a QuantTensor [rows, cols]
    (int4 codes for 4-bit types, int8 for 5-, 6- and 8-bit ones; float32 scales and minima)."""
    block, size, fn = QUANT_TYPES[type_name]
    rows = raw.shape[0]
    codes, scales, mins, group = fn(np.ascontiguousarray(raw).reshape(rows * cols // block, size))
    codes = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols))
    if codes.dtype == torch.uint8:
        codes = pack_int4(codes)
    as_groups = lambda a: None if a is None else torch.from_numpy(  # noqa: E731
        np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(rows, cols // group)))
    return QuantTensor(codes.contiguous(), as_groups(scales), as_groups(mins))


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of Llama's q/k rows (within each head): the same as
    transformers' reverse_permute_weights, for the rows of whole heads."""
    dim = t.shape[0] // heads // 2
    return t.reshape(heads, dim, 2, *t.shape[1:]).swapaxes(2, 1).reshape(t.shape)


class GGUFCheckpoint:
    """A .gguf file as a checkpoint source: Hugging Face names, rows on demand. The file is parsed
    when first needed (seconds for a large vocabulary): a cached split needs only its identity."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.dir = self.path.parent
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such GGUF file")

    @functools.cached_property
    def reader(self):
        import gguf

        return gguf.GGUFReader(str(self.path))

    @property
    def arch(self) -> str:
        return str(self.reader.fields["general.architecture"].contents())

    @functools.cached_property
    def hf_config(self) -> dict:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(self.dir), gguf_file=self.path.name).to_dict()
        config.pop("quantization_config", None)
        return config

    @functools.cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)

    @functools.cached_property
    def tensors(self) -> dict:
        tensors = {}
        for t in self.reader.tensors:
            name = self._hf_name(t.name)
            kind = t.tensor_type.name
            if kind not in QUANT_TYPES and kind not in FLOAT_TYPES:
                raise ConfigError(f"{self.path}: tensor {t.name} is {kind}; tpi reads {', '.join(FLOAT_TYPES)} and "
                                  f"{', '.join(QUANT_TYPES)}")
            tensors[name] = t
        return tensors

    def _hf_name(self, name: str) -> str:
        m = _LAYER.match(name)
        key = _LAYER.sub("blk.{}.", name, count=1) if m else name
        if key not in NAMES:
            raise ConfigError(f"{self.path}: tensor {name!r} is not one tpi knows for {self.arch}")
        return NAMES[key].format(m.group(1)) if m else NAMES[key]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def is_quantized(self, name: str) -> bool:
        return self._tensor(name).tensor_type.name in QUANT_TYPES

    def _tensor(self, name: str):
        if name not in self.tensors:
            raise ConfigError(f"{self.path}: the file has no tensor for {name!r}")
        return self.tensors[name]

    def rows(self, name: str, a: int, b: int) -> torch.Tensor | QuantTensor:
        """Rows [a, b) of tensor `name`: floats as stored, or a QuantTensor (q/k rows of a Llama
        file in Hugging Face's order: a, b on whole heads)."""
        t = self._tensor(name)
        shape = self.shape(name)
        kind = t.tensor_type.name
        if len(shape) == 1:
            return torch.from_numpy(np.array(t.data, dtype=np.float32))  # norms, biases: float32 in GGUF
        if kind in FLOAT_TYPES:
            out = torch.from_numpy(np.array(t.data[a:b])).view(FLOAT_TYPES[kind]) if kind == "BF16" else \
                torch.from_numpy(np.array(t.data[a:b]))
        else:
            out = decode(np.asarray(t.data[a:b]), kind, shape[1])
        return self._in_hf_order(name, out, a, b)

    def _in_hf_order(self, name: str, out, a: int, b: int):
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return out
        hd = self.config.head_dim
        if a % hd or b % hd:
            raise ConfigError(f"rows [{a}, {b}) of {name} are not whole heads of {hd} rows")
        per_head = (b - a) // hd
        if isinstance(out, QuantTensor):
            return QuantTensor(*(None if t is None else _unpermute(t, per_head).contiguous()
                                 for t in (out.codes, out.scales, out.mins)))
        return _unpermute(out, per_head).contiguous() if per_head else out

    def fingerprint(self) -> str:
        st = os.stat(self.path)
        return hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()

    def write_extras(self, out: Path) -> None:
        """The tokenizer, its chat template and the generation config, from the file's metadata."""
        from transformers import AutoTokenizer, GenerationConfig

        AutoTokenizer.from_pretrained(str(self.dir), gguf_file=self.path.name).save_pretrained(out)
        eos = self.hf_config.get("eos_token_id")
        GenerationConfig(eos_token_id=eos, bos_token_id=self.hf_config.get("bos_token_id")).save_pretrained(out)
