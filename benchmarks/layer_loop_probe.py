"""A persistent chain of batch-1 INT4 GEMVs whose task body IS the production GEMV's (GPU probe, issue 5).

``persistent_probe.py`` (stop 36) found one launch for a chain of dependent layers saves up to ~2.6 us a layer
against the same kernel launched per layer, but its simple task bodies ran ~2x slower than the production GEMV a
layer. This probe keeps the production arithmetic and only moves the launch boundary: ``_layer_loop_kernel`` loops
over the layers inside one launch, and each of its tasks (a column block and a K split of one layer) runs
``int4_gemv._gemv_h2_kernel``'s batch-1 K loop from its own pieces (``_tile``: codes and scale row, ``_row_pairs``,
``_dot_row``: the half2 dot in inline PTX) and its split-K finish (``int4_tiles._finish``: the partials parked, the
column block's last program sums them in split order and writes the bf16 output). That last program then publishes
the block (a release add on the layer's done counter); a program's first task of a layer pulls its weight tiles into
L2 (``_prefetch_tiles``) and then waits (an acquire load) until every block of the previous layer is out. Program p
takes tasks p, p + P, ... of every layer, so the grid must be resident at once (the launcher checks the compiled
kernel's registers).

Timed per layer, against the production GEMV a layer (``persistent_probe.chain_launches``) in the same run: the
loop in ONE launch and the same kernel launched once a layer. A chain is 32 o-sized 4096 layers, 16 Llama-MLP
up / down pairs, or the 129 GEMVs of a Llama-3.1-8B decode step at rates 0 and 0.35 (``llama_step``: the step's
GEMV bytes and dependencies, without attention, norms and activations), the outputs checked against the fp32 torch
reference first. A program with no task in a layer (more programs than tasks) goes on to the next.

Result (stop 37, three H100 runs): slower than the production launches on every chain (the step's GEMVs x1.24-1.37
at best), and a layer of the all-boundary 512-wide chain costs ~2.8 us in one launch as launched: the stage-latency
model of ``ratio_bound.py`` and ``docs/decode-megakernel.md`` take it from here.

    python benchmarks/layer_loop_probe.py --json benchmarks/results/layer_loop_probe_h100.json
    TRITON_INTERPRET=1 python benchmarks/layer_loop_probe.py --cpu-smoke     # tiny shapes, no GPU: code paths only
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from graph_timing import programs_held
from kernel_bench import build_case
from persistent_probe import _load_acquire, anchor_row, both_ways, report_head, run_chains

from uniql.kernels import int4_gemv as ig
from uniql.kernels.int4_tiles import _finish

# a layer's row: N, K, K splits, tiles a split, codes / scales / input / output / workspace / counter offsets
META = tl.constexpr(10)
# (the layers' done counters are adjacent int32s: one 128-byte line apart took 8 more registers, 8 -> 7 programs an
# SM, and its 256-column grids ran 15-40 % slower on the H100, results/layer_loop_probe_sleep_h100.json)


_ASM_PREFETCH = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }")


@triton.jit
def _prefetch_tiles(qw_ptr, stride_qw, col, n_left, t0, t1, rows_k, SUB_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pull a task's weight tiles into L2, one request per 128-byte line, before it waits (the production GEMV
    did the same before ``gdc_wait`` until stop 39, when PDL without it won)."""
    lines = tl.arange(0, BLOCK_N // 32) * 32  # int32 columns: 32 words = one line
    r = tl.arange(0, 2 * SUB_R)
    for t in range(t0, t1):
        rows = t * 2 * SUB_R + r
        ptrs = qw_ptr + rows[:, None] * stride_qw + col + lines[None, :]
        live = ((rows < rows_k)[:, None] & (lines < n_left)[None, :]).to(tl.int32)
        tl.inline_asm_elementwise(_ASM_PREFETCH, "=r,l,r", [ptrs, live], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _poll_after_sleep(ptr, ns):
    """Sleep about ``ns`` nanoseconds, then ``_load_acquire(ptr)``."""
    return tl.inline_asm_elementwise("nanosleep.u32 $2;\n\tld.global.acquire.gpu.b32 $0, [$1];", "=r,l,r",
                                     [ptr, ns], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_until(at, need, err_ptr, WAIT: tl.constexpr, SLEEP: tl.constexpr):
    """Until the counter at ``at`` reaches ``need``, polling an acquire load, SLEEP ns before each poll if > 0 (fewer
    loads queued at the counter's L2 slice). WAIT False (the interpreter, programs one after another): count an
    error at ``err_ptr`` if it has not."""
    if WAIT and SLEEP > 0:
        while _poll_after_sleep(at, SLEEP) < need:
            pass
    elif WAIT:
        while _load_acquire(at) < need:
            pass
    elif tl.atomic_add(at, 0, sem="acquire") < need:
        tl.atomic_add(err_ptr, 1, sem="relaxed")


@triton.jit
def _layer_loop_kernel(acts_ptr, qw_ptr, sc_ptr, meta_ptr, ws_ptr, cnt_ptr, done_ptr, err_ptr, first, last,
                       GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SUB_R: tl.constexpr, SUM_STEP: tl.constexpr,
                       PREFETCH: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, WAIT: tl.constexpr,
                       SLEEP: tl.constexpr):
    """Layers [first, last) of a chain; acts (bf16 / fp16): the input, then each layer's output. Program p runs
    tasks p, p + P, ... of each layer (none where the layer has fewer: it goes on to the next). WAIT False (the
    interpreter, programs one after another): a task whose input is unfinished counts an error instead of waiting."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    layer, task = first, pid
    while layer < last:
        row = meta_ptr + layer * META
        n, splits = tl.multiple_of(tl.load(row), 16), tl.load(row + 2)  # plan_loop checks: 16-byte weight loads
        count = tl.cdiv(n, BLOCK_N) * splits
        if task < count:
            _run_task(acts_ptr, qw_ptr, sc_ptr, row, ws_ptr, cnt_ptr, done_ptr, err_ptr, layer, n, splits, task,
                      (task == pid) & (layer > first), GROUP, BLOCK_N, SUB_R, SUM_STEP, PREFETCH, X_BF16, ASM, WAIT,
                      SLEEP)
        task += programs
        if task >= count:
            layer, task = layer + 1, pid


@triton.jit
def _run_task(acts_ptr, qw_ptr, sc_ptr, row, ws_ptr, cnt_ptr, done_ptr, err_ptr, layer, n, splits, task, wait,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SUB_R: tl.constexpr, SUM_STEP: tl.constexpr,
              PREFETCH: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr, WAIT: tl.constexpr,
              SLEEP: tl.constexpr):
    """One task (column block ``task // splits``, K split ``task % splits``) of the layer whose table row is
    ``row``; ``wait``: the program's first task of a layer past the launch's first, whose input must be complete
    (every column block of the layer before published: the tasks of that layer waited for theirs)."""
    k = tl.load(row + 1)
    blk, split = task // splits, task % splits
    qw = qw_ptr + tl.multiple_of(tl.load(row + 4), 16)  # every offset a multiple of 16 (plan_loop)
    rows_k = k // 8
    t0 = split * tl.load(row + 3)
    t1 = tl.minimum(t0 + tl.load(row + 3), tl.cdiv(rows_k, 2 * SUB_R))
    if wait:
        if ASM and PREFETCH > 0 and BLOCK_N >= 32:  # this task's first tiles into L2 meanwhile (they do not depend
            # on the input; inline PTX: not in the interpreter; one request a 32-word line: blocks of >= 32 columns)
            _prefetch_tiles(qw, n, blk * BLOCK_N, n - blk * BLOCK_N, t0, tl.minimum(t1, t0 + PREFETCH), rows_k,
                            SUB_R, BLOCK_N)
        # every column block of the previous layer
        _wait_until(done_ptr + layer - 1, tl.cdiv(tl.load(row - META), BLOCK_N), err_ptr, WAIT, SLEEP)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    x_at, sc_at = tl.multiple_of(tl.load(row + 6), 16), tl.multiple_of(tl.load(row + 5), 16)
    acc = _task_sum(acts_ptr + x_at, qw, sc_ptr + sc_at, n, rows_k, offs_n, t0, t1, GROUP, SUB_R, X_BF16, ASM)
    ws_at, out_at = tl.multiple_of(tl.load(row + 8), 16), tl.multiple_of(tl.load(row + 7), 16)
    offs_m = tl.arange(0, 1)
    _, wrote = _finish(acc * 16.0, blk, split, splits, ws_ptr + ws_at, cnt_ptr + tl.load(row + 9), acts_ptr + out_at,
                       0, acts_ptr, offs_m, offs_m < 1, offs_n, offs_n < n, 1, BLOCK_N, True, False, SUM_STEP)
    if wrote:  # the block's output is stored (a CTA barrier precedes a scalar atomic): publish it
        tl.atomic_add(done_ptr + layer, 1, sem="release")


@triton.jit
def _task_sum(x_ptr, qw, sc, n, rows_k, offs_n, t0, t1, GROUP: tl.constexpr, SUB_R: tl.constexpr,
              X_BF16: tl.constexpr, ASM: tl.constexpr):
    """``_gemv_h2_kernel``'s batch-1 K loop over tiles [t0, t1) of one column block (stride n: a compact layer):
    the [1, BLOCK_N] sum / 16."""
    mask_n = (offs_n < n)[None, :]
    wcol = offs_n[None, :]
    offs_r = tl.arange(0, SUB_R)[:, None]
    acc = tl.zeros([SUB_R, offs_n.shape[0]], tl.float32)
    one = tl.full([], 1.0, tl.float32)
    for t in range(t0, t1):  # the production K loop's own pieces: tile loads, activation pairs, dot
        ra, rb, ma, mb, wa, wb, scale = ig._tile(qw, n, sc, n, wcol, mask_n, offs_r, t, rows_k, GROUP, SUB_R)
        p = ig._row_pairs(x_ptr, 0, 0, 1, ra, rb, ma, mb, one, X_BF16, ASM, False)
        acc += ig._dot_row(wa, wb, p, ASM) * scale
    return tl.sum(acc, axis=0)[None, :]


@dataclasses.dataclass
class LoopPlan:
    """A chain laid out for ``_layer_loop_kernel`` (the weights copied into flat buffers)."""
    qw: torch.Tensor
    sc: torch.Tensor
    meta: torch.Tensor
    acts: torch.Tensor  # the input, then each layer's output
    ws: torch.Tensor  # split-K partials, every layer's column blocks x splits x BLOCK_N
    cnt: torch.Tensor  # every layer's column-block arrival counters (zero between launches: _finish resets them)
    sync: torch.Tensor  # each layer's done counter, then the error count
    dims: list[int]
    programs: int
    group: int
    block_n: int
    sub_r: int
    sum_step: int


def plan_loop(layers, group: int, programs: int, block_n: int = 128, sub_r: int = 4,
              dtype: torch.dtype = torch.bfloat16) -> LoopPlan:
    """Lay out ``layers`` ((qw [K/8, N], sc [K/G, N]) each; a layer reads the first K outputs of the one before)
    for a grid of ``programs``, with K splits that give every layer >= ``programs`` tasks where its tiles allow."""
    if 2 * sub_r * 8 > group or group % (2 * sub_r * 8) or block_n % 16:
        raise ValueError(f"a tile of 2 x {sub_r} packed rows must fit a scale group of {group}, block_n ({block_n}) "
                         "a multiple of 16")
    dims, meta, at = [layers[0][0].shape[0] * 8], [], {"q": 0, "s": 0, "a": 0, "w": 0, "c": 0}
    for i, (qw, sc) in enumerate(layers):
        k, n = qw.shape[0] * 8, qw.shape[1]
        if k > dims[-1] or k % group or n % 16 or sc.shape != (k // group, n):
            raise ValueError(f"layer {i}: qw {tuple(qw.shape)}, sc {tuple(sc.shape)} do not follow a layer with "
                             f"{dims[-1]} outputs in groups of {group} (widths: multiples of 16)")
        dims.append(n)
        blocks, tiles = triton.cdiv(n, block_n), triton.cdiv(k // 8, 2 * sub_r)
        per_split = triton.cdiv(tiles, min(tiles, triton.cdiv(programs, blocks)))
        splits = triton.cdiv(tiles, per_split)
        # acts: the input, then each layer's output; this layer reads the start of the one before
        meta.append([n, k, splits, per_split, at["q"], at["s"], at["a"], at["a"] + dims[-2], at["w"], at["c"]])
        at = {"q": at["q"] + k // 8 * n, "s": at["s"] + k // group * n, "a": at["a"] + dims[-2],
              "w": at["w"] + blocks * splits * block_n, "c": at["c"] + blocks}
    device = layers[0][0].device
    most = max(m[2] for m in meta)
    if most > 64:  # _finish's one-sweep split-K sum takes at most 64 partials
        raise ValueError(f"{most} K splits in a layer (at most 64): fewer programs")
    return LoopPlan(torch.cat([qw.reshape(-1) for qw, _ in layers]), torch.cat([sc.reshape(-1) for _, sc in layers]),
                    torch.tensor(meta, dtype=torch.int64, device=device),
                    torch.empty(sum(dims), dtype=dtype, device=device),
                    torch.empty(at["w"], dtype=torch.float32, device=device),
                    torch.zeros(at["c"], dtype=torch.int32, device=device),
                    torch.empty(len(layers) + 1, dtype=torch.int32, device=device), dims,
                    programs, group, block_n, sub_r, max(8, triton.next_power_of_2(most)))


def chain_loop(plan: LoopPlan, x: torch.Tensor, per_launch: int | None = None, prefetch: int = 2,
               check: bool = False, sleep_ns: int = 0) -> torch.Tensor:
    """The chain's output ([N of the last layer], the plan's dtype) from launches of ``plan.programs`` programs,
    ``per_launch`` layers each (default all: one launch); a waiting program sleeps ``sleep_ns`` between polls.
    ``check`` (a host sync): raise if a task ran before its input was complete (interpreter)."""
    n_layers = len(plan.dims) - 1
    if x.shape != (plan.dims[0],):
        raise ValueError(f"the chain takes a [{plan.dims[0]}] input, got {tuple(x.shape)}")
    plan.sync.zero_()
    plan.acts[: plan.dims[0]].copy_(x)
    per_launch = per_launch or n_layers
    consts = {"GROUP": plan.group, "BLOCK_N": plan.block_n, "SUB_R": plan.sub_r, "SUM_STEP": plan.sum_step,
              "PREFETCH": prefetch, "X_BF16": plan.acts.dtype == torch.bfloat16, "ASM": ig.USE_ASM,
              "WAIT": x.is_cuda, "SLEEP": sleep_ns, "num_warps": 4}
    for first in range(0, n_layers, per_launch):
        errors = plan.sync[n_layers:]
        args = (plan.acts, plan.qw, plan.sc, plan.meta, plan.ws, plan.cnt, plan.sync, errors, first,
                min(first + per_launch, n_layers))
        if x.is_cuda and plan.programs > (held := programs_held(_layer_loop_kernel, args, consts)):
            raise ValueError(f"{plan.programs} programs do not fit on the GPU at once (it holds {held} of them)")
        _layer_loop_kernel[(plan.programs,)](*args, **consts)
    if check and (bad := plan.sync[n_layers].item()):
        raise RuntimeError(f"{bad} tasks ran before their input was complete")
    return plan.acts[-plan.dims[-1]:]


def probe(name: str, shapes: list[tuple[int, int]], group: int, configs, cuda: bool, repeats: int) -> dict:
    """One chain of (K, N) layers: the production GEMV a layer, then each (programs, block_n, sub_r, prefetch,
    sleep ns) config of the loop in one launch and launched per layer (a grid that cannot be resident is recorded
    with the reason)."""
    dtype = torch.bfloat16 if cuda else torch.float16
    row, x, layers, ref = anchor_row(name, shapes, group, cuda, repeats, dtype)
    xh, row["loop"] = x.to(dtype), []
    for programs, block_n, sub_r, prefetch, sleep in configs:
        plan = plan_loop(layers, group, programs, block_n, sub_r, dtype)
        def call(per_launch, check, pl=plan, pf=prefetch, ns=sleep):
            return chain_loop(pl, xh, per_launch, pf, check, ns)
        entry = {"programs": plan.programs, "block_n": block_n, "sub_r": sub_r, "prefetch": prefetch, "sleep_ns": sleep}
        row["loop"].append(both_ways(entry, call, ref, cuda, repeats, len(layers)))
    return row


def square(width: int, count: int) -> list[tuple[int, int]]:
    return [(width, width)] * count


def pairs(hidden: int, inner: int, count: int) -> list[tuple[int, int]]:
    return [(hidden, inner), (inner, hidden)] * count


def llama_step(rate: float, group: int, blocks: int = 32) -> list[tuple[int, int]]:
    """The (K, N) of every GEMV of a Llama-3.1-8B decode step at ``rate`` (a uniform ladder's active sizes,
    ``kernel_bench.build_case``): q|k|v, o, gate|up, down a block, then the vocab head. o reads the start of q|k|v's
    output and down the start of gate|up's (stand-ins for attention and SiLU-mul): the bytes and the dependencies of
    the step's GEMVs, none of its other kernels."""
    def active(layer: str) -> tuple[int, int]:
        case = build_case("llama-3.1-8b", layer, rate if layer != "lm_head" else 0.0, group)
        return case.k_active, case.n_active
    return [active(layer) for layer in ("qkv", "o", "gate_up", "down")] * blocks + [active("lm_head")]


def report(row: dict, copy_tbps: float | None) -> None:
    if report_head(row, copy_tbps, "loop") is None:
        return
    prod = row["launches_us_a_layer"]
    for e in row["loop"]:
        head = (f"    {e['programs']:5d} programs x {e['block_n']:3d} x {e['sub_r']} rows, prefetch {e['prefetch']}, "
                f"sleep {e.get('sleep_ns', 0)}: ")
        print(head + (f"skipped ({e['skipped']})" if "skipped" in e else
                      f"{e['us_a_layer']:.2f} us a layer in one launch (x{e['us_a_layer'] / prod:.2f} of the "
                      f"production GEMV), {e['per_layer_us_a_layer']:.2f} per layer, error {e['rel_err']:.1e}"),
              flush=True)


def setup_chains(cuda: bool, sms: int):
    if not cuda:  # the interpreter: one program a launch of all layers
        return ({"tiny square": square(64, 3), "tiny mixed": [(64, 96), (96, 32), (32, 64)],
                 "tiny prefixes": [(64, 96), (64, 64), (32, 160), (96, 64)]},  # reading the start of the last output
                32, [(1, 32, 2, 2, 0), (1, 16, 1, 0, 0)])
    # the production GEMV's batch-1 tiles (128 columns, 2 x 4 packed rows) at its 8 programs an SM (63 registers: 8
    # fit), fewer and wider programs; a 256 ns sleep between polls (stop 37's first run: the 1056-program grids lost
    # to their own per-layer launches, the 528- and 264-program ones won by ~1 us a layer); the 512-wide chain's
    # layers are all boundary (next to no bytes): what one costs inside a launch and between two
    configs = [(sms * 8, 128, 4, 2, 0), (sms * 8, 128, 4, 2, 256), (sms * 8, 128, 4, 0, 256), (sms * 4, 256, 4, 2, 0),
               (sms * 4, 256, 4, 2, 256), (sms * 2, 128, 4, 2, 256)]
    return ({"tiny 32 x 512": square(512, 32), "o-sized 32 x 4096": square(4096, 32),
             "mlp up/down 16 x 2": pairs(4096, 14336, 16),
             **{f"llama-8b step GEMVs, rate {r}": llama_step(r, 128) for r in (0.0, 0.35)}}, 128, configs)


def main(argv=None) -> None:
    run_chains(__doc__, "layer_loop_probe.py", setup_chains, probe, report, argv)


if __name__ == "__main__":
    main()
