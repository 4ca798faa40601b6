"""Tiny GGUF files for the tests: a seeded random Llama (build_tiny) written with the ``gguf``
package's GGUFWriter as llama.cpp's converter writes it, every 2-D weight in a requested type.

Owns: ``write_gguf`` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and BF16 quantized from the checkpoint's
floats by ``gguf.quants.quantize``; Q4_K, Q5_K, Q6_K, which the package cannot quantize, and Q2_K,
Q3_K (types tpi refuses) as random blocks with small float16 super-block scales; F32, F16 as
floats; norms F32; q/k rows permuted as llama.cpp's converter does, before quantizing; the
metadata transformers needs for the config and a byte-level tokenizer), ``q4_k_m_types`` (a mixed
file's types, like a real Q4_K_M), ``permute`` (llama.cpp's q/k row order) and
``dequantized_tensors`` (the file's tensors by the ``gguf`` package alone, in Hugging Face names
and order). Does not know: tpi.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# every quantized row a multiple of 256 (K-quants' super-block): hidden 256, FFN 512, 4 heads of 64
TINY = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=256)
# GGUF name -> Hugging Face name ({} is the layer); the order of llama.cpp's files
NAMES = {"token_embd.weight": "model.embed_tokens.weight",
         "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
         "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
         "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
         "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
         "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
         "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
         "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
         "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
         "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
         "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# random K-quant blocks: (float16 d, dmin) magnitudes that keep |w| under about 0.5 with mean near 0
K_SCALES = {"Q4_K": (4e-4, 3e-3), "Q5_K": (2e-4, 3e-3), "Q6_K": (1e-4, 0.0), "Q2_K": (4e-3, 6e-3),
            "Q3_K": (2e-3, 0.0)}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute`: within each head, the rotary halves' rows
    interleaved (the inverse of transformers' reverse_permute_weights)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_m_types(layers: int) -> dict[str, str]:
    """A mixed file like llama.cpp's Q4_K_M: Q4_K mostly, Q6_K for the head and some attn_v/ffn_down,
    Q5_0 and Q8_0 side by side with them; and one F16 attn_k and one BF16 attn_q (permuted floats)."""
    types = {"*": "Q4_K", "output.weight": "Q6_K", "token_embd.weight": "Q8_0"}
    for i in range(layers):
        types[f"blk.{i}.attn_v.weight"] = "Q6_K" if i % 2 == 0 else "Q5_0"
        types[f"blk.{i}.ffn_down.weight"] = "Q6_K" if i % 2 == 0 else "Q8_0"
    types[f"blk.{layers - 1}.attn_k.weight"] = "F16"
    types[f"blk.{layers - 1}.attn_q.weight"] = "BF16"
    return types


def random_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """[rows, row bytes] uint8 of random blocks of `kind`, the float16 super-block scales small and
    positive (finite, moderate values)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d_max, dmin_max = K_SCALES[kind]
    d = (d_max * rng.uniform(0.5, 1.0, n)).astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = (dmin_max * rng.uniform(0.5, 1.0, n)).astype(np.float16).view(np.uint8).reshape(n, 2)
    if kind in ("Q4_K", "Q5_K"):
        raw[:, 0:2], raw[:, 2:4] = d, dmin
    elif kind in ("Q6_K", "Q3_K"):
        raw[:, -2:] = d
    elif kind == "Q2_K":
        raw[:, -4:-2], raw[:, -2:] = d, dmin
    else:
        raise ValueError(f"no random blocks for {kind}")
    return raw.reshape(rows, -1)


def _encode(w: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """A float32 [rows, cols] weight in GGUF type `kind`: (array, raw_dtype for GGUFWriter.add_tensor)."""
    import gguf

    if kind == "F32":
        return w.astype(np.float32), None
    if kind == "F16":
        return w.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in K_SCALES:
        return random_blocks(*w.shape, kind, rng), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def _type_of(types: dict[str, str] | str, name: str) -> str:
    if isinstance(types, str):
        return types
    return types.get(name, types.get("*", "F32"))


def _hf_tensors(hf_dir: Path, cfg: dict) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under GGUF names (llama.cpp's order), q/k rows permuted."""
    from safetensors.numpy import load_file

    hf = load_file(hf_dir / "model.safetensors")
    out = {}
    for layer in [None, *range(cfg["num_hidden_layers"])]:
        for gname, hname in NAMES.items():
            if ("{}" in gname) == (layer is None) or hname.format(layer) not in hf:
                continue
            w = hf[hname.format(layer)]
            if gname.startswith(("blk.{}.attn_q.", "blk.{}.attn_k.")):
                w = permute(w, cfg["num_attention_heads"] if "attn_q" in gname else cfg["num_key_value_heads"])
            out[gname.format(layer)] = w
    return out


def _metadata(writer, cfg: dict) -> None:
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer.add_name("tiny-llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    # byte-level BPE over the 256 bytes, no merges, no special tokens: one token per byte
    spelling = bytes_to_unicode()
    assert cfg["vocab_size"] == 256, "the tokenizer has one token per byte"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([spelling[b] for b in range(256)])
    writer.add_token_scores([0.0] * 256)  # no merges: transformers derives them from the scores (none)
    writer.add_token_types([int(gguf.TokenType.NORMAL)] * 256)


def write_gguf(hf_dir: Path, out: Path, types: dict[str, str] | str, seed: int = 0, tied: bool = True) -> Path:
    """A GGUF file at `out` of the tiny Llama in `hf_dir` (built there by build_tiny with TINY if it
    has no config.json; `tied`: no output.weight, as Llama 3.2 1B). `types`: one GGUF type name for
    every 2-D weight, or GGUF tensor name -> type with "*" the default; 1-D tensors are F32."""
    import gguf
    from conftest import build_tiny

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").exists():
        build_tiny("llama", hf_dir, seed, **TINY, tie_word_embeddings=tied)
    cfg = json.loads((hf_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    _metadata(writer, cfg)
    for name, w in _hf_tensors(hf_dir, cfg).items():
        data, raw_dtype = _encode(w, _type_of(types, name), rng) if w.ndim == 2 else (w.astype(np.float32), None)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def dequantized_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized by ``gguf.quants.dequantize``, under Hugging Face names, q/k
    rows back in Hugging Face's order by transformers' own reverse permutation."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf.GGUFReader(str(path))
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    out = {}
    for t in reader.tensors:
        layer, key = (t.name.split(".")[1], ".".join(["blk", "{}", *t.name.split(".")[2:]])) \
            if t.name.startswith("blk.") else (None, t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = unpermute.process(w, t.name).weights
        out[NAMES[key].format(layer)] = torch.from_numpy(np.ascontiguousarray(w))
    return out
