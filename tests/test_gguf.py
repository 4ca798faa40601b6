"""GGUF files in (tpi/quant/gguf.py): each type tpi reads decodes to exactly what the ``gguf`` package
dequantizes, a type it does not read is refused by name, llama.cpp's q/k row order is undone as
transformers undoes it; and tiny Llama GGUF files (one per type, and a mixed one like a Q4_K_M)
run in an in-process cluster at world sizes 1, 2 and uneven ratios with float32 logits within
1e-4 of transformers loading the same file and identical greedy tokens, kept quantized (a fraction
of the float32 split's bytes) or dequantized (quant="float"); int8/int4 on a GGUF file is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from gguf_files import TINY, dequantized_tensors, permute, q4_k_m_types, random_blocks, write_gguf

from tpi.config import ConfigError
from tpi.inprocess import InProcessCluster
from tpi.quant.formats import QuantTensor, dequantize
from tpi.quant.gguf import QUANT_TYPES, GGUFCheckpoint, _unpermute, decode
from tpi.split import Quant, split, split_cached

pytestmark = pytest.mark.timeout(120)

PROMPT = [3, 17, 42, 99, 7, 250, 128, 64, 5, 11, 200, 31]
NEW = 16
KINDS = [*QUANT_TYPES, "mixed"]  # one file per type, and a mixed one
CASES = [(k, ws, r) for k in KINDS for ws, r in ((1, None), (2, None), (2, "2,1"))]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """kind -> the path of its GGUF file, written once per module: a type name for every 2-D weight
    (embedding tied, as Llama 3.2 1B), or "mixed" (untied, Q4_K_M-like types), or "refuse-Q2_K"
    (Q8_0 but one tensor of a type tpi does not read)."""
    root = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(kind: str):
        if kind not in cache:
            types = kind
            if kind == "mixed":
                types = q4_k_m_types(TINY["num_hidden_layers"])
            elif kind.startswith("refuse-"):
                types = {"*": "Q8_0", "blk.1.ffn_up.weight": kind.removeprefix("refuse-")}
            hf = root / ("hf-untied" if kind == "mixed" else "hf-tied")
            cache[kind] = write_gguf(hf, root / "files" / f"{kind}.gguf", types, tied=kind != "mixed")
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def references(gguf_files):
    """kind -> (GGUF path, transformers' logits [L, V] and greedy tokens on the file), computed once."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(kind: str):
        if kind not in cache:
            path = gguf_files(kind)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            state = model.state_dict()  # transformers' weights: the gguf package's, q/k rows unpermuted
            assert all(torch.equal(state[k], w) for k, w in dequantized_tensors(path).items())
            with torch.no_grad():
                logits = model(torch.tensor([PROMPT])).logits[0]
                out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            tokens = out[0, len(PROMPT):].tolist()
            assert len(set(tokens)) > 2, f"{kind}: a degenerate reference {tokens}"
            cache[kind] = (path, logits, tokens)
        return cache[kind]

    return get


# -- unit: the decoders, refusal, the row order --------------------------------------------------------
def _blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, row bytes] of `kind`: quantized from random floats where the gguf package can, else
    random blocks with small super-block scales."""
    import gguf

    if kind.endswith("_K"):
        return random_blocks(rows, cols, kind, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])


@pytest.mark.unit
@pytest.mark.parametrize("kind", list(QUANT_TYPES))
def test_decode_dequantizes_bit_for_bit_as_the_gguf_package(kind):
    import gguf

    rng = np.random.default_rng(1)
    rows, cols = 5, 3 * 256  # several blocks (and super-blocks) a row
    raw = _blocks(kind, rows, cols, rng)
    qt = decode(raw, kind, cols)
    assert isinstance(qt, QuantTensor) and qt.shape == (rows, cols)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype(np.float32))
    got = dequantize(qt)
    assert ref.shape == got.shape and torch.isfinite(ref).all()
    # equal values, bit for bit but for the sign of a zero: the gguf package's d * (q - 8) is -0.0
    # where d < 0 and q = 8, tpi's d * q + (-8 d) is +0.0; no sum can tell them apart
    assert torch.equal(got, ref), \
        f"{kind}: {(got != ref).sum().item()} values differ, max {(got - ref).abs().max().item():.3e}"
    differ = got.view(torch.int32) != ref.view(torch.int32)
    assert (got[differ] == 0).all()


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K"])
def test_a_type_tpi_does_not_read_is_refused_by_name(gguf_files, kind, tmp_path):
    with pytest.raises(ConfigError, match=rf"blk\.1\.ffn_up\.weight is {kind}; tpi reads"):
        assert GGUFCheckpoint(gguf_files(f"refuse-{kind}")).tensors  # the file is parsed when first needed
    with pytest.raises(ConfigError, match=rf"is {kind}; tpi reads"):
        split(gguf_files(f"refuse-{kind}"), tmp_path / "s", 1, progress=False)


@pytest.mark.unit
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_is_transformers_reverse_permutation(heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(heads * 16, 24, generator=torch.Generator().manual_seed(heads))
    ref = LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), heads, heads)
    assert torch.equal(_unpermute(w, heads), torch.from_numpy(ref))
    assert torch.equal(_unpermute(torch.from_numpy(permute(w.numpy(), heads)), heads), w)  # llama.cpp's inverse


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["Q8_0", "mixed"])
def test_rows_of_whole_heads_come_back_in_hugging_face_order(gguf_files, kind):
    """Every tensor's rows, whole and from a middle head on, as the gguf package and transformers'
    reverse permutation give them (the mixed file has an F16 attn_k too)."""
    path = gguf_files(kind)
    ckpt = GGUFCheckpoint(path)
    hd = ckpt.config.head_dim
    for name, ref in dequantized_tensors(path).items():
        ranges = [(0, ref.shape[0]), (hd, min(3 * hd, ref.shape[0]))] if ref.dim() == 2 else [(0, ref.shape[0])]
        for a, b in ranges:
            got = ckpt.rows(name, a, b)
            got = dequantize(got) if isinstance(got, QuantTensor) else got.float()
            want = ref[a:b] if ref.dim() == 2 else ref
            assert torch.equal(got, want), f"{name} rows [{a}, {b})"


# -- in-process: against transformers on the same file --------------------------------------------------
@pytest.mark.inprocess
@pytest.mark.parametrize("kind,world_size,ratios", CASES, ids=[f"{k}-{w}-{r}" for k, w, r in CASES])
def test_matches_transformers(references, split_cache, kind, world_size, ratios):
    path, ref_logits, ref_tokens = references(kind)
    with InProcessCluster(path, world_size, ratios, cache_dir=split_cache, compute="exact") as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens


@pytest.mark.inprocess
@pytest.mark.parametrize("kind", ["Q4_0", "Q6_K", "mixed"])
def test_dequantized_split_matches_transformers(references, split_cache, kind):
    path, ref_logits, ref_tokens = references(kind)
    with InProcessCluster(path, 2, cache_dir=split_cache, quant="float") as cluster:
        assert_close(cluster.forward(PROMPT), ref_logits)
        assert cluster.generate(PROMPT, NEW) == ref_tokens


@pytest.mark.inprocess
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_requantizing_a_gguf_file_is_refused(gguf_files, split_cache, quant):
    with pytest.raises(ConfigError, match=rf"quant='{quant}'.*GGUF file"):
        InProcessCluster(gguf_files("Q4_K"), 1, cache_dir=split_cache, quant=quant).start()


# split bytes / float32 split bytes (4 bytes a weight): codes (4-bit packed, else int8) with float32
# scales (and minima) per group of 32, 16 for Q6_K: 0.19x for 4-bit types, 0.28x for Q8_0 and
# Q5_0, 0.32x for Q5_1, Q5_K and Q6_K; the mixed file in between
BOUNDS = {"Q8_0": 0.3, "Q4_0": 0.2, "Q4_1": 0.2, "Q5_0": 0.3, "Q5_1": 0.33, "Q4_K": 0.2, "Q5_K": 0.33,
          "Q6_K": 0.33, "mixed": 0.3}


@pytest.mark.inprocess
@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_split_is_a_fraction_of_the_float32_one(gguf_files, split_cache, kind):
    path = gguf_files(kind)
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    kept = size(split_cached(path, 2, cache_dir=split_cache, progress=False))
    floats = size(split_cached(path, 2, cache_dir=split_cache, progress=False, quant=Quant.of("float")))
    ratio = kept / floats
    print(f"{kind}: split {kept} bytes, float32 split {floats} bytes ({ratio:.3f}x), file {path.stat().st_size}")
    assert ratio < BOUNDS[kind]


# -- the embedded model's own GGUF -------------------------------------------------------------------------------------
@pytest.mark.slow  # a 135M model: a split of its GGUF per world size (parsing the file: ~6-12 s each)
@pytest.mark.timeout(400)
def test_the_embedded_models_own_gguf_at_world_sizes_1_and_2(smollm2, split_cache):
    """SmolLM2 from its GGUF as shipped (Q4_1 layers, a Q8_0 embedding: 4-bit on every rank), exact
    compute, at world size 1 and 2 with an uneven split: within 1e-4 of transformers on its float32
    conversion (the same weights, dequantized), the same greedy tokens. World size 3 (3 KV heads: at
    most 3 ranks with a share) runs through `tpi run` in test_cli.py::test_tpi_run_a_gguf_file."""
    from tpi.embedded import gguf_path

    _, model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    for world_size, ratios in ((1, None), (2, "2,1")):
        with InProcessCluster(gguf_path(), world_size, ratios, cache_dir=split_cache, compute="exact") as cluster:
            assert_close(cluster.forward(ids), ref_logits)
            assert cluster.generate(ids, 16) == ref, (world_size, ratios)
            assert all(s.weight_format == "gguf/exact" for s in cluster.stats())
