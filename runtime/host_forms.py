"""What an Int4Linear reads on CPU (``Int4Linear.prepare_host``): built once from the packed tensors, never saved.

* :class:`DenseHost`: the weight dequantized once, ``W^T [K, N]`` in the model dtype; every prefix a view. Exact
  in fp32, and the fast form for many rows (prefill: a BLAS / AMX GEMM).
* :class:`Int4Host` (bfloat16 models): calls with one position per sequence (decode steps, and the head over a
  prompt's last token) go through aten's CPU int4 GEMM over the codes (``uniql.kernels.int4_cpu``), which reads
  ~4.5 bits a weight instead of 16; calls over several positions (prefill) through the dense bf16 copy, because
  that kernel is a GEMV at heart: its time grows with the rows (a 1536 x 576 projection out of cache on the 2-core
  AVX-512 dev host: 35 vs 139 us at 1 row, 54 vs 102 at 4, 92 vs 98 at 8, 323 vs 106 at 32, int4 vs dense bf16).
  The split is by call kind, not by row count, on purpose: the int4 kernel computes each row on its own (bit-equal
  whatever the batch, tested), so a request's tokens never depend on how many others share its decode step; a
  row threshold sent large decode batches to the dense GEMM, whose rounding differs, and concurrent greedy answers
  drifted from sequential ones. Large decode batches therefore pay the int4 kernel's per-row cost. Holding both
  forms costs ~1/3 more than the dense copy alone.
"""

from __future__ import annotations

import torch

from uniql.kernels import int4_format
from uniql.kernels.int4_cpu import CpuInt4

HOST = "_host"  # the Int4Linear attribute (in __dict__, not a buffer) holding its host form


class DenseHost:
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype=torch.float32):
        self.w_t, self.dtype = int4_format.dequantize(qweight, scales, group_size, dtype=dtype), dtype

    @staticmethod
    def bytes_for(n: int, k: int, group_size: int, dtype: torch.dtype) -> int:
        return n * k * dtype.itemsize

    def tensors(self) -> list[torch.Tensor]:
        return [self.w_t]

    def __call__(self, x: torch.Tensor, n: int | None, k: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = x @ self.w_t[:k, :n]
        return out if bias is None else out + bias.to(out.dtype)


class Int4Host:
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, dtype=torch.bfloat16):
        self.int4 = CpuInt4(qweight, scales, group_size, dtype)
        self.dense = DenseHost(qweight, scales, group_size, dtype)
        self.dtype = dtype

    @staticmethod
    def bytes_for(n: int, k: int, group_size: int, dtype: torch.dtype) -> int:
        return CpuInt4.bytes_for(n, k, group_size, dtype) + DenseHost.bytes_for(n, k, group_size, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return self.int4.tensors() + self.dense.tensors()

    def __call__(self, x: torch.Tensor, n: int | None, k: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
        one_position = x.dim() == 2 or x.shape[-2] == 1  # [B, K] or [B, 1, K]: a decode step
        return (self.int4 if one_position else self.dense)(x, n, k, bias)
