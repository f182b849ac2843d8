"""Static KV cache sized for one rung: K is [B, kv_heads, max_len, qk], V is [B, kv_heads, max_len, vo]."""

from __future__ import annotations

import torch

from .ladder import LayerSizes


class KVCache:
    def __init__(self, sizes: list[LayerSizes], num_kv_heads: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.sizes = list(sizes)
        self.max_len = max_len
        self.length = 0  # tokens already written (same for every sequence of the batch)
        self.k = [torch.zeros(batch, num_kv_heads, max_len, s.qk, dtype=dtype, device=device) for s in sizes]
        self.v = [torch.zeros(batch, num_kv_heads, max_len, s.vo, dtype=dtype, device=device) for s in sizes]

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Write this step's K/V ([B, g, T, *]) after the cached tokens; return views of all tokens so far."""
        start, steps = self.length, k_new.shape[2]
        if start + steps > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {start + steps} requested")
        if k_new.shape[-1] != self.k[layer].shape[-1] or v_new.shape[-1] != self.v[layer].shape[-1]:
            raise ValueError("K/V head dims do not match the rung this cache was sized for")
        self.k[layer][:, :, start:start + steps] = k_new
        self.v[layer][:, :, start:start + steps] = v_new
        end = start + steps
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
