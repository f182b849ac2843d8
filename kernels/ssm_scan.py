"""Mamba2 prefill: the SSD chunked scan in torch, and the plain sequential recurrence as its reference.

Both compute, per head ``h`` of group ``g = h // (H / G)``, with an fp32 state ``s [P', N']``::

    s_t = exp(dt_t A[h]) s_{t-1} + dt_t x_t B_t^T        y_t = s_t C_t (+ D[h] x_t if D is given)

Contract (the runtime's ``runtime/mamba.py`` calls it; P'/N' are a rung's kept sizes):
* ``x [b, T, H, P']`` (any strides: rank-major channels arrive as ``flat.view(b, T, P', H).transpose(2, 3)``),
  ``dt [b, T, H]`` the time step AFTER ``dt_bias``, softplus and the limit, ``A [H]`` (negative),
  ``B, C [b, T, G, N']``, ``initial [b, H, P', N']`` or None (zeros), ``D [H]`` or None.
* returns ``(y [b, T, H, P'] fp32, final_state [b, H, P', N'] fp32)``.

The chunked scan (Dao & Gu 2024, "SSD") splits T into chunks of ``chunk`` steps (the model's ``chunk_size``).
Inside a chunk the output is a causal "attention" ``y_l = sum_{s<=l} (C_l . B_s) exp(a_s+1 + .. + a_l) dt_s x_s``
(``a = dt A``): two batched matmuls instead of T dependent steps. Each chunk also emits its local end state;
one short recurrence over the ``T / chunk`` chunk states (a lower-triangular decay matrix) gives every chunk
its entering state, whose contribution ``C_l exp(cum a) s_in`` is added. Cost per head and token:
``chunk * (N' / rep + P')`` multiply-adds intra-chunk plus ``2 P' N'`` for the states, against the sequential
loop's ``2 P' N'`` in T dependent small steps: about 2.1-2.6x the arithmetic on the tiny and 8B-like shapes, for
matmul-shaped work and no Python loop over T (5-27x faster on 2 CPU threads; benchmarks/ssm_scan_cost.py).
B/C stay per group (``G`` not ``H``): ``C . B`` is computed once per group and shared by its heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(x, dt, A, B, C, initial) -> None:
    b, t, heads, p = x.shape
    if dt.shape != (b, t, heads) or A.shape != (heads,):
        raise ValueError(f"dt [b, T, H], A [H]: got {tuple(dt.shape)}, {tuple(A.shape)} for x {tuple(x.shape)}")
    if B.dim() != 4 or B.shape != C.shape or B.shape[:2] != (b, t) or heads % B.shape[2]:
        raise ValueError(f"B, C [b, T, G, N'] with H a multiple of G: got {tuple(B.shape)}, {tuple(C.shape)}")
    if initial is not None and initial.shape != (b, heads, p, B.shape[3]):
        raise ValueError(f"initial state must be [b, H, P', N'] = {(b, heads, p, B.shape[3])}, "
                         f"got {tuple(initial.shape)}")


def _segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """``a [..., L]`` -> ``exp(sum a[j+1..i])`` for ``j <= i`` else 0, ``[..., L, L]``.

    Each sum is accumulated on its own (a masked cumsum), not as ``cumsum[i] - cumsum[j]``: with dt*A ~ -10 a
    step, a 256-step cumsum reaches -2600, where fp32 differences lose ~3e-4 in the exponent.
    """
    length = a.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    below = causal.tril(-1)
    terms = a[..., :, None].expand(*a.shape, length).masked_fill(~below, 0.0)  # [.., i, j] = a[i] for i > j
    sums = torch.cumsum(terms, dim=-2)  # [.., i, j] = a[j+1] + .. + a[i]
    return torch.exp(sums.masked_fill(~causal, -torch.inf))


def _to_end(a: torch.Tensor, dim: int) -> torch.Tensor:
    """``exp(sum a[t+1..end])`` along ``dim`` (a reverse cumsum, accurate near the end where it matters)."""
    rev = torch.flip(torch.cumsum(torch.flip(a, (dim,)), dim), (dim,))
    return torch.exp(rev - a)


def chunked_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk: int, initial: torch.Tensor | None = None, D: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD scan over chunks of ``chunk`` steps (contract in the module doc)."""
    _check(x, dt, A, B, C, initial)
    b, t, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    pad = (-t) % chunk  # padded steps get dt = 0: no decay and no input, so the final state is unchanged
    xf, dtf, Bf, Cf = (F.pad(v.float(), (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B, C))
    c = (t + pad) // chunk
    xdt = (xf * dtf[..., None]).view(b, c, chunk, groups, rep, p)  # [b,c,l,G,R,P]
    Bf = Bf.view(b, c, chunk, groups, n)
    Cf = Cf.view(b, c, chunk, groups, n)
    a = (dtf * A.float()).view(b, c, chunk, groups, rep).permute(0, 1, 3, 4, 2)  # [b,c,G,R,l]
    a_cum = torch.cumsum(a, dim=-1)
    scores = torch.einsum("bclgn,bcsgn->bcgls", Cf, Bf)  # per group, shared by its heads
    weights = scores[:, :, :, None] * _segsum_exp(a)  # [b,c,G,R,l,s]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", weights, xdt)
    to_end = _to_end(a, -1)  # decay from each step to its chunk's end, [b,c,G,R,l]
    local = torch.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bf, to_end, xdt)  # chunk end states from zero
    start = x.new_zeros(b, groups, rep, p, n, dtype=torch.float32) if initial is None else \
        initial.float().reshape(b, groups, rep, p, n)
    states = torch.cat((start[:, None], local), dim=1)  # [b,c+1,G,R,P,N]
    totals = F.pad(a_cum[..., -1], (0, 0, 0, 0, 1, 0)).permute(0, 2, 3, 1)  # [b,G,R,c+1]
    carry = _segsum_exp(totals)  # [b,G,R,c+1,c+1]: decay from chunk j's end to chunk i's end
    entering = torch.einsum("bgrij,bjgrpn->bigrpn", carry, states)  # [b,c+1,G,R,P,N]
    y = y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", Cf, entering[:, :-1], torch.exp(a_cum))
    y = y.reshape(b, c * chunk, heads, p)[:, :t]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y, entering[:, -1].reshape(b, heads, p, n)


def chunk_local_states(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, chunk: int
                       ) -> torch.Tensor:
    """Each chunk's end state started from zero, ``[b, T/chunk (rounded up), H, P', N']`` fp32: the SSD chunk
    states without the carry between chunks (what the compressor's state-aware scores measure)."""
    b, t, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    rep = heads // groups
    pad = (-t) % chunk
    xf, dtf, Bf = (F.pad(v.float(), (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, dt, B))
    c = (t + pad) // chunk
    xdt = (xf * dtf[..., None]).view(b, c, chunk, groups, rep, p)
    to_end = _to_end((dtf * A.float()).view(b, c, chunk, groups, rep), 2)  # [b,c,l,G,R]
    local = torch.einsum("bcsgn,bcsgr,bcsgrp->bcgrpn", Bf.view(b, c, chunk, groups, n), to_end, xdt)
    return local.reshape(b, c, heads, p, n)


def sequential_scan_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, initial: torch.Tensor | None = None, D: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time (same contract; slow, for tests and tiny inputs)."""
    _check(x, dt, A, B, C, initial)
    b, t, heads, p = x.shape
    rep = heads // B.shape[2]
    state = x.new_zeros(b, heads, p, B.shape[3], dtype=torch.float32) if initial is None else initial.float()
    ys = []
    for i in range(t):
        step = dt[:, i].float()  # [b, H]
        Bh = B[:, i].float().repeat_interleave(rep, dim=1)  # [b, H, N]
        Ch = C[:, i].float().repeat_interleave(rep, dim=1)
        state = state * torch.exp(step * A.float())[..., None, None] + \
            (step[..., None] * x[:, i].float())[..., None] * Bh[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y, state
