"""LoRA (through peft) on the elastic decoder's projections, sliced exactly like the weights at every rung.

The decoder runs a rung by calling each projection on a prefix, ``forward(x, n=N_active, k=K_active)``
(runtime/linear.py). A LoRA-wrapped projection must compute the same function as its merged weight truncated
the same way: ``(W + s B A)[:n, :k] = W[:n, :k] + s B[:n] A[:, :k]``. So the adapter's A keeps the first ``k``
input columns and B the first ``n`` output rows; training at a rung therefore touches exactly the channels
inference at that rung reads (no separate training mask that could disagree with the truncation).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from uniql.runtime.decoder import ElasticDecoder
from uniql.runtime.linear import DenseLinear


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # projection names (leaf module names); None = every DenseLinear inside the decoder layers
    targets: list[str] | None = None
    extra: dict = field(default_factory=dict)  # passed through to peft.LoraConfig

    def validate(self) -> None:
        # a nan / inf alpha trained to a NaN checkpoint, written with exit 0
        if self.rank < 1 or not 0 < self.alpha < math.inf or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 1, a finite alpha > 0 and dropout in [0, 1): {self}")

    def manifest(self, model: ElasticDecoder) -> dict:
        return {**asdict(self), "targets": resolve_targets(model, self.targets)}


class ElasticLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear over a :class:`DenseLinear`, with the adapter sliced to the active prefix."""

    def forward(self, x: torch.Tensor, n: int | None = None, k: int | None = None, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, n=n, k=k)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a = self.lora_A[name].weight[:, :k]  # [r, k]: the kept input columns
            b = self.lora_B[name].weight[:n]  # [n, r]: the kept output rows
            hidden = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)
            result = result + (F.linear(hidden, b) * self.scaling[name]).to(result.dtype)
        return result


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Leaf names of the projections to adapt: ``targets`` checked against the model, or every DenseLinear
    inside the decoder layers (the embedding table and lm_head are never adapted)."""
    layers = model.layers if hasattr(model, "layers") else model
    available = sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, DenseLinear)})
    if targets is None:
        return available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not projections of this model; choose from {available}")
    return sorted(set(targets))


def add_lora(model: ElasticDecoder, settings: LoraSettings, seed: int = 1234):
    """Wrap ``model`` (frozen) with fresh adapters: A Kaiming-uniform (seeded), B zero, so the output is unchanged."""
    settings.validate()
    targets = resolve_targets(model, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=_target_regex(targets), **settings.extra)
    config._register_custom_module({DenseLinear: ElasticLoraLinear})
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns about any layer type it does not ship; DenseLinear is handled by ElasticLoraLinear
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        torch.manual_seed(seed)  # every DDP rank starts from the same adapters
        peft_model = get_peft_model(model, config)
    return peft_model


def _target_regex(targets: list[str]) -> str:
    """Projections inside decoder layers only (``embed`` / ``lm_head`` are DenseLinear too)."""
    return rf"layers\.\d+\.(.*\.)?({'|'.join(targets)})"


def lora_modules(model: nn.Module) -> dict[str, ElasticLoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ElasticLoraLinear)}


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors only (what checkpoints and DDP checks compare)."""
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter state has tensors this model lacks: {result.unexpected_keys[:4]}")


def merge_lora(peft_model) -> ElasticDecoder:
    """Fold ``s B A`` into every adapted weight (order kept: rows/columns stay where sorting put them)."""
    model = peft_model.merge_and_unload()
    return model.requires_grad_(False)
