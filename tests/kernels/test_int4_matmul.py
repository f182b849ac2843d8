"""W4A16 Triton kernels vs the torch reference (CPU: Triton interpreter, small shapes; GPU: real shapes, bf16)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402
from uniql.runtime.ladder import kept_size  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16, torch.float32]


def packed(n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qweight, scales = rtn_quantize(torch.randn(n, k, generator=g), group)
    return qweight.to(DEV), scales.to(DEV)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def tol(dtype) -> float:
    # gemv computes in fp32 from exact codes; gemm rounds the dequantized tile to the activation dtype
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def check(x, qweight, scales, group, **kw):
    out = im.int4_matmul(x, qweight, scales, group, **kw)
    ref = im.int4_matmul_reference(x, qweight, scales, group, **{a: b for a, b in kw.items() if a != "config"})
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol(x.dtype), kw
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 17, 260])
@pytest.mark.parametrize(("n_stored", "k_stored", "group", "n", "k"), [
    (200, 192, 64, 200, 192),   # full, N not a power of two
    (200, 192, 64, 37, 136),    # odd N prefix, K prefix ending inside a group
    (48, 320, 32, 48, 8),       # one packed row
    (130, 256, 128, 130, 248),
])
def test_kernel_matches_reference(dtype, m, n_stored, k_stored, group, n, k):
    qweight, scales = packed(n_stored, k_stored, group)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV)
    check(x, qweight, scales, group, n=n, k=k)
    check(x, qweight, scales, group, n=n, k=k, bias=bias)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_split_k_is_exact_and_deterministic(path, split):
    qweight, scales = packed(96, 512, 32)
    m = 3 if path.startswith("gemv") else 6
    x = torch.randn(m, 488, device=DEV, dtype=torch.float32 if not CUDA else torch.float16)
    block_m = 4 if path.startswith("gemv") else 16
    cfg = im.Int4Config(path, block_n=32, block_k=32, split_k=split, num_warps=4, block_m=block_m)
    first = check(x, qweight, scales, 32, n=90, k=488, config=cfg)
    again = im.int4_matmul(x, qweight, scales, 32, n=90, k=488, config=cfg)
    assert torch.equal(first, again)  # the last program sums the partials in split order
    _, counters = im.workspace(x.device, 0, 0)
    assert int(counters.abs().sum()) == 0  # every tile's counter is back at zero for the next launch / replay


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_many_splits_sum_in_a_fixed_order(path):
    """Twenty splits: the fixup's four-at-a-time loop runs five steps (a 3-D chunked variant that loaded 16 per
    step measured slower in the engine, results/decode_split_chunk_ab_h200.json)."""
    qweight, scales = packed(64, 1280, 32)
    m = 1 if path == "gemv" else 5
    x = torch.randn(m, 1256, device=DEV, dtype=torch.float32 if not CUDA else torch.float16)
    cfg = im.Int4Config(path, block_n=64 if path == "gemv" else 32, block_k=32, split_k=37, num_warps=4,
                        block_m=1 if path == "gemv" else 16)
    first = check(x, qweight, scales, 32, n=60, k=1256, config=cfg)
    assert torch.equal(first, im.int4_matmul(x, qweight, scales, 32, n=60, k=1256, config=cfg))
    _, counters = im.workspace(x.device, 0, 0)
    assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_eight_partials_a_step_sum_to_the_same_bits(monkeypatch, path):
    """UNIQL_SPLITK_STEP=8 loads eight split-K partials per step of the last program's sum instead of four, ``all``
    every partial in one unrolled sweep; the adds keep split order, so every output bit is the same (42 K tiles in
    21 splits: a partial last step at either width, 11 masked loads in the sweep)."""
    qweight, scales = packed(64, 1344, 32)
    m = 1 if path == "gemv" else 5
    x = torch.randn(m, 1344, device=DEV, dtype=torch.float32 if not CUDA else torch.float16)
    cfg = im.Int4Config(path, block_n=64 if path == "gemv" else 16, block_k=32, split_k=21, num_warps=4,
                        block_m=1 if path == "gemv" else 16)
    monkeypatch.setenv("UNIQL_SPLITK_STEP", "4")
    assert im.sum_step(cfg.block_m, cfg.block_n, 21) == 4
    four = im.int4_matmul(x, qweight, scales, 32, n=60, config=cfg)
    monkeypatch.setenv("UNIQL_SPLITK_STEP", "8")
    assert im.sum_step(cfg.block_m, cfg.block_n) == 8
    assert torch.equal(im.int4_matmul(x, qweight, scales, 32, n=60, config=cfg), four)
    monkeypatch.setenv("UNIQL_SPLITK_STEP", "all")  # all 21 partials in one unrolled sweep of 32 loads
    assert im.sum_step(cfg.block_m, cfg.block_n, 21) == 32 and im.sum_step(cfg.block_m, cfg.block_n, 6) == 8
    assert im.sum_step(4, 128, 21) == 4  # 512 floats a partial: the four-a-step loop
    assert torch.equal(im.int4_matmul(x, qweight, scales, 32, n=60, config=cfg), four)
    assert rel_err(four, im.int4_matmul_reference(x, qweight, scales, 32, n=60)) < 3 * tol(x.dtype)
    monkeypatch.delenv("UNIQL_SPLITK_STEP")  # the default since the stop-33 A/B
    assert im.sum_step(cfg.block_m, cfg.block_n, 21) == 32
    monkeypatch.setenv("UNIQL_SPLITK_STEP", "16")
    with pytest.raises(ValueError, match="UNIQL_SPLITK_STEP must be 4, 8 or all"):
        im.sum_step(1, 64, 21)


def test_gemm_with_split_k_and_an_inner_group_tail():
    qweight, scales = packed(80, 256, 32)
    x = torch.randn(19, 200, device=DEV).to(DTYPES[0])
    cfg = im.Int4Config("gemm", block_n=32, block_k=64, split_k=2, num_warps=4, block_m=16)
    check(x, qweight, scales, 32, n=64, k=200, config=cfg)


@pytest.mark.parametrize("m", [1, 6])
def test_fused_segments_match_separate_prefixes(m):
    qweight, scales = packed(160, 128, 64)
    x = torch.randn(m, 128, device=DEV).to(DTYPES[0])
    segments = [(0, 48), (64, 16), (128, 32)]  # q | k | v prefixes of a fused [q 64 | k 64 | v 32] weight
    bias = torch.randn(96, device=DEV)
    fused = check(x, qweight, scales, 64, segments=segments, bias=bias)
    parts = [im.int4_matmul(x, qweight[:, a:], scales[:, a:], 64, n=n) for a, n in segments]
    assert rel_err(fused, torch.cat(parts, -1) + bias.to(fused.dtype)) < tol(x.dtype)


@pytest.mark.parametrize("m", [1, 6])
def test_five_segments_match_separate_prefixes(m):
    """Mamba's z|x|B|C|dt in one launch: five prefixes of one fused weight, each its own width, odd ones too."""
    qweight, scales = packed(224, 128, 64)
    x = torch.randn(m, 128, device=DEV).to(DTYPES[0])
    segments = [(0, 40), (48, 24), (96, 16), (144, 8), (192, 20)]
    fused = check(x, qweight, scales, 64, segments=segments)
    parts = [im.int4_matmul(x, qweight[:, a:], scales[:, a:], 64, n=n) for a, n in segments]
    assert rel_err(fused, torch.cat(parts, -1)) < tol(x.dtype)


@pytest.mark.parametrize("axis", ["n", "k"])
def test_every_rung_of_a_ladder_is_a_prefix_of_the_same_bytes(axis):
    """gate/up (N-pruned) and down (K-pruned) at each rung's kept size from THE rounding rule."""
    group, full = 32, 256
    qweight, scales = packed(full if axis == "n" else 64, full if axis == "k" else 64, group)
    pointers = (qweight.data_ptr(), scales.data_ptr())
    for rate in (0.0, 0.1, 0.15, 0.25, 0.35, 0.5, 0.85):
        keep = kept_size(full, 1 - rate, 32)
        kw = {"n": keep} if axis == "n" else {"k": keep}
        x = torch.randn(1, keep if axis == "k" else 64, device=DEV).to(DTYPES[0])
        out = check(x, qweight, scales, group, **kw)
        assert out.shape[-1] == (keep if axis == "n" else 64)
    assert (qweight.data_ptr(), scales.data_ptr()) == pointers


@pytest.mark.skipif(not CUDA, reason="the half2 assembly runs on the GPU (CPU runs its plain-Triton twin)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_half2_gemv_is_accurate_for_large_and_small_activations(dtype, m):
    """fp16 products and 8-term half2 sums: no overflow for |x| in the thousands, no underflow for tiny x."""
    g = torch.Generator().manual_seed(0)
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(512, 1024, generator=g) * 1e-2, 64))
    for magnitude in (2000.0, 1e-3):  # (small weights keep the OUTPUT inside fp16 range)
        x = (torch.randn(m, 1024, device=DEV) * magnitude).to(dtype)
        out = check(x, qweight, scales, 64)
        assert torch.isfinite(out).all()


def test_misaligned_activation_views_are_copied_not_misread():
    qweight, scales = packed(64, 128, 64)
    base = torch.randn(2, 129, device=DEV).to(DTYPES[0])
    check(base[:, 1:], qweight, scales, 64)  # odd element offset: not int32-aligned


def test_leading_dims_and_strided_activations():
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(2, 3, 256, device=DEV).to(DTYPES[0])[..., ::2]  # last dim strided: the launcher copies it
    out = check(x, qweight, scales, 64)
    assert out.shape == (2, 3, 64)


@pytest.mark.parametrize(("kw", "match"), [
    ({"k": 100}, "multiple of 8"),
    ({"k": 120}, "input features"),
    ({"n": 0}, "outside"),
    ({"segments": [(0, 10), (60, 10)]}, "outside"),
    ({"segments": [(0, 8)] * 6}, "segments supported"),
    ({"bias": torch.zeros(3)}, "bias must have shape"),
])
def test_bad_input_is_refused_clearly(kw, match):
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(1, 128, device=DEV).to(DTYPES[0])
    if "bias" in kw:
        kw = {"bias": kw["bias"].to(DEV)}
    with pytest.raises(ValueError, match=match):
        im.int4_matmul(x, qweight, scales, 64, **kw)


def test_wrong_dtypes_and_groups_are_refused():
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(1, 128, device=DEV).to(DTYPES[0])
    with pytest.raises(ValueError, match="float16"):
        im.int4_matmul(x, qweight, scales.float(), 64)
    with pytest.raises(ValueError, match="activations"):
        im.int4_matmul(x.to(torch.float64), qweight, scales, 64)
    with pytest.raises(ValueError, match="group size"):
        im.int4_matmul(x, qweight, scales, 48)


@pytest.mark.skipif(not CUDA, reason="real shapes need the GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 16, 300])
@pytest.mark.parametrize(("n", "k", "n_act", "k_act"), [(6144, 4096, 4992, 4096), (4096, 14336, 4096, 9344),
                                                         (4096, 4096, 4096, 2664)])
def test_gpu_real_shapes(dtype, m, n, k, n_act, k_act):
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // 64, n, device="cuda") * 0.02 + 0.001).half()
    x = torch.randn(m, k_act, device="cuda", dtype=dtype)
    check(x, qweight, scales, 64, n=n_act, k=k_act)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3])
def test_glu_epilogue_equals_projection_then_silu_mul(m, split):
    """silu(gate) * up written by the gate|up GEMV itself (second tile of each pair) = the projection, then the
    activation in torch; several column blocks (the last one partial), split K, and counters back at zero."""
    dtype = torch.float16 if not CUDA else torch.bfloat16
    qweight, scales = packed(200, 256, 32)  # stored [gate 100 | up 100]
    x = torch.randn(m, 248, device=DEV).to(dtype)
    segments = [(0, 90), (100, 90)]  # a rung keeping 90 of 100 columns of each
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=split, num_warps=4, block_m=4)
    act = im.int4_glu(x, qweight, scales, 32, segments, k=248, config=cfg)
    gate_up = im.int4_matmul(x, qweight, scales, 32, k=248, segments=segments, config=cfg)
    gate, up = gate_up.float().split(90, dim=-1)
    expected = (gate * torch.sigmoid(gate)).to(dtype) * up.to(dtype)
    assert act.shape == (m, 90) and act.dtype == dtype
    torch.testing.assert_close(act, expected, atol=1e-2, rtol=1e-2)
    ref = im.int4_matmul_reference(x, qweight, scales, 32, k=248, segments=segments).float()
    assert rel_err(act, torch.nn.functional.silu(ref[:, :90]) * ref[:, 90:]) < 3 * tol(dtype)
    _, counters = im.workspace(x.device, 0, 0)
    assert int(counters.abs().sum()) == 0  # tile and pair counters are back at zero for the next replay


def test_glu_needs_two_equal_segments():
    qweight, scales = packed(64, 64, 32)
    x = torch.randn(1, 64, device=DEV).to(DTYPES[0])
    with pytest.raises(ValueError, match="two segments of one width"):
        im.int4_glu(x, qweight, scales, 32, [(0, 16), (32, 24)])


def close_bf16(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to one bf16 rounding step (2^-7 relative)."""
    return bool(((a.float() - b.float()).abs() <= b.float().abs() * 2 ** -7 + 1e-30).all())


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_split_across_two_gemvs_equals_add_norm_then_gemv(m, split, big, dtype):
    """Producer: s = x + x_in @ W (rounded like torch's add), s * w and per-tile sums of s^2, bit for bit against
    the plain projection; consumer: (s * w) @ W2 scaled per row by 1/rms(s) = RMSNorm(s) @ W2. ``big``: a residual
    stream far beyond fp16's half2-sum range (the consumer must normalise before its fp16 conversion; on the GPU the
    half2 sums overflow without that, while the interpreter's fp32 emulation cannot, so CPU checks the arithmetic)."""
    gen = torch.Generator().manual_seed(3)
    qweight, scales = packed(96, 128, 32, seed=1)  # producer: 128 -> 96 (the hidden size)
    q2, s2 = packed(80, 96, 32, seed=2)  # consumer: 96 -> 80
    x_in = torch.randn(m, 120, generator=gen).to(DEV, dtype)  # a k prefix of the producer's inputs
    magnitude = (8e3 if dtype == torch.float16 else 1e5) if big else 3.0  # fp16 must still hold s * w
    resid = (torch.randn(m, 96, generator=gen) * magnitude).to(DEV, dtype)
    weight = (torch.rand(96, generator=gen) + 0.5).to(DEV, dtype)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=split, num_warps=4, block_m=4)
    got = im.int4_residual(x_in, qweight, scales, 32, 120, resid, weight, config=cfg)  # split: the fixup writes
    assert got is not None
    s, sg, sums = got
    delta = im.int4_matmul(x_in, qweight, scales, 32, k=120, config=cfg)
    same = torch.equal if CUDA or dtype != torch.bfloat16 else close_bf16  # the interpreter truncates to bf16
    assert same(s, (resid.float() + delta.float()).to(dtype))
    assert same(sg, (s.float() * weight.float()).to(dtype))
    torch.testing.assert_close(sums.sum(1), s.float().pow(2).sum(1), rtol=1e-5, atol=1e-4)
    normed = (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * weight
    want = im.int4_matmul_reference(normed, q2, s2, 32)
    out = im.int4_matmul(sg, q2, s2, 32, config=cfg, norm=(sums, 1e-5))
    assert torch.isfinite(out).all() and rel_err(out, want) < 3 * tol(dtype)
    glu = im.int4_glu(sg, q2, s2, 32, [(0, 40), (40, 40)], config=cfg, norm=(sums, 1e-5))
    gate, up = want.float().split(40, dim=-1)
    assert rel_err(glu, torch.nn.functional.silu(gate) * up) < 5 * tol(dtype)


def test_bias_must_be_one_contiguous_row_on_the_device():
    """The kernels read ``bias + column`` at stride 1: a strided view would be misread, not just slow."""
    qweight, scales = packed(64, 128, 64)
    x = torch.randn(1, 128, device=DEV).to(DTYPES[0])
    strided = torch.randn(64, 2, device=DEV)[:, 0]
    for bad, match in ((strided, "contiguous"), (torch.zeros(64, device="meta"), "device"),
                       (torch.zeros(1, 64, device=DEV), "shape")):
        with pytest.raises(ValueError, match=match):
            im.int4_matmul(x, qweight, scales, 64, bias=bad)
    with pytest.raises(ValueError, match="contiguous"):  # the GLU epilogue reads it the same way
        im.int4_glu(x, qweight, scales, 64, [(0, 32), (32, 32)], bias=strided)
    torch.testing.assert_close(im.int4_matmul(x, qweight, scales, 64, bias=strided.contiguous()),
                               im.int4_matmul_reference(x, qweight, scales, 64, bias=strided), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_glu_of_an_empty_batch_is_empty(lead):
    qweight, scales = packed(64, 64, 32)
    out = im.int4_glu(torch.randn(*lead, 64, device=DEV).to(DTYPES[0]), qweight, scales, 32, [(0, 32), (32, 32)])
    assert out.shape == (*lead, 32) and out.dtype == DTYPES[0]


GEMV4 = im.Int4Config("gemv", block_n=32, block_k=32, split_k=1, num_warps=4, block_m=4)


@pytest.mark.parametrize("cfg", [
    im.Int4Config("dequant", block_n=64, block_k=64, split_k=1, num_warps=4),
    im.Int4Config("gemm", block_n=32, block_k=32, split_k=1, num_warps=4, block_m=16),
])
def test_norm_is_refused_where_the_half2_gemv_does_not_run(cfg):
    """norm= folds 1/rms into the half2 GEMV only; any other path must refuse it, not return an un-normed product."""
    qweight, scales = packed(64, 32, 32)
    x = torch.randn(3, 32, device=DEV, dtype=torch.float16)
    norm = (torch.full((3, 2), 50.0, device=DEV), 0.0)
    with pytest.raises(ValueError, match="half2 GEMV only"):
        im.int4_matmul(x, qweight, scales, 32, config=cfg, norm=norm)
    with pytest.raises(ValueError, match="half2 GEMV only"):
        im.int4_glu(x, qweight, scales, 32, [(0, 32), (32, 32)], config=cfg, norm=norm)
    with pytest.raises(ValueError, match="half2 GEMV only"):  # the fp32 GEMV has no norm either
        im.int4_matmul(x.float(), qweight, scales, 32, config=GEMV4, norm=norm)



def test_norm_sums_must_be_contiguous_fp32_rows_for_every_row():
    """The GEMV reads row r's sums at ``ss + r * parts``: a strided, short or fp16 ``ss`` is refused."""
    qweight, scales = packed(16, 32, 32)
    x = torch.randn(3, 32, device=DEV, dtype=torch.float16)
    sums = torch.rand(3, 2, device=DEV) * 100
    strided = torch.cat([sums, torch.full((3, 3), 1e6, device=DEV)], 1)[:, :2]
    for bad in (strided, sums[:2], sums.half(), sums[:, :, None]):
        with pytest.raises(ValueError, match="norm sums"):
            im.int4_matmul(x, qweight, scales, 32, config=GEMV4, norm=(bad, 1e-5))
    want = im.int4_matmul_reference(x.float() * torch.rsqrt(sums.sum(1, keepdim=True) / 32 + 1e-5), qweight, scales, 32)
    out = im.int4_matmul(x, qweight, scales, 32, config=GEMV4, norm=(sums, 1e-5))
    assert rel_err(out, want) < 3 * tol(torch.float16)


@pytest.mark.parametrize("split", [1, 3])
def test_early_residual_load_gives_the_same_bits(monkeypatch, split):
    """Early loads (UNIQL_EARLY_LOADS=all: these are 3 rows) load the residual input before the split-K sum instead
    of after it: s, s * w and the sums of squares must be bit for bit the plain order's."""
    gen = torch.Generator().manual_seed(4)
    qweight, scales = packed(96, 128, 32, seed=1)
    x_in = torch.randn(3, 120, generator=gen).to(DEV, torch.float16)
    resid = (torch.randn(3, 96, generator=gen) * 3).to(DEV, torch.float16)
    weight = (torch.rand(96, generator=gen) + 0.5).to(DEV, torch.float16)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=split, num_warps=4, block_m=4)
    runs = []
    for flag in ("0", "all"):
        monkeypatch.setenv("UNIQL_EARLY_LOADS", flag)
        runs.append(im.int4_residual(x_in, qweight, scales, 32, 120, resid, weight, config=cfg))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_residual_operands_are_checked():
    """One residual row per row of x (a smaller residual would be read and written past its end), a contiguous
    norm weight (read at stride 1) and a contiguous bias."""
    qweight, scales = packed(32, 64, 32)
    x = torch.randn(3, 64, device=DEV, dtype=torch.float16)
    resid, weight = torch.randn(3, 32, device=DEV).half(), torch.rand(32, 2, device=DEV).half() + 0.5
    with pytest.raises(ValueError, match="one row per row of x"):
        im.int4_residual(x, qweight, scales, 32, 64, resid[:1], weight[:, 0].contiguous(), config=GEMV4)
    with pytest.raises(ValueError, match="norm_weight must be contiguous"):
        im.int4_residual(x, qweight, scales, 32, 64, resid, weight[:, 0], config=GEMV4)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        im.int4_residual(x, qweight, scales, 32, 64, resid, weight[:, 0].contiguous(),
                         bias=torch.randn(32, 2, device=DEV)[:, 0], config=GEMV4)
    s, sg, _ = im.int4_residual(x, qweight, scales, 32, 64, resid, weight[:, 0].contiguous(), config=GEMV4)
    assert torch.equal(sg, (s.float() * weight[:, 0].float()).half())


def _refuse_launch(*_, **__):
    raise AssertionError("launched a kernel whose int32 offsets wrap")


@pytest.mark.skipif(DEV == "cuda", reason="the 4 GiB output is lazily mapped on the host only")
def test_int32_offsets_past_2_31_are_refused_not_launched(monkeypatch):
    """A batch on the Triton GEMM (an explicit config, as the benchmark sweeps take at prefill sizes) whose output
    rows pass 2^31 elements: the kernels index x / out / qweight in int32, the offsets wrapped."""
    n, m = 1 << 20, 2049  # m * n > 2^31
    qweight = torch.empty(8, n, dtype=torch.int32)  # never read: lazily mapped
    scales = torch.ones(1, n, dtype=torch.float16)
    x = torch.randn(m, 64, dtype=torch.float16)
    monkeypatch.setattr(im, "_gemm_kernel", type("K", (), {"__getitem__": lambda *_: _refuse_launch})())
    with pytest.raises(ValueError, match="int32"):
        im.int4_matmul(x, qweight, scales, 64, config=im.Int4Config("gemm", 64, 64, 1, 4, 16))
