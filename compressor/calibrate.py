"""Layer-by-layer calibration driver.

Only one layer's activations exist at a time: the batches' hidden states enter layer i, the layer runs in fp32
on the compute device, collectors read what they need through hooks, and the layer's outputs (computed before
any collector modifies the layer) become layer i+1's inputs. Padding never enters a statistic: collectors
get the batch's attention mask and select real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from uniql.runtime.decoder import DecoderLayer, ElasticDecoder

from .calib_data import CalibBatch
from .ssm_orders import MambaStats, accumulate


class Collector:
    """Base collector: subclasses override the hooks they need."""

    def attach(self, index: int, layer: DecoderLayer) -> list:
        return []

    def begin_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask.bool()

    def end_batch(self, layer_in: torch.Tensor, layer_out: torch.Tensor) -> None:
        pass

    def finish(self, index: int, layer: DecoderLayer) -> None:
        pass


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [n_real, D] in fp32: padded positions dropped."""
    return x[mask].float()


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x of one batch in fp32 (fast), returned in fp64 for accumulation across batches."""
    return (x.T @ x).double()


@dataclass
class LayerStats:
    """Second-moment statistics of one layer (sums over real tokens, fp64)."""

    tokens: int = 0
    attn_in_corr: torch.Tensor | None = None  # [h, h] sum of x x^T, x = attention input (normed)
    attn_in_sum: torch.Tensor | None = None  # [h] sum of x (for bias terms)
    mlp_hidden_corr: torch.Tensor | None = None  # [I, I] sum of a a^T, a = down_proj input
    mamba: MambaStats | None = None  # a Mamba2 mixer's state / channel statistics (ssm_orders.py)

    def add(self, name: str, value: torch.Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else old + value)


class SortStatsCollector(Collector):
    """Gathers what structured sorting needs; hands each finished layer to ``on_layer(index, layer, stats)``."""

    def __init__(self, on_layer):
        self.on_layer = on_layer

    def attach(self, index, layer):
        self.stats = LayerStats()
        hooks = []
        if layer.attn is not None:
            hooks.append(layer.attn.q_proj.register_forward_pre_hook(self._attn_in))
        if layer.mlp is not None:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(self._mlp_hidden))
        if layer.mamba is not None:
            self.stats.mamba = MambaStats()
            hooks.append(layer.mamba.register_forward_pre_hook(self._mamba_in))
        return hooks

    def _attn_in(self, module, args):
        x = real_tokens(args[0], self.mask)
        self.stats.tokens += x.shape[0]
        self.stats.add("attn_in_corr", gram(x))
        self.stats.add("attn_in_sum", x.double().sum(0))

    def _mamba_in(self, module, args):
        accumulate(self.stats.mamba, module, args[0], self.mask)  # args[0]: the normed mixer input [B, T, h]

    def _mlp_hidden(self, module, args):
        self.stats.add("mlp_hidden_corr", gram(real_tokens(args[0], self.mask)))

    def finish(self, index, layer):
        self.on_layer(index, layer, self.stats)
        self.stats = None


@dataclass
class BlockImportanceCollector(Collector):
    """ShortGPT block importance: 1 - mean cos(layer input, layer output) on each sequence's last real token."""

    scores: list[float] = field(default_factory=list)

    def attach(self, index, layer):
        self.cos_sum, self.count = 0.0, 0
        return []

    def end_batch(self, layer_in, layer_out):
        last = self.mask.long().sum(1) - 1  # right padding: last real position
        rows = torch.arange(layer_in.shape[0], device=layer_in.device)
        x, y = layer_in[rows, last].double(), layer_out[rows, last].double()
        cos = (x * y).sum(-1) / ((x.norm(dim=-1) + 1e-6) * (y.norm(dim=-1) + 1e-6))
        self.cos_sum += cos.sum().item()
        self.count += x.shape[0]

    def finish(self, index, layer):
        self.scores.append(1.0 - self.cos_sum / self.count)


def _context(model: ElasticDecoder, batch: CalibBatch, device) -> dict:
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    ctx = model.context(ids, attention_mask=mask)
    ctx["inv_freq"] = model.inv_freq.to(device)
    return ctx


@torch.no_grad()
def run_layerwise(model: ElasticDecoder, batches: list[CalibBatch], collectors: list[Collector],
                  device="cpu", desc: str = "calibrating", recompute_outputs: bool = False) -> None:
    """Run every calibration batch through the model one layer at a time, feeding the collectors.

    By default layer i+1 sees layer i's outputs from before the collectors changed it (sorting must see the
    original model). ``recompute_outputs`` feeds the changed layer's outputs instead (sequential GPTQ: later
    layers see, and compensate for, the quantization error of earlier ones).
    """
    device = torch.device(device)
    hidden = [model.embed_tokens(b.input_ids).float() for b in batches]
    full = model.full_sizes
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # statistics in true fp32
    try:
        for index, layer in enumerate(tqdm(model.layers, desc=desc, unit="layer")):
            dtype = next(layer.parameters()).dtype
            layer.to(device=device, dtype=torch.float32)
            hooks = [h for c in collectors for h in c.attach(index, layer)]
            outputs = []
            for batch, x in zip(batches, hidden, strict=True):
                x = x.to(device)
                for c in collectors:
                    c.begin_batch(batch.attention_mask.to(device))
                y = layer(x, full, _context(model, batch, device), layer=index)
                for c in collectors:
                    c.end_batch(x, y)
                outputs.append(y.cpu())
            for h in hooks:
                h.remove()
            for c in collectors:
                c.finish(index, layer)
            if recompute_outputs:
                outputs = [layer(x.to(device), full, _context(model, b, device), layer=index).cpu()
                           for b, x in zip(batches, hidden, strict=True)]
            layer.to(device="cpu", dtype=dtype)
            hidden = outputs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
