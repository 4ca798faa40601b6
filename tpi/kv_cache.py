"""Preallocated KV cache for this rank's KV heads only.

Owns: one [slots, layers, kv_heads, max_context, head_dim] buffer each for keys and values, the
map from sequence id to slot, and the errors for a full cache or a context that is too long.
Does not know: how keys are computed, the network, other ranks.
"""

from __future__ import annotations

import torch

from tpi.errors import TpiError


class CacheError(TpiError, RuntimeError):
    """No free slot, or a sequence beyond the configured maximum context."""


class LayerCache:
    """One layer's keys and values for one sequence: views into the shared buffers."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # [Hkv, max_context, hd]

    def append(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [Hkv, L, hd] at [start, start + L); return all keys and values up to there."""
        end = start + k.shape[1]
        if end > self.k.shape[1]:
            raise CacheError(f"position {end} is beyond the maximum context of {self.k.shape[1]} tokens")
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_context: int,
                 dtype: torch.dtype, slots: int = 1, device: str | torch.device = "cpu"):
        shape = (slots, num_layers, kv_heads, max_context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_context = max_context
        self._free = list(range(slots))
        self._slot: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, seq: int, layer: int) -> LayerCache:
        slot = self._slot.get(seq)
        if slot is None:
            if not self._free:
                raise CacheError(f"no free KV slot for sequence {seq}: {len(self._slot)} sequences are active")
            slot = self._slot[seq] = self._free.pop(0)
        return LayerCache(self.k[slot, layer], self.v[slot, layer])

    def free(self, seq: int) -> None:
        slot = self._slot.pop(seq, None)
        if slot is not None:
            self._free.append(slot)

    def free_all(self) -> None:
        for seq in list(self._slot):
            self.free(seq)
