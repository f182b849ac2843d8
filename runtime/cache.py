"""Caches sized for one rung: K is [B, kv_heads, max_len, qk], V is [B, kv_heads, max_len, vo] for attention
layers, plus conv/SSM states for Mamba layers (``ssm_cache.py``); and the decode batch that attends over many
requests' caches in one launch per layer."""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from uniql.kernels import ops
from uniql.kernels.decode_attention import decode_attention, decode_attention_rope

from .ladder import LayerSizes
from .spec import ArchSpec
from .ssm_cache import BatchedSSMStates, new_ssm_states

_serials = itertools.count()


class KVCache:
    """One request's (or a batch's) caches at one rung. With ``spec``, only attention layers get K/V (the others
    an empty ``[B, g, 0, 0]``) and Mamba layers get conv/SSM states; without it every layer is attention."""

    def __init__(self, sizes: list[LayerSizes], num_kv_heads: int, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", spec: ArchSpec | None = None):
        self.sizes = list(sizes)
        self.max_len = max_len
        self.length = 0  # tokens already written (same for every sequence of the batch)
        self.serial = next(_serials)  # identity that is never reused (graph address tables key on it)
        attn = set(range(len(sizes)) if spec is None else spec.layers_with("attn"))
        self.k = [torch.zeros(batch, num_kv_heads, *((max_len, s.qk) if i in attn else (0, 0)), dtype=dtype,
                              device=device) for i, s in enumerate(sizes)]
        self.v = [torch.zeros(batch, num_kv_heads, *((max_len, s.vo) if i in attn else (0, 0)), dtype=dtype,
                              device=device) for i, s in enumerate(sizes)]
        none = [None] * len(sizes)
        self.conv, self.ssm = (none, none) if spec is None else new_ssm_states(spec, sizes, batch, dtype, device)
        # allocated whole here and never replaced (writes go in place), so the size is counted once: the async
        # engine publishes the sum over live caches after every step
        states = [t for t in self.conv + self.ssm if t is not None]
        self._nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v + states)

    def narrowed(self, sizes: list[LayerSizes]) -> KVCache:
        """This cache's K/V as head-dim prefix views sized for ``sizes`` (a rung whose dims are at most this
        cache's): one allocation serves every rung. Attention-only caches (an SSM state is no prefix of another
        rung's); the views own no bytes, so ``nbytes`` is 0."""
        if self.has_ssm:
            raise ValueError("a cache with Mamba states cannot be narrowed")
        if len(sizes) != len(self.sizes) or \
                any(s.qk > o.qk or s.vo > o.vo for s, o in zip(sizes, self.sizes, strict=True)):
            raise ValueError("narrowed sizes must have one entry a layer, each at most this cache's head dims")
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.sizes, view.length, view.serial, view._nbytes = list(sizes), 0, next(_serials), 0
        view.k = [t[..., :s.qk] if t.shape[-1] else t for t, s in zip(self.k, sizes, strict=True)]
        view.v = [t[..., :s.vo] if t.shape[-1] else t for t, s in zip(self.v, sizes, strict=True)]
        return view

    @property
    def has_ssm(self) -> bool:
        return any(s is not None for s in self.ssm)

    def ssm_states(self, layer: int):
        """(conv state ``[B, ch', W-1]``, SSM state ``[B, H, P', N']``) of a Mamba layer, updated in place."""
        return self.conv[layer], self.ssm[layer]

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
        return self._nbytes


# Tests set this to run the Triton kernel on CPU tensors under TRITON_INTERPRET=1; otherwise CPU decode takes
# the torch reference (the interpreter is ~25x slower, fine for checking, not for serving or other tests).
TRITON_ON_CPU = False


def _triton_attention(device: torch.device) -> bool:
    return device.type == "cuda" or (TRITON_ON_CPU and os.environ.get("TRITON_INTERPRET", "0") == "1")


class DecodeBatch:
    """One decode step's view of B requests' own caches (each a batch-1 ``KVCache`` of its rung).

    On CUDA the attention kernel reads the caches through address tables, and Mamba layers' conv and SSM kernels
    read each request's states through theirs (``ssm_cache.BatchedSSMStates``); the tables, capacities and
    lengths are fixed-size buffers, so a CUDA graph captured over a ``DecodeBatch`` stays valid while ``bind``
    refreshes them in place. ``lengths`` counts tokens including the one being decoded (its K/V are appended by the
    kernel). Without Triton the same step runs the torch reference over the cache tensors.
    """

    def __init__(self, sizes: list[LayerSizes], batch: int, max_len: int, device: torch.device | str):
        self.sizes, self.batch, self.max_len = list(sizes), batch, max_len
        self.device = torch.device(device)
        layers = len(sizes)
        self.k_ptrs = torch.zeros(layers, batch, dtype=torch.int64, device=device)
        self.v_ptrs = torch.zeros(layers, batch, dtype=torch.int64, device=device)
        self.caps = torch.ones(batch, dtype=torch.int32, device=device)
        self.lengths = torch.ones(batch, dtype=torch.int32, device=device)
        self.caches: list[KVCache] = []
        self.length_list: list[int] = []
        self.ssm = BatchedSSMStates(layers, batch, self.device, tables=_triton_attention(self.device))

    def bind(self, caches: list[KVCache], lengths: torch.Tensor | None = None) -> None:
        """Point the tables at these caches (one per row, batch-1 each, this batch's rung)."""
        if len(caches) != self.batch:
            raise ValueError(f"this decode batch has {self.batch} rows, got {len(caches)} caches")
        if any(c.sizes != self.sizes for c in caches):
            raise ValueError("every cache of a decode batch must be sized for the batch's rung")
        if any(c.max_len > self.max_len for c in caches):
            raise ValueError(f"a cache holds more than this batch's bound of {self.max_len} tokens")
        # the torch fallback reads the tensors; the kernel only the addresses (holding the caches there would keep
        # finished requests' memory alive inside a captured graph's batch)
        self.caches = [] if _triton_attention(self.device) else list(caches)
        if caches[0].has_ssm:
            self.ssm.bind(caches)
        tables = torch.tensor([[[c.k[i].data_ptr() for c in caches] for i in range(len(self.sizes))],
                               [[c.v[i].data_ptr() for c in caches] for i in range(len(self.sizes))]])
        self.k_ptrs.copy_(tables[0])
        self.v_ptrs.copy_(tables[1])
        self.caps.copy_(torch.tensor([c.max_len for c in caches], dtype=torch.int32))
        if lengths is not None:
            self.set_lengths(lengths)

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Tokens per row including the new one (the runner's step buffer; copied, never kept)."""
        self.length_list = [int(v) for v in lengths.tolist()] if not _triton_attention(self.device) else []
        self.lengths.copy_(lengths)

    def ssm_states(self, layer: int):
        """Every row's (conv, SSM) state of a Mamba layer: int64 address tables ``[B]`` (Triton) or lists of the
        rows' own state tensors (torch references); the step updates them in place either way."""
        return self.ssm.states(layer)

    @property
    def conv_dtype(self) -> torch.dtype | None:
        """The bound caches' conv state dtype (a table carries addresses only)."""
        return self.ssm.conv_dtype

    def attend(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q ``[B, heads, qk]``, k_new ``[B, kv, qk]``, v_new ``[B, kv, vo]`` -> ``[B, heads * vo]`` rank-major."""
        if _triton_attention(q.device):
            return decode_attention(q, k_new.to(q.dtype), v_new.to(q.dtype), self.k_ptrs[layer],
                                    self.v_ptrs[layer], self.caps, self.lengths, scale, self.max_len)
        return self._attend_torch(layer, q, k_new, v_new, scale)

    def attend_rope(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos, sin,
                    rope_index: torch.Tensor, n_heads: int, scale: float) -> torch.Tensor:
        """``attend`` from UNROTATED rank-major q ``[B, heads*qk]`` / k_new ``[B, kv*qk]``: on the Triton path the
        rotation happens inside the attention kernel (one launch less per layer), else through ``ops.rope``."""
        n_kv = v_new.shape[1]
        if _triton_attention(q.device):
            return decode_attention_rope(q, k_new.to(q.dtype), v_new.to(q.dtype), cos, sin, rope_index, n_heads,
                                         self.k_ptrs[layer], self.v_ptrs[layer], self.caps, self.lengths, scale,
                                         self.max_len)
        q, k = ops.rope(q, k_new, cos, sin, rope_index, n_heads, n_kv, q.shape[1] // n_heads)  # [heads, B, qk]
        return self.attend(layer, q.transpose(0, 1), k.transpose(0, 1), v_new, scale)

    def _attend_torch(self, layer: int, q, k_new, v_new, scale: float) -> torch.Tensor:
        """CPU path: append to each cache, then SDPA over its filled prefix (same math as the kernel)."""
        rows = []
        n_heads, n_kv = q.shape[1], k_new.shape[1]
        for i, cache in enumerate(self.caches):
            end = self.length_list[i]
            k_cache, v_cache = cache.k[layer][0], cache.v[layer][0]  # [kv, cap, *]
            k_cache[:, end - 1] = k_new[i].to(k_cache.dtype)
            v_cache[:, end - 1] = v_new[i].to(v_cache.dtype)
            # one query per head: the heads sharing a KV head are its "query rows" (GQA without expanding K/V;
            # ~30 % faster on CPU than enable_gqa, which takes SDPA's math path)
            out = F.scaled_dot_product_attention(q[i].view(n_kv, n_heads // n_kv, -1), k_cache[:, :end].to(q.dtype),
                                                 v_cache[:, :end].to(q.dtype), scale=scale)  # [kv, rep, vo]
            rows.append(out.reshape(n_heads, -1).T.reshape(-1))  # rank-major
        return torch.stack(rows)
