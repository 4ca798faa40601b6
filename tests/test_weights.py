"""Checkpoint reading and splitting on tiny models: the manifest describes the files, each rank's
block holds exactly its slice of the original tensors, sharded and single-file checkpoints split
identically, pickles and unsupported models are refused, config parsing agrees across the forms
HF writes, damaged or lying files raise errors that name them, and each rank checks its files
(sizes, sha256, headers) when it starts."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpi.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig, RopeConfig
from tpi.open_rank import open_rank_model
from tpi.options import MemoryOptions, RankOptions
from tpi.partition import make_plan
from tpi.rank_model import RankModel
from tpi.safetensors_io import ShardFileError, read_header
from tpi.scheduler import read_block
from tpi.split import split
from tpi.weights import Manifest, block_file, block_spec, load_block, verify_rank_files

pytestmark = pytest.mark.unit

WORLD = 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.glob("rank*/*") if p.is_file()}


@pytest.fixture(scope="module")
def llama3(tiny_models) -> tuple[Path, dict[str, torch.Tensor], ModelConfig]:
    """(checkpoint dir, original tensors, config) of the tiny Llama with attention and MLP biases."""
    path, _ = tiny_models("llama3")
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    return path, load_file(path / "model.safetensors"), cfg


@pytest.fixture(scope="module")
def split3(llama3, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("split3")
    return out, split(llama3[0], out, WORLD, progress=False)


# --- (a) split: manifest and slices --------------------------------------------------------------

def test_manifest_lists_every_file_with_size_and_sha256(split3) -> None:
    out, manifest = split3
    assert set(manifest["files"]) == block_files(out)
    for rel, meta in manifest["files"].items():
        assert meta["size"] == (out / rel).stat().st_size, rel
        assert meta["sha256"] == sha256(out / rel), rel
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.rglob("*.part"))


def test_manifest_plan_and_blocks(llama3, split3) -> None:
    _, _, cfg = llama3
    manifest = split3[1]
    assert manifest["plan"] == make_plan(cfg, WORLD).to_dict()
    expected = {block_file(r, layer, kind) for r in range(WORLD) for layer in range(cfg.num_layers)
                for kind in ("attn", "ffn")} | {block_file(0, None, "head")}
    assert set(manifest["files"]) == expected


def rank_tensors(out: Path, layer: int, kind: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / block_file(r, layer, kind)) for r in range(WORLD)]


def test_attention_slices(llama3, split3) -> None:
    _, orig, cfg = llama3
    out, manifest = split3
    hd = cfg.head_dim
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}.self_attn."
        ranks = rank_tensors(out, layer, "attn")
        for r, (t, shard) in enumerate(zip(ranks, manifest["plan"]["shards"])):
            q = slice(shard["heads"][0] * hd, shard["heads"][1] * hd)
            kv = slice(shard["kv_heads"][0] * hd, shard["kv_heads"][1] * hd)
            assert torch.equal(t["q_proj.weight"], orig[p + "q_proj.weight"][q]), (layer, r)
            assert torch.equal(t["q_proj.bias"], orig[p + "q_proj.bias"][q]), (layer, r)
            for name in ("k_proj", "v_proj"):
                assert torch.equal(t[f"{name}.weight"], orig[f"{p}{name}.weight"][kv]), (layer, r, name)
                assert torch.equal(t[f"{name}.bias"], orig[f"{p}{name}.bias"][kv]), (layer, r, name)
            assert torch.equal(t["o_proj.weight"], orig[p + "o_proj.weight"][:, q]), (layer, r)
            norm = orig[f"model.layers.{layer}.input_layernorm.weight"]
            assert torch.equal(t["input_layernorm.weight"], norm)
        # the ranks' slices put back together are the original, whatever the plan
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(torch.cat([t[f"{name}.weight"] for t in ranks]), orig[f"{p}{name}.weight"])
        assert torch.equal(torch.cat([t["o_proj.weight"] for t in ranks], dim=1), orig[p + "o_proj.weight"])


def test_ffn_slices(llama3, split3) -> None:
    _, orig, cfg = llama3
    out, manifest = split3
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}.mlp."
        ranks = rank_tensors(out, layer, "ffn")
        for r, (t, shard) in enumerate(zip(ranks, manifest["plan"]["shards"])):
            c = slice(*shard["ffn"])
            for name in ("gate_proj", "up_proj"):
                assert torch.equal(t[f"{name}.weight"], orig[f"{p}{name}.weight"][c]), (layer, r, name)
                assert torch.equal(t[f"{name}.bias"], orig[f"{p}{name}.bias"][c]), (layer, r, name)
            assert torch.equal(t["down_proj.weight"], orig[p + "down_proj.weight"][:, c]), (layer, r)
        assert torch.equal(torch.cat([t["down_proj.weight"] for t in ranks], dim=1), orig[p + "down_proj.weight"])
        assert torch.equal(torch.cat([t["up_proj.weight"] for t in ranks]), orig[p + "up_proj.weight"])


def bias_owners(out: Path, layers: int, ranks: int) -> dict[str, set[int]]:
    owners: dict[str, set[int]] = {"o_proj.bias": set(), "down_proj.bias": set()}
    for r in range(ranks):
        for layer in range(layers):
            for kind in ("attn", "ffn"):
                f = out / block_file(r, layer, kind)
                names = set(read_header(str(f))) if f.is_file() else set()
                for bias, ranks_with in owners.items():
                    if bias in names:
                        ranks_with.add(r)
    return owners


def test_row_parallel_biases_on_rank0_only(llama3, split3) -> None:
    _, orig, cfg = llama3
    out, _ = split3
    assert bias_owners(out, cfg.num_layers, WORLD) == {"o_proj.bias": {0}, "down_proj.bias": {0}}
    t = load_file(out / block_file(0, 1, "attn"))
    assert torch.equal(t["o_proj.bias"], orig["model.layers.1.self_attn.o_proj.bias"])


def test_row_parallel_biases_move_off_a_rank_without_share(llama3, tmp_path) -> None:
    path, _, cfg = llama3
    split(path, tmp_path, WORLD, ratios="0,1,1", progress=False)
    assert bias_owners(tmp_path, cfg.num_layers, WORLD) == {"o_proj.bias": {1}, "down_proj.bias": {1}}
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == ["head.safetensors"]


def test_head_file(llama3, split3) -> None:
    _, orig, _ = llama3
    out, _ = split3
    head = load_file(out / block_file(0, None, "head"))
    assert set(head) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for name, t in head.items():
        source = name if name == "lm_head.weight" else f"model.{name}"
        assert torch.equal(t, orig[source]), name


def test_tied_embeddings_have_no_lm_head(tiny_models, tmp_path) -> None:
    path, _ = tiny_models("llama")
    split(path, tmp_path, 1, progress=False)
    assert set(load_file(tmp_path / block_file(0, None, "head"))) == {"embed_tokens.weight", "norm.weight"}


def test_load_block_matches_file(split3) -> None:
    out, _ = split3
    manifest = Manifest.load(out)
    for r in range(WORLD):
        got = load_block(out, manifest, r, 1, "ffn")
        ref = load_file(out / block_file(r, 1, "ffn"))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# --- (b) sharded checkpoints ---------------------------------------------------------------------

def test_sharded_checkpoint_splits_identically(tiny_models, split3, tmp_path) -> None:
    _, model = tiny_models("llama3")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    manifest = split(sharded, tmp_path / "out", WORLD, progress=False)
    assert manifest["files"] == split3[1]["files"]


# --- (c) pickled checkpoints ---------------------------------------------------------------------

def test_pickled_checkpoint_refused_unopened(llama3, tmp_path, monkeypatch) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(llama3[0] / "config.json", model_dir)
    pickled = model_dir / "pytorch_model.bin"
    pickled.write_bytes(b"\x80\x04 not a pickle, and never read" * 10)
    opened: list[str] = []

    def recording(real):
        def wrapper(file, *args, **kwargs):
            opened.append(os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else repr(file))
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    with pytest.raises(ConfigError, match=r"pickled.*pytorch_model\.bin"):
        split(model_dir, tmp_path / "out", 1, progress=False)
    assert any(p.endswith("config.json") for p in opened), opened  # the recorder works
    assert not any("pytorch_model" in p for p in opened), opened
    assert not (tmp_path / "out").exists()


# --- (d) unsupported architectures ---------------------------------------------------------------

GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}


def test_unsupported_architecture_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="GPT2LMHeadModel") as err:
        ModelConfig.from_hf(GPT2)
    assert all(a in str(err.value) for a in SUPPORTED_ARCHITECTURES), err.value
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        split(tmp_path, tmp_path / "out", 1, progress=False)


def test_unsupported_model_type_named() -> None:
    cfg = {k: v for k, v in GPT2.items() if k != "architectures"}
    with pytest.raises(ConfigError, match=r"model_type='gpt2'.*LlamaForCausalLM"):
        ModelConfig.from_hf(cfg)


# --- (e) rotary settings -------------------------------------------------------------------------

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 131072}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
LLAMA3_ROPE = RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)


def rope_of(**fields) -> RopeConfig:
    return ModelConfig.from_hf({**BASE, **fields}).rope


@pytest.mark.parametrize("fields", [
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}},
], ids=["old", "legacy-type", "transformers5"])
def test_llama3_rope_forms_agree(fields: dict) -> None:
    assert rope_of(**fields) == LLAMA3_ROPE


def test_rope_as_transformers_rewrites_it() -> None:
    from transformers import LlamaConfig

    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}}
    hf = LlamaConfig(**{k: v for k, v in BASE.items() if k != "architectures"}, **old).to_dict()
    assert "rope_parameters" in hf
    assert ModelConfig.from_hf({**hf, "architectures": BASE["architectures"]}).rope == LLAMA3_ROPE


def test_default_and_linear_rope_forms() -> None:
    assert rope_of() == RopeConfig(theta=10000.0)
    assert rope_of(rope_theta=1e6) == rope_of(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert rope_of(rope_theta=1e6) == RopeConfig(theta=1e6)
    linear = RopeConfig(theta=1e4, type="linear", factor=2.0)
    assert rope_of(rope_scaling={"type": "linear", "factor": 2.0}) == linear
    assert rope_of(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}) == linear


@pytest.mark.parametrize("fields", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
    {"rope_scaling": {"type": "yarn", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
])
def test_yarn_refused(fields: dict) -> None:
    with pytest.raises(ConfigError, match=r"rope type 'yarn' is not supported"):
        rope_of(**fields)


# --- (f) sliding windows -------------------------------------------------------------------------

def windows(arch: str, **fields) -> tuple[int | None, ...]:
    return ModelConfig.from_hf({**BASE, "architectures": [arch], **fields}).sliding_windows


def test_sliding_windows() -> None:
    assert windows("MistralForCausalLM", sliding_window=4096) == (4096, 4096, 4096)
    assert windows("MistralForCausalLM", sliding_window=None) == (None, None, None)
    assert windows("Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=False) == (None, None, None)
    assert windows("Qwen2ForCausalLM", sliding_window=4096, use_sliding_window=True,
                   max_window_layers=1) == (None, 4096, 4096)
    assert windows("LlamaForCausalLM", sliding_window=4096) == (None, None, None)


@pytest.mark.parametrize("use,expected", [(True, (None, 128, 128)), (False, (None, None, None))])
def test_sliding_windows_as_transformers_writes_them(use: bool, expected: tuple) -> None:
    from transformers import Qwen2Config

    hf = Qwen2Config(use_sliding_window=use, sliding_window=128, max_window_layers=1, num_hidden_layers=3,
                     hidden_size=64, num_attention_heads=8, num_key_value_heads=4).to_dict()
    assert "layer_types" in hf
    assert ModelConfig.from_hf({**hf, "architectures": ["Qwen2ForCausalLM"]}).sliding_windows == expected


# --- (g) damaged files ---------------------------------------------------------------------------

def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("cut,match", [
    (lambda n, h: 4, "too short"),
    (lambda n, h: 8 + h - 1, "header length"),
    (lambda n, h: n - 1, "do not match"),
], ids=["in-length", "in-header", "in-data"])
def test_read_header_truncated(split3, tmp_path, cut, match: str) -> None:
    src = split3[0] / block_file(1, 0, "attn")
    data = src.read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data[:cut(len(data), header_length(src))])
    with pytest.raises(ShardFileError, match=match) as err:
        read_header(str(damaged))
    assert str(damaged) in str(err.value)


def write_raw_safetensors(path: Path, header: bytes, data: bytes = b"\0" * 8) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header", [b"[]", b'{"a": {"dtype": "F32", "shape": [1]}}', b'{"a": 5}'])
def test_read_header_malformed(tmp_path, header: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    write_raw_safetensors(path, header)
    with pytest.raises(ShardFileError, match="bad.safetensors"):
        read_header(str(path))


@pytest.mark.parametrize("damage", ["grow", "shrink", "delete"])
def test_load_block_checks_size(split3, tmp_path, damage: str) -> None:
    out = tmp_path / "copy"
    shutil.copytree(split3[0], out)
    rel = block_file(2, 1, "ffn")
    path = out / rel
    data = path.read_bytes()
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(data + b"\0" if damage == "grow" else data[:-8])
    manifest = Manifest.load(out)
    with pytest.raises(ShardFileError, match=rf"{rel}: size .*manifest says {len(data)} bytes"):
        load_block(out, manifest, 2, 1, "ffn")
    load_block(out, manifest, 1, 1, "ffn")  # the others still load


@pytest.mark.parametrize("meta", [
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]},  # JSON's infinity
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},
    {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 8 << 40]},  # far past the end
], ids=["inf", "float-shape", "bool-shape", "negative", "three-offsets", "list-dtype", "past-the-end"])
def test_read_header_refuses_lying_entries(tmp_path, meta: dict) -> None:
    path = tmp_path / "lying.safetensors"
    write_raw_safetensors(path, json.dumps({"a": meta}).encode().replace(b"Infinity", b"1e400"))
    with pytest.raises(ShardFileError, match=r"lying\.safetensors: tensor a"):
        read_header(str(path))


def test_read_header_refuses_deep_nesting(tmp_path) -> None:
    path = tmp_path / "deep.safetensors"
    write_raw_safetensors(path, b"[" * 100_000)
    with pytest.raises(ShardFileError, match="deep.safetensors: header is not valid JSON"):
        read_header(str(path))


# --- (h) shard files checked at start ------------------------------------------------------------

@pytest.fixture
def damaged(split3, tmp_path) -> Path:
    """A private copy of the 3-rank split, to damage."""
    out = tmp_path / "copy"
    shutil.copytree(split3[0], out)
    return out


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_header(out: Path, rel: str, edit) -> None:
    """Rewrite a block file's header through `edit(header)`, keeping its data, and update the
    manifest so that its size and sha256 agree: a file that lies in its header only."""
    path = out / rel
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][rel] = {"size": path.stat().st_size, "sha256": sha256(path)}
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_verify_finds_a_flipped_byte_by_sha256(damaged) -> None:
    rel = block_file(2, 1, "ffn")
    flip_byte(damaged / rel, (damaged / rel).stat().st_size - 3)  # in the data: the header still parses
    manifest = Manifest.load(damaged)
    with pytest.raises(ShardFileError, match=rf"rank 2: .*{rel}: sha256 .* does not match the manifest"):
        verify_rank_files(damaged, manifest, 2)
    verify_rank_files(damaged, manifest, 2, checksums=False)  # the same size: only the checksum sees it
    for rank in (0, 1):
        verify_rank_files(damaged, manifest, rank)  # the other ranks' files are fine


@pytest.mark.parametrize("damage", ["cut", "delete"])
def test_verify_checks_sizes_even_without_checksums(damaged, damage: str) -> None:
    rel = block_file(1, 0, "attn")
    size = (damaged / rel).stat().st_size
    if damage == "cut":
        os.truncate(damaged / rel, size - 100)
    else:
        (damaged / rel).unlink()
    with pytest.raises(ShardFileError, match=rf"rank 1: .*{rel}: size \S+, manifest says {size} bytes"):
        verify_rank_files(damaged, Manifest.load(damaged), 1, checksums=False)


def rank_model(out: Path, rank: int, verify: bool = True) -> RankModel:
    return open_rank_model(out, Manifest.load(out), rank, RankOptions(memory=MemoryOptions(verify_shards=verify)))


def test_rank_refuses_a_flipped_byte_at_start_unless_told_not_to_verify(damaged) -> None:
    rel = block_file(0, None, "head")
    flip_byte(damaged / rel, (damaged / rel).stat().st_size - 1)
    with pytest.raises(ShardFileError, match=rf"rank 0: .*{rel}: sha256"):
        rank_model(damaged, 0)
    rank_model(damaged, 0, verify=False).close()  # --no-verify: starts, and trusts the bytes


def test_rank_refuses_a_header_with_ranges_past_the_end(damaged) -> None:
    rel = block_file(1, 1, "ffn")

    def grow(header: dict) -> None:  # the last tensor claims 4x its rows, consistently, past the end
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        meta = header[name]
        begin, end = meta["data_offsets"]
        meta["shape"][0] *= 4
        meta["data_offsets"] = [begin, begin + 4 * (end - begin)]

    rewrite_header(damaged, rel, grow)
    with pytest.raises(ShardFileError, match=rf"{rel}: tensor .* do not match .* the file size"):
        rank_model(damaged, 1)  # the manifest agrees with the file: the header itself is checked


def test_rank_refuses_a_header_with_shapes_the_config_does_not_have(damaged) -> None:
    rel = block_file(1, 0, "attn")

    def transpose(header: dict) -> None:  # same bytes, same offsets: q_proj [16, 64] read as [64, 16]
        header["q_proj.weight"]["shape"] = header["q_proj.weight"]["shape"][::-1]

    rewrite_header(damaged, rel, transpose)
    with pytest.raises(ShardFileError, match=rf"{rel}: tensor q_proj.weight is F32 \[64, 16\]; .* need F32 "
                                             r"\[16, 64\]"):
        rank_model(damaged, 1)


def test_a_file_cut_after_start_is_named_when_read(damaged) -> None:
    manifest = Manifest.load(damaged)
    spec = block_spec(damaged, manifest, 2, 0, "ffn")
    os.truncate(spec.path, os.path.getsize(spec.path) - 8)
    with pytest.raises(ShardFileError, match=rf"{spec.path}: tensor \S+: unexpected end of file"):
        read_block(spec)


# --- (i) bfloat16 --------------------------------------------------------------------------------

def test_bfloat16_split_is_cast_of_float32(llama3, split3, tmp_path) -> None:
    manifest = split(llama3[0], tmp_path, WORLD, dtype="bfloat16", progress=False)
    assert manifest["dtype"] == "bfloat16" and Manifest.load(tmp_path).dtype == torch.bfloat16
    fp32_out, fp32_manifest = split3
    assert set(manifest["files"]) == set(fp32_manifest["files"])
    for rel in manifest["files"]:
        half, full = load_file(tmp_path / rel), load_file(fp32_out / rel)
        assert half.keys() == full.keys(), rel
        for name, t in half.items():
            assert t.dtype == torch.bfloat16, (rel, name)
            assert torch.equal(t, full[name].to(torch.bfloat16)), (rel, name)
