"""The one loop over layers, where each layer's two allreduces happen; and one rank's weights.

Owns: ``RankModel`` (this rank's blocks, its KV cache, its rotary table) and ``run_layers``, which
every rank, master and workers alike, runs for each step. Does not know: sockets (it gets a
Communicator), tokenizers, sampling, HTTP.
"""

from __future__ import annotations

import os

import torch

from tpi.comm.base import Communicator
from tpi.comm.wire import Phase, Tag
from tpi.kv_cache import KVCache
from tpi.layers import Weights, attention_partial, ffn_partial, rope_inv_freq
from tpi.weights import Manifest, load_block, rank_blocks


def default_max_context(manifest: Manifest) -> int:
    return min(manifest.config.max_position_embeddings, 4096)


class RankModel:
    """One rank's share of every layer, resident in memory, and the KV cache for its heads."""

    def __init__(self, shard_dir: str | os.PathLike, manifest: Manifest, rank: int,
                 max_context: int | None = None, slots: int = 1):
        self.cfg, self.manifest, self.rank = manifest.config, manifest, rank
        self.dtype = manifest.dtype
        self.max_context = max_context or default_max_context(manifest)
        blocks = {(layer, kind): load_block(shard_dir, manifest, rank, layer, kind)
                  for layer, kind in rank_blocks(self.cfg, manifest.plan, rank)}
        self.attn: list[Weights | None] = [blocks.get((i, "attn")) for i in range(self.cfg.num_layers)]
        self.ffn: list[Weights | None] = [blocks.get((i, "ffn")) for i in range(self.cfg.num_layers)]
        self.head: Weights | None = blocks.get((None, "head"))
        shard = manifest.plan.shards[rank]
        self.cache = KVCache(self.cfg.num_layers, shard.num_kv_heads, self.cfg.head_dim, self.max_context,
                             self.dtype, slots)
        self.inv_freq = rope_inv_freq(self.cfg.rope, self.cfg.head_dim)

    def attention(self, layer: int, x: torch.Tensor, seq: int, start: int) -> torch.Tensor:
        w = self.attn[layer]
        if w is None:  # no heads here: this rank adds nothing
            return torch.zeros_like(x)
        return attention_partial(x, w, self.cache.layer(seq, layer), start, self.cfg, self.inv_freq,
                                 self.cfg.sliding_windows[layer])

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.ffn[layer]
        return torch.zeros_like(x) if w is None else ffn_partial(x, w, self.cfg)


def run_layers(model: RankModel, comm: Communicator, x: torch.Tensor, seq: int, step: int,
               start: int) -> torch.Tensor:
    """All decoder layers for hidden states x [L, D] at positions [start, start + L)."""
    for layer in range(model.cfg.num_layers):
        x = x + comm.all_reduce(model.attention(layer, x, seq, start), Tag(seq, step, layer, Phase.ATTN))
        x = x + comm.all_reduce(model.mlp(layer, x), Tag(seq, step, layer, Phase.FFN))
    return x
