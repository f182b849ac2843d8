"""``pdl.early_loads``: which decode launches issue their loads early (batch 1 by default, as measured), and that
the attention and GEMV launchers pass it on by their own batch; ``UNIQL_PDL`` refuses typos."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_diff

pytest.importorskip("triton")

from uniql.kernels import decode_attention as att  # noqa: E402
from uniql.kernels import elementwise, int4_gemv, pdl, ssm_update  # noqa: E402
from uniql.kernels import int4_matmul as im  # noqa: E402
from uniql.kernels.int4_format import rtn_quantize  # noqa: E402
from uniql.kernels.pdl import early_loads, pdl_enabled, pdl_mode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_early_loads_default_is_batch_one_only(monkeypatch):
    """At batch 4 and 16 early loads decoded slower on the H100 (results/early_loads_batch_ab_h100.json)."""
    for unset in (None, "", "1"):
        if unset is None:
            monkeypatch.delenv("UNIQL_EARLY_LOADS", raising=False)
        else:
            monkeypatch.setenv("UNIQL_EARLY_LOADS", unset)
        assert early_loads(1) and not early_loads(2) and not early_loads(16)
    monkeypatch.setenv("UNIQL_EARLY_LOADS", "all")
    assert early_loads(1) and early_loads(4)
    monkeypatch.setenv("UNIQL_EARLY_LOADS", "0")
    assert not early_loads(1) and not early_loads(4)
    for bad in ("yes", "ALL", "2"):  # a typo must not silently pick a behaviour
        monkeypatch.setenv("UNIQL_EARLY_LOADS", bad)
        with pytest.raises(ValueError, match="UNIQL_EARLY_LOADS must be 0, 1 or all"):
            early_loads(1)


def test_pdl_switch_refuses_typos(monkeypatch):
    """Off unless 1 (PDL also needs sm_90 and no interpreter); a typo ("true", "on") must not silently run off."""
    monkeypatch.delenv("UNIQL_PDL", raising=False)
    assert not pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("UNIQL_PDL", "1")
    assert not pdl_enabled(torch.device("cpu"))  # no PDL off the GPU
    monkeypatch.setenv("UNIQL_PDL", "late")
    assert pdl_mode(torch.device("cpu"), 1) == 0
    for bad in ("true", "LATE", "2"):
        monkeypatch.setenv("UNIQL_PDL", bad)
        with pytest.raises(ValueError, match="UNIQL_PDL must be 0, 1 or late"):
            pdl_enabled(torch.device("cpu"))


def test_pdl_mode_by_switch_rows_and_device(monkeypatch):
    """On an sm_90+ GPU: late -> 2, 1 -> 1, 0 -> 0; off above PDL_MAX_ROWS rows (batch 16 lost) and under the
    interpreter."""
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gpu = torch.device("cuda", 0)
    monkeypatch.delenv("UNIQL_PDL", raising=False)
    assert [pdl_mode(gpu, rows) for rows in (1, 4, 5, 16)] == [2, 2, 0, 0]
    monkeypatch.setenv("UNIQL_PDL", "1")
    assert [pdl_mode(gpu, rows) for rows in (1, 4, 5)] == [1, 1, 0]
    monkeypatch.setenv("UNIQL_PDL", "0")
    assert pdl_mode(gpu, 1) == 0
    monkeypatch.setenv("UNIQL_PDL", "late")
    monkeypatch.setattr(pdl, "_capable", lambda index: False)  # before sm_90 (Jetson Orin's sm_87)
    assert pdl_mode(gpu, 1) == 0
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl_mode(gpu, 1) == 0


@pytest.mark.parametrize("rows", [1, 3])
def test_late_mode_reaches_the_long_kernels_only(monkeypatch, rows):
    """UNIQL_PDL=late: the GEMV and the attention split pass get mode 2 (release after their main loop), the
    short combine keeps mode 1's release right after its wait; every one of them is launched with PDL, and each
    launcher asks for the mode with its own decode rows."""
    asked = []

    def mode(device, n):
        asked.append(n)
        return 2

    monkeypatch.setattr(att, "pdl_mode", mode)
    monkeypatch.setattr(int4_gemv, "pdl_mode", mode)
    split, combine, gemv = _Recorder(), _Recorder(), _Recorder()
    monkeypatch.setattr(att, "_split_kernel", split)
    monkeypatch.setattr(att, "_combine_kernel", combine)
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", gemv)
    _attention(rows)
    _residual_gemv(rows)
    assert asked == [rows, rows]
    assert [(c["PDL"], c["launch_pdl"]) for c in split.calls] == [(2, True)]
    assert [(c["PDL"], c["launch_pdl"]) for c in combine.calls] == [(True, True)]
    assert [(c["PDL"], c["launch_pdl"]) for c in gemv.calls] == [(2, True)]


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **constexprs)`` records the constexprs."""

    def __init__(self):
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


def _attention(batch: int):
    heads, kv, qk, cap = 4, 2, 16, 8
    caches = [torch.zeros(kv, cap, qk, device=DEV, dtype=torch.float16) for _ in range(2 * batch)]
    tables = (torch.tensor([c.data_ptr() for c in caches[:batch]], dtype=torch.int64, device=DEV),
              torch.tensor([c.data_ptr() for c in caches[batch:]], dtype=torch.int64, device=DEV),
              torch.full((batch,), cap, dtype=torch.int32, device=DEV),
              torch.full((batch,), 3, dtype=torch.int32, device=DEV))
    q = torch.zeros(batch, heads, qk, device=DEV, dtype=torch.float16)
    new = torch.zeros(batch, kv, qk, device=DEV, dtype=torch.float16)
    att.decode_attention(q, new, new.clone(), *tables, qk ** -0.5, cap)


@pytest.mark.parametrize(("batch", "flag", "early"), [(1, None, True), (3, None, False), (3, "all", True),
                                                      (1, "0", False)])
def test_attention_passes_early_loads_by_its_batch(monkeypatch, batch, flag, early):
    if flag is None:
        monkeypatch.delenv("UNIQL_EARLY_LOADS", raising=False)
    else:
        monkeypatch.setenv("UNIQL_EARLY_LOADS", flag)
    split, combine = _Recorder(), _Recorder()
    monkeypatch.setattr(att, "_split_kernel", split)
    monkeypatch.setattr(att, "_combine_kernel", combine)
    _attention(batch)
    assert [c["EARLY"] for c in split.calls] == [early]
    assert [c["EARLY"] for c in combine.calls] == [early]


def _residual_gemv(rows: int):
    gen = torch.Generator().manual_seed(0)
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(96, 128, generator=gen), 32))
    x = torch.randn(rows, 128, generator=gen).to(DEV, torch.float16)
    resid = torch.randn(rows, 96, generator=gen).to(DEV, torch.float16)
    weight = torch.ones(96, device=DEV, dtype=torch.float16)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=1, num_warps=4, block_m=4)
    im.int4_residual(x, qweight, scales, 32, 128, resid, weight, config=cfg)


@pytest.mark.parametrize(("rows", "early"), [(1, True), (3, False)])
def test_residual_gemv_passes_early_loads_by_its_rows(monkeypatch, rows, early):
    monkeypatch.delenv("UNIQL_EARLY_LOADS", raising=False)
    kernel = _Recorder()
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", kernel)
    _residual_gemv(rows)
    assert [c["EARLY"] for c in kernel.calls] == [early]


@pytest.mark.parametrize("flag", ["0", "1"])
def test_ssm_kernels_join_pdl_only_when_switched_on(monkeypatch, flag):
    """UNIQL_PDL_SSM=1 (the default since stop 40) launches the state update and the group norm with PDL (where PDL
    is on at all), 0 keeps them out, and each asks with its own rows."""
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device, rows=1: rows <= pdl.PDL_MAX_ROWS)
    monkeypatch.setenv("UNIQL_PDL_SSM", flag)
    update, norm = _Recorder(), _Recorder()
    monkeypatch.setattr(ssm_update, "_update_kernel", update)
    monkeypatch.setattr(elementwise, "_group_rms_kernel", norm)
    for batch in (1, 16):
        heads, p, n = 4, 8, 16
        x = torch.zeros(batch, heads, p, device=DEV)
        ssm_update.selective_state_update(torch.zeros(batch, heads, p, n, device=DEV), x, torch.zeros(batch, heads,
                                          device=DEV), torch.zeros(heads, device=DEV), torch.zeros(batch, 1, n,
                                          device=DEV), torch.zeros(batch, 1, n, device=DEV))
        elementwise.group_rms_norm(x, torch.ones(heads * p, device=DEV), 2, 1e-5)
    on = flag == "1"
    assert [(c["PDL"], c["launch_pdl"]) for c in update.calls] == [(on, on), (False, False)]
    assert [(c["PDL"], c["launch_pdl"]) for c in norm.calls] == [(on, on), (False, False)]


@pytest.mark.parametrize(("rows", "split"), [(1, 1), (1, 3), (3, 5), (1, 7)])
def test_gemv_preload_gives_the_same_bits(monkeypatch, rows, split):
    """UNIQL_GEMV_PRELOAD=1 (2) loads each program's first K tile (two) before the PDL wait and peels it off the
    loop (the second used only where the split has two), UNIQL_GEMV_PIPE=1 loads tile t + 1 before computing tile t:
    the same products summed in the same order, so the projection, the residual epilogue and the GLU pair must be
    bit for bit the plain loop's (K = 200 of 256: 25
    packed rows in 7 tiles, a ragged last one; splits of 7, of 3, 3 and 1, of 2, 2, 2 and 1, and of one tile)."""
    gen = torch.Generator().manual_seed(7)
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(96, 256, generator=gen), 32))
    x = torch.randn(rows, 200, generator=gen).to(DEV, torch.float16)
    resid = torch.randn(rows, 96, generator=gen).to(DEV, torch.float16)
    weight = (torch.rand(96, generator=gen) + 0.5).to(DEV, torch.float16)
    cfg = im.Int4Config("gemv", block_n=32, block_k=32, split_k=split, num_warps=4, block_m=4 if rows > 1 else 1)
    runs = []
    # then UNIQL_GEMV_PIPE=1 (the loop one tile ahead, its look-ahead past the split masked off) with each preload
    for flag, pipe in (("0", "0"), ("1", "0"), ("2", "0"), ("0", "1"), ("1", "1"), ("2", "1")):
        monkeypatch.setenv("UNIQL_GEMV_PRELOAD", flag)
        monkeypatch.setenv("UNIQL_GEMV_PIPE", pipe)
        runs.append([im.int4_matmul(x, qweight, scales, 32, k=200, config=cfg),
                     *im.int4_residual(x, qweight, scales, 32, 200, resid, weight, config=cfg),
                     im.int4_glu(x, qweight, scales, 32, [(0, 48), (48, 48)], k=200, config=cfg)])
    ref = im.int4_matmul_reference(x, qweight, scales, 32, k=200)
    assert max_rel_diff(runs[0][0], ref) < 3e-3  # every run is right, not merely equal
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


def _launched(monkeypatch, name: str, flag: str | None, key: str, rows: tuple[int, ...]) -> list:
    """The constexpr ``key`` the launcher passed for residual GEMVs of ``rows`` rows with switch ``name`` = ``flag``."""
    if flag is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, flag)
    kernel = _Recorder()
    monkeypatch.setattr(int4_gemv, "_gemv_h2_kernel", kernel)
    for m in rows:
        _residual_gemv(m)
    return [c[key] for c in kernel.calls]


@pytest.mark.parametrize(("flag", "preload"), [(None, 1), ("0", 0), ("1", 1), ("2", 2)])
def test_gemv_launcher_passes_the_preload_switch(monkeypatch, flag, preload):
    assert _launched(monkeypatch, "UNIQL_GEMV_PRELOAD", flag, "PRELOAD", (1,)) == [preload]


@pytest.mark.parametrize(("flag", "pipes"), [(None, [True, True]), ("0", [False, False]), ("1", [True, True]),
                                             ("rows", [False, True])])
def test_gemv_launcher_passes_the_pipe_switch(monkeypatch, flag, pipes):
    """UNIQL_GEMV_PIPE: ``1`` (the default) at every batch, ``rows`` in launches of 2+ rows, ``0`` never."""
    assert _launched(monkeypatch, "UNIQL_GEMV_PIPE", flag, "PIPE", (1, 3)) == pipes


def test_head_scope_caps_the_gemv_preload(monkeypatch):
    """Inside ``head_gemv_preload`` the GEMV preloads at most UNIQL_HEAD_PRELOAD tiles (none by default)."""
    from uniql.kernels import pdl

    monkeypatch.setenv("UNIQL_GEMV_PRELOAD", "2")
    with pdl.head_gemv_preload():
        assert pdl.gemv_preload() == 0
        monkeypatch.setenv("UNIQL_HEAD_PRELOAD", "1")
        with pdl.head_gemv_preload():
            assert pdl.gemv_preload() == 1
    assert pdl.gemv_preload() == 2


def test_ssm_scope_caps_the_gemv_preload(monkeypatch):
    """Inside ``ssm_gemv_preload`` (a Mamba block's decode) the GEMVs preload at most UNIQL_SSM_GEMV_PRELOAD tiles
    (0 by default), read when the scope opens; outside it UNIQL_GEMV_PRELOAD holds."""
    from uniql.kernels import pdl

    monkeypatch.setenv("UNIQL_GEMV_PRELOAD", "2")
    assert pdl.gemv_preload() == 2
    with pdl.ssm_gemv_preload():
        assert pdl.gemv_preload() == 0
        monkeypatch.setenv("UNIQL_SSM_GEMV_PRELOAD", "1")
        assert pdl.gemv_preload() == 0
        with pdl.ssm_gemv_preload():
            assert pdl.gemv_preload() == 1
        assert pdl.gemv_preload() == 0
    assert pdl.gemv_preload() == 2
    monkeypatch.setenv("UNIQL_GEMV_PRELOAD", "0")
    with pdl.ssm_gemv_preload():
        assert pdl.gemv_preload() == 0  # a cap, never more than the global switch
    monkeypatch.setenv("UNIQL_SSM_GEMV_PRELOAD", "3")
    with pytest.raises(ValueError, match="UNIQL_SSM_GEMV_PRELOAD"), pdl.ssm_gemv_preload():
        pass
