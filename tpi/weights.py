"""Checkpoints in, per-rank block files out: reading a HF checkpoint and splitting it for a plan.

Owns: finding a checkpoint's tensors (single ``model.safetensors`` or an index of shards), refusing
pickled checkpoints, writing one safetensors file per (rank, layer, block) plus the master's head
file and a ``manifest.json`` (config, plan, each file's size and sha256), the split cache,
checking one rank's files at start (sizes, sha256, headers against the config and plan), and
reading one rank's block back. Never holds a whole tensor of the source: rows are read by byte range
in bounded chunks and written as they go. Does not know: the network, generation, transformers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tpi.config import ConfigError, ModelConfig
from tpi.partition import ShardPlan, make_plan
from tpi.safetensors_io import NAMES, ShardFileError, StreamingWriter, TensorInfo, read_header, read_rows
from tpi.scheduler import BlockSpec, TensorRange, read_block

SPLIT_FORMAT = 1
CHUNK_BYTES = 32 * 1024 * 1024
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BlockKind = Literal["attn", "ffn", "head"]
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf") + PICKLED


def block_file(rank: int, layer: int | None, kind: BlockKind) -> str:
    """Relative path of one block's file inside a split folder."""
    if kind == "head":
        return f"rank{rank}/head.safetensors"
    return f"rank{rank}/layer{layer:03d}.{kind}.safetensors"


class Checkpoint:
    """The tensors of a HF checkpoint folder, by name, read by byte range."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise ConfigError(f"{self.dir}: no config.json; expected a Hugging Face checkpoint folder")
        self.hf_config = json.loads((self.dir / "config.json").read_text())
        self.config = ModelConfig.from_hf(self.hf_config)
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        for f in self._weight_files():
            for name, info in read_header(str(f)).items():
                self.tensors[name] = (str(f), info)

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.dir / n for n in names]
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickled = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLED)
        if pickled:
            raise ConfigError(f"{self.dir}: only pickled checkpoint files ({', '.join(pickled)}); tpi never "
                              "unpickles weights. Convert them to safetensors first.")
        raise ConfigError(f"{self.dir}: no *.safetensors weights found")

    def info(self, name: str) -> tuple[str, TensorInfo]:
        if name not in self.tensors:
            raise ShardFileError(f"{self.dir}: checkpoint has no tensor {name!r}")
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def fingerprint(self) -> str:
        """Cheap identity of the checkpoint: path, config and weight files' sizes and mtimes."""
        h = hashlib.sha256(str(self.dir.resolve()).encode())
        h.update(json.dumps(self.hf_config, sort_keys=True).encode())
        for f in sorted({f for f, _ in self.tensors.values()}):
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Slice:
    """A source tensor, optionally narrowed to rows or columns [a, b)."""

    source: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


def _block_slices(cfg: ModelConfig, plan: ShardPlan, rank: int, layer: int, kind: BlockKind) -> dict[str, Slice]:
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


def _slice_shape(full: tuple[int, ...], sl: Slice) -> tuple[int, ...]:
    shape = list(full)
    if sl.rows:
        shape[0] = sl.rows[1] - sl.rows[0]
    if sl.cols:
        shape[1] = sl.cols[1] - sl.cols[0]
    return tuple(shape)


def _chunks(ckpt: Checkpoint, sl: Slice, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    path, info = ckpt.info(sl.source)
    r0, r1 = sl.rows or (0, info.shape[0] if info.shape else 1)
    step = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        for a in range(r0, r1, step):
            rows = read_rows(fd, info, a, min(a + step, r1))
            if sl.cols:
                rows = rows[:, sl.cols[0]:sl.cols[1]]
            yield rows.to(dtype)
    finally:
        os.close(fd)


def _write_block(ckpt: Checkpoint, out_dir: Path, rel: str, slices: dict[str, Slice], dtype: torch.dtype) -> dict:
    specs = [(name, dtype, _slice_shape(ckpt.info(sl.source)[1].shape, sl)) for name, sl in slices.items()]
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = StreamingWriter(str(path), specs)
    for sl in slices.values():
        for chunk in _chunks(ckpt, sl, dtype):
            writer.write(chunk)
    writer.close()
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


def split(model_dir: str | os.PathLike, out_dir: str | os.PathLike, world_size: int,
          ratios=None, dtype: str = "float32", progress: bool = True) -> dict:
    """Split a checkpoint into per-rank block files under `out_dir`; returns the manifest."""
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {list(DTYPE_NAMES)}")
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    plan = make_plan(cfg, world_size, ratios)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, layer, kind) for r in range(world_size) for layer, kind in rank_blocks(cfg, plan, r)]
    files = {}
    bar = _progress(len(jobs), f"split {Path(model_dir).name} for {world_size} ranks", progress)
    for r, layer, kind in jobs:
        rel = block_file(r, layer, kind)
        files[rel] = _write_block(ckpt, out, rel, _block_slices(cfg, plan, r, layer, kind), DTYPE_NAMES[dtype])
        bar.update(1)
    bar.close()
    for f in Path(model_dir).iterdir():  # tokenizer, chat template, generation config: the master's
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    manifest = {"format": SPLIT_FORMAT, "config": ckpt.hf_config, "dtype": dtype, "plan": plan.to_dict(),
                "generation": _generation_config(Path(model_dir)), "files": files}
    _write_json(out / "manifest.json", manifest)
    return manifest


def _generation_config(model_dir: Path) -> dict:
    p = model_dir / "generation_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)


def cache_root() -> Path:
    return Path(os.environ.get("TPI_CACHE") or Path.home() / ".cache" / "tpi")


def split_cached(model_dir: str | os.PathLike, world_size: int, ratios=None, dtype: str = "float32",
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Split once per (checkpoint, world size, ratios, dtype) into the cache; safe across processes."""
    ckpt = Checkpoint(model_dir)
    plan = make_plan(ckpt.config, world_size, ratios)
    key = hashlib.sha256(json.dumps([ckpt.fingerprint(), plan.to_dict(), dtype, SPLIT_FORMAT]).encode())
    root = Path(cache_dir) if cache_dir else cache_root() / "splits"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key.hexdigest()[:24]
    with open(str(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the split done
        if not (final / "manifest.json").is_file():
            tmp = Path(f"{final}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            split(model_dir, tmp, world_size, plan.ratios, dtype, progress)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    return final


@dataclass(frozen=True)
class Manifest:
    """A split folder's manifest, with the parsed config and plan."""

    raw: dict
    config: ModelConfig
    plan: ShardPlan
    dtype: torch.dtype
    digest: str  # sha256 of the manifest file: ranks compare it when they meet

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
        return cls(raw, ModelConfig.from_hf(raw["config"]), ShardPlan.from_dict(raw["plan"]),
                   DTYPE_NAMES[raw["dtype"]], hashlib.sha256(data).hexdigest())

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


def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
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
    manifest's config and plan say the block holds (a lying header is refused before any read)."""
    header = read_header(str(path))
    full, prefix, dtype = _full_shapes(manifest.config), f"model.layers.{layer}.", manifest.dtype
    expected = {name: _slice_shape(full[sl.source.removeprefix(prefix)], sl)
                for name, sl in _block_slices(manifest.config, manifest.plan, rank, layer, kind).items()}
    if set(header) != set(expected):
        raise ShardFileError(f"{path}: holds tensors {sorted(header)}; expected {sorted(expected)}")
    for name, info in header.items():
        if info.shape != expected[name] or info.dtype != dtype:
            raise ShardFileError(f"{path}: tensor {name} is {NAMES[info.dtype]} {list(info.shape)}; the "
                                 f"manifest's config and plan need {NAMES[dtype]} {list(expected[name])}")
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
               ) -> tuple[TensorInfo, TensorInfo, str, list[tuple[BlockSpec, int, int]]]:
    """The master's head file: (embedding info, norm info, path, LM-head row chunks).

    Each chunk is a block of at most `chunk_bytes` holding rows [a, b) of the LM head (the
    embedding table when tied), named "lm_head.weight"; (spec, a, b) per chunk.
    """
    path = _checked_path(shard_dir, manifest, block_file(0, None, "head"))
    header = _checked_header(path, manifest, 0, None, "head")
    head = header.get("lm_head.weight", header["embed_tokens.weight"])
    rows = head.shape[0]
    step = max(1, min(rows, chunk_bytes // head.row_bytes))
    chunks = []
    for a in range(0, rows, step):
        b = min(rows, a + step)
        t = TensorRange("lm_head.weight", head.dtype, (b - a, *head.shape[1:]), head.start + a * head.row_bytes,
                        (b - a) * head.row_bytes)
        chunks.append((BlockSpec((None, "head", len(chunks)), str(path), (t,)), a, b))
    return header["embed_tokens.weight"], header["norm.weight"], str(path), chunks


def load_block(shard_dir: str | os.PathLike, manifest: Manifest, rank: int, layer: int | None,
               kind: BlockKind) -> dict[str, torch.Tensor]:
    """Read one block file whole; its size is checked against the manifest first."""
    return read_block(block_spec(shard_dir, manifest, rank, layer, kind))
