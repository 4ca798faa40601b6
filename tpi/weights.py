"""A split's layout and one rank's files: what each block holds, the manifest, the checks at start.

Owns: the layout every split has (``block_file``: one safetensors file per rank, layer and block,
and the master's head file; ``block_slices``: which rows or columns of which checkpoint tensor each
block holds; ``rank_blocks``; the one rank that adds a row-parallel bias), the ``Manifest`` (config,
plan, dtype, the quantized format if any, each file's size and sha256) and its validation,
checking one rank's files at start (sizes, sha256, headers against the config, the plan and the
format: a lying header is refused before any read), where each block's tensors lie in its file
(``block_spec``, ``head_specs``) and reading one back. Does not know: how splits are written
(split.py), the network, generation, transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tpi.config import ConfigError, ModelConfig
from tpi.partition import ShardPlan
from tpi.quant.formats import SUFFIXES, TILE, check_shapes
from tpi.safetensors_io import NAMES, ShardFileError, TensorInfo, read_header
from tpi.scheduler import BlockSpec, TensorRange, read_block

SPLIT_FORMAT = 1
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BlockKind = Literal["attn", "ffn", "head"]
QUANT_FORMATS = ("int8", "int4", "gguf")  # a manifest's "quant": tpi's own, or a GGUF file's types kept


def block_file(rank: int, layer: int | None, kind: BlockKind) -> str:
    """Relative path of one block's file inside a split folder."""
    if kind == "head":
        return f"rank{rank}/head.safetensors"
    return f"rank{rank}/layer{layer:03d}.{kind}.safetensors"


@dataclass(frozen=True)
class Slice:
    """A source tensor, optionally narrowed to rows or columns [a, b)."""

    source: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


def block_slices(cfg: ModelConfig, plan: ShardPlan, rank: int, layer: int, kind: BlockKind) -> dict[str, Slice]:
    s, hd, p = plan.shards[rank], cfg.head_dim, f"model.layers.{layer}."
    owns_bias = rank == bias_rank(plan, kind)
    if kind == "attn":
        q, kv = (s.heads[0] * hd, s.heads[1] * hd), (s.kv_heads[0] * hd, s.kv_heads[1] * hd)
        out = {"input_layernorm.weight": Slice(p + "input_layernorm.weight")}
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{name}.weight"] = Slice(f"{p}self_attn.{name}.weight", rows=rows)
            if cfg.qkv_bias:
                out[f"{name}.bias"] = Slice(f"{p}self_attn.{name}.bias", rows=rows)
        out["o_proj.weight"] = Slice(p + "self_attn.o_proj.weight", cols=q)
        if cfg.attention_bias and owns_bias:
            out["o_proj.bias"] = Slice(p + "self_attn.o_proj.bias")
        if cfg.qk_norm:
            out["q_norm.weight"] = Slice(p + "self_attn.q_norm.weight")
            out["k_norm.weight"] = Slice(p + "self_attn.k_norm.weight")
        return out
    if kind == "ffn":
        c = s.ffn
        out = {"post_attention_layernorm.weight": Slice(p + "post_attention_layernorm.weight")}
        for name in ("gate_proj", "up_proj"):
            out[f"{name}.weight"] = Slice(f"{p}mlp.{name}.weight", rows=c)
            if cfg.mlp_bias:
                out[f"{name}.bias"] = Slice(f"{p}mlp.{name}.bias", rows=c)
        out["down_proj.weight"] = Slice(p + "mlp.down_proj.weight", cols=c)
        if cfg.mlp_bias and owns_bias:
            out["down_proj.bias"] = Slice(p + "mlp.down_proj.bias")
        return out
    out = {"embed_tokens.weight": Slice("model.embed_tokens.weight"), "norm.weight": Slice("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = Slice("lm_head.weight")
    return out


def bias_rank(plan: ShardPlan, kind: BlockKind) -> int:
    """The one rank that adds a row-parallel bias: rank 0 unless it has no share of the block."""
    for s in plan.shards:
        if (s.num_kv_heads if kind == "attn" else s.ffn_size) > 0:
            return s.rank
    raise ConfigError("no rank has a share of the model")


def rank_blocks(cfg: ModelConfig, plan: ShardPlan, rank: int) -> list[tuple[int | None, BlockKind]]:
    """The blocks rank `rank` owns, in execution order (head last, master only)."""
    s = plan.shards[rank]
    blocks: list[tuple[int | None, BlockKind]] = []
    for layer in range(cfg.num_layers):
        if s.num_kv_heads:
            blocks.append((layer, "attn"))
        if s.ffn_size:
            blocks.append((layer, "ffn"))
    if rank == 0:
        blocks.append((None, "head"))
    return blocks


def slice_shape(full: tuple[int, ...], sl: Slice) -> tuple[int, ...]:
    shape = list(full)
    if sl.rows:
        shape[0] = sl.rows[1] - sl.rows[0]
    if sl.cols:
        shape[1] = sl.cols[1] - sl.cols[0]
    return tuple(shape)


def cache_root() -> Path:
    return Path(os.environ.get("TPI_CACHE") or Path.home() / ".cache" / "tpi")


@dataclass(frozen=True)
class Manifest:
    """A split folder's manifest, with the parsed config and plan."""

    raw: dict
    config: ModelConfig
    plan: ShardPlan
    dtype: torch.dtype
    digest: str  # sha256 of the manifest file: ranks compare it when they meet
    quant: dict | None = None  # {"format", "group_size", "head"}; None: every weight in `dtype`

    @classmethod
    def load(cls, shard_dir: str | os.PathLike) -> Manifest:
        path = Path(shard_dir) / "manifest.json"
        if not path.is_file():
            raise ConfigError(f"{shard_dir}: no manifest.json; expected a folder written by `tpi split`")
        return cls.parse(path.read_bytes(), str(path))

    @classmethod
    def parse(cls, data: bytes, source: str = "manifest") -> Manifest:
        """Parse a manifest file's bytes (e.g. as sent by the master), checking its structure."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{source}: not a JSON manifest ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != SPLIT_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(f"{source}: split format {got!r}, expected {SPLIT_FORMAT}; split again")
        files = raw.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise ConfigError(f"{source}: 'files' must map each file to its size and sha256")
        if raw.get("dtype") not in DTYPE_NAMES:
            raise ConfigError(f"{source}: dtype {raw.get('dtype')!r}, expected one of {list(DTYPE_NAMES)}")
        quant = raw.get("quant")
        if quant is not None and not (isinstance(quant, dict) and quant.get("format") in QUANT_FORMATS
                                      and isinstance(quant.get("group_size"), int) and quant["group_size"] > 0
                                      and isinstance(quant.get("head"), bool)):
            raise ConfigError(f"{source}: quant {quant!r}, expected {{'format': one of {list(QUANT_FORMATS)}, "
                              "'group_size': a positive integer, 'head': true or false}")
        return cls(raw, ModelConfig.from_hf(raw["config"]), ShardPlan.from_dict(raw["plan"]),
                   DTYPE_NAMES[raw["dtype"]], hashlib.sha256(data).hexdigest(), quant)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def rank_files(self, rank: int) -> dict[str, dict]:
        """The files rank `rank` reads: relative path -> {size, sha256}."""
        return {rel: f for rel, f in self.raw["files"].items() if rel.startswith(f"rank{rank}/")}


def sha256_file(path: str | os.PathLike, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_rank_files(shard_dir: str | os.PathLike, manifest: Manifest, rank: int, checksums: bool = True) -> None:
    """Check rank `rank`'s files against the manifest, at start: every size first (a missing or cut
    file is found without reading anything), then with `checksums` every sha256 (reads each file
    once). The error names the rank and the file."""
    files = manifest.rank_files(rank)
    try:
        paths = {rel: _checked_path(shard_dir, manifest, rel) for rel in sorted(files)}
    except ShardFileError as e:
        raise ShardFileError(f"rank {rank}: {e}") from None
    for rel, path in paths.items() if checksums else ():
        got, want = sha256_file(path), files[rel]["sha256"]
        if got != want:
            raise ShardFileError(f"rank {rank}: {path}: sha256 {got[:16]}... does not match the manifest's "
                                 f"{want[:16]}...: the file is damaged; split again, or delete it so that "
                                 "the worker fetches it again")


def _checked_path(shard_dir: str | os.PathLike, manifest: Manifest, rel: str) -> Path:
    path = Path(shard_dir) / rel
    expected = manifest.raw["files"].get(rel)
    if expected is None:
        raise ShardFileError(f"{path}: not listed in the manifest")
    if not path.is_file() or path.stat().st_size != expected["size"]:
        size = path.stat().st_size if path.is_file() else "missing"
        raise ShardFileError(f"{path}: size {size}, manifest says {expected['size']} bytes")
    return path


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor shapes as the config says, by name (the layer prefix dropped)."""
    d, hd, v, f = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (d, q), "self_attn.o_proj.bias": (d,),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
        "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,),
        "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
    }


def _checked_header(path: Path, manifest: Manifest, rank: int, layer: int | None,
                    kind: BlockKind) -> dict[str, TensorInfo]:
    """A block file's header, its tensors' names, dtypes and shapes checked against what the
    manifest's config, plan and format say the block holds (a lying header is refused before any
    read). A quantized split may hold a weight as ``<name>.qweight``, ``.scales`` (and ``.mins``)."""
    header = read_header(str(path))
    full, prefix, dtype = full_shapes(manifest.config), f"model.layers.{layer}.", manifest.dtype
    expected = {name: slice_shape(full[sl.source.removeprefix(prefix)], sl)
                for name, sl in block_slices(manifest.config, manifest.plan, rank, layer, kind).items()}
    names = set()
    for name, shape in expected.items():
        base = name.removesuffix(".weight")
        if manifest.quantized and len(shape) == 2 and f"{base}.qweight" in header:
            q = {s: header.get(f"{base}.{s}") for s in SUFFIXES}
            if q["scales"] is None:
                raise ShardFileError(f"{path}: {base}.qweight has no {base}.scales")
            try:
                check_shapes(base, q["qweight"].shape, q["qweight"].dtype, q["scales"].shape, q["scales"].dtype,
                             q["mins"] and q["mins"].shape, q["mins"] and q["mins"].dtype, *shape)
            except ConfigError as e:
                raise ShardFileError(f"{path}: {e}") from None
            names |= {f"{base}.{s}" for s in SUFFIXES if q[s] is not None}
            continue
        names.add(name)
        info = header.get(name)
        if info is not None and (info.shape != shape or info.dtype != dtype):
            raise ShardFileError(f"{path}: tensor {name} is {NAMES[info.dtype]} {list(info.shape)}; the "
                                 f"manifest's config and plan need {NAMES[dtype]} {list(shape)}")
    if set(header) != names:
        raise ShardFileError(f"{path}: holds tensors {sorted(header)}; expected {sorted(names)}")
    return header


def block_spec(shard_dir: str | os.PathLike, manifest: Manifest, rank: int, layer: int | None,
               kind: BlockKind) -> BlockSpec:
    """Where one block's tensors lie in its file (its size checked against the manifest, its
    header against the config and plan)."""
    path = _checked_path(shard_dir, manifest, block_file(rank, layer, kind))
    header = _checked_header(path, manifest, rank, layer, kind)
    return BlockSpec((layer, kind), str(path), tuple(
        TensorRange(name, info.dtype, info.shape, info.start, info.nbytes) for name, info in header.items()))


def head_specs(shard_dir: str | os.PathLike, manifest: Manifest, chunk_bytes: int
               ) -> tuple[dict[str, TensorInfo], TensorInfo, str, list[tuple[BlockSpec, int, int]]]:
    """The master's head file: (the embedding's tensors, norm info, path, LM-head row chunks).

    The embedding's tensors are {"weight": info}, or a quantized table's {"qweight", "scales"
    (, "mins")}. Each chunk is a block of at most `chunk_bytes` holding rows [a, b) of the LM head
    (the embedding table when tied), named "lm_head.*"; (spec, a, b) per chunk.
    """
    path = _checked_path(shard_dir, manifest, block_file(0, None, "head"))
    header = _checked_header(path, manifest, 0, None, "head")

    def parts(base: str) -> dict[str, TensorInfo]:
        return {s: header[f"{base}.{s}"] for s in ("weight", *SUFFIXES) if f"{base}.{s}" in header}

    embed = parts("embed_tokens")
    head = parts("lm_head") if not manifest.config.tie_word_embeddings else embed
    rows = next(iter(head.values())).shape[0]
    row_bytes = sum(t.row_bytes for t in head.values())
    step = max(1, min(rows, chunk_bytes // row_bytes))
    if rows % TILE == 0:  # chunks of whole tiles: tiled int4 codes (formats.py) stay byte ranges
        step = max(TILE, step // TILE * TILE)
    chunks = []
    for a in range(0, rows, step):
        b = min(rows, a + step)
        t = tuple(TensorRange(f"lm_head.{s}", i.dtype, (b - a, *i.shape[1:]), i.start + a * i.row_bytes,
                              (b - a) * i.row_bytes) for s, i in head.items())
        chunks.append((BlockSpec((None, "head", len(chunks)), str(path), t), a, b))
    return embed, header["norm.weight"], str(path), chunks


def load_block(shard_dir: str | os.PathLike, manifest: Manifest, rank: int, layer: int | None,
               kind: BlockKind) -> dict[str, torch.Tensor]:
    """Read one block file whole; its size is checked against the manifest first."""
    return read_block(block_spec(shard_dir, manifest, rank, layer, kind))
