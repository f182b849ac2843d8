"""Launch configurations of the W4A16 kernels (``int4_config``): the path by batch size, block sizes, K splits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from uniql.kernels import int4_matmul as im  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def unpipelined_one_row(monkeypatch):
    """One-row GEMVs without the K loop's look-ahead (``UNIQL_GEMV_PIPE=rows``): their 256-column programs hold 8 an
    SM, the plans these tests were measured on; the pipelined default's (7, 6 with five segments):
    test_pipelined_one_row_wave_counts_its_registers."""
    monkeypatch.setenv("UNIQL_GEMV_PIPE", "rows")


def test_path_choice_by_batch():
    paths = [im.choose_path(m) for m in (1, 2, 4, 5, 16, 127, 128, 2048)]
    assert paths == ["gemv"] * 3 + ["gemm"] * 3 + ["dequant"] * 2
    assert [im.choose_path(m, 128256) for m in (1, 2, 4)] == ["gemv", "gemm", "gemm"]
    with pytest.raises(ValueError):
        im.choose_path(0)


def test_configs_cover_the_paths():
    for m in (1, 4, 16, 64, 200, 2048):
        cfg = im.pick_config(m, 28672, 4096, 64, DEV)
        assert cfg.path == im.choose_path(m, 28672) and cfg.block_k % 8 == 0
        assert cfg in im.candidate_configs(m, 28672, 4096, 64, DEV)
        if cfg.path == "gemv":
            assert cfg.block_m >= m and cfg.block_k <= 64
    assert any(c.path == "gemm" for c in im.candidate_configs(2048, 4096, 4096, 64, DEV))  # prefill compares both
    small = im.pick_config(1, 4096, 4096, 64, DEV)  # attention-sized: 128 columns
    assert (small.path, small.block_n) == ("gemv", 128)
    assert small in im.candidate_configs(1, 4096, 4096, 64, DEV)
    assert im.pick_config(4, 4096, 14336, 64, DEV).block_n == 256  # K-heavy at batch 4 keeps the wide tiles


@pytest.mark.parametrize("n", [28672, 24320, 21504, 18688, 37888, 28416, 18560, 128256, 152064, 256000])
def test_wide_gemv_split_fills_one_wave(monkeypatch, unpipelined_one_row, n):
    """The K split of the wide decode GEMVs (gate|up, Mamba's in_proj, vocab heads) is the largest that keeps
    every program in one wave of ~8 per SM (10 on 128 columns): rounding up left a second wave of a few dozen
    programs (the 8B-shaped gate|up at rate 0.25, N = 21504, took as long as at rate 0 in the engine on the H100),
    unless that wave would be under 3/4 full: then one split more (Qwen2.5's vocab head, 152064 wide: 171 us on one
    split, 118 on two).
    UNIQL_WIDE_COLS=128 (experiment): 128-column blocks at batch 1 below vocab size, split the same way."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)  # an H100 SXM, without a GPU
    monkeypatch.delenv("UNIQL_WIDE_COLS", raising=False)
    for cols in (256, 128 if n <= 65536 else 256):
        cfg = im.pick_config(1, n, 4096, 128, "cuda")
        # 10 programs an SM on 128 columns (UNIQL_GEMV_PER_SM=wide, the default)
        blocks, slots, k_tiles = -(-n // cfg.block_n), (10 if cfg.block_n == 128 else 8) * 132, 4096 // cfg.block_k
        fits = blocks * cfg.split_k <= slots and (blocks * (cfg.split_k + 1) > slots or cfg.split_k == k_tiles // 2)
        # or one wave would be under 3/4 full (few long programs): one split more
        fewer = blocks * (cfg.split_k - 1)
        sparse = fewer < 0.75 * slots < blocks * cfg.split_k
        assert cfg.block_n == cols and (fits or sparse)
        monkeypatch.setenv("UNIQL_WIDE_COLS", "128")
    if n in (128256, 152064):  # vocab heads: Llama-3's 501 x 2 fills 95 % of the wave; Qwen2.5's 594 x 1 only 56 %
        monkeypatch.delenv("UNIQL_WIDE_COLS")
        assert im.pick_config(1, n, 4096, 128, "cuda").split_k == 2
    assert n > 65536 or im.pick_config(4, n, 4096, 128, "cuda").block_n == 256  # batch 2-4: not measured
    monkeypatch.setenv("UNIQL_WIDE_COLS", "64")
    with pytest.raises(ValueError, match="UNIQL_WIDE_COLS must be 128, 256 or auto"):
        im.pick_config(1, n, 4096, 128, "cuda")


@pytest.mark.parametrize(("n", "k", "split"), [(4096, 14336, 33), (4096, 9344, 33), (6144, 4096, 22), (4096, 4096, 32),
                                                (4992, 4096, 27), (4096, 2688, 21), (4096, 8192, 33)])
def test_narrow_gemv_split_fills_at_most_one_wave(monkeypatch, n, k, split):
    """Batch 1, attention-sized outputs and the K-heavy down / out_proj: the deepest split (two K tiles a program)
    made 3-4 waves of programs on down (32 x 112), 17.9 us vs 14.9 at one wave on the H100; now the most splits
    that fit one wave of 8 programs an SM, never deeper than two tiles a program. UNIQL_NARROW_SPLIT=deep: as
    before."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)  # an H100 SXM, without a GPU
    monkeypatch.delenv("UNIQL_NARROW_SPLIT", raising=False)
    cfg = im.pick_config(1, n, k, 128, "cuda")
    blocks, k_tiles = -(-n // 128), -(-k // cfg.block_k)
    assert (cfg.block_n, cfg.split_k) == (128, split) and blocks * split <= 8 * 132
    assert blocks * (split + 1) > 8 * 132 or split == k_tiles // 2
    monkeypatch.setenv("UNIQL_NARROW_SPLIT", "deep")
    assert im.pick_config(1, n, k, 128, "cuda").split_k == k_tiles // 2
    monkeypatch.setenv("UNIQL_ROWS_PLAN", "old")  # batch 2-4 follow their own plan (test_rows_gemv_plan); stop 46's:
    assert im.pick_config(3, n, 4096, 128, "cuda").split_k == 4096 // cfg.block_k // 2
    monkeypatch.delenv("UNIQL_ROWS_PLAN")
    monkeypatch.setenv("UNIQL_NARROW_SPLIT", "")  # empty = unset: the default
    assert im.pick_config(1, n, k, 128, "cuda").split_k == split
    for bad in ("Deep", "shallow", "1"):  # a typo must not silently run the default
        monkeypatch.setenv("UNIQL_NARROW_SPLIT", bad)
        with pytest.raises(ValueError, match="UNIQL_NARROW_SPLIT must be wave or deep"):
            im.pick_config(1, n, k, 128, "cuda")


@pytest.mark.parametrize(("n", "k"), [(4096, 14336), (6144, 4096), (28672, 4096), (21504, 4096), (128256, 4096)])
def test_gemv_programs_per_sm_switch_sizes_the_wave(monkeypatch, n, k):
    """UNIQL_GEMV_PER_SM=4 (an experiment for PDL: room on each SM for the next kernel's programs) fills a wave of
    4 programs an SM instead of 8 on the batch-1 half2 GEMVs, narrow and wide; a typo is refused."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.delenv("UNIQL_GEMV_PER_SM", raising=False)
    programs = {}
    for per_sm in ("8", "4"):
        monkeypatch.setenv("UNIQL_GEMV_PER_SM", per_sm)
        cfg = im.pick_config(1, n, k, 128, "cuda")
        programs[per_sm] = -(-n // cfg.block_n) * cfg.split_k
        assert 0.75 * int(per_sm) * 132 <= programs[per_sm] <= int(per_sm) * 132 * 1.5
    assert programs["4"] < programs["8"]
    monkeypatch.setenv("UNIQL_GEMV_PER_SM", "6")
    with pytest.raises(ValueError, match="UNIQL_GEMV_PER_SM must be 4, 8, regs or wide"):
        im.pick_config(1, n, k, 128, "cuda")


def test_register_sized_wave(monkeypatch):
    """UNIQL_GEMV_PER_SM=regs: a wave of what the register file holds, 10 programs an SM on 128 columns (48 registers
    a thread), 8 on 256: Llama-8B's down (K = 14336 / 9344 at rates 0 / 0.35) gets 38 x 6 / 37 x 4 K tiles instead
    of 32 x 7 / 30 x 5; the wide gate|up keeps 256 columns and its 8 an SM."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)

    def launch(n, k):
        cfg = im.pick_config(1, n, k, 128, "cuda")
        splits, per = int4_config.launch_split(-(-k // cfg.block_k), cfg.split_k)
        return cfg.block_n, -(-n // cfg.block_n) * splits, per

    monkeypatch.setenv("UNIQL_GEMV_PER_SM", "8")
    assert launch(4096, 14336) == (128, 1024, 7) and launch(4096, 9344) == (128, 960, 5)
    gate_up = launch(28672, 4096)
    monkeypatch.setenv("UNIQL_GEMV_PER_SM", "regs")
    assert launch(4096, 14336) == (128, 1216, 6) and launch(4096, 9344) == (128, 1184, 4)
    assert launch(28672, 4096) == gate_up and gate_up[0] == 256 and gate_up[1] <= 8 * 132


def test_wide_default_gives_10_an_sm_to_the_wide_path_128_column_launches_only(monkeypatch, unpipelined_one_row):
    """UNIQL_GEMV_PER_SM=wide (the default): 10 programs an SM where the wide path runs 128 columns (Mamba2-8B's
    z|x|B|C|dt at rates 0.25 / 0.35: 6 x 128 and 5 x 128 K tiles a program, instead of 4 x 256 and 6 x 128 at 8 an
    SM), 8 on its 256-column launches and on every narrow launch (Llama-8B's down keeps 32 x 7 / 30 x 5)."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)

    def launch(widths, k=4096):  # (block_n, programs, K tiles a program)
        cfg = im.pick_config(1, sum(widths), k, 128, "cuda", widths=widths)
        splits, per = int4_config.launch_split(-(-k // cfg.block_k), cfg.split_k)
        return cfg.block_n, sum(-(-w // cfg.block_n) for w in widths) * splits, per

    in_proj = {0.0: (8192, 8192, 1024, 1024, 128), 0.25: (6144, 6144, 768, 768, 128),
               0.35: (5376, 5376, 640, 640, 128)}
    monkeypatch.delenv("UNIQL_GEMV_PER_SM", raising=False)
    default = {rate: launch(w) for rate, w in in_proj.items()}
    assert default == {0.0: (256, 949, 5), 0.25: (128, 1199, 6), 0.35: (128, 1235, 5)}
    assert all(progs <= (10 if block_n == 128 else 8) * 132 for block_n, progs, _ in default.values())
    assert launch((4096,), 14336) == (128, 1024, 7) and launch((4096,), 9344) == (128, 960, 5)
    monkeypatch.setenv("UNIQL_GEMV_PER_SM", "8")
    assert {rate: launch(w) for rate, w in in_proj.items()} == {0.0: (256, 949, 5), 0.25: (256, 880, 4),
                                                                0.35: (128, 1045, 6)}


def test_segmented_launch_counts_each_segments_blocks(monkeypatch, unpipelined_one_row):
    """Each output segment starts a column block: Mamba2-8B's z|x|B|C|dt at rate 0.35 is 49 blocks of 256, not
    12160 / 256 = 48; split for 48 (22 ways) it ran 1078 programs, 22 in a second wave. With the widths the split
    keeps one wave; int4_matmul and int4_glu pass their segments' widths."""
    from uniql.kernels import int4_config
    from uniql.kernels.int4_format import rtn_quantize

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.setenv("UNIQL_WIDE_COLS", "256")  # auto takes 128 columns on this launch
    widths = (5376, 5376, 640, 640, 128)
    cfg = im.pick_config(1, sum(widths), 4096, 128, "cuda", widths=widths)
    blocks = sum(-(-w // cfg.block_n) for w in widths)
    splits, _ = int4_config.launch_split(4096 // cfg.block_k, cfg.split_k)
    assert blocks == 49 and blocks * splits <= 8 * 132
    blind = im.pick_config(1, sum(widths), 4096, 128, "cuda")
    assert blocks * int4_config.launch_split(4096 // blind.block_k, blind.split_k)[0] > 8 * 132  # the old count

    seen = []
    real = im.pick_config
    monkeypatch.setattr(im, "pick_config", lambda *a, **kw: seen.append((kw.get("widths"), kw.get("paired")))
                        or real(*a, **kw))
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(96, 64), 32))
    x = torch.randn(1, 64).to(DEV, torch.float16)
    im.int4_matmul(x, qweight, scales, 32, segments=[(0, 20), (40, 30)])
    im.int4_glu(x, qweight, scales, 32, [(0, 24), (48, 24)])  # paired (the default): one segment of both halves
    monkeypatch.setenv("UNIQL_GLU_PAIRED", "0")
    im.int4_glu(x, qweight, scales, 32, [(0, 24), (48, 24)])
    assert seen == [((20, 30), None), ((48,), True), ((24, 24), False)]


@pytest.mark.parametrize("n, paired_cols, paired_programs", [(14336, 256, 896), (12160, 128, 1140),
                                                             (10752, 256, 924), (9344, 128, 1168)])
def test_paired_glu_plans_seven_programs_an_sm_at_256_columns(monkeypatch, unpipelined_one_row, n, paired_cols,
                                                              paired_programs):
    """A paired gate|up takes 70 registers a thread at 256 columns (7 programs of 128 threads an SM): its one-wave
    split counts 7 an SM there, so Llama-8B's gate|up at rates 0.15 / 0.35 (1045 / 949 programs when planned for 8,
    a second wave on 924 slots) takes 128 columns instead (auto's share rule), and rates 0 / 0.25 fit 256."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    cfg = im.pick_config(1, 2 * n, 4096, 128, "cuda", widths=(2 * n,), paired=True)
    splits, _ = int4_config.launch_split(4096 // cfg.block_k, cfg.split_k)
    programs = -(-2 * n // cfg.block_n) * splits
    assert (cfg.block_n, programs) == (paired_cols, paired_programs)
    assert programs <= (7 if cfg.block_n == 256 else 10) * 132
    unpaired = im.pick_config(1, 2 * n, 4096, 128, "cuda", widths=(n, n))
    assert unpaired.block_n == 256  # the pair epilogue's plan is unchanged (8 an SM)


def test_auto_wide_cols_take_128_only_where_a_program_reads_a_fifth_less(monkeypatch, unpipelined_one_row):
    """UNIQL_WIDE_COLS=auto (the default): 128-column blocks where their one-wave split (10 programs an SM on them,
    UNIQL_GEMV_PER_SM=wide) leaves a program at most 0.78 of the weight bytes 256 columns do (Mamba2-8B's z|x|B|C|dt
    at rates 0.25 / 0.35: 6 x 128 and 5 x 128 against 4 x 256, 0.75 and 0.625; both won the H100 engine A/B), 256
    elsewhere: at 0.8 (Mamba2's rate 0: 8 x 128 against 5 x 256, lost) and on smaller savings (Llama-8B's gate|up at
    rate 0.25, 0.83; at 8 an SM 0.92, lost). Never a larger share than 256's."""
    import random

    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.delenv("UNIQL_WIDE_COLS", raising=False)

    def share(widths, k=4096):  # (block_n, a program's K tiles x columns, programs)
        cfg = im.pick_config(1, sum(widths), k, 128, "cuda", widths=widths)
        splits, per = int4_config.launch_split(-(-k // cfg.block_k), cfg.split_k)
        return cfg.block_n, per * cfg.block_n, sum(-(-w // cfg.block_n) for w in widths) * splits

    assert share((5376, 5376, 640, 640, 128))[:2] == (128, 5 * 128)
    assert share((6144, 6144, 768, 768, 128))[:2] == (128, 6 * 128)
    assert share((8192, 8192, 1024, 1024, 128))[:2] == (256, 5 * 256)  # 8 x 128: 0.8, lost the A/B
    assert share((10752, 10752))[:2] == (256, 6 * 256) and share((14336, 14336))[:2] == (256, 8 * 256)
    monkeypatch.setenv("UNIQL_WIDE_COLS", "128")
    assert share((10752, 10752))[:2] == (128, 10 * 128)  # what auto turned down (0.83)
    assert share((8192, 8192, 1024, 1024, 128))[:2] == (128, 8 * 128)
    rng = random.Random(0)
    took_128 = 0
    for _ in range(300):
        widths = tuple(rng.randrange(64, 16384, 64) for _ in range(rng.choice((1, 2, 5))))
        if sum(widths) <= 8192:  # the narrow layers' path: 128 columns always
            continue
        k = rng.choice((2048, 4096, 8192))
        monkeypatch.setenv("UNIQL_WIDE_COLS", "256")
        wide = share(widths, k)
        monkeypatch.setenv("UNIQL_WIDE_COLS", "128")
        narrow = share(widths, k)
        monkeypatch.delenv("UNIQL_WIDE_COLS")
        block_n, auto, _ = share(widths, k)
        assert auto <= wide[1], widths
        assert (block_n == 128) == (narrow[1] <= int4_config.WIDE_128_SHARE * wide[1]), widths
        took_128 += block_n == 128
    assert took_128 > 0  # the draw reaches both branches


@pytest.mark.parametrize(("n", "k"), [(4096, 8192), (18560, 4096), (4096, 14336)])
def test_gemv_tile_k_switch(monkeypatch, n, k):
    """UNIQL_GEMV_BLOCK_K=32 (an experiment: a finer rounding step of the tiles each program streams) halves the
    batch-1 GEMV tiles, narrow and wide, and still fills one wave; batch 4 and the vocab head keep theirs."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.setenv("UNIQL_GEMV_BLOCK_K", "32")
    cfg = im.pick_config(1, n, k, 128, "cuda")
    per_sm = 10 if cfg.block_n == 128 and n > 8192 else 8  # UNIQL_GEMV_PER_SM=wide
    assert cfg.block_k == 32 and 0.75 * per_sm * 132 <= -(-n // cfg.block_n) * cfg.split_k <= per_sm * 132
    assert im.pick_config(4, n, 4096, 128, "cuda").block_k == 64
    assert im.pick_config(1, 128256, 4096, 128, "cuda").block_k == 32  # the head's own choice
    monkeypatch.delenv("UNIQL_GEMV_BLOCK_K")
    assert im.pick_config(1, n, k, 128, "cuda").block_k == 64
    monkeypatch.setenv("UNIQL_GEMV_BLOCK_K", "16")
    with pytest.raises(ValueError, match="UNIQL_GEMV_BLOCK_K must be 32 or 64"):
        im.pick_config(1, n, k, 128, "cuda")


@pytest.mark.parametrize("m", [3, 16])
def test_small_batch_sweep_has_skinny_gemm_configs_that_compute(m, monkeypatch):
    """kernel_bench --sweep-batches times 16-row tensor-core GEMM tiles at batch 2-16 (several widths and K splits,
    against the CUDA-core GEMV at batch <= 4): each must give the reference's result. 8 SMs, as the interpreter
    has: on a real GPU this small shape caps every K split at its deepest, so the splits would not vary."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 8)
    from uniql.kernels.int4_format import rtn_quantize

    gen = torch.Generator().manual_seed(m)
    qweight, scales = (t.to(DEV) for t in rtn_quantize(torch.randn(200, 512, generator=gen), 32))
    x = torch.randn(m, 512, generator=gen).to(DEV, torch.float16)
    skinny = [c for c in im.candidate_configs(m, 200, 512, 32, DEV) if c.path == "gemm" and c.block_m == 16]
    assert len({c.block_n for c in skinny}) == 3 and len({c.split_k for c in skinny}) > 1
    assert m > 4 or any(c.path == "gemv" for c in im.candidate_configs(m, 200, 512, 32, DEV))
    want = im.int4_matmul_reference(x.float(), qweight, scales, 32)
    for cfg in sorted(skinny, key=lambda c: (c.split_k, c.block_n))[::5]:  # a spread: the interpreter is slow
        got = im.int4_matmul(x, qweight, scales, 32, config=cfg).float()
        assert (got - want).abs().max() <= 2e-3 * want.abs().max(), cfg


@pytest.mark.parametrize(("n", "k", "plan", "old"), [
    (6144, 4096, (64, 6), (64, 3)),  # Llama-8B q|k|v: ~4 programs an SM
    (4096, 4096, (64, 9), (64, 5)),  # o
    (28672, 4096, (128, 5), (64, 1)),  # gate|up: wide, ~8 an SM on 128 columns
    (4096, 14336, (128, 17), (64, 5)),  # down: K-heavy, 128 columns
    (4096, 9344, (128, 17), (64, 5)),  # down at rate 0.35
])
def test_skinny_gemm_plan(monkeypatch, n, k, plan, old):
    """5-16 rows take the tensor-core GEMM (one 16-row tile) with the block width and K split of the H100 batch-16
    sweep (stop 47): each was the sweep's best for its Llama-8B shape; UNIQL_SKINNY_PLAN=old restores stop 46's."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    for rows in (5, 16):
        monkeypatch.delenv("UNIQL_SKINNY_PLAN", raising=False)
        cfg = im.pick_config(rows, n, k, 64, "cuda")
        assert (cfg.path, cfg.block_m, cfg.block_k, cfg.num_warps) == ("gemm", 16, 64, 4)
        assert (cfg.block_n, cfg.split_k) == plan
        monkeypatch.setenv("UNIQL_SKINNY_PLAN", "old")
        assert (im.pick_config(rows, n, k, 64, "cuda").block_n, im.pick_config(rows, n, k, 64, "cuda").split_k) == old


@pytest.mark.parametrize(("n", "k", "plan", "old"), [
    (6144, 4096, (128, 11), (128, 32)),  # Llama-8B q|k|v: ~4 programs an SM
    (4096, 4096, (128, 17), (128, 32)),  # o
    (4096, 14336, (256, 33), (256, 66)),  # down (K-heavy: the wide path's 256 columns)
    (28672, 4096, (256, 9), (256, 9)),  # gate|up keeps the wide path's one-wave plan
])
def test_rows_gemv_plan(monkeypatch, n, k, plan, old):
    """2-4 rows on the half2 GEMV: ~4 programs an SM on attention-sized and K-heavy layers, the H100 batch-4 sweep's
    best for each Llama-8B shape (stop 47); UNIQL_ROWS_PLAN=old restores stop 46's two tiles a program."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    for rows in (2, 4):
        monkeypatch.delenv("UNIQL_ROWS_PLAN", raising=False)
        cfg = im.pick_config(rows, n, k, 64, "cuda")
        assert (cfg.path, cfg.block_m, cfg.block_n, cfg.split_k) == ("gemv", rows, *plan)
        monkeypatch.setenv("UNIQL_ROWS_PLAN", "old")
        cfg = im.pick_config(rows, n, k, 64, "cuda")
        assert (cfg.block_n, cfg.split_k) == old


def test_pipelined_one_row_wave_counts_its_registers(monkeypatch):
    """With the K loop one tile ahead at one row (UNIQL_GEMV_PIPE=1) a 256-column program takes 72 registers a thread
    (79 with five segments), so a wave holds 7 (6) an SM, not 8: the plan must keep every program in that wave. At
    2-4 rows (pipelined by default) and without the look-ahead the 256-column wave stays 8 an SM."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.setenv("UNIQL_GEMV_PIPE", "1")
    assert int4_config._programs_per_sm(256, True) == 7
    assert int4_config._programs_per_sm(256, True, segments=5) == 6
    assert int4_config._programs_per_sm(256, True, rows=4) == 8
    assert int4_config._programs_per_sm(128, True, segments=5) == 10  # 40 registers at 128 columns
    assert int4_config._programs_per_sm(256, True, block_k=32) == 8  # the vocab heads' tiles: 40 registers
    in_proj = (8192, 8192, 128, 128, 128)  # Mamba2-8B's z|x|B|C|dt at rate 0 (widths as the engine passes them)
    for widths, per_sm in ((in_proj, 6), ((21504,), 7)):
        cfg = im.pick_config(1, sum(widths), 4096, 64, "cuda", widths=widths)
        blocks = sum(-(-w // cfg.block_n) for w in widths)
        splits, _ = int4_config.launch_split(-(-4096 // cfg.block_k), cfg.split_k)
        assert blocks * splits <= (per_sm if cfg.block_n > 128 else 10) * 132
    monkeypatch.setenv("UNIQL_GEMV_PIPE", "rows")
    assert int4_config._programs_per_sm(256, True) == 8 and int4_config._programs_per_sm(256, True, segments=5) == 8


@pytest.mark.parametrize("group_size, block_k", [(32, 32), (64, 64)])
def test_wide_plan_counts_the_launch_tile_in_every_step(monkeypatch, group_size, block_k):
    """The wide batch-1 GEMV's column choice (``_wide_block_n``) and its K split count programs an SM for the tile the
    launch runs: a g32 checkpoint's 32-K tiles take 40 registers with the look-ahead (8 an SM), its 64-K ones 72 (7).
    The column choice once counted every launch as 64-K, so a g32 gate|up chose its columns for 7 an SM and split for
    8."""
    from uniql.kernels import int4_config

    monkeypatch.setattr(int4_config, "_sm_count", lambda device: 132)
    monkeypatch.setenv("UNIQL_GEMV_PIPE", "1")
    seen = []
    counted = int4_config._programs_per_sm
    monkeypatch.setattr(int4_config, "_programs_per_sm",
                        lambda *args, **kw: seen.append(args[5] if len(args) > 5 else kw.get("block_k", 64))
                        or counted(*args, **kw))
    cfg = im.pick_config(1, 28672, 4096, group_size, "cuda", widths=(14336, 14336))
    assert cfg.block_k == block_k
    assert seen and set(seen) == {block_k}, seen
