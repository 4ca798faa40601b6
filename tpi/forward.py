"""The loop over layers, with each layer's two allreduces, and where each block runs.

Owns: ``run_layers``, the step every rank runs (master and workers alike): for each layer this
rank's attention partial, ``x = x + comm.all_reduce(partial)``, its FFN partial and the second
allreduce; ``logits``, rank 0's final norm and LM head; and ``run_block``, which runs one block
where its weights are: resident on the accelerator, from host memory on the CPU, or offloaded
(the offload package copies it to the accelerator, or divides it with the CPU). Does not know:
sockets (it gets a Communicator), how the weights got where they are (open_rank.py),
tokenizers, sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tpi.comm.base import Communicator
from tpi.comm.wire import Phase, Tag
from tpi.layers import attention_partial, ffn_partial, lm_head, rms_norm

if TYPE_CHECKING:
    from tpi.rank_model import RankModel


def run_layers(model: RankModel, comm: Communicator, x: torch.Tensor, seq: int, step: int,
               start: int) -> torch.Tensor:
    """All decoder layers for hidden states x [L, D] at positions [start, start + L)."""
    for layer in range(model.cfg.num_layers):
        x = x + comm.all_reduce(attention(model, layer, x, seq, start), Tag(seq, step, layer, Phase.ATTN))
        x = x + comm.all_reduce(mlp(model, layer, x), Tag(seq, step, layer, Phase.FFN))
    return x


def attention(model: RankModel, layer: int, x: torch.Tensor, seq: int, start: int) -> torch.Tensor:
    """This rank's attention partial of `layer` [L, D]."""
    cache, window = model.cache.layer(seq, layer), model.cfg.sliding_windows[layer]

    def run(x: torch.Tensor, w, linear=model.linear) -> torch.Tensor:
        return attention_partial(x, w, cache, start, model.cfg, model.rope(start, x), window, linear)

    return run_block(model, (layer, "attn"), x, run)


def mlp(model: RankModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """This rank's FFN partial of `layer` [L, D]."""
    return run_block(model, (layer, "ffn"), x, lambda x, w, linear=model.linear: ffn_partial(x, w, model.cfg, linear))


def logits(model: RankModel, h: torch.Tensor) -> torch.Tensor:
    """Rank 0: final norm and LM head, chunk by chunk of vocabulary rows: h [L, D] -> float32 [L, V]."""
    hn = rms_norm(h, model.head.norm, model.cfg.rms_norm_eps)
    out = torch.empty((h.shape[0], model.cfg.vocab_size), dtype=torch.float32)
    resident = [(a, b, model.gpu_blocks[key]) for key, a, b in model.head.chunks if key in model.gpu_blocks]
    on_gpu = []
    if resident:  # queued first: the accelerator computes them while the host's chunks go by
        hd = hn.to(model.device)
        on_gpu = [(a, b, lm_head(hd, w, model.linear)) for a, b, w in resident]
    head = lambda x, w, linear=model.linear: lm_head(x, w, linear)  # noqa: E731
    for key, a, b in model.head.chunks:
        if key not in model.gpu_blocks:
            out[:, a:b] = run_block(model, key, hn, head, join=lambda c, y: torch.cat([c, y], dim=1))
    for a, b, y in on_gpu:
        out[:, a:b] = y.cpu()
    return out


def run_block(model: RankModel, key: tuple, x: torch.Tensor, run: Callable, join: Callable = torch.add
              ) -> torch.Tensor:
    """Block `key` on x, where its weights are; x and the result on the CPU. `run(x, w, linear)`
    is the block's math (its `linear` defaults to the model's: dense, or quantized); `join` puts
    an offloaded block's two parts together (added for a layer block's partial sums, side by side
    for an LM-head chunk's rows)."""
    if key in model.gpu_blocks:
        return run(x.to(model.device), model.gpu_blocks[key]).to(x.device)
    i = model.index.get(key)
    if i is None:  # no share of this block here: this rank adds nothing
        return torch.zeros_like(x)
    with model.sched.block(i) as w:
        if model.offload is None or model.offload.on_cpu(key):  # the CPU computes it whole
            return run(x, w)
        return model.offload.run(i, key, x, w, run, join)


@torch.inference_mode()
def timed_step(model: RankModel, comm: Communicator, x: torch.Tensor, seq: int = -1) -> float:
    """Seconds for one step of this rank on x [1, D] at position 0 (and on rank 0 its LM head);
    the sequence's KV slot is freed after. With a communicator that returns at once, the rank's
    own work: how the offload's share is tuned."""
    t0 = time.perf_counter()
    h = run_layers(model, comm, x, seq, 0, 0)
    if model.head is not None:
        logits(model, h)
    seconds = time.perf_counter() - t0
    model.cache.free(seq)
    return seconds
