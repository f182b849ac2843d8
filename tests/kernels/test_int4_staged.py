"""The TMA-staged batch-1 GEMV (``kernels/int4_staged.py``): its reference against the dequantized product, the
config it picks, the launcher's checks, its sm_90 compile (no GPU needed), and on a GPU the kernel itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
staged = pytest.importorskip("uniql.kernels.int4_staged")

from uniql.kernels.int4_format import rtn_quantize  # noqa: E402
from uniql.kernels.int4_matmul import int4_matmul_reference  # noqa: E402

CUDA90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _weights(k_stored: int, n_stored: int, group: int, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_stored, k_stored, generator=gen) / k_stored**0.5
    qweight, scales = rtn_quantize(w, group)
    x = torch.randn(1, k_stored, generator=gen)
    return x.to(device), qweight.to(device), scales.to(device)


@pytest.mark.parametrize("k_stored,n_stored,k,n,group", [(512, 96, 512, 96, 128), (512, 96, 272, 40, 32),
                                                          (1024, 64, 1008, 64, 64), (256, 32, 64, 12, 32)])
def test_reference_pairs_equal_the_dequantized_product(k_stored, n_stored, k, n, group):
    x, qweight, scales = _weights(k_stored, n_stored, group)
    got = staged.staged_gemv_reference(x, qweight, scales, group, n=n, k=k)
    want = int4_matmul_reference(x[:, :k], qweight, scales, group, n=n, k=k)
    assert got.shape == (1, n)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def as_sm90(monkeypatch):
    """staged_config as on an sm_90 GPU outside the interpreter (the decision is host-side arithmetic)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    return torch.device("cuda", 0)


def test_config_takes_what_fits_next_to_the_next_layer(as_sm90):
    o = staged.staged_config(1, 4096, 4096, 128, as_sm90)
    assert o == staged.StagedConfig(block_n=32, warps=8, chunk_rows=256)
    assert 2 * staged.staged_smem_bytes(o, 4096) <= staged.SMEM_BYTES
    assert staged.staged_config(1, 4096, 2688, 128, as_sm90).chunk_rows == 256  # a pruned K: one box, zero-filled
    small = staged.staged_config(1, 512, 512, 128, as_sm90)
    assert (small.chunk_rows, small.warps) == (32, 4)  # 8 rows of threads a warp: 4 warps cover 32 pairs
    for k in range(16, 4097, 16 * 13):
        staged.staged_constexprs(staged.staged_config(1, 64, k, 32, as_sm90), k, 32)  # every pick tiles


@pytest.mark.parametrize("m,k,group,why", [(2, 4096, 128, "two rows"), (1, 8192, 128, "slice too large"),
                                           (1, 14336, 128, "the MLP's down"), (1, 4104, 8, "K not a multiple of 16"),
                                           (1, 4096, 24, "group 24")])
def test_config_refuses_what_it_does_not_serve(as_sm90, m, k, group, why):
    assert staged.staged_config(m, 4096, k, group, as_sm90) is None, why


def test_config_refuses_cpu_pre_hopper_and_the_interpreter(monkeypatch):
    assert staged.staged_config(1, 4096, 4096, 128, torch.device("cpu")) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 7))  # Jetson Orin
    assert staged.staged_config(1, 4096, 4096, 128, torch.device("cuda", 0)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    assert staged.staged_config(1, 4096, 4096, 128, torch.device("cuda", 0)) is None


def test_launcher_refuses_bad_inputs_with_clear_errors():
    x, qweight, scales = _weights(512, 96, 128)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        staged.staged_gemv(x, qweight, scales, 128)
    xh = x.half()
    with pytest.raises(ValueError, match="outside"):
        staged.staged_gemv(xh, qweight, scales, 128, k=1024)
    with pytest.raises(ValueError, match="do not cover"):
        staged.staged_gemv(xh, qweight, scales[:2], 128)
    with pytest.raises(ValueError, match="does not serve"):
        staged.staged_gemv(xh, qweight, scales, 128)  # a CPU tensor
    with pytest.raises(ValueError, match="does not tile"):
        staged.staged_constexprs(staged.StagedConfig(block_n=32, warps=8, chunk_rows=32), 512, 128)


TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "sass_staged.py"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sm90_build_stages_by_tma_and_leaves_room_for_the_next_layer(dtype):
    """Compiled ahead of time for sm_90 (``benchmarks/sass_staged.py``, in a process without the interpreter) at
    o's K, a pruned K and a small one, in the configs ``staged_config`` picks there."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton wheel ships no cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(TOOL), "--k", "4096", "2688", "512", "--dtype", dtype, "--json"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=TOOL.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["k"] for r in rows] == [4096, 2688, 512]
    for r in rows:
        assert r["tma_loads"] >= 2, f"{r}: the weights are not copied by TMA"
        assert not r["local_memory"], f"{r}: registers spill to local memory"
        assert r["hfma2"] >= 32, f"{r}: not the packed-fp16 dot"
        # this layer's programs and the next layer's must fit an SM together: 64 K registers, 227 KB shared
        assert 2 * r["registers"] * 32 * r["config"]["warps"] <= 65536, r
        assert 2 * r["staged_bytes"] <= staged.SMEM_BYTES, r


@pytest.mark.skipif(not CUDA90, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("k_stored,n_stored,k,n", [(4096, 4096, 4096, 4096), (4096, 6144, 4096, 6144),
                                                   (4096, 4096, 2688, 4096), (4096, 6144, 4096, 4032),
                                                   (512, 96, 272, 40), (3584, 4608, 3584, 4608)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_staged_gemv_matches_its_reference_on_the_gpu(k_stored, n_stored, k, n, dtype):
    x, qweight, scales = _weights(k_stored, n_stored, 128, "cuda")
    got = staged.staged_gemv(x.to(dtype), qweight, scales, 128, n=n, k=k)
    want = staged.staged_gemv_reference(x.to(dtype), qweight, scales, 128, n=n, k=k)
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
