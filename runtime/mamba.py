"""The elastic Mamba2 mixer (Mamba2, Bamba, Nemotron-H): one block that runs at any rung as prefix views.

Storage layout (the contract sorting writes, ``compressor/``; every rung keeps a PREFIX of each tensor):
* in_proj is stored as separate linears ``z_proj [H*P, hidden]``, ``x_proj [H*P, hidden]``,
  ``B_proj [G*N, hidden]``, ``C_proj [G*N, hidden]``, ``dt_proj [H, hidden]`` (fusable later as FusedInt4
  segments, ``runtime/fusion.py``).
* x/z rows are rank-major across heads: row ``c * H + h`` is channel ``c`` of head ``h``, so keeping ``P'``
  channels per head is the first ``H * P'`` rows (zero-copy, like v_proj/o_proj in decoder.py). ``conv_x``
  weight/bias, the gated norm weight ``norm_weight`` and ``out_proj``'s columns follow the same order.
* B/C rows are state-major across groups: row ``n * G + g`` is state ``n`` of group ``g``; keeping ``N'`` states
  is the first ``G * N'`` rows; ``conv_B``/``conv_C`` follow.
* ``dt_bias``, ``A_log``, ``D`` (and dt_proj) are per head and never pruned. Head ``h`` reads group
  ``h // (H / G)``.
* The gated RMSNorm ``norm(y * silu(z)) * w`` normalises each of ``ssm_norm_groups`` groups of heads over its
  KEPT channels (``(H / groups) * P'``), the same function in training (masks) and inference (truncation).

Math (fp32 state): ``xBC = act(causal_conv(x|B|C))``; ``dt = clamp(softplus(dt_proj(u) + dt_bias), limit)``;
``A = -exp(A_log)``; ``s_t = exp(dt A) s_{t-1} + dt x_t B_t^T``, ``y_t = s_t C_t + D x_t``. The dt limit is
applied at every step, prefill and decode alike (transformers' torch decode path skips it, which makes a token's
output depend on whether it was prefilled or decoded).
Prefill scans in chunks (``kernels/ssm_scan.py``, torch) over a per-request cache. A decode step over a
``DecodeBatch`` updates each request's own states in place. On CUDA, through the batch's fixed address tables (so
a CUDA graph captured once serves any bound requests), those are Triton launches: the causal conv (fed the three
kept weight prefixes as segments: no per-step cat of parameters; inside the in-projection's GEMV where that
serves, ``kernels/gemv_conv.py``, else ``kernels/conv_update.py``), the selective state update + gate
(``kernels/ssm_update.py``), then the group norm. On CPU the torch references of those kernels run over lists of
the states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniql.kernels import elementwise, ops, ssm_update
from uniql.kernels.gemv_conv import ConvStep
from uniql.kernels.pdl import ssm_gemv_preload
from uniql.kernels.ssm_scan import chunked_scan
from uniql.kernels.switches import switch

from .cache import DecodeBatch
from .linear import DenseLinear, FusedInt4, Prenormed, fold_norm
from .spec import ArchSpec

_CONV_ACTS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu}


class ElasticMamba(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, heads, p = spec.hidden_size, spec.ssm_heads, spec.ssm_head_dim
        groups, n, w = spec.ssm_groups, spec.ssm_state, spec.ssm_conv
        self.heads, self.head_dim, self.groups, self.state, self.kernel = heads, p, groups, n, w
        self.norm_groups, self.norm_eps, self.chunk = spec.ssm_norm_groups, spec.ssm_norm_eps, spec.ssm_chunk
        self.dt_limit = spec.dt_limit
        self.act, self.act_name = _CONV_ACTS[spec.ssm_act], spec.ssm_act
        bias = spec.ssm_proj_bias
        self.z_proj, self.x_proj = DenseLinear(h, heads * p, bias), DenseLinear(h, heads * p, bias)
        self.B_proj, self.C_proj = DenseLinear(h, groups * n, bias), DenseLinear(h, groups * n, bias)
        self.dt_proj = DenseLinear(h, heads, bias)
        for name, rows in (("x", heads * p), ("B", groups * n), ("C", groups * n)):
            self.register_parameter(f"conv_{name}_weight", nn.Parameter(torch.zeros(rows, w)))
            self.register_parameter(f"conv_{name}_bias",
                                    nn.Parameter(torch.zeros(rows)) if spec.ssm_conv_bias else None)
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(heads * p))
        self.out_proj = DenseLinear(heads * p, h, bias)
        self.in_proj: FusedInt4 | None = None  # z|x|B|C|dt in one packed tensor (runtime/fusion.py), one launch

    def conv_params(self, p: int, n: int):
        """Conv weight ``[ch', W]`` and bias ``[ch']`` of the kept channels x | B | C (cat of three prefixes)."""
        hp, gn = self.heads * p, self.groups * n
        weight = torch.cat((self.conv_x_weight[:hp], self.conv_B_weight[:gn], self.conv_C_weight[:gn]))
        if self.conv_x_bias is None:
            return weight, None
        return weight, torch.cat((self.conv_x_bias[:hp], self.conv_B_bias[:gn], self.conv_C_bias[:gn]))

    def conv_segments(self, p: int, n: int):
        """The kept conv weight and bias rows as three prefix views each (x | B | C), bias None without one."""
        hp, gn = self.heads * p, self.groups * n
        weight = [self.conv_x_weight[:hp], self.conv_B_weight[:gn], self.conv_C_weight[:gn]]
        if self.conv_x_bias is None:
            return weight, None
        return weight, [self.conv_x_bias[:hp], self.conv_B_bias[:gn], self.conv_C_bias[:gn]]

    def project(self, u, p: int, n: int):
        """z ``[..., H*p]``, xBC ``[..., H*p + 2*G*n]`` (rank-/state-major), raw dt ``[..., H]``."""
        hp, gn = self.heads * p, self.groups * n
        if self.in_proj is not None:  # one launch; x|B|C come out side by side, so xBC is a view (no cat)
            out = self.in_proj(u, (hp, hp, gn, gn, self.heads), cat=True)
            return out[..., :hp], out[..., hp:2 * hp + 2 * gn], out[..., 2 * hp + 2 * gn:]
        xbc = torch.cat((self.x_proj(u, n=hp), self.B_proj(u, n=gn), self.C_proj(u, n=gn)), dim=-1)
        return self.z_proj(u, n=hp), xbc, self.dt_proj(u)

    def conv(self, xbc, p: int, n: int, conv_state=None):
        """Causal depthwise conv over time: ``xbc [b,T,ch']``, ``conv_state [b,ch',W-1]`` (updated in place)."""
        weight, bias = self.conv_params(p, n)
        b, t, ch = xbc.shape
        past = xbc.new_zeros(b, ch, self.kernel - 1) if conv_state is None else conv_state.to(xbc.dtype)
        window = torch.cat((past, xbc.transpose(1, 2)), dim=-1)  # [b, ch', W-1+T]
        if conv_state is not None:
            conv_state.copy_(window[..., -(self.kernel - 1):])
        out = F.conv1d(window, weight.to(xbc.dtype)[:, None], None if bias is None else bias.to(xbc.dtype),
                       groups=ch)
        return self.act(out.transpose(1, 2))

    def split_heads(self, xbc, p: int, n: int):
        """xBC -> x ``[..., H, p]``, B and C ``[..., G, n]`` (views of the rank-/state-major channels)."""
        hp, gn = self.heads * p, self.groups * n
        x, B, C = xbc.split((hp, gn, gn), dim=-1)
        per_group = (n, self.groups)
        return (x.unflatten(-1, (p, self.heads)).transpose(-1, -2), B.unflatten(-1, per_group).transpose(-1, -2),
                C.unflatten(-1, per_group).transpose(-1, -2))

    def time_step(self, dt_raw):
        lo, hi = self.dt_limit
        return F.softplus(dt_raw.float() + self.dt_bias.float()).clamp(lo, hi)

    def gated_norm(self, y, z, p: int):
        """``y, z [..., H, p]`` -> rank-major ``[..., p*H]``: RMSNorm of ``y * silu(z)`` per group of heads."""
        return self.group_rms(y.float() * F.silu(z.float()), p)

    def group_rms(self, g, p: int):
        """The norm half of ``gated_norm``: already gated ``g [..., H, p]`` -> weighted, rank-major ``[..., p*H]``."""
        g = g.float().unflatten(-2, (self.norm_groups, self.heads // self.norm_groups))
        g = g * torch.rsqrt(g.pow(2).mean((-2, -1), keepdim=True) + self.norm_eps)
        g = g.flatten(-3, -2)  # [..., H, p]
        weight = self.norm_weight[:self.heads * p].view(p, self.heads).T.float()
        return (g * weight).transpose(-1, -2).flatten(-2)

    def forward(self, u, sizes, cache=None, layer: int = 0, residual=None, **_):
        """``u [b,T,hidden]`` -> ``[b,T,hidden]``. ``cache``: a per-request cache (prefill) or a DecodeBatch."""
        if isinstance(cache, DecodeBatch):
            return self.decode(u, sizes, cache, layer, residual)
        p, n = sizes.ssm_p, sizes.ssm_n
        conv_state, ssm_state = (None, None) if cache is None else cache.ssm_states(layer)
        z, xbc, dt_raw = self.project(u, p, n)
        xbc = self.conv(xbc, p, n, conv_state)
        x, B, C = self.split_heads(xbc, p, n)
        dt, A = self.time_step(dt_raw), -torch.exp(self.A_log.float())
        if u.shape[1] == 1 and ssm_state is not None:  # one step of a per-request cache: the state in place
            y = ops.ssm_state_update(ssm_state, x[:, 0], dt[:, 0].contiguous(), A, B[:, 0], C[:, 0])[:, None]
        else:
            y, new_state = chunked_scan(x, dt, A, B, C, self.chunk, ssm_state)
            if ssm_state is not None:
                ssm_state.copy_(new_state)
        return self.finish(u, y, x, z, p)

    def decode(self, u, sizes, batch: DecodeBatch, layer: int, residual=None):
        """``_decode`` with this block's GEMVs preloading at most ``UNIQL_SSM_GEMV_PRELOAD`` tiles
        (``pdl.ssm_gemv_preload``)."""
        with ssm_gemv_preload():
            return self._decode(u, sizes, batch, layer, residual)

    def _decode(self, u, sizes, batch: DecodeBatch, layer: int, residual=None):
        """One token per request (``u [B, 1, hidden]``, or a :class:`Prenormed` residual whose norm the fused
        in-projection finishes) over each request's own conv/SSM states, in place. ``residual`` = (stream, next
        norm): return the stream after this block with that norm half done by out_proj (a Prenormed), where the
        decode GEMV serves it.

        The state update also applies dt's bias/softplus/limit, the D skip and the ``silu(z)`` gate (the same
        math as ``forward``'s torch ops)."""
        p, n = sizes.ssm_p, sizes.ssm_n
        if isinstance(u, Prenormed) and self.in_proj is None:  # only the fused in-projection finishes a norm
            u = u.normed()
        stream = u.x if isinstance(u, Prenormed) else u
        b, dtype = stream.shape[0], stream.dtype
        conv_state, ssm_state = batch.ssm_states(layer)
        weight, bias = self.conv_segments(p, n)
        u_step = u if isinstance(u, Prenormed) else u[:, 0]
        convolved = self._project_conv(u_step, p, n, conv_state, weight, bias, batch.conv_dtype)
        projected = convolved or self.project(u_step, p, n)
        z, xbc, dt_raw = (t.reshape(b, -1) for t in projected)  # [B, H*p], [B, ch'], [B, H] (views)
        z = z.unflatten(-1, (p, self.heads)).transpose(-1, -2)  # [B, H, p] view of the rank-major channels
        step = dict(D=self.D, z=z, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        # three launches (tables; two with the conv in the in-projection) or the torch references (lists)
        if convolved is None:
            xbc = ops.conv_state_update(xbc, conv_state, weight, bias, self.act_name, batch.conv_dtype)
        x, B, C = self.split_heads(xbc, p, n)
        normed = self._update_normed(ssm_state, x, dt_raw, B, C, step, p, dtype)
        k = self.heads * p
        done = fold_norm(self.out_proj, normed[:, None], k, residual)
        return done if done is not None else self.out_proj(normed[:, None], k=k)

    def _project_conv(self, u, p: int, n: int, conv_state, weight, bias, conv_dtype):
        """z, the ACTIVATED conv of x | B | C (the state shifted) and raw dt from the in-projection's one launch
        (``kernels/gemv_conv.py``: no conv kernel); None where it does not serve (no fused in-projection, states not
        in an address table, not the half2 GEMV). ``UNIQL_SSM_CONV_FOLD=0`` turns it off: it won the H100 engine A/B
        at every rate in both rounds (Mamba2-8B 2.399 / 1.973 ms vs 2.470 / 2.036 at rates 0 / 0.35, stop 33)."""
        if switch("UNIQL_SSM_CONV_FOLD") != "1" or self.in_proj is None or not ssm_update.is_table(conv_state):
            return None
        hp, gn = self.heads * p, self.groups * n
        stream = u.xw if isinstance(u, Prenormed) else u
        out = torch.empty(conv_state.shape[0], hp + 2 * gn, dtype=stream.dtype, device=stream.device)
        conv = ConvStep(conv_state, tuple(weight), None if bias is None else tuple(bias), self.act_name, conv_dtype,
                        out)
        proj = self.in_proj.project_conv(u, (hp, hp, gn, gn, self.heads), conv)
        if proj is None:
            return None
        proj = proj.reshape(out.shape[0], -1)
        return proj[:, :hp], out, proj[:, 2 * hp + 2 * gn:]

    def _update_normed(self, ssm_state, x, dt_raw, B, C, step: dict, p: int, dtype) -> torch.Tensor:
        """The state update, then the gated group norm: ``[B, P' * H]`` rank-major, what out_proj reads. (The norm
        inside the update's launch, or split across it and out_proj's GEMV, lost the H100 engine A/Bs: removed,
        stop 35.)"""
        gated = ops.ssm_state_update(ssm_state, x, dt_raw, self.decay_rates(), B, C, **step)
        if ops.triton_enabled(gated.device):
            return elementwise.group_rms_norm(gated, self.norm_weight, self.norm_groups, self.norm_eps, dtype)
        return self.group_rms(gated[:, None], p).to(dtype)[:, 0]

    def decay_rates(self) -> torch.Tensor:
        """``A = -exp(A_log)`` in fp32 for the decode step, computed once per value of ``A_log`` (three tiny
        launches a layer a token otherwise; inside a CUDA graph they are most of a Mamba layer's fixed cost).
        Keyed on the parameter's storage and in-place version counter, so loading new weights recomputes it. A
        model built under ``torch.inference_mode`` has no version counters: its key is the storage alone, and
        ``load_state_dict`` drops the cached value (``_load_from_state_dict``)."""
        version = None if self.A_log.is_inference() else self.A_log._version
        key = (self.A_log.data_ptr(), version, self.A_log.device)
        cached = self.__dict__.get("_decay")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                self.__dict__["_decay"] = (key, -torch.exp(self.A_log.float()))
        return self.__dict__["_decay"][1]

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_decay", None)  # new A_log values, possibly copied into the same storage
        super()._load_from_state_dict(*args, **kwargs)

    def finish(self, u, y, x, z, p: int):
        """Skip (D x), gated norm and out_proj: ``y, x [b, T, H, p]``, flat rank-major ``z [b, T, H*p]``."""
        y = y + self.D.float()[:, None] * x.float()
        out = self.gated_norm(y, z.unflatten(-1, (p, self.heads)).transpose(-1, -2), p)
        return self.out_proj(out.to(u.dtype), k=self.heads * p)
