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
    """A decode batch's SSM states: each request's own state, read and written where it lives.

    On CUDA the selective-state-update kernel takes an int64 table of the requests' state addresses (no copy);
    on CPU the states are stacked for the step and written back after it. Conv states (W-1 columns) are always
    stacked and written back. CUDA graphs are not used for models with Mamba layers yet: the conv stack reads
    fixed addresses, so a captured graph would keep reading the first bound requests'.
    """

    def __init__(self, caches: list, device: torch.device):
        self.caches = caches
        self.tables = None
        if device.type == "cuda":
            self.tables = [None if s is None else torch.tensor([c.ssm[i].data_ptr() for c in caches],
                                                               dtype=torch.int64, device=device)
                           for i, s in enumerate(caches[0].ssm)]

    def states(self, layer: int):
        conv = torch.cat([c.conv[layer] for c in self.caches])
        ssm = self.tables[layer] if self.tables is not None else torch.cat([c.ssm[layer] for c in self.caches])
        return conv, ssm

    def commit(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        for i, cache in enumerate(self.caches):
            cache.conv[layer].copy_(conv[i:i + 1])
            if self.tables is None:
                cache.ssm[layer].copy_(ssm[i:i + 1])
