"""Quantized weights (tpi/quant, tpi/split.py): the formats and kernels alone (unit tier), every
family at world sizes 1-4 and uneven ratios in int8 and int4 against transformers running the
dequantized weights (``export_dequantized``) in one process (inprocess tier: float32 logits within
1e-4 of their scale, greedy tokens identical, in the exact compute), streaming equal to resident,
the quantized LM head and embedding, and one real-process case per format, its workers fetching
their quantized shards from the master (cluster tier). GGUF files: test_gguf.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, assert_close, build_tiny

from tpi.comm.membership import Members, hello, identity
from tpi.comm.wire import Kind
from tpi.config import ConfigError
from tpi.inprocess import InProcessCluster
from tpi.partition import make_plan
from tpi.quant.formats import (
    QuantTensor,
    check_shapes,
    dequantize,
    from_block,
    pack_int4,
    quantize,
    tile_int4,
    unpack_int4,
    untile_int4,
)
from tpi.quant.kernels import KERNEL_ROWS, QuantLinear, _layout_is_tiled, _torch_pack, transient_bytes
from tpi.safetensors_io import ShardFileError
from tpi.split import Quant, export_dequantized, split, split_cached
from tpi.weights import Manifest, block_file, block_spec

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11, 200, 31]
NEW = 16
# head_dim 32 and 128 FFN columns: every rank's o_proj columns and FFN share are whole groups of 32,
# and every projection has whole 32-row tiles, so that torch's int4 kernel runs (and the
# dequantizing path for the LM head's chunks and int8)
SHAPE = dict(head_dim=32, intermediate_size=128)


# -- the formats and kernels (unit tier) -----------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("group", [32, 128])
def test_quantize_error_is_within_half_a_step(fmt, group):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, fmt, group)
    assert qt.shape == (48, 256) and qt.group_size == group and qt.format == fmt
    assert qt.scales.dtype == torch.float16  # exact in float16 for weights of this range
    step = qt.scales.float().repeat_interleave(group, dim=1)
    err = (dequantize(qt) - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    if fmt == "int4":
        assert qt.codes.dtype == torch.uint8 and qt.codes.shape == (48, 128) and qt.mins is not None
    else:
        assert qt.codes.dtype == torch.int8 and qt.mins is None


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_scales_stay_float32_where_float16_cannot_hold_them():
    w = torch.full((16, 32), 1e6)
    w[0] = 1e-9  # its scale (1e-9 / 127) is below float16's smallest value: every scale stays float32
    qt = quantize(w, "int8", 32)
    assert qt.scales.dtype == torch.float32
    assert_close(dequantize(qt), w, rel=1e-2)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_int4_layouts_round_trip_and_the_tiled_one_is_torchs():
    q = torch.randint(0, 16, (64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    tiled = tile_int4(packed)
    assert torch.equal(untile_int4(tiled), packed)
    assert torch.equal(tiled, _torch_pack(packed)) == _layout_is_tiled()  # what the kernel reads
    if torch.__version__.startswith("2.13"):  # CI's torch: blocks go to its int4 kernel as they were read
        assert _layout_is_tiled()
    qt = QuantTensor(packed, torch.ones(64, 3), None)
    stored = from_block(qt.tensors("p"), "p")  # 64 rows: stored tiled
    assert stored.tiled and torch.equal(stored.codes, tiled)
    assert torch.equal(stored.rows(5, 40).codes, packed[5:40]) and torch.equal(stored.rows(32, 64).codes, packed[32:])
    assert not from_block(QuantTensor(packed[:48], torch.ones(48, 3)).tensors("p"), "p").tiled  # 48 rows: not


@pytest.mark.unit
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt,rows,group", [("int4", 64, 32), ("int4", 48, 128), ("int4", 40, 32), ("int8", 64, 32),
                                            ("int4", 64, 16)])
@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("steps", [5, KERNEL_ROWS + 16])  # a decode-sized step and a prompt chunk beyond the kernel's
def test_quant_linear_matches_the_dequantized_product(fmt, rows, group, prepared, steps):
    """exact: F.linear on the dequantized weight, to a few 1e-6; fast: torch's int4 kernel (groups
    32-256, whole 32-row tiles: 64 rows, not 48 or 40) within bfloat16's error on short
    steps, and a prepared block's dequantized scales-and-zeros beyond; other weights as exact."""
    gen = torch.Generator().manual_seed(2)
    qt = quantize(torch.randn(rows, 256, generator=gen), fmt, group)
    x = torch.randn(steps, 256, generator=gen)
    bias = torch.randn(rows, generator=gen)
    ref = F.linear(x, dequantize(qt), bias)
    for compute, rel in (("exact", 1e-5), ("fast", 3e-2)):
        linear = QuantLinear(compute)
        w = {**qt.tensors("p"), "p.bias": bias}
        if prepared:
            linear.prepare(w)
        assert_close(linear(x, w, "p"), ref, rel=rel)
        assert_close(linear(x, w, "p"), linear(x, dict(w), "p"), rel=0)  # repeatable
    assert QuantLinear("exact")(x, {"p.weight": dequantize(qt), "p.bias": bias}, "p").equal(ref)  # floats: F.linear


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_prepare_makes_the_kernels_scales_once_in_the_same_bytes():
    qt = quantize(torch.randn(64, 256), "int4", 32)
    w = qt.tensors("p")
    before = sum(t.nbytes for t in w.values())
    QuantLinear("fast").prepare(w)
    if _layout_is_tiled():  # else fast dequantizes too: nothing to prepare
        assert set(w) == {"p.qweight", "p.int4sz"} and sum(t.nbytes for t in w.values()) == before
    w = qt.tensors("p")
    QuantLinear("exact").prepare(w)  # exact dequantizes: nothing to prepare
    assert set(w) == {"p.qweight", "p.scales", "p.mins"}


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_transient_bytes_bound_one_call():
    int4 = [("p.qweight", torch.uint8, (64, 128)), ("p.scales", torch.float16, (64, 8)), ("x.weight", torch.float32,
                                                                                            (4, 4))]
    sz = (4 + 2) * 2 * 64 * 8 if _layout_is_tiled() else 4 * 64 * 256  # else fast dequantizes, as exact
    assert transient_bytes(int4, "fast", 64) == sz  # scales-and-zeros in float32 and bfloat16
    assert transient_bytes(int4, "fast", 512) == (4 + 2) * 2 * 64 * 8 + 4 * 64 * 256 if _layout_is_tiled() else sz
    assert transient_bytes(int4, "exact", 1) == 4 * 64 * 256  # only that
    int8 = [("p.qweight", torch.int8, (40, 256)), ("p.scales", torch.float16, (40, 8))]
    assert transient_bytes(int8, "fast", 1) == 4 * 40 * 256


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_bad_shapes_and_values_are_named():
    with pytest.raises(ConfigError, match=r"q_proj.qweight is torch.int8 \[8, 30\]"):
        check_shapes("q_proj", (8, 30), torch.int8, (8, 1), torch.float16, None, None, 8, 32)
    with pytest.raises(ConfigError, match=r"q_proj.scales is torch.float16 \[8, 3\]"):
        check_shapes("q_proj", (8, 16), torch.uint8, (8, 3), torch.float16, None, None, 8, 32)
    with pytest.raises(ConfigError, match=r"q_proj.mins is torch.float32"):
        check_shapes("q_proj", (8, 16), torch.uint8, (8, 1), torch.float16, (8, 1), torch.float32, 8, 32)
    with pytest.raises(ConfigError, match="quant='int3'"):
        Quant("int3")
    with pytest.raises(ConfigError, match="group_size=33"):
        Quant("int4", 33)
    with pytest.raises(ConfigError, match="cannot be quantized in groups of 32"):
        quantize(torch.randn(4, 48), "int4", 32)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_the_plan_apportions_ffn_columns_in_whole_groups(tiny_models):
    from tpi.config import ModelConfig

    raw = json.loads((tiny_models("llama")[0] / "config.json").read_text())
    plan = make_plan(ModelConfig.from_hf({**raw, "intermediate_size": 128}), 3, None, 32)
    assert sorted(s.ffn_size for s in plan.shards) == [32, 32, 64] and all(s.ffn[0] % 32 == 0 for s in plan.shards)
    with pytest.raises(ConfigError, match="intermediate_size=96 is not a multiple of the group size 64"):
        make_plan(ModelConfig.from_hf({**raw, "intermediate_size": 96}), 3, None, 64)


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_a_worker_computing_or_chunking_otherwise_is_refused():
    members = Members(3, "d" * 64, "exact")
    ok = members.welcome(identity(1), hello(1, "d" * 64, "", "exact"))
    assert ok.joined and ok.reply.kind == Kind.WELCOME
    refused = members.welcome(identity(2), hello(2, "d" * 64, "", "fast"))
    assert refused.reply.kind == Kind.REFUSE and "rank 2 computes 'fast'" in refused.refused
    assert "--compute" in refused.refused
    refused = members.welcome(identity(2), hello(2, "d" * 64, "", "exact", 64))
    assert refused.reply.kind == Kind.REFUSE and "prefill chunks of 64 tokens, the master sends 512" in refused.refused


# -- the split --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_models(tmp_path_factory):
    """family -> checkpoint dir of the family's tiny model in the quantizable shape."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tmp_path_factory.mktemp(f"q-{family}")
            build_tiny(family, cache[family], **SHAPE)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def references(quant_models, tmp_path_factory, split_cache):
    """(family, world size, ratios, format, head) -> (transformers logits, greedy tokens) on the split's
    dequantized weights."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str, world: int, ratios, fmt: str, head: bool = False):
        key = (family, world, ratios, fmt, head)
        if key not in cache:
            shard = split_cached(quant_models(family), world, ratios, cache_dir=split_cache, progress=False,
                                 quant=Quant(fmt, 32, head))
            ref_dir = export_dequantized(shard, tmp_path_factory.mktemp("ref"))
            model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager")
            with torch.no_grad():
                logits = model.eval()(torch.tensor([PROMPT])).logits[0]
                out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            cache[key] = (logits, out[0, len(PROMPT):].tolist())
        return cache[key]

    return get


@pytest.mark.inprocess
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_split_sizes_and_manifest(quant_models, tmp_path, fmt):
    path = quant_models("llama")
    floats = split(path, tmp_path / "f32", 2, progress=False)
    m = split(path, tmp_path / fmt, 2, progress=False, quant=Quant(fmt))
    assert m["quant"] == {"format": fmt, "group_size": 32, "head": False}
    assert Manifest.load(tmp_path / fmt).quant == m["quant"]
    layer_bytes = {name: sum(f["size"] for rel, f in man["files"].items() if "layer" in rel)
                   for name, man in (("f32", floats), (fmt, m))}
    # int8: a byte and 2/32 of scales per weight; int4: half a byte and 4/32 (safetensors headers aside)
    assert layer_bytes[fmt] < (0.33 if fmt == "int8" else 0.2) * layer_bytes["f32"], layer_bytes
    spec = block_spec(tmp_path / fmt, Manifest.load(tmp_path / fmt), 1, 0, "ffn")
    names = {t.name for t in spec.tensors}
    assert {"gate_proj.qweight", "gate_proj.scales", "down_proj.qweight"} <= names and "gate_proj.weight" not in names
    assert ("gate_proj.mins" in names) == (fmt == "int4")


@pytest.mark.inprocess
@pytest.mark.timeout(60)
def test_a_group_size_that_cuts_a_slice_is_refused(quant_models, tmp_path):
    with pytest.raises(ConfigError, match=r"group size 128 cuts groups: hidden_size = 64 .* use --group-size 64"):
        split(quant_models("llama"), tmp_path / "s", 2, progress=False, quant=Quant("int4", 128))
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.inprocess
@pytest.mark.timeout(60)
def test_a_lying_quantized_header_is_refused(quant_models, tmp_path):
    from tpi.safetensors_io import StreamingWriter

    split(quant_models("llama"), tmp_path, 2, progress=False, quant=Quant("int4"))
    manifest = Manifest.load(tmp_path)
    rel = block_file(1, 0, "attn")
    spec = block_spec(tmp_path, manifest, 1, 0, "attn")
    tensors = {t.name: (t.dtype, t.shape) for t in spec.tensors}
    tensors["q_proj.scales"] = (torch.float16, (tensors["q_proj.scales"][1][0], 3))  # 3 groups of a 64-wide row
    path = tmp_path / rel
    writer = StreamingWriter(str(path), [(n, d, s) for n, (d, s) in tensors.items()])
    for dtype, shape in tensors.values():
        writer.write(torch.zeros(shape, dtype=dtype))
    writer.close()
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["files"][rel] = {"size": writer.size, "sha256": writer.sha256.hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFileError, match=r"q_proj.scales is torch.float16 \[.*, 3\]"):
        block_spec(tmp_path, Manifest.load(tmp_path), 1, 0, "attn")


# -- sharded inference on quantized weights against transformers on the dequantized ones ---------------------------
CASES = [(f, ws, None, fmt) for f in FAMILIES for ws in (1, 2, 3, 4) for fmt in ("int8", "int4")]
CASES += [("llama", 3, "0,1,1", "int4"), ("llama3", 3, "3,1,1", "int8"), ("qwen3", 4, "1,2,2,1", "int4"),
          ("mistral", 3, "2,1,1", "int4")]


@pytest.mark.inprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("family,world_size,ratios,fmt", CASES, ids=[f"{f}-{w}-{r}-{q}" for f, w, r, q in CASES])
def test_exact_compute_matches_transformers_on_the_dequantized_weights(references, quant_models, split_cache,
                                                                       family, world_size, ratios, fmt):
    ref_logits, ref_tokens = references(family, world_size, ratios, fmt)
    with InProcessCluster(quant_models(family), world_size, ratios, quant=fmt, compute="exact",
                          cache_dir=split_cache) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens
        stats = cluster.stats()
    assert all(s.weight_format == f"{fmt}/exact" and s.weight_bytes > 0 for s in stats)


@pytest.mark.inprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied and untied embeddings
def test_quantized_lm_head_and_embedding(references, quant_models, split_cache, family):
    """Exact: transformers' answer; fast: close to it, and streamed (embedding rows read from disk)
    bit for bit what resident gives (a tied table's resident chunks keep their own scales)."""
    ref_logits, ref_tokens = references(family, 2, None, "int4", True)
    for compute in ("exact", "fast"):
        logits = []
        for stream in (False, True):  # streaming the head's chunks reads embeddings from disk
            kw = {"stream_all": True, "window": 1} if stream else {}
            with InProcessCluster(quant_models(family), 2, quant="int4", quant_head=True, compute=compute,
                                  cache_dir=split_cache, **kw) as cluster:
                logits.append(cluster.forward(PROMPT))
                assert_close(logits[-1], ref_logits, rel=1e-4 if compute == "exact" else 3e-2)
                if compute == "exact":
                    assert cluster.generate(PROMPT, NEW) == ref_tokens
        assert torch.equal(*logits)


@pytest.mark.inprocess
@pytest.mark.timeout(120)
@pytest.mark.parametrize("compute", ["exact", "fast"])
def test_streaming_is_bit_identical_to_resident(quant_models, split_cache, compute):
    """Pinned blocks go into the kernel's form once at start, streamed ones at each use: the same numbers."""
    path = quant_models("llama3")
    with InProcessCluster(path, 2, quant="int4", compute=compute, cache_dir=split_cache) as cluster:
        logits, tokens = cluster.forward(PROMPT), cluster.generate(PROMPT, 8)
    for window in (1, 2):
        with InProcessCluster(path, 2, quant="int4", compute=compute, cache_dir=split_cache, stream_all=True,
                              window=window) as cluster:
            assert torch.equal(cluster.forward(PROMPT), logits) and cluster.generate(PROMPT, 8) == tokens
            stats = cluster.stats()
        for r in stats:  # streamed reads move the quantized bytes
            assert r.pinned_blocks == 0 and r.bytes_read >= 9 * r.block_bytes
            assert r.weight_bytes == r.block_bytes if r.rank else r.weight_bytes > r.block_bytes  # + the final norm


@pytest.mark.inprocess
@pytest.mark.timeout(120)
def test_fast_compute_is_close_and_weights_are_smaller(references, quant_models, split_cache):
    ref_logits, _ = references("llama", 2, None, "int4")
    with InProcessCluster(quant_models("llama"), 2, quant="int4", cache_dir=split_cache) as cluster:  # fast: default
        assert_close(cluster.forward(PROMPT), ref_logits, rel=3e-2)
        quantized = cluster.stats()
    with InProcessCluster(quant_models("llama"), 2, cache_dir=split_cache) as cluster:
        floats = cluster.stats()
    assert all(s.weight_format == "int4/fast" for s in quantized) and all(s.weight_format == "" for s in floats)
    for q, f in zip(quantized[1:], floats[1:]):  # rank 0 also holds the float32 table (tied LM head)
        assert q.block_bytes < 0.2 * f.block_bytes and q.weight_bytes == q.block_bytes


@pytest.mark.inprocess
@pytest.mark.timeout(60)
def test_quant_float_is_todays_float_split(quant_models, split_cache):
    with InProcessCluster(quant_models("llama"), 2, cache_dir=split_cache) as cluster:
        logits = cluster.forward(PROMPT)
    with InProcessCluster(quant_models("llama"), 2, quant="float", cache_dir=split_cache) as cluster:
        assert torch.equal(cluster.forward(PROMPT), logits)


@pytest.mark.inprocess
@pytest.mark.timeout(60)
def test_the_offload_is_refused_on_quantized_weights(quant_models, split_cache):
    with pytest.raises(ConfigError, match="offload_share=0.5: the CPU/GPU offload divides float weights"):
        InProcessCluster(quant_models("llama"), 1, quant="int4", offload_share=0.5, cache_dir=split_cache).start()


# -- real processes: one case per format ----------------------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fmt,world_size,ratios", [("int4", 3, "2,1,1"), ("int8", 2, None)])
def test_real_processes_fetch_quantized_shards_and_match(references, quant_models, split_cache, tmp_path, fmt,
                                                         world_size, ratios):
    """Workers fetch their quantized shards from the master (the bytes of their quantized files) and
    the logits are bit for bit the in-process cluster's, within 1e-4 of transformers'."""
    from tpi import LocalCluster

    ref_logits, ref_tokens = references("mistral", world_size, ratios, fmt)
    path = quant_models("mistral")
    with LocalCluster(path, world_size, ratios, quant=fmt, compute="exact", cache_dir=split_cache,
                      worker_cache_dir=tmp_path) as cluster:
        logits = cluster.forward(PROMPT)
        assert_close(logits, ref_logits)
        assert cluster.generate(PROMPT, NEW, temperature=0.0) == ref_tokens
        stats, manifest = cluster.stats(), Manifest.load(cluster.shard_dir)
    for r in stats[1:]:
        assert r.fetched_bytes == sum(f["size"] for f in manifest.rank_files(r.rank).values())
        assert r.weight_format == f"{fmt}/exact"
    with InProcessCluster(path, world_size, ratios, quant=fmt, compute="exact", cache_dir=split_cache) as local:
        assert torch.equal(local.forward(PROMPT), logits)


# -- a GPU: quantized blocks that fit its budget run there ------------------------------------------------------------
@pytest.mark.inprocess
@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("gpu_budget", [None, "100KB"])  # everything on the GPU; the KV cache (64 KB) and some blocks
def test_quantized_blocks_on_the_gpu(references, quant_models, split_cache, fmt, gpu_budget):
    """On CUDA a quantized projection is dequantized into a reused buffer on the GPU (no CPU int4
    kernel there); the host's blocks use the CPU's kernel: exact either way."""
    ref_logits, ref_tokens = references("llama3", 2, None, fmt, True)
    with InProcessCluster(quant_models("llama3"), 2, quant=fmt, quant_head=True, compute="exact", device="cuda",
                          gpu_memory_budget=gpu_budget, max_context=64, cache_dir=split_cache) as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens
        stats = cluster.stats()
    assert all(s.gpu_blocks > 0 for s in stats)
    assert (gpu_budget is None) == all(s.block_bytes == 0 for s in stats)  # no host blocks without a budget
