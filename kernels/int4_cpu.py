"""The CPU backend's INT4 GEMM: our packed weights re-laid once for aten's CPU int4 kernel, read in 4 bits.

Why: the CPU runner used to dequantize every weight to a dense float copy and multiply that, so a decode step
read 32 bits per weight (as many bytes as the fp32 model it was compressed from). ``aten._weight_int4pack_mm_for_cpu``
(the CPU twin of tinygemm; vectorised, AVX-512 / AVX2, for bf16 activations only) reads the 4-bit codes and a
scale per group.

Layout (aten's): codes ``W [N, K]`` packed as uint8 ``[N, K/2]``, blocked by ``BLOCK_N`` output rows (64 with
AVX-512, 32 with AVX2) as ``[N/BLOCK_N, K, BLOCK_N/2]``; scales and zeros ``[K/G, N, 2]`` in the activation
dtype, with
``w = (q - 8) * s + z``, which is our symmetric format with ``z = 0``, so the values are the same to the bit.

Prefixes: the stored N is padded to a multiple of 64 (zero-weight rows; aten wants N % 16 == 0, and whole blocks
keep every prefix in one format), so an N prefix (q/k/v, gate/up) that is a multiple of 64 is a prefix of the
blocked rows, i.e. a view; any other length runs to the next multiple of 64 and drops the extra outputs. The kernel
wants its scales contiguous, so an N prefix below the stored width copies its scale columns per call (``K/G * n``
pairs: 1/4 of its codes' bytes, a few microseconds; no hidden per-rung memory). A K prefix (o_proj/down_proj inputs)
is not a view of the blocked layout: the activations are zero-padded to the stored K instead, which multiplies the
pruned columns by zero (so the result is exact) but still reads them: on CPU only N pruning saves bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int4_format import PACK, ZERO, unpack
from .int4_matmul import int4_matmul_reference as reference  # noqa: F401 (the torch reference of every W4A16 path)

ROW_BLOCK = 64  # a multiple of aten's BLOCK_N on every CPU (64 AVX-512, 32 AVX2 / scalar)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# aten vectorises bf16 activations only; fp32 / fp16 take a scalar loop 20-40x slower than a dense fp32 GEMV
# (measured on this project's AVX-512 CPU host), so they are for exact tests, not for serving
FAST_DTYPES = (torch.bfloat16,)


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fast() -> bool:
    """The kernel exists and runs vectorised here (x86 with AVX2 / AVX-512), so bf16 decode through it pays."""
    return available() and torch.backends.cpu.get_cpu_capability().startswith("AVX")


class CpuInt4:
    """One projection's codes and scales in aten's CPU int4 layout: ``packed`` uint8 ``[Np, Kp/2]``,
    ``scales_zeros`` ``[Kp/G, Np, 2]`` in the activation dtype; ``Np`` = N rounded up to whole row blocks, ``Kp`` =
    K rounded up to whole groups (a stored K prefix that ends inside a group), both padded with zero weights."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype=torch.float32):
        if dtype not in DTYPES:
            raise ValueError(f"CPU int4 GEMM takes {DTYPES} activations, got {dtype}")
        k = qweight.shape[0] * PACK
        self.n, self.k, self.group_size, self.dtype = qweight.shape[1], k, group_size, dtype
        self.k_padded = -(-k // group_size) * group_size
        self.n_padded = -(-self.n // ROW_BLOCK) * ROW_BLOCK
        codes = unpack(qweight).T  # [N, K] int32, 0..15
        pad_k, pad_n = self.k_padded - k, self.n_padded - self.n
        codes = F.pad(codes, (0, pad_k, 0, pad_n), value=ZERO)  # padding codes weigh (8 - 8) * s = 0
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
        s = F.pad(scales[: self.k_padded // group_size].to(dtype), (0, pad_n), value=1.0)  # [Kp/G, Np]
        self.scales_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()

    @staticmethod
    def bytes_for(n: int, k: int, group_size: int, dtype: torch.dtype) -> int:
        """What the form of an (n, k) stored prefix takes: codes, then a (scale, zero) pair per group."""
        n_padded, k_padded = -(-n // ROW_BLOCK) * ROW_BLOCK, -(-k // group_size) * group_size
        return n_padded * k_padded // 2 + (k_padded // group_size) * n_padded * 2 * dtype.itemsize

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]

    def __call__(self, x: torch.Tensor, n: int | None = None, k: int | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., k] -> [..., n]``: the first ``n`` outputs over the first ``k`` inputs."""
        n = self.n if n is None else n
        k = x.shape[-1] if k is None else k
        if x.shape[-1] != k or not 0 < k <= self.k or not 0 < n <= self.n:
            raise ValueError(f"prefix (n={n}, k={k}) of a [{self.n}, {self.k}] weight with x [..., {x.shape[-1]}]")
        rows = x.reshape(-1, k).to(self.dtype)
        if k < self.k_padded:  # zero activations for the pruned (or padding) inputs: exact, not cheaper
            rows = F.pad(rows, (0, self.k_padded - k))
        n_run = -(-n // ROW_BLOCK) * ROW_BLOCK
        packed, sz = self.packed, self.scales_zeros
        if n_run < self.n_padded:
            packed, sz = packed[:n_run], sz[:, :n_run].contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, self.group_size, sz)
        out = out[:, :n].reshape(*x.shape[:-1], n).to(x.dtype)
        return out if bias is None else out + bias[:n].to(out.dtype)
