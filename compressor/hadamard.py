"""Rotate the residual (hidden) dimension by a randomized Hadamard matrix before quantization (QuaRot-style).

Only the hidden axis is rotated: the K side of q/k/v/gate/up/lm_head (and Mamba z/x/B/C/dt) and the N side of
o/down (and Mamba out_proj), plus the embedding table. Pruned axes (heads, ranks, MLP channels, Mamba head
channels and states) are never touched, so every rung stays a prefix.
RMSNorm weights are folded into the linears that read the norm first (a rotation commutes with a weightless
RMSNorm). Embedding and head tables are rotated too (4-bit tables quantize better rotated). An untied head also
absorbs the final norm's weight; a TIED table stays one shared table E Q, and the decoder runs the final norm
in the original basis instead (two hidden x hidden products per token, far cheaper than a second table).
"""

from __future__ import annotations

import torch

from uniql.runtime.decoder import ElasticDecoder
from uniql.runtime.linear import DenseLinear


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q, for a prime q."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if j in residues else -1 for j in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (prime q = 3 mod 4) or 2(q + 1) (prime q = 1 mod 4), Paley I / II."""
    sign = -1.0 if q % 4 == 3 else 1.0
    conf = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # conference matrix: skew (I) or symmetric (II)
    conf[0, 1:], conf[1:, 0], conf[1:, 1:] = 1.0, sign, _jacobsthal(q)
    eye = torch.eye(q + 1, dtype=torch.float64)
    if q % 4 == 3:
        return conf + eye
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conf, one) + torch.kron(eye, torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64))


# order -> Paley prime (I: q = 3 mod 4 gives q+1; II: q = 1 mod 4 gives 2(q+1)); covers 576, 3584, 896, ...
_BASES = {12: 11, 20: 19, 28: 13, 36: 17, 44: 43, 60: 59, 68: 67, 76: 37, 84: 83}


def hadamard(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n (Sylvester x Paley), or None if no construction here fits."""
    power = n & -n
    rest = n // power
    if rest == 1:
        base = torch.ones(1, 1, dtype=torch.float64)
    else:
        order = next((o for o in _BASES if o % rest == 0 and power % (o // rest) == 0), None)
        if order is None:
            return None
        base, power = _paley(_BASES[order]), power // (order // rest)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < power:
        sylvester = torch.cat((torch.cat((sylvester, sylvester), 1), torch.cat((sylvester, -sylvester), 1)), 0)
    return torch.kron(sylvester, base)


def random_rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Orthogonal [n, n]: Hadamard with random signs (``"hadamard"``), else a random orthogonal matrix."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    h = hadamard(n)
    if h is not None:
        return signs[:, None] * h / n ** 0.5, "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(r.diagonal()), "random_orthogonal"


def _scale_inputs(linear: DenseLinear, weight: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.double() * weight.double()).to(linear.weight.dtype)


OUTPUT_SIDE = ("attn.o_proj", "mlp.down_proj", "mamba.out_proj")  # write the residual stream (N = hidden)


def _norm_readers(layer) -> list:
    """(norm, the projections reading it): the mixer's inputs after input_norm, the MLP's after post_attn_norm."""
    readers = [p for p in layer.linear_paths if p not in OUTPUT_SIDE]
    pairs = [(layer.input_norm, [p for p in readers if not p.startswith("mlp.")]),
             (layer.post_attn_norm, [p for p in readers if p.startswith("mlp.")])]
    return [(norm, paths) for norm, paths in pairs if norm is not None]


def fold_layer_norms(model: ElasticDecoder) -> None:
    """Move each layer's RMSNorm weights into the linears reading that norm; the norms become ones."""
    for layer in model.layers:
        for norm, readers in _norm_readers(layer):
            for path in readers:
                _scale_inputs(layer.get_linear(path), norm.weight)
            norm.weight.data = torch.ones_like(norm.weight.data)  # new tensor: never write through shared storage


def _rotate(t: torch.Tensor, rot: torch.Tensor, side: str) -> torch.Tensor:
    out = t.double() @ rot if side == "in" else rot.T @ t.double()
    return out.to(t.dtype)


def rotate_hidden(model: ElasticDecoder, seed: int = 0) -> dict:
    """Fold norms, then rotate the residual stream by Q: x -> x Q everywhere. Returns manifest info."""
    fold_layer_norms(model)
    rot, kind = random_rotation(model.spec.hidden_size, seed)
    tied = model.lm_head is None
    if tied:
        model.hidden_rotation = rot.float()
    else:
        _scale_inputs(model.lm_head, model.norm.weight)
        model.norm.weight.data = torch.ones_like(model.norm.weight.data)
    for table in (model.embed,) if tied else (model.embed, model.lm_head):
        table.weight.data = _rotate(table.weight.data, rot, "in")
    for layer in model.layers:
        for path in (p for p in layer.linear_paths if p not in OUTPUT_SIDE):
            linear = layer.get_linear(path)
            linear.weight.data = _rotate(linear.weight.data, rot, "in")
        for path in (p for p in layer.linear_paths if p in OUTPUT_SIDE):
            linear = layer.get_linear(path)
            linear.weight.data = _rotate(linear.weight.data, rot, "out")
            if linear.bias is not None:
                linear.bias.data = (linear.bias.double() @ rot).to(linear.bias.dtype)
    return {"rotation": kind, "seed": seed, "dim": model.spec.hidden_size, "runtime_rotation": tied}
