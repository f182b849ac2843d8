"""The activation dtype a checkpoint is served in: `--dtype auto|bfloat16|float16|float32` (vLLM's flag).

One helper for `uniql serve`, `uniql generate` and `uniql bench decode`. The dtype is applied once, at load
(``load_checkpoint(dtype=...)``): norms, biases, float tables and the Mamba mixers' float parameters take it,
and with them everything sized from ``model.norm.weight.dtype`` afterwards (the runner's KV and conv caches,
the CPU runner's host forms, the server's byte accounting). INT4 codes and scales keep their format
dtypes (``Int4Linear._apply``), RoPE frequencies and a hidden rotation stay fp32 (``ElasticDecoder._apply``),
SSM states stay fp32 (``ssm_cache``).

``auto``: bfloat16 on a CUDA device with native bf16 (compute capability 8.0+: A100, H100, A6000, Jetson Orin),
float16 on an older CUDA device; on CPU bfloat16 where aten's vectorised CPU int4 GEMM runs (x86 with AVX2 /
AVX-512: decode reads the INT4 codes, W4A16 as on the GPU, ~1.7x the tokens/s of the fp32 path on SmolLM2), else
float32 (the runner dequantizes once and multiplies; exact). Any dtype can be asked for on CPU. Torch is imported
inside the functions: the flag and its check are used by torch-free code.
"""

from __future__ import annotations

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DTYPE_HELP = ("activation / cache dtype: auto (default) = bfloat16 on a GPU with native bf16, else float16 on a "
              "GPU; on CPU bfloat16 (INT4 decode kernel) on x86 with AVX2 / AVX-512, else float32")


def add_dtype_arg(parser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def check_dtype_name(name: str) -> str:
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")
    return name


def resolve_dtype(name: str, device):
    """The torch dtype ``name`` means on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device)."""
    import torch

    from .checkpoint import DTYPES, checked_device

    if check_dtype_name(name) != "auto":
        return DTYPES[name]
    if checked_device(device).type != "cuda":
        from uniql.kernels import int4_cpu

        return torch.bfloat16 if int4_cpu.fast() else torch.float32
    # native support only: emulated bf16 (pre-Ampere) would run the decode kernels far slower than fp16
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_for_inference(ckpt_dir, device, dtype: str = "auto"):
    """``(model, manifest)``: the checkpoint on ``device``, cast once to the dtype ``dtype`` resolves to there."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt_dir, device=device, dtype=resolve_dtype(dtype, device))
