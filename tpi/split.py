"""Checkpoints in, per-rank block files out: splitting a model for a plan, in floats or quantized.

Owns: reading a checkpoint tensor by tensor (``Checkpoint``: a Hugging Face folder with
``model.safetensors`` or an index of shards; pickled checkpoints refused unopened; a ``.gguf``
file through quant/gguf.py), the output format (``Quant``: the checkpoint's own, floats, or
group-wise int8/int4 quantized from floats), writing one safetensors file per (rank, layer,
block) plus the master's head file and ``manifest.json`` (config, plan, format, each file's size
and sha256), the split cache, and ``export_dequantized`` (a split back to a Hugging Face folder of
float32 weights: the tests' reference for quantized splits, and an export for users). A float
tensor is never held whole: rows are read in bounded chunks and written as they go; a quantized
slice (an eighth of its float32 bytes at int4) is made in memory, then written. Does not know: the
network, generation, how the blocks are read back (weights.py).
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
from tpi.partition import make_plan, parse_ratios
from tpi.quant.formats import QuantTensor, dequantize, from_block, quantize
from tpi.safetensors_io import ShardFileError, StreamingWriter, TensorInfo, read_header, read_rows
from tpi.weights import (
    DTYPE_NAMES,
    SPLIT_FORMAT,
    Manifest,
    Slice,
    block_file,
    block_slices,
    cache_root,
    full_shapes,
    load_block,
    rank_blocks,
    slice_shape,
)

CHUNK_BYTES = 32 * 1024 * 1024
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf") + PICKLED
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QuantName = Literal["float", "int8", "int4"]


@dataclass(frozen=True)
class Quant:
    """The split's weight format. `name` None: the checkpoint's own (a folder's floats, a GGUF
    file's types); "float": every weight dequantized to the split's float dtype; "int8"/"int4":
    the layers' projections quantized in groups of `group_size` input columns (and the embedding
    and LM head too with `head`)."""

    name: QuantName | None = None
    group_size: int = 32
    head: bool = False

    def __post_init__(self) -> None:
        if self.name not in (None, "float", "int8", "int4"):
            raise ConfigError(f"quant={self.name!r}: expected none, float, int8 or int4")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2 \
                or self.group_size % 2:
            raise ConfigError(f"group_size={self.group_size!r}: expected an even integer >= 2 (e.g. 32, 64, 128)")

    @classmethod
    def of(cls, name: str | None, group_size: int = 32, head: bool = False) -> Quant:
        """From the CLI's or LocalCluster's values: "none" (or None) keeps the checkpoint's format."""
        return cls(None if name in (None, "none") else name, group_size, head)

    def manifest(self, source_quantized: bool) -> dict | None:
        if self.name in ("int8", "int4"):
            return {"format": self.name, "group_size": self.group_size, "head": self.head}
        if self.name is None and source_quantized:
            return {"format": "gguf", "group_size": 32, "head": True}
        return None


class Checkpoint:
    """The tensors of a HF checkpoint folder, by name, read by byte range."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise ConfigError(f"{self.dir}: no config.json; expected a Hugging Face checkpoint folder or a .gguf file")
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

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name)[1].shape

    def is_quantized(self, name: str) -> bool:
        return False

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        path, info = self.info(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            return read_rows(fd, info, a, b)
        finally:
            os.close(fd)

    def fingerprint(self) -> str:
        """Cheap identity of the checkpoint: path, config and weight files' sizes and mtimes."""
        h = hashlib.sha256(str(self.dir.resolve()).encode())
        h.update(json.dumps(self.hf_config, sort_keys=True).encode())
        for f in sorted({f for f, _ in self.tensors.values()}):
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def write_extras(self, out: Path) -> None:
        """Tokenizer, chat template, generation config: the master's."""
        for f in self.dir.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
                shutil.copy2(f, out / f.name)


def open_checkpoint(path: str | os.PathLike):
    """A Hugging Face folder or a .gguf file, as a checkpoint source."""
    if str(path).endswith(".gguf"):
        from tpi.quant.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    return Checkpoint(path)


# -- one tensor's slice ---------------------------------------------------------------------------------
def _row_chunks(ckpt, sl: Slice) -> Iterator:
    """The rows of a slice's source, in chunks of about CHUNK_BYTES (of its float32 size)."""
    shape = ckpt.shape(sl.source)
    r0, r1 = sl.rows or (0, shape[0] if shape else 1)
    step = max(1, CHUNK_BYTES // max(4 * (shape[1] if len(shape) > 1 else 1), 1))
    align = ckpt.config.head_dim  # a chunk of q/k rows holds whole heads (a GGUF's rows are permuted per head)
    step = max(align, step // align * align)
    for a in range(r0, r1, step):
        yield ckpt.rows(sl.source, a, min(a + step, r1))


def _float_chunks(ckpt, sl: Slice, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    for rows in _row_chunks(ckpt, sl):
        if isinstance(rows, QuantTensor):
            rows = dequantize(rows)
        if sl.cols:
            rows = rows[:, sl.cols[0]:sl.cols[1]]
        yield rows.to(dtype)


def _cols(qt: QuantTensor, a: int, b: int) -> QuantTensor:
    """Input columns [a, b) of a quantized weight, on whole groups."""
    g = qt.group_size
    if a % g or b % g:
        raise ConfigError(f"columns [{a}, {b}) cut groups of {g}: a rank's slice must hold whole groups")
    per = 2 if qt.format == "int4" else 1
    return QuantTensor(qt.codes[:, a // per:b // per], qt.scales[:, a // g:b // g],
                       None if qt.mins is None else qt.mins[:, a // g:b // g])


def _quant_slice(ckpt, sl: Slice, quant: Quant) -> QuantTensor:
    """A projection's slice quantized (from floats) or as the source quantized it (GGUF)."""
    parts = []
    for rows in _row_chunks(ckpt, sl):
        if not isinstance(rows, QuantTensor):
            rows = quantize(rows if not sl.cols else rows[:, sl.cols[0]:sl.cols[1]], quant.name, quant.group_size)
        elif sl.cols:
            rows = _cols(rows, *sl.cols)
        parts.append(rows)
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return QuantTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)


def _quantized(ckpt, name: str, sl: Slice, quant: Quant) -> bool:
    """Whether output tensor `name` (of a block) is written quantized."""
    base = name.rsplit(".", 1)[0]
    if not name.endswith(".weight") or (base not in PROJECTIONS and base not in ("lm_head", "embed_tokens")):
        return False
    if quant.name in ("int8", "int4"):
        return base in PROJECTIONS or quant.head
    return quant.name is None and ckpt.is_quantized(sl.source)


def _write_block(ckpt, out_dir: Path, rel: str, slices: dict[str, Slice], dtype: torch.dtype, quant: Quant) -> dict:
    quantized = {name: _quant_slice(ckpt, sl, quant) for name, sl in slices.items()
                 if _quantized(ckpt, name, sl, quant)}
    specs, order = [], []
    for name, sl in slices.items():
        if name in quantized:
            for tname, t in quantized[name].tensors(name.rsplit(".", 1)[0]).items():
                specs.append((tname, t.dtype, tuple(t.shape)))
                order.append((t,))
        else:
            specs.append((name, dtype, slice_shape(ckpt.shape(sl.source), sl)))
            order.append((ckpt, sl))
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = StreamingWriter(str(path), specs)
    for item in order:
        for chunk in (item[0].contiguous(),) if len(item) == 1 else _float_chunks(item[0], item[1], dtype):
            writer.write(chunk)
    writer.close()
    return {"size": writer.size, "sha256": writer.sha256.hexdigest()}


# -- the split ------------------------------------------------------------------------------------------
def split(model: str | os.PathLike, out_dir: str | os.PathLike, world_size: int, ratios=None,
          dtype: str = "float32", progress: bool = True, quant: Quant = Quant()) -> dict:
    """Split a checkpoint (folder or .gguf) into per-rank block files under `out_dir`; returns the
    manifest. `dtype` is the floats' (norms, biases, and unquantized weights)."""
    return _split(open_checkpoint(model), model, out_dir, world_size, ratios, dtype, progress, quant)


def _split(ckpt, model, out_dir, world_size: int, ratios, dtype: str, progress: bool, quant: Quant) -> dict:
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {list(DTYPE_NAMES)}")
    cfg = ckpt.config
    gguf = str(model).endswith(".gguf")
    if gguf and quant.name in ("int8", "int4"):
        raise ConfigError(f"quant={quant.name!r}: {model} is a GGUF file, whose types are kept as they are "
                          "(quant=None) or dequantized (quant='float'); int8 and int4 quantize a float checkpoint")
    fmt = quant.manifest(gguf)
    if fmt:  # before the plan, which needs whole groups of FFN columns: say which widths cut groups
        _check_groups(cfg, make_plan(cfg, world_size, ratios), fmt["group_size"], model)
    plan = make_plan(cfg, world_size, ratios, fmt["group_size"] if fmt else 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, layer, kind) for r in range(world_size) for layer, kind in rank_blocks(cfg, plan, r)]
    files = {}
    bar = _progress(len(jobs), f"split {Path(model).name} for {world_size} ranks", progress)
    for r, layer, kind in jobs:
        rel = block_file(r, layer, kind)
        files[rel] = _write_block(ckpt, out, rel, block_slices(cfg, plan, r, layer, kind), DTYPE_NAMES[dtype], quant)
        bar.update(1)
    bar.close()
    ckpt.write_extras(out)
    generation = out / "generation_config.json"
    manifest = {"format": SPLIT_FORMAT, "config": ckpt.hf_config, "dtype": dtype, "plan": plan.to_dict(),
                "generation": json.loads(generation.read_text()) if generation.is_file() else {}, "files": files}
    if fmt:
        manifest["quant"] = fmt
    _write_json(out / "manifest.json", manifest)
    return manifest


def _check_groups(cfg: ModelConfig, plan, group: int, model) -> None:
    """Every quantized projection's input columns, as each rank holds them, must be whole groups:
    the hidden size and the FFN size (the plan apportions FFN columns in whole groups), and each
    rank's query heads (o_proj's columns). A slice that would cut a group is refused, naming the
    widths and the group sizes that fit."""
    widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size}
    widths |= {f"rank {s.rank}'s query heads x head_dim (o_proj's columns)": s.num_heads * cfg.head_dim
               for s in plan.shards if s.num_heads}
    bad = {name: w for name, w in widths.items() if w % group}
    if bad:
        fits = [g for g in (256, 128, 64, 32, 16, 8) if all(w % g == 0 for w in widths.values())]
        raise ConfigError(f"{model}: group size {group} cuts groups: " + ", ".join(f"{n} = {w}" for n, w in bad.items())
                          + f" is not a multiple of {group}. A rank's slice never cuts a group; "
                          + (f"use --group-size {fits[0]}" if fits else "no group size of 8 or more fits this split"))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)


def split_cached(model: str | os.PathLike, world_size: int, ratios=None, dtype: str = "float32",
                 cache_dir: str | os.PathLike | None = None, progress: bool = True, quant: Quant = Quant()) -> Path:
    """Split once per (checkpoint, world size, ratios, dtype, format) into the cache; safe across
    processes. A split already there is found from the checkpoint's identity alone (a GGUF file is
    not parsed)."""
    ckpt = open_checkpoint(model)
    key = hashlib.sha256(json.dumps([ckpt.fingerprint(), world_size, parse_ratios(ratios, world_size), dtype,
                                     SPLIT_FORMAT, [quant.name, quant.group_size, quant.head]]).encode())
    root = Path(cache_dir) if cache_dir else cache_root() / "splits"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key.hexdigest()[:24]
    with open(str(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the split done
        if not (final / "manifest.json").is_file():
            tmp = Path(f"{final}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _split(ckpt, model, tmp, world_size, ratios, dtype, progress, quant)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a refused plan or a failed write leaves nothing
                raise
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    return final


# -- back to a Hugging Face folder ------------------------------------------------------------------------
def export_dequantized(shard_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A split (quantized or not) back to a Hugging Face folder: config.json, the tokenizer files, and
    model.safetensors with every weight in float32, each assembled from the ranks' slices (one tensor
    in memory at a time). transformers loads it; its outputs are the reference for the split's."""
    manifest = Manifest.load(shard_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _hf_tensors(manifest)
    specs = [(n, torch.float32, s) for n, s in names.items()]
    writer = StreamingWriter(str(out / "model.safetensors"), specs)
    for name, shape in names.items():
        writer.write(_assemble(shard_dir, manifest, name, shape))
    writer.close()
    (out / "config.json").write_text(json.dumps({k: v for k, v in manifest.raw["config"].items()
                                                 if k != "quantization_config"}, indent=1))
    for f in Path(shard_dir).iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    return out


def _hf_tensors(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, by its Hugging Face name, with its full shape."""
    cfg = manifest.config
    shapes, out = full_shapes(cfg), {}
    for layer in range(cfg.num_layers):
        for kind in ("attn", "ffn"):
            for rank in range(manifest.plan.world_size):
                for sl in block_slices(cfg, manifest.plan, rank, layer, kind).values():
                    out[sl.source] = shapes[sl.source.removeprefix(f"model.layers.{layer}.")]
    for sl in block_slices(cfg, manifest.plan, 0, None, "head").values():
        out[sl.source] = shapes[sl.source]
    return out


def _assemble(shard_dir, manifest: Manifest, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor `name` whole, in float32, from every rank slice that holds it."""
    cfg, plan = manifest.config, manifest.plan
    full = torch.zeros(shape, dtype=torch.float32)
    blocks = [(0, None, "head")] if not name.startswith("model.layers.") else \
        [(r, int(name.split(".")[2]), k) for r in range(plan.world_size) for k in ("attn", "ffn")]
    for rank, layer, kind in blocks:
        if kind != "head" and (layer, kind) not in rank_blocks(cfg, plan, rank):
            continue
        w = load_block(shard_dir, manifest, rank, layer, kind)
        for out_name, sl in block_slices(cfg, plan, rank, layer, kind).items():
            if sl.source != name:
                continue
            base = out_name.rsplit(".", 1)[0]
            t = dequantize(from_block(w, base)) if f"{base}.qweight" in w and out_name.endswith(".weight") \
                else w[out_name].float()
            rows = slice(*sl.rows) if sl.rows else slice(None)
            cols = slice(*sl.cols) if sl.cols else slice(None)
            full[(rows, cols) if full.dim() == 2 else rows] = t
    return full
