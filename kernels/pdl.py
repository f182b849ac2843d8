"""Programmatic dependent launch (PDL, sm_90+): let each decode kernel launch while its predecessor drains.

At batch 1 a decode step is ~6 dependent kernels per layer. Between two kernels of a CUDA graph the GPU idles for
the launch latency and the next kernel's dispatch, ~0.4 us a boundary on the H100 (stop 35's in-graph profile),
next to GEMVs of 5-25 us. With PDL a kernel is launched while its predecessor still runs (``launch_pdl=True``);
``gdc_wait`` then blocks until the predecessor has finished and its writes are visible.

The contract every PDL kernel of this package keeps: nothing is read that the previous kernel may write, and
nothing is written, before ``gdc_wait``; every program calls ``gdc_wait`` (so a finished kernel implies that
all kernels before it finished too), and releases its dependents (``gdc_launch_dependents``) only after it, so at
most one kernel runs ahead: what kernels two or more back wrote is complete before a kernel starts, and may be read
before its wait (``attention_prewait``). A non-PDL kernel (torch ops) between two PDL kernels just restores
ordinary stream order. Where the release sits is the mode (``pdl_mode``): right after the wait everywhere
(``UNIQL_PDL=1``), or, the default (``late``), after the main loop of the long kernels (the GEMVs, the attention
split pass) and right after the wait in the short ones. Decode launches of at most ``PDL_MAX_ROWS`` rows only.

Measured (H100, Llama-8B shape, batch 1, engine A/B of two alternating rounds, stop 39,
``results/pdl_ab_h100.json``): late 2.128-2.130 / 1.701-1.705 ms at rates 0 / 0.35 against 2.236-2.239 /
1.828-1.829 without PDL; mode 1 2.205-2.210 / 1.746-1.749. At batch 4 late won too (x0.97), at batch 16 it lost
(x1.01-1.02; ``results/pdl_batch_ab_h100.json``). Until stop 39 every GEMV pulled its first two weight
tiles into L2 before the wait, and with that prefetch both modes lost (2.39 / 2.44 ms at rate 0; the H200 in stop
27 and the H100 in stop 29 measured the same loss with it): it is gone. Off on devices before sm_90 (Jetson Orin
is sm_87) and under the Triton interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl

from .switches import switch


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


# The most decode rows a launch may have to use PDL: batch 1 and 4 decoded faster with it, batch 16 slower
# (H100, same machine, two rounds, stop 39, results/pdl_batch_ab_h100.json: x0.93-0.95 / x0.97 / x1.01-1.02);
# batch 8 was not timed, so it keeps the behaviour from before PDL. Launches of more rows (prefill of longer
# prompts, larger batches) never use it.
PDL_MAX_ROWS = 4


def pdl_mode(device: torch.device, rows: int) -> int:
    """How a launch of ``rows`` rows on ``device`` uses programmatic dependent launch (read per launch: tests flip
    it): 0 off, 1 it lets the next kernel launch right after its wait, 2 (``late``) the long kernels (GEMVs, the
    attention split pass) only once their main loop is done (``pdl_release``), so the next kernel's programs land
    during their tail instead of sharing the SMs with their whole run. ``UNIQL_PDL``: late (default), 1 or 0;
    anything else is refused, on every device. Off for more than ``PDL_MAX_ROWS`` rows, before sm_90 and under the
    interpreter."""
    raw = switch("UNIQL_PDL")
    if raw == "0" or rows > PDL_MAX_ROWS or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return 0
    if not _capable(device.index if device.index is not None else torch.cuda.current_device()):
        return 0
    return 2 if raw == "late" else 1


def pdl_enabled(device: torch.device, rows: int = 1) -> bool:
    """Whether a launch of ``rows`` rows on ``device`` uses programmatic dependent launch (``pdl_mode`` > 0)."""
    return pdl_mode(device, rows) > 0


def pdl_ssm(device: torch.device, rows: int) -> bool:
    """Whether the Mamba step's state update and group norm take part in PDL too (``UNIQL_PDL_SSM``: 1, the
    default since stop 40, or 0). Off, each of them breaks the chain of early launches twice a layer. H100 A/B,
    Mamba2-8B shape, two rounds (``results/prewait_ab_h100.json``): 2.168 / 1.994 / 1.788 / 1.690 ms against
    2.187 / 2.087 / 1.881 / 1.778 at rates 0 / 0.15 / 0.25 / 0.35."""
    return switch("UNIQL_PDL_SSM") == "1" and pdl_enabled(device, rows)


# The preload cap of the GEMVs launched inside a ``ssm_gemv_preload`` / ``glu_gemv_preload`` / ``head_gemv_preload``
# scope (the innermost one's; they do not nest in a decode step), None elsewhere
_SCOPE: contextvars.ContextVar[int | None] = contextvars.ContextVar("uniql_gemv_preload_cap", default=None)


def gemv_preload() -> int:
    """How many of their first K tiles (weights and scales) the decode GEMVs load before ``gdc_wait``
    (``UNIQL_GEMV_PRELOAD``: 1, the default since stop 40, 0, or 2, which lost: x1.03 at every rate on Llama-8B,
    H100, stop 42, results/stop42_ab_h100.json). The weights depend on no kernel, so under PDL that first DRAM
    round trip overlaps the previous kernel's tail instead of following the wait; unlike the L2 prefetch that lost
    (above), it fetches tiles into registers the loop needs anyway. Same arithmetic, same bits, on any device
    (without PDL the wait is nothing and the loop is peeled). Inside a scope below, at most its switch's tiles."""
    tiles = int(switch("UNIQL_GEMV_PRELOAD"))
    cap = _SCOPE.get()
    return tiles if cap is None else min(tiles, cap)


def gemv_pipe(rows: int) -> bool:
    """Whether a decode GEMV of ``rows`` activation rows runs its K loop one tile ahead: tile t + 1's weights and
    scales are loaded before tile t's arithmetic, so each program keeps a tile's loads in flight while it computes
    (``UNIQL_GEMV_PIPE``: ``1``, the default since stop 48, every batch; ``rows`` only above one row, where a tile's
    arithmetic is longest (the stop-47 default); ``0`` never). At one row the 256-column programs take 72 registers
    (79 with five segments), which the wave plans count (``int4_config._programs_per_sm``); with that, ``1`` against
    ``rows`` (H100 engine A/B, two rounds each): Llama-8B x0.998 / 0.988 / 0.993 / 0.987 at rates 0 / 0.15 / 0.25 /
    0.35, Mamba2-8B x0.971 / 0.966 / 0.984 / 0.980 (results/envab_pipe1_h100.json, envab_ssm_pipe1_h100.json).
    Same products in the same order: same bits."""
    mode = switch("UNIQL_GEMV_PIPE")
    return mode == "1" or (mode == "rows" and rows > 1)


@contextlib.contextmanager
def _preload_cap(tiles: int):
    token = _SCOPE.set(tiles)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def ssm_gemv_preload():
    """The scope of a Mamba block's decode GEMVs (in- and out-projection): they preload at most
    ``UNIQL_SSM_GEMV_PRELOAD`` tiles (0 by default). With the preload Mamba2-8B decoded 1-3 % slower at the pruned
    rates and no faster at rate 0, while Llama-8B gains from it (H100 engine A/Bs of ``UNIQL_GEMV_PRELOAD=0``, stops
    40 and 42: 1.793 / 1.702 ms against 1.846 / 1.732 at rates 0.25 / 0.35, results/stop42_ab_h100.json)."""
    return _preload_cap(int(switch("UNIQL_SSM_GEMV_PRELOAD")))  # read as the scope opens: a graph keeps its capture's


def glu_gemv_preload():
    """The scope of a paired gate|up GEMV (``int4_tiles.glu_paired``): it preloads at most ``UNIQL_GLU_PRELOAD``
    tiles (1 by default, as every GEMV). Without the preload its 256-column programs take 56 registers instead of 70
    (sm_90, ``benchmarks/sass_gemv.py``) and 8 fit an SM instead of 7, but 0 lost at every rate on Llama-8B: x1.056 /
    1.005 / 1.044 / 1.019 at rates 0 / 0.15 / 0.25 / 0.35 (H100 engine A/B, stop 44,
    results/head_glu_preload_ab_h100.json)."""
    return _preload_cap(int(switch("UNIQL_GLU_PRELOAD")))


def head_gemv_preload():
    """The scope of the vocab head's GEMV: it preloads at most ``UNIQL_HEAD_PRELOAD`` tiles (0 by default since stop
    44). With one tile the 8B heads took 128.5 / 126.4 us alone against 116.3 / 119.0 without (Llama / Qwen2.5, H100
    kernel tables of stops 42 and 44, results/kernels_h100.json), and the Llama-8B step x0.994-0.996 at every rate
    (engine A/B, both rounds, results/head_glu_preload_ab_h100.json). Its programs are long (64 K tiles of 32
    x 256), so one tile's early start is worth little to them; why it costs ~10 us was not profiled."""
    return _preload_cap(int(switch("UNIQL_HEAD_PRELOAD")))


def attention_prewait() -> bool:
    """Whether the decode attention's split pass issues its cache loads (bases, length, a one-block split's K / V)
    before ``gdc_wait`` where it loads early under PDL (``UNIQL_ATTN_PREWAIT``: 1, the default since stop 40, or 0;
    ``results/prewait_ab_h100.json``): none of them is written by the q|k|v GEMV it waits for, so the
    K / V stream would overlap that GEMV's tail. Same bits; without PDL merely another order."""
    return switch("UNIQL_ATTN_PREWAIT") == "1"


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait for the previous kernel's results, then allow the next kernel to launch (see the module contract):
    what the short kernels call, in either mode."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """A long kernel's wait: in mode 1 it also lets the next kernel launch; in mode 2 ``pdl_release`` does, later."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Mode 2: let the next kernel launch once this program's main loop is done (a program that never gets here
    releases it by exiting)."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


def early_loads(batch: int) -> bool:
    """Kernels issue the loads that depend on nothing a wait produces before that wait (the attention split pass
    before it knows the length, its combine every split's partial with the length, the o / down GEMVs their residual
    input before the split-K sum), so fewer memory round trips sit in a row on a short kernel's critical path. Same
    arithmetic, same bits. ``batch``: the decode rows of the launch.

    ``UNIQL_EARLY_LOADS``: unset or ``1`` = batch 1 only (the default), ``all`` = every batch, ``0`` = never. Same-
    machine A/Bs on the H100 (two alternating rounds each): at batch 1 on since stop 29 (Llama-8B TPOT 2.413-2.418 /
    1.950-1.956 ms vs 2.452-2.456 / 1.995-1.996 at rates 0 / 0.35, results/decode_envab_h100.txt; again this
    session, 2.320 / 1.906 vs 2.358 / 1.944, results/early_loads_batch_ab_h100.json), but at batch 4 and 16 it was
    slower: 5.28 vs 4.70 ms at batch 4 rate 0, 11.61 vs 6.93 at batch 16 rate 0 and 6-7 % at the other rates (the
    attention split pass, whose splits run several blocks there, took 982 us a step at batch 4 rate 0). Read per
    launch; anything else is a clear error."""
    raw = switch("UNIQL_EARLY_LOADS")
    return raw == "all" or (raw == "1" and batch == 1)
