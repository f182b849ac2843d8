"""Per-request SSM caches sized by the request's rung, and the cache-byte formula every consumer shares.

A Mamba layer keeps, for each request, its SSM state ``[H, P', N']`` in fp32 (the recurrence accumulates over
the whole sequence; bf16 would drift) and its conv state ``[H*P' + 2*G*N', W-1]`` (the last W-1 inputs of the
causal conv, channels x | B | C in the stored rank-/state-major order) in the cache dtype. Neither grows with
the sequence. Attention layers keep their KV cache (``cache.KVCache``); layers without attention hold none.
"""

from __future__ import annotations

import torch

from .ladder import LayerSizes
from .spec import ArchSpec

SSM_STATE_DTYPE = torch.float32


def conv_channels(spec: ArchSpec, s: LayerSizes) -> int:
    return spec.ssm_heads * s.ssm_p + 2 * spec.ssm_groups * s.ssm_n


def new_ssm_states(spec: ArchSpec, sizes: list[LayerSizes], batch: int, dtype: torch.dtype, device):
    """(conv states, SSM states): one tensor per Mamba layer, None elsewhere."""
    mamba = set(spec.layers_with("mamba"))
    conv = [torch.zeros(batch, conv_channels(spec, s), spec.ssm_conv - 1, dtype=dtype, device=device)
            if i in mamba else None for i, s in enumerate(sizes)]
    ssm = [torch.zeros(batch, spec.ssm_heads, s.ssm_p, s.ssm_n, dtype=SSM_STATE_DTYPE, device=device)
           if i in mamba else None for i, s in enumerate(sizes)]
    return conv, ssm


def cache_bytes(spec: ArchSpec, sizes: list[LayerSizes], max_len: int, itemsize: int) -> int:
    """Bytes of one request's caches at these kept sizes: KV of attention layers for ``max_len`` tokens plus
    the fixed-size conv and SSM states of Mamba layers. The runner's admission check and the server's
    controller both use this."""
    kv = sum((sizes[i].qk + sizes[i].vo) * spec.num_kv_heads for i in spec.layers_with("attn")) * max_len * itemsize
    ssm = 0
    for i in spec.layers_with("mamba"):
        s = sizes[i]
        ssm += conv_channels(spec, s) * (spec.ssm_conv - 1) * itemsize
        ssm += spec.ssm_heads * s.ssm_p * s.ssm_n * SSM_STATE_DTYPE.itemsize
    return kv + ssm


class BatchedSSMStates:
    """A decode batch's conv and SSM states: each request's own, read and written where it lives (no copies).

    With Triton (``tables``): int64 address tables ``[layers, B]`` of every row's conv state (``[1, ch', W-1]``
    contiguous, cache dtype) and SSM state (``[1, H, P', N']`` fp32), allocated ONCE and refreshed in place by
    ``bind``, so a CUDA graph captured over them reads whichever requests are bound now (the kernels of
    ``kernels/conv_update.py`` and ``kernels/ssm_update.py`` follow the addresses). Without Triton, lists of
    the bound requests' state tensors for the torch references, which update each in place too.
    """

    def __init__(self, layers: int, batch: int, device: torch.device, tables: bool):
        self.batch = batch
        self.conv_ptrs = torch.zeros(layers, batch, dtype=torch.int64, device=device) if tables else None
        self.ssm_ptrs = torch.zeros(layers, batch, dtype=torch.int64, device=device) if tables else None
        self.conv_dtype: torch.dtype | None = None  # the bound caches' conv state dtype (the kernel needs it)
        self.caches: list = []

    def bind(self, caches: list) -> None:
        """Point at these batch-1 caches, one per row (rows may repeat a cache: graph padding rows do)."""
        conv = caches[0].conv
        self.conv_dtype = next(t.dtype for t in conv if t is not None)
        if self.conv_ptrs is None:
            self.caches = list(caches)
            return
        if any(c.conv[i] is not None and not (c.conv[i].is_contiguous() and c.ssm[i].is_contiguous())
               for c in caches for i in range(len(conv))):
            raise ValueError("address tables need each request's own contiguous conv and SSM states")
        tables = torch.tensor([[[0 if c.conv[i] is None else c.conv[i].data_ptr() for c in caches]
                                for i in range(len(conv))],
                               [[0 if c.ssm[i] is None else c.ssm[i].data_ptr() for c in caches]
                                for i in range(len(conv))]], dtype=torch.int64)
        self.conv_ptrs.copy_(tables[0])
        self.ssm_ptrs.copy_(tables[1])

    def states(self, layer: int):
        """(conv, SSM) of every row at a Mamba layer: table rows ``[B]`` int64, or lists of the state tensors."""
        if self.conv_ptrs is not None:
            return self.conv_ptrs[layer], self.ssm_ptrs[layer]
        return [c.conv[layer] for c in self.caches], [c.ssm[layer] for c in self.caches]
