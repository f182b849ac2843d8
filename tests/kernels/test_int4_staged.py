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


def test_norm_reference_scales_each_activation_by_the_rms_before_fp16():
    x, qweight, scales = _weights(512, 64, 64)
    parts = torch.rand(1, 5) * 100
    got = staged.staged_gemv_reference(x, qweight, scales, 64, norm=(parts, 1e-5))
    rms = torch.sqrt(parts.sum() / 512 + 1e-5)
    want = int4_matmul_reference((x / rms).half().float(), qweight, scales, 64)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,block_n", [(96, 32), (72, 32), (40, 16)])
def test_residual_reference_rounds_s_and_sums_each_tile(n, block_n):
    x, qweight, scales = _weights(256, n, 32)
    residual = torch.randn(1, n).bfloat16()
    w = torch.rand(n) + 0.5
    s, sg, sums = staged.staged_residual_reference(x, qweight, scales, 32, 256, residual, w, block_n=block_n)
    y = int4_matmul_reference(x, qweight, scales, 32).float()
    assert s.dtype == sg.dtype == torch.bfloat16
    torch.testing.assert_close(s, (residual.float() + y).bfloat16())
    assert sums.shape == (1, -(-n // block_n))
    s32 = s.float()[0]
    for t in range(sums.shape[1]):  # the last tile is partial where block_n does not divide n
        torch.testing.assert_close(sums[0, t], (s32[t * block_n:(t + 1) * block_n] ** 2).sum())
    torch.testing.assert_close(sg, (s.float() * w).bfloat16())


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
                                           (1, 0, 128, "no K"),
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
    variants = ("plain", "res", "norm")
    assert [(r["k"], r["variant"]) for r in rows] == [(k, v) for k in (4096, 2688, 512) for v in variants]
    for r in rows:
        assert r["tma_loads"] >= 2, f"{r}: the weights are not copied by TMA"
        assert not r["local_memory"], f"{r}: registers spill to local memory"
        assert r["hfma2"] >= 32, f"{r}: not the packed-fp16 dot"
        # this layer's programs and the next layer's must fit an SM together: 64 K registers, 227 KB shared
        assert 2 * r["registers"] * 32 * r["config"]["warps"] <= 65536, r
        assert 2 * r["staged_bytes"] <= staged.SMEM_BYTES, r
        # nothing the previous kernel writes is needed for the weights and scales: all of them go out before the wait
        assert r["tma_before_wait"] == r["tma_loads"] and r["loads_before_wait"] > 0, r
    plain = {r["k"]: r["loads_before_wait"] for r in rows if r["variant"] == "plain"}
    assert all(r["loads_before_wait"] > plain[r["k"]] for r in rows if r["variant"] == "res")  # the residual too


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


@pytest.mark.skipif(not CUDA90, reason="needs an sm_90+ GPU")
@pytest.mark.parametrize("k", [4096, 2688])
def test_staged_residual_matches_the_production_epilogue(k):
    """Against ``int4_matmul.int4_residual`` (the engine's o / down GEMV): the same s and s * w, and the same total
    of the sums of s^2 (the two kernels cut the columns into different tiles)."""
    from uniql.kernels.int4_matmul import int4_residual

    x, qweight, scales = _weights(4096, 4096, 128, "cuda")
    x = x.bfloat16()
    residual = torch.randn(1, 4096, device="cuda").bfloat16()
    w = torch.rand(4096, device="cuda").bfloat16() + 0.5
    s, sg, sums = staged.staged_residual(x, qweight, scales, 128, k, residual, w)
    ref_s, ref_sg, ref_sums = staged.staged_residual_reference(x, qweight, scales, 128, k, residual, w)
    prod_s, prod_sg, prod_sums = int4_residual(x, qweight, scales, 128, k, residual, w)
    for got in (ref_s, prod_s):
        torch.testing.assert_close(s.float(), got.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(sg.float(), ref_sg.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(sums, ref_sums, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(sums.sum(), prod_sums.sum(), rtol=2e-2, atol=1e-2)


@pytest.mark.skipif(not CUDA90, reason="needs an sm_90+ GPU")
def test_staged_norm_prologue_matches_the_production_one():
    from uniql.kernels.int4_matmul import int4_matmul

    x, qweight, scales = _weights(4096, 6144, 128, "cuda")
    x = x.bfloat16() * 3
    parts = torch.rand(1, 128, device="cuda") * 50
    got = staged.staged_gemv(x, qweight, scales, 128, norm=(parts, 1e-5))
    want = staged.staged_gemv_reference(x, qweight, scales, 128, norm=(parts, 1e-5))
    prod = int4_matmul(x, qweight, scales, 128, norm=(parts, 1e-5))
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(got.float(), prod.float(), rtol=2e-2, atol=2e-2 * scale)


def test_int4_residual_takes_the_staged_kernel_only_when_switched_on(monkeypatch):
    """``UNIQL_GEMV_STAGED=1`` routes a one-row ``int4_residual`` through ``staged_residual_if_served`` (stubbed
    here: the kernel needs an sm_90 GPU) and keeps the production kernel's result where it declines or is off."""
    from uniql.kernels import int4_matmul as im

    x, qweight, scales = _weights(256, 64, 32)
    xh, residual, w = x.bfloat16(), torch.randn(1, 64).bfloat16(), torch.rand(64).bfloat16()
    calls = []

    def staged_stub(x2, qw, sc, group, k, res, nw, norm=None):
        calls.append((tuple(x2.shape), k, group, norm))
        return (res + 1, res + 2, torch.zeros(1, 2)) if served else None

    monkeypatch.setattr(staged, "staged_residual_if_served", staged_stub)
    monkeypatch.setenv("UNIQL_GEMV_STAGED", "0")
    want = im.int4_residual(xh, qweight, scales, 32, 256, residual, w)
    assert calls == []
    monkeypatch.setenv("UNIQL_GEMV_STAGED", "1")
    served = True
    s, sg, sums = im.int4_residual(xh, qweight, scales, 32, 256, residual, w)
    assert calls == [((1, 256), 256, 32, None)]
    assert torch.equal(s, residual + 1) and torch.equal(sg, residual + 2) and sums.shape == (1, 2)
    served = False  # declined (e.g. K > 4096): the production kernel's result
    got = im.int4_residual(xh, qweight, scales, 32, 256, residual, w)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
