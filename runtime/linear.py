"""Linear layers that run on a prefix of their stored weight: ``forward(x, n=N_active, k=K_active)``.

``DenseLinear`` keeps a floating-point ``weight [N, K]`` (the compressor's working form and the FP baseline);
both prefixes are views (``weight[:n, :k]``), so a rung never copies a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uniql.kernels import int4_cpu, int4_format, ops
from uniql.kernels import int4_matmul as _mm
from uniql.kernels.embedding import embedding_int4

from .host_forms import HOST, DenseHost, Int4Host


def prefix(t: torch.Tensor | None, n: int | None) -> torch.Tensor | None:
    return None if t is None or n is None else t[:n]


class DenseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, n: int | None = None, k: int | None = None) -> torch.Tensor:
        """x [..., k] -> [..., n] with the first ``n`` output rows and ``k`` input columns."""
        weight = self.weight[:n, :k]
        bias = self.bias if n is None or self.bias is None else self.bias[:n]
        return F.linear(x, weight, bias)

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Use as an embedding table: rows of ``weight [vocab, hidden]`` (in ``dtype`` when given)."""
        rows = F.embedding(ids, self.weight)
        return rows if dtype is None else rows.to(dtype)

    def nbytes(self, n: int | None = None, k: int | None = None) -> int:
        n = self.out_features if n is None else n
        k = self.in_features if k is None else k
        return n * k * self.weight.element_size()

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Add, replace or drop the bias (sorting folds a V bias into o_proj)."""
        self.bias = None if bias is None else nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)


class Int4Linear(nn.Module):
    """W4A16 linear over the packed format of ``uniql.kernels.int4_format`` (see there for the layout).

    On CUDA the Triton kernels of ``uniql.kernels.int4_matmul`` read the active prefix in place. On CPU the runner
    gives each layer a host form once (``prepare_host``): aten's CPU int4 GEMM over the codes re-laid
    (``uniql.kernels.int4_cpu``), or where that is missing a dense dequantized copy; without one, each call
    dequantizes its active prefix and multiplies.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        int4_format.check_shape(out_features, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(in_features // int4_format.PACK, out_features,
                                                    dtype=torch.int32))
        self.register_buffer("scales", torch.ones(in_features // group_size, out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_packed(cls, qweight, scales, group_size: int, bias: torch.Tensor | None = None) -> Int4Linear:
        layer = cls(qweight.shape[0] * int4_format.PACK, qweight.shape[1], group_size, bias is not None)
        layer.qweight, layer.scales = qweight.contiguous(), scales.to(torch.float16).contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse=True):
        # the packed tensors keep their format dtypes (int32 codes, fp16 scales) whatever the model is cast to
        qweight, scales = self.qweight, self.scales
        super()._apply(fn, recurse)
        self.qweight = qweight.to(self.scales.device)
        self.scales = scales.to(self.scales.device)
        return self

    def weight_t(self, n: int | None = None, k: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """Dequantized active prefix ``W^T [k, n]``."""
        return int4_format.dequantize(self.qweight, self.scales, self.group_size, k, n, dtype)

    def forward(self, x: torch.Tensor | Prenormed, n: int | None = None, k: int | None = None) -> torch.Tensor:
        bias = prefix(self.bias, n if n is not None else self.out_features)
        if isinstance(x, Prenormed):  # finish the norm inside the decode GEMV where it serves this call
            norm = _norm_args(x, n or self.out_features, self.in_features, self.group_size)
            if norm is not None and k in (None, self.in_features):
                return _mm.int4_matmul(x.xw, self.qweight, self.scales, self.group_size, n=n, bias=bias, norm=norm)
            x = x.normed()
        host = self.__dict__.get(HOST)
        if host is not None and x.device.type == "cpu" and x.dtype == host.dtype:
            return host(x, n, k, bias)
        return ops.int4_linear(x, self.qweight, self.scales, self.group_size, n=n, k=k, bias=bias)

    def forward_residual(self, x: torch.Tensor, k: int, residual: torch.Tensor, norm) -> Prenormed | None:
        """``residual + self(x, k=k)`` with the next ``norm`` (an RMSNorm) half done in the same launch, or None
        where the decode GEMV does not serve this call (the caller runs the plain path). bf16 streams only: the
        half-done norm ``s * w`` is stored in the stream's dtype, and in fp16 it could overflow where the norm's
        output (normalised first) does not."""
        if HOST in self.__dict__ or torch.compiler.is_compiling() or residual.dtype != torch.bfloat16:
            return None
        done = _mm.int4_residual(x, self.qweight, self.scales, self.group_size, k, residual, norm.weight,
                                 prefix(self.bias, self.out_features))
        return None if done is None else Prenormed(*done, norm)

    def prepare_host(self, dtype: torch.dtype = torch.float32, kind: str = "auto") -> None:
        """CPU: build the form calls read (``host_forms``; ``kind`` "int4": decode through aten's int4 GEMM on the
        codes, prefill through a dense copy; "dense": the dense copy only; "auto": int4 for bfloat16 models where
        the kernel runs vectorised (``int4_cpu.fast``, the same test as ``--dtype auto``), else dense (fp32 stays
        exact and fast: aten's fp32 int4 path is a scalar loop)).
        Not a buffer: never saved, never moved by ``.to()``; ``refresh_host`` rebuilds it from the packed tensors."""
        if kind not in ("auto", "int4", "dense"):
            raise ValueError(f"host form must be auto, int4 or dense, got {kind!r}")
        use_int4 = kind == "int4" or (kind == "auto" and int4_cpu.fast() and dtype in int4_cpu.FAST_DTYPES)
        host_cls = Int4Host if use_int4 else DenseHost
        self.__dict__[HOST] = host_cls(self.qweight, self.scales, self.group_size, dtype)

    @property
    def host(self):
        return self.__dict__.get(HOST)

    def refresh_host(self) -> None:
        """Rebuild the host form from the current packed tensors (elastic residency cut or reloaded them)."""
        host = self.host
        if host is not None:
            self.__dict__[HOST] = type(host)(self.qweight, self.scales, self.group_size, host.dtype)

    def host_bytes(self, n: int, k: int) -> int:
        """Bytes the host form takes for an (n, k) prefix of the packed tensors (0 without one)."""
        host = self.host
        return 0 if host is None else type(host).bytes_for(n, k, self.group_size, host.dtype)

    def lookup(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Embedding rows: row ``v`` of the table is column ``v`` of the packed ``[hidden, vocab]``."""
        return ops.embedding(ids, self.qweight, self.scales, self.group_size, dtype)

    def lookup_prenormed(self, ids: torch.Tensor, dtype: torch.dtype, norm) -> Prenormed:
        """Embedding rows with the first half of ``norm`` (the first layer's RMSNorm) done in the same launch: a
        :class:`Prenormed` the first projection finishes (Triton: CUDA, or the interpreter in tests)."""
        rows, rows_w, sums = embedding_int4(ids, self.qweight, self.scales, self.group_size, dtype, check_ids=False,
                                            norm_weight=norm.weight)
        return Prenormed(rows, rows_w, sums, norm)

    def nbytes(self, n: int | None = None, k: int | None = None) -> int:
        n = self.out_features if n is None else n
        k = self.in_features if k is None else k
        return int4_format.packed_bytes(k, n, self.group_size)


@dataclass
class Prenormed:
    """The residual stream after a block, with the next RMSNorm half done by that block's output GEMV
    (``int4_matmul.int4_residual``): ``x`` the new residual, ``xw`` = x * ``norm.weight``, ``sums`` the per-tile
    sums of x^2 ``[M, tiles]``. The next block's fused projection finishes the norm (each activation times 1/rms
    before the GEMV's fp16 conversion), so the norm costs no launch of its own."""
    x: torch.Tensor
    xw: torch.Tensor
    sums: torch.Tensor
    norm: nn.Module  # the RMSNorm begun here

    def normed(self) -> torch.Tensor:
        """The norm's output computed by the norm itself (for a consumer outside the decode GEMV)."""
        return self.norm(self.x)


def fold_norm(proj, x, k: int, residual) -> Prenormed | None:
    """``proj`` as the residual add plus half of the next RMSNorm (``Int4Linear.forward_residual``), or None
    (no ``residual`` = (stream, next norm) given, or the projection cannot fold)."""
    if residual is None:
        return None
    stream, norm = residual
    fold = getattr(proj, "forward_residual", None)
    return None if fold is None else fold(x, k, stream, norm)


def _norm_args(x: Prenormed, n_total: int, k: int, group_size: int):
    """(sums, eps) when the half2 decode GEMV serves this call and can finish ``x``'s norm, else None."""
    rows = x.xw.reshape(-1, k).shape[0]
    ok = _mm.half2_gemv_config(rows, n_total, k, group_size, x.xw) is not None
    return (x.sums, x.norm.eps) if ok else None


class FusedInt4(nn.Module):
    """Several Int4Linear sharing their input (q|k|v, gate|up) stored side by side in ONE packed tensor.

    ``runtime/fusion.py`` builds it and re-points each member's ``qweight``/``scales`` at its column range of the
    fused tensors (views, so memory is not doubled and the eager members still work). A call reads every
    member's active prefix in one kernel launch through ``segments``: member ``i`` occupies the stored columns
    ``starts[i] : starts[i] + widths[i]``. Elastic residency re-lays the fused tensors with each member cut to its
    resident prefix (``set_members``), which moves the starts and shrinks the widths; the row stride is read from
    the tensor at every launch, so the kernels follow.
    """

    def __init__(self, members: list[Int4Linear]):
        super().__init__()
        self.group_size = members[0].group_size
        self.members = tuple(members)  # a tuple, not a ModuleList: the members stay where the model holds them
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(0, dtype=torch.float16))
        self.set_members([(m.qweight, m.scales) for m in members])
        self.biases = [m.bias for m in members]

    def set_members(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store each member's (qweight ``[K/8, n_i]``, scales ``[K/G, n_i]``) side by side, on this module's
        device, and re-point the members at their ranges. Allocates the new fused tensors, then drops the old
        ones (the members' views were their last holders), so the peak is old + new of this group only."""
        device = parts[0][0].device if self.qweight.numel() == 0 else self.qweight.device
        self.qweight = torch.cat([q for q, _ in parts], dim=1).to(device)
        self.scales = torch.cat([s for _, s in parts], dim=1).to(device, torch.float16)
        self.widths = tuple(q.shape[1] for q, _ in parts)
        self.starts, start = [], 0
        for m, width in zip(self.members, self.widths, strict=True):
            self.starts.append(start)
            m.qweight = self.qweight[:, start:start + width]
            m.scales = self.scales[:, start:start + width]
            start += width

    def keep_prefixes(self, widths: tuple[int, ...], k: int) -> None:
        """Cut every member to its first ``widths[i]`` columns and ``k`` input rows (a release)."""
        rows, groups = -(-k // int4_format.PACK), -(-k // self.group_size)
        self.set_members([(m.qweight[:rows, :w], m.scales[:groups, :w])
                          for m, w in zip(self.members, widths, strict=True)])

    def _segments_bias(self, x, n_active):
        if any(n > w for n, w in zip(n_active, self.widths, strict=True)):
            # a wider segment would silently read the next member's columns
            raise RuntimeError(f"active widths {n_active} exceed the resident {self.widths}: rung not resident")
        segments = list(zip(self.starts, n_active, strict=True))
        bias, x = None, x.xw if isinstance(x, Prenormed) else x
        if any(b is not None for b in self.biases):
            bias = torch.cat([b[:n] if b is not None else x.new_zeros(n)
                              for b, n in zip(self.biases, n_active, strict=True)])
        return segments, bias

    def glu(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``silu(gate) * up`` of a two-member (gate, up) group at active width ``n``, in one launch at decode."""
        if len(self.members) != 2:
            raise ValueError(f"a GLU needs a (gate, up) pair, this group has {len(self.members)} members")
        segments, bias = self._segments_bias(x, (n, n))
        if isinstance(x, Prenormed):
            norm = self._norm_args(x, 2 * n)
            if norm is not None:
                return _mm.int4_glu(x.xw, self.qweight, self.scales, self.group_size, segments, bias=bias, norm=norm)
            x = x.normed()
        return ops.int4_glu(x, self.qweight, self.scales, self.group_size, segments, bias=bias)

    def _norm_args(self, x: Prenormed, n_total: int):
        return _norm_args(x, n_total, self.qweight.shape[0] * int4_format.PACK, self.group_size)

    def forward(self, x: torch.Tensor | Prenormed, n_active: tuple[int, ...], cat: bool = False):
        """Outputs of every member at its active width: a tuple of views, or (``cat``) one tensor side by side.
        ``x`` may be a :class:`Prenormed` residual: the norm is finished inside the GEMV."""
        segments, bias = self._segments_bias(x, n_active)
        norm = self._norm_args(x, sum(n_active)) if isinstance(x, Prenormed) else None
        if norm is not None:
            out = _mm.int4_matmul(x.xw, self.qweight, self.scales, self.group_size, bias=bias, segments=segments,
                                  norm=norm)
        else:
            x = x.normed() if isinstance(x, Prenormed) else x
            out = ops.int4_linear(x, self.qweight, self.scales, self.group_size, segments=segments, bias=bias)
        return out if cat else out.split(list(n_active), dim=-1)

    def project_conv(self, x: torch.Tensor | Prenormed, n_active: tuple[int, ...], conv) -> torch.Tensor | None:
        """``forward(x, n_active, cat=True)`` with Mamba2's causal-conv step on members 1-3 (x | B | C) in the same
        launch, into ``conv.out`` (``kernels/gemv_conv.py``); None where the half2 decode GEMV does not serve the
        call (the caller then convolves separately)."""
        xs = x.xw if isinstance(x, Prenormed) else x
        rows = xs.reshape(-1, xs.shape[-1]).shape[0]
        if torch.compiler.is_compiling() or _mm.half2_gemv_config(rows, sum(n_active), xs.shape[-1],
                                                                   self.group_size, xs) is None:
            return None
        segments, bias = self._segments_bias(x, n_active)
        norm = self._norm_args(x, sum(n_active)) if isinstance(x, Prenormed) else None
        if isinstance(x, Prenormed) and norm is None:
            xs = x.normed()
        return _mm.int4_matmul(xs, self.qweight, self.scales, self.group_size, bias=bias, segments=segments,
                               norm=norm, conv=conv)
