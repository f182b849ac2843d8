"""Model runner: prefill and decode steps over the elastic decoder, one KV cache per request sized by its rung.

Each request keeps its rung from prefill to its last token, so its cache holds exactly the kept K/V head dims
of that rung (a pruned request costs less cache memory too) and ``max_len = prompt + max_tokens`` positions.
This is the eager path (CPU, or GPU without graphs): decode runs the requests of a rung one after another.
The GPU path with one CUDA graph per (rung, batch size) over a shared cache pool is the next step.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .decoder import ElasticDecoder
from .linear import Int4Linear
from .request import Request


class ModelRunner:
    def __init__(self, model: ElasticDecoder, cache_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.cache_dtype = cache_dtype
        self.caches: dict[str, KVCache] = {}
        if self.device.type == "cpu":  # no fused INT4 kernel on CPU: dequantize once, every rung a view of it
            dtype = model.norm.weight.dtype
            for module in model.modules():
                if isinstance(module, Int4Linear):
                    module.cache_dequantized(dtype)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def cache_bytes_for(self, req: Request) -> int:
        """Bytes a request's cache would take (the scheduler's admission check uses it)."""
        sizes = self.model.sizes_for(req.rung)
        per_token = sum(s.qk + s.vo for s in sizes) * self.model.spec.num_kv_heads
        itemsize = torch.empty((), dtype=self.cache_dtype or self.model.norm.weight.dtype).element_size()
        return per_token * req.max_len * itemsize

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches.values())

    @torch.inference_mode()
    def prefill(self, req: Request) -> torch.Tensor:
        """Run the prompt, fill a fresh cache; returns the last position's logits [V] (fp32)."""
        cache = self.model.new_cache(1, req.max_len, req.rung, self.cache_dtype)
        self.caches[req.request_id] = cache
        ids = torch.tensor([req.prompt_ids], device=self.device)
        return self.model(ids, cache=cache, logits_to_keep=1)[0, -1].float()

    @torch.inference_mode()
    def decode(self, reqs: list[Request]) -> torch.Tensor:
        """One new token per request (its last output token in, next logits out): [B, V] fp32."""
        rows = []
        for req in reqs:
            ids = torch.tensor([[req.output_ids[-1]]], device=self.device)
            rows.append(self.model(ids, cache=self.caches[req.request_id], logits_to_keep=1)[0, -1])
        return torch.stack(rows).float()

    def free(self, request_id: str) -> None:
        """Drop a request's cache at once (finished or cancelled)."""
        self.caches.pop(request_id, None)
