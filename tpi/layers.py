"""One rank's model math: RMSNorm, rotary embeddings, the attention and FFN partial sums.

Owns: the arithmetic of Llama/Mistral/Qwen2/Qwen3 decoder layers for whatever heads and FFN
columns the weights passed in cover. A partial is this rank's contribution to the layer's output;
summing the partials of all ranks gives the unsharded output. Does not know: ranks, sockets,
threads, files. Weights arrive as dicts of tensors named as in the block files (see weights.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tpi.config import ModelConfig, RopeConfig
from tpi.kv_cache import LayerCache

Weights = dict[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled (as transformers does)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for the default, linear and llama3 rotary types."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv / rope.factor
    if rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] for integer positions [L], computed in float32, cast to `dtype`."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, L, hd]; cos, sin [L, hd]."""
    return x * cos + _rotate_half(x) * sin


def dense(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    """Projection `name` of block `w` on x [L, in] -> [L, out], bias included: the ``linear``
    every function here uses unless it is handed another (the CPU/GPU offload's, which divides
    the rows, see offload/offloader.py)."""
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


Linear = Callable[[torch.Tensor, Weights, str], torch.Tensor]


def attention_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """Boolean [L, k_len]: causal, and within the sliding window when there is one."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def attention_partial(x: torch.Tensor, w: Weights, cache: LayerCache, start: int, cfg: ModelConfig,
                      rope: tuple[torch.Tensor, torch.Tensor], window: int | None, linear: Linear = dense
                      ) -> torch.Tensor:
    """This rank's share of self-attention for tokens at positions [start, start + L).

    x [L, D] is the layer input (residual stream); rope is (cos, sin) [L, hd] for those positions,
    on x's device; returns the partial output [L, D].
    """
    L, hd = x.shape[0], cfg.head_dim
    h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q = linear(h, w, "q_proj").view(L, -1, hd).transpose(0, 1)  # [Hq, L, hd]
    k = linear(h, w, "k_proj").view(L, -1, hd).transpose(0, 1)  # [Hkv, L, hd]
    v = linear(h, w, "v_proj").view(L, -1, hd).transpose(0, 1)
    if cfg.qk_norm:
        q = rms_norm(q, w["q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm.weight"], cfg.rms_norm_eps)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    dev = cache.k.device  # the attention core runs where the cache lives
    keys, values = cache.append(start, k.to(dev), v.to(dev))  # [Hkv, start + L, hd]
    if L == 1 and (window is None or keys.shape[1] <= window):  # one query that sees every key: no mask
        mask = None
    else:
        mask = attention_mask(torch.arange(start, start + L, device=dev), keys.shape[1], window)
    out = F.scaled_dot_product_attention(q.to(dev), keys, values, attn_mask=mask, scale=hd**-0.5,
                                         enable_gqa=q.shape[0] != keys.shape[0])  # [Hq, L, hd]
    out = out.transpose(0, 1).reshape(L, -1).to(x.device)
    return linear(out, w, "o_proj")


def ffn_partial(x: torch.Tensor, w: Weights, cfg: ModelConfig, linear: Linear = dense) -> torch.Tensor:
    """This rank's share of the SwiGLU FFN over its intermediate columns; x [L, D] -> [L, D]."""
    h = rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return linear(F.silu(linear(h, w, "gate_proj")) * linear(h, w, "up_proj"), w, "down_proj")


def lm_head(x: torch.Tensor, w: Weights, linear: Linear = dense) -> torch.Tensor:
    """Logits of the vocabulary rows an LM-head chunk holds: x [L, D] (normed) -> [L, rows]."""
    return linear(x, w, "lm_head")
