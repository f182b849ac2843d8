"""The weight store of elastic residency: release and reload the tails of a model's pruned projections.

Each of the seven projections of a layer holds, at most: the packed INT4 codes ``qweight [K/8, N]`` and
``scales [K/G, N]`` (or a float ``weight [N, K]``), and on CPU the host form the runner built once
(``Int4Linear.prepare_host``: the codes re-laid for aten's CPU int4 GEMM, or a dense dequantized copy). Releasing a
layer to rung ``r`` replaces every one of them by a *clone* of its rung-``r`` prefix, so the old full tensor is
really freed (a view would keep it alive), and rebuilds the host form from it; reloading reads the full packed
tensors back from the memory-mapped checkpoint and rebuilds the host form again.
``resident_bytes`` measures the storages actually held; ``rung_bytes`` predicts them per rung, and the tests
check the two agree. Embedding/head tables, norms and biases are never pruned and stay resident.

On CUDA the runner fuses q|k|v and gate|up into one packed tensor each (``FusedInt4``; the members are views of
it). There a release re-lays the fused tensor with every member cut to its own resident prefix, and a reload
re-lays it from the stored members: one new tensor per group is allocated, copied, and the old one dropped, so
the peak rises by one group at most. Swapping tensors under captured CUDA graphs or a running forward is the
caller's to prevent: the residency manager runs each pass through ``EngineBackend.change_weights``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from uniql.kernels.int4_format import PACK, packed_bytes
from uniql.runtime.checkpoint import WEIGHTS
from uniql.runtime.decoder import ElasticDecoder
from uniql.runtime.linear import DenseLinear, FusedInt4, Int4Linear
from uniql.runtime.memory import active_shapes

log = logging.getLogger(__name__)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view counts its whole storage: that is what is held)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def linear_bytes(module, n: int, k: int) -> int:
    """Bytes a projection holds at active shape (n, k): what ``_release`` leaves behind."""
    if isinstance(module, Int4Linear):
        return packed_bytes(k, n, module.group_size) + module.host_bytes(n, k)
    return n * k * module.weight.element_size()


class ElasticWeights:
    """Release/reload of the pruned projections of ``model``, reloading from ``ckpt_dir``'s safetensors."""

    def __init__(self, model: ElasticDecoder, ckpt_dir: str | Path | None):
        self.model = model
        self.path = None if ckpt_dir is None else Path(ckpt_dir) / WEIGHTS
        ladder, spec = model.ladder, model.spec
        self.num_layers = spec.num_layers
        names = {id(m): name for name, m in model.named_modules()}
        # shapes[layer][path][rung] = (n, k)
        self.shapes = [{path: [active_shapes(spec, sizes[i])[path] for sizes in ladder.sizes]
                        for path in layer.linear_paths} for i, layer in enumerate(model.layers)]
        self.modules = [{path: layer.get_linear(path) for path in layer.linear_paths} for layer in model.layers]
        self.names = [{path: names[id(m)] for path, m in mods.items()} for mods in self.modules]
        self.layer_rung = [0] * self.num_layers
        # per layer: the fused groups (FusedInt4, member paths) and the projections stored on their own
        self.fused = [_fused_groups(layer, mods) for layer, mods in zip(model.layers, self.modules, strict=True)]
        grouped = [{p for _, paths in groups for p in paths} for groups in self.fused]
        self.single = [[p for p in mods if p not in grouped[i]] for i, mods in enumerate(self.modules)]
        full = self.resident_bytes()
        pruned_full = sum(linear_bytes(m, *self.shapes[i][p][0]) for i, mods in enumerate(self.modules)
                          for p, m in mods.items())
        self.fixed_bytes = full - pruned_full
        self.rung_bytes = tuple(self.fixed_bytes + sum(linear_bytes(m, *self.shapes[i][p][r])
                                                       for i, mods in enumerate(self.modules) for p, m in mods.items())
                                for r in range(len(ladder.rates)))

    # ------------------------------------------------------------------------------------------ reading
    def resident_bytes(self) -> int:
        tensors = [t for _, t in self.model.named_parameters()] + [t for _, t in self.model.named_buffers()]
        tensors += [t for m in self.model.modules() if isinstance(m, Int4Linear) and m.host for t in m.host.tensors()]
        return _storage_bytes(tensors)

    # ------------------------------------------------------------------------------------------ release
    def release_layer(self, layer: int, rung: int) -> None:
        """Keep only what ``rung`` and above read."""
        if rung <= self.layer_rung[layer]:
            return
        shapes = {path: by_rung[rung] for path, by_rung in self.shapes[layer].items()}
        for fused, paths in self.fused[layer]:
            fused.keep_prefixes(tuple(shapes[p][0] for p in paths), shapes[paths[0]][1])
            for p in paths:
                self.modules[layer][p].refresh_host()
        for path in self.single[layer]:
            _release(self.modules[layer][path], *shapes[path])
        self.layer_rung[layer] = rung

    def reload_layer(self, layer: int, rung: int) -> None:
        if rung >= self.layer_rung[layer]:
            return
        if self.path is None:
            raise RuntimeError("this model has no checkpoint file to reload weights from")
        shapes = {path: by_rung[rung] for path, by_rung in self.shapes[layer].items()}
        names, mods = self.names[layer], self.modules[layer]
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as stored:  # memory-mapped
                for fused, paths in self.fused[layer]:
                    fused.set_members([_stored_packed(stored, names[p], fused.group_size, *shapes[p]) for p in paths])
                    for p in paths:
                        mods[p].refresh_host()
                for path in self.single[layer]:
                    _reload(mods[path], names[path], stored, *shapes[path])
        finally:  # cut short too: some projections may be that wide now, so a release back must not skip the layer
            self.layer_rung[layer] = rung

    def settle(self) -> None:
        """Give freed memory back: glibc keeps freed heap pages unless trimmed; CUDA's allocator caches blocks."""
        if self.model.norm.weight.device.type == "cuda":
            torch.cuda.empty_cache()
        with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): the allocator decides
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fused_groups(layer, modules: dict) -> list[tuple[FusedInt4, tuple[str, ...]]]:
    """The layer's fused projections with the paths of their members, in storage order."""
    by_id = {id(m): path for path, m in modules.items()}
    groups = []
    for fused in (getattr(layer.attn, "qkv", None), getattr(layer.mlp, "gate_up", None),
                  getattr(layer.mamba, "in_proj", None)):
        if isinstance(fused, FusedInt4):
            groups.append((fused, tuple(by_id[id(m)] for m in fused.members)))
    return groups


def _release(module, n: int, k: int) -> None:
    """Keep a clone of the (n, k) prefix of every tensor the projection holds; the full tensors are freed."""
    if isinstance(module, Int4Linear):
        module.qweight = module.qweight[: -(-k // PACK), :n].clone()
        module.scales = module.scales[: -(-k // module.group_size), :n].clone()
        module.refresh_host()
    elif isinstance(module, DenseLinear):
        module.weight = torch.nn.Parameter(module.weight[:n, :k].clone(), requires_grad=False)


def _stored_packed(stored, name: str, group_size: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n, k) prefix of a projection's stored codes ``[K/8, N]`` and scales ``[K/G, N]`` (host tensors)."""
    qweight = stored.get_slice(f"{name}.qweight")[: -(-k // PACK), :n]
    scales = stored.get_slice(f"{name}.scales")[: -(-k // group_size), :n]
    return _own(qweight), _own(scales)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own size: a slice read from the file may be a view of the WHOLE stored tensor (a
    row prefix is already contiguous, so .contiguous() would keep all of it alive)."""
    return t.clone(memory_format=torch.contiguous_format)


def _reload(module, name: str, stored, n: int, k: int) -> None:
    """Read the stored tensors back (their (n, k) prefix, or all of them at rung 0) and rebuild the host form."""
    device = module.scales.device if isinstance(module, Int4Linear) else module.weight.device
    if isinstance(module, Int4Linear):
        qweight, scales = _stored_packed(stored, name, module.group_size, n, k)
        module.qweight, module.scales = qweight.to(device).contiguous(), scales.to(device).contiguous()
        module.refresh_host()
    elif isinstance(module, DenseLinear):
        weight = _own(stored.get_slice(f"{name}.weight")[:n, :k]).to(device, module.weight.dtype)
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
