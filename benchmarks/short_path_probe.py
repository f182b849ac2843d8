"""The shortest dependent path between batch-1 INT4 GEMVs in one persistent launch (GPU probe, issue 5).

Stop 37 measured a stage (a dependent GEMV) at ~2.8 us inside one launch as between graph launches
(``layer_loop_probe.py``'s all-boundary 512-wide chain), and ``ratio_bound.py`` needs <= 1.95 us for a Llama ratio of
0.75. That probe's stage keeps the production GEMV's chain of memory round trips: wait, load the input, load the
first weights, park split-K partials, count arrivals, the last program sums and stores, publish. This one keeps only
what a dependency needs:

* a task (a column block and a K slice of one layer) loads its weight codes and scales into registers BEFORE it
  waits: they do not depend on the input;
* it waits for the column block of the previous layer that holds its K slice (``LAYER_WAIT``: for the whole
  previous layer instead), polling an acquire load;
* its input is the sum of the previous layer's split-K partials, read in one tile and reduced in a fixed order (no
  arrival counter, no finishing program, no fp32 atomics: same input, same bits);
* it stores its own fp32 partials with plain stores and publishes them with one release add on its block's counter.

A round trip fewer than that is not a GEMV. ``SYNC_ONLY`` runs the waits and the publishes alone (no loads, no
arithmetic): the latency of the dependency itself. Run 2 (stop 38, H100): a 512-wide stage 2.28 us in one launch
against 2.88 launched, the sync alone 1.20; but at o's size x1.8-2.4 slower than the production GEMV, as every
column block's task re-reads the input's split partials from L2 (8 x splits / block_n of the weight bytes).

Whole-K tasks (a narrow column block, 16-64 columns, and all of K or half, with ``LAYER_WAIT``) remove that re-read
and put a task's whole weight tile in registers before its wait: a layer's weights stream while the layer before
computes, the one design the stage-latency model does not bind. Timed per layer against the production GEMV a layer
in the same run (``persistent_probe.anchor_row``), in one launch and launched per layer (no waits: the anchor with
the same arithmetic), on the 32 x 512 chain (all boundary), the 32 x 4096 o-sized chain, Llama MLP up / down pairs
and the 129 GEMVs of a Llama-3.1-8B step (``layer_loop_probe.llama_step``); outputs checked against the fp32 torch
reference first.

Result (stop 38, runs 2-3 on H100s): the 512-wide stage takes 2.20-2.28 us in one launch (the production GEMV a launch
2.88-3.05, the dependency alone ~1.2); every real-sized chain runs x1.3-2.9 slower than the production GEMV at its
best config, in one launch and launched a layer alike (whole-K tiles of 32 KB hold two programs an SM: too few loads
in flight).
``ratio_bound.py`` at 2.20 us: a ratio of 0.757 for the step's 201 stages.

    python benchmarks/short_path_probe.py --json benchmarks/results/short_path_probe_run3_h100.json
    TRITON_INTERPRET=1 python benchmarks/short_path_probe.py --cpu-smoke     # tiny shapes, no GPU: code paths only
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from graph_timing import programs_held
from layer_loop_probe import _wait_until, llama_step, pairs
from persistent_probe import _MAGIC_ZERO, _task_tile, anchor_row, both_ways, report_head, run_chains

# a layer's row: N, K, K splits, codes, scales, input partials, output partials, the input's splits and row stride,
# this layer's counters (_task_tile reads the first five)
META = tl.constexpr(10)
# int32s between two counters: one 128-byte line each (adjacent counters put a layer's pollers and its publishers on
# one L2 line)
LINE = tl.constexpr(32)


@triton.jit
def _short_chain_kernel(part_ptr, qw_ptr, sc_ptr, meta_ptr, cnt_ptr, err_ptr, first, last, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, IN_SPLITS: tl.constexpr,
                        LAYER_WAIT: tl.constexpr, SYNC_ONLY: tl.constexpr, WAIT: tl.constexpr, SLEEP: tl.constexpr):
    """Layers [first, last) of a chain: program p runs tasks p, p + P, ... of each layer (none where the layer has
    fewer). ``part_ptr``: the input (one split), then each layer's [splits, N] fp32 partials. WAIT False (the
    interpreter, programs one after another): a task whose input is unfinished counts an error instead."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    layer, task = first, pid
    while layer < last:
        row = meta_ptr + layer * META
        n, splits = tl.load(row), tl.load(row + 2)
        count = tl.cdiv(n, BLOCK_N) * splits
        if task < count:
            _short_task(part_ptr, qw_ptr, sc_ptr, row, cnt_ptr, err_ptr, task, layer > first, GROUP, BLOCK_N, ROWS,
                        IN_SPLITS, LAYER_WAIT, SYNC_ONLY, WAIT, SLEEP)
        task += programs
        if task >= count:
            layer, task = layer + 1, pid


@triton.jit
def _short_task(part_ptr, qw_ptr, sc_ptr, row, cnt_ptr, err_ptr, task, wait, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, ROWS: tl.constexpr, IN_SPLITS: tl.constexpr, LAYER_WAIT: tl.constexpr,
                SYNC_ONLY: tl.constexpr, WAIT: tl.constexpr, SLEEP: tl.constexpr):
    """Task ``task`` of the layer at ``row``: weights, wait, input (the partials' fixed-order sum), its partials,
    publish. ``wait``: the input comes from this launch (False for a launch's first layer: the stream orders it).
    Every load that does not depend on the input (the table's fields among them) is issued before the wait."""
    splits = tl.load(row + 2)
    blk, split = task // splits, task % splits
    publish_at = cnt_ptr + tl.load(row + 9) + (0 if LAYER_WAIT else blk * LINE)
    before = row - META * wait.to(tl.int32)  # the layer before (a launch's first layer: its own row, not waited on)
    if LAYER_WAIT:
        wait_at, need = cnt_ptr + tl.load(before + 9), tl.cdiv(tl.load(before), BLOCK_N) * tl.load(before + 2)
    else:  # the one column block of the layer before that holds this task's K slice (plan_short)
        wait_at, need = cnt_ptr + tl.load(before + 9) + split * ROWS * 8 // BLOCK_N * LINE, tl.load(before + 2)
    if not SYNC_ONLY:
        words, scale, rows, offs_n, n, k = _task_tile(qw_ptr, sc_ptr, row, task, True, GROUP, BLOCK_N, ROWS)
        offs_k = split * ROWS * 8 + tl.arange(0, ROWS * 8)
        in_at, in_splits, stride = part_ptr + tl.load(row + 5) + offs_k, tl.load(row + 7), tl.load(row + 8)
        out_at = part_ptr + tl.load(row + 6) + split * n + offs_n
    if wait:
        _wait_until(wait_at, need, err_ptr, WAIT, SLEEP)
    if not SYNC_ONLY:
        xs = _input_rows(in_at, offs_k, k, in_splits, stride, ROWS, IN_SPLITS)
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):  # code j of every word: K index 8 x row + j
            code = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - _MAGIC_ZERO
            acc += code * xs[j][:, None]
        SCALE_ROWS: tl.constexpr = (ROWS * 8 + GROUP - 1) // GROUP
        part = tl.sum(tl.sum(tl.reshape(acc, [SCALE_ROWS, ROWS // SCALE_ROWS, BLOCK_N]), axis=1) * scale, axis=0)
        tl.store(out_at, part, mask=offs_n < n)
    # Triton puts a CTA barrier before a scalar atomic: every thread's stores are issued before the release
    tl.atomic_add(publish_at, 1, sem="release")


@triton.jit
def _input_rows(in_at, offs_k, k, in_splits, stride, ROWS: tl.constexpr, IN_SPLITS: tl.constexpr):
    """The task's K slice of the input (``in_at``: its first split's pointers to inputs ``offs_k``) as eight [ROWS]
    vectors, vector j holding inputs 8 r + j: each split's slice loaded whole (contiguous; written by other programs:
    read at L2, not from L1), every load issued before the first add, summed in split order (the same bits every
    run), then taken apart in registers (no cross-warp sum)."""
    x = tl.zeros([ROWS * 8], dtype=tl.float32)
    for s in tl.static_range(IN_SPLITS):
        x += tl.load(in_at + s * stride, mask=offs_k < tl.where(in_splits > s, k, 0), other=0.0, cache_modifier=".cg")
    even, odd = tl.split(tl.reshape(x, [ROWS, 2, 2, 2]))  # input 8 r + 4 a + 2 b + c: c = 0, 1
    x04, x26 = tl.split(even)
    x15, x37 = tl.split(odd)
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@dataclasses.dataclass
class ShortPlan:
    """A chain laid out for ``_short_chain_kernel`` (the weights copied into flat buffers)."""
    qw: torch.Tensor
    sc: torch.Tensor
    meta: torch.Tensor
    part: torch.Tensor  # the input, then each layer's [splits, N] partials (fp32)
    sync: torch.Tensor  # the layers' counters (zeroed a run), then the error count
    dims: list[int]
    tasks: list[int]  # a layer's task count
    group: int
    block_n: int
    rows: int
    in_splits: int  # the most splits a layer's input has, to a power of two


def plan_short(layers, group: int, block_n: int = 128, rows: int = 16) -> ShortPlan:
    """Lay out ``layers`` ((qw [K/8, N], sc [K/G, N]) each; a layer reads the first K outputs of the one before) in
    tasks of ``block_n`` columns and ``rows`` packed K rows (8 x rows inputs: one column block of the layer before)."""
    if any(v < 1 or v & (v - 1) for v in (group // 8, rows, block_n)) or group % 8:
        raise ValueError(f"the group ({group}) must be 8 x a power of two, rows ({rows}) and block_n ({block_n}) "
                         "powers of two")
    dims, meta, tasks, at = [layers[0][0].shape[0] * 8], [], [], {"q": 0, "s": 0, "p": 0, "c": 0}
    in_at, in_splits = 0, 1
    at["p"] = dims[0]
    for i, (qw, sc) in enumerate(layers):
        k, n = qw.shape[0] * 8, qw.shape[1]
        if k > dims[-1] or k % group or n % 16 or sc.shape != (k // group, n):
            raise ValueError(f"layer {i}: qw {tuple(qw.shape)}, sc {tuple(sc.shape)} do not follow a layer with "
                             f"{dims[-1]} outputs in groups of {group} (widths: multiples of 16)")
        splits, blocks = triton.cdiv(k // 8, rows), triton.cdiv(n, block_n)
        meta.append([n, k, splits, at["q"], at["s"], in_at, at["p"], in_splits, dims[-1], at["c"]])
        tasks.append(blocks * splits)
        dims.append(n)
        in_at, in_splits = at["p"], splits
        at = {"q": at["q"] + k // 8 * n, "s": at["s"] + k // group * n, "p": at["p"] + splits * n,
              "c": at["c"] + blocks * LINE.value}
    most = max(m[7] for m in meta)
    if most > 64:  # the input tile holds every split's partials of a task's rows
        raise ValueError(f"a layer's input has {most} K splits (at most 64): more rows a task")
    device = layers[0][0].device
    return ShortPlan(torch.cat([qw.reshape(-1) for qw, _ in layers]), torch.cat([sc.reshape(-1) for _, sc in layers]),
                     torch.tensor(meta, dtype=torch.int64, device=device),
                     torch.empty(at["p"], dtype=torch.float32, device=device),
                     torch.zeros(at["c"] + 1, dtype=torch.int32, device=device), dims, tasks, group, block_n, rows,
                     max(2, triton.next_power_of_2(most)))


def chain_short(plan: ShortPlan, x: torch.Tensor, programs: int | None = None, per_launch: int | None = None, *,
                layer_wait: bool = False, sync_only: bool = False, sleep_ns: int = 0,
                check: bool = False) -> torch.Tensor | None:
    """Run the chain in launches of ``programs`` programs (default: the most tasks a layer has, or on a GPU what it
    holds at once if fewer), ``per_launch`` layers each (default all: one launch); a waiting task sleeps ``sleep_ns``
    between polls. ``check`` (a host sync): raise
    if a task ran before its input was complete (interpreter) and return the output (fp32 [N of the last layer]);
    otherwise None (the partials' sum is not timed)."""
    n_layers = len(plan.dims) - 1
    if x.shape != (plan.dims[0],):
        raise ValueError(f"the chain takes a [{plan.dims[0]}] input, got {tuple(x.shape)}")
    if not layer_wait and plan.block_n % (8 * plan.rows):
        raise ValueError(f"a block wait needs block_n ({plan.block_n}) a multiple of 8 x rows ({8 * plan.rows}): a "
                         "task's K slice inside one column block of the layer before (or wait for the whole layer)")
    plan.sync.zero_()
    plan.part[: plan.dims[0]].copy_(x)
    per_launch, errors = per_launch or n_layers, plan.sync[-1:]
    consts = {"GROUP": plan.group, "BLOCK_N": plan.block_n, "ROWS": plan.rows, "IN_SPLITS": plan.in_splits,
              "LAYER_WAIT": layer_wait, "SYNC_ONLY": sync_only, "WAIT": x.is_cuda, "SLEEP": sleep_ns,
              "num_warps": 8 if plan.block_n * plan.rows >= 4096 else 4}  # codes and sums: <= 64 registers each
    for first in range(0, n_layers, per_launch):
        args = (plan.part, plan.qw, plan.sc, plan.meta, plan.sync, errors, first, min(first + per_launch, n_layers))
        grid = programs or max(plan.tasks)
        if x.is_cuda:
            held = programs_held(_short_chain_kernel, args, consts)
            if programs is None:
                grid = min(grid, held)
            elif programs > held:
                raise ValueError(f"{programs} programs do not fit on the GPU at once (it holds {held} of them)")
        _short_chain_kernel[(grid,)](*args, **consts)
    if not check:
        return None
    if bad := plan.sync[-1].item():
        raise RuntimeError(f"{bad} tasks ran before their input was complete")
    last = plan.meta[-1].tolist()
    return plan.part[last[6]: last[6] + last[2] * last[0]].view(last[2], last[0]).sum(0)


def probe(name: str, shapes: list[tuple[int, int]], group: int, configs, cuda: bool, repeats: int) -> dict:
    """One chain of (K, N) layers: the production GEMV a layer, then each (block_n, rows, layer_wait, sync_only,
    sleep ns) config in one launch and launched per layer."""
    row, x, layers, ref = anchor_row(name, shapes, group, cuda, repeats,
                                     torch.bfloat16 if cuda else torch.float32)
    row["short"] = []
    for block_n, rows, layer_wait, sync_only, sleep in configs[name] if isinstance(configs, dict) else configs:
        entry = {"block_n": block_n, "rows": rows, "layer_wait": layer_wait, "sync_only": sync_only, "sleep_ns": sleep}
        try:
            plan = plan_short(layers, group, block_n, rows)
        except ValueError as exc:  # e.g. a layer whose input would have too many splits at these tiles
            row["short"].append({**entry, "skipped": str(exc)})
            continue
        def call(per_launch, check, pl=plan, lw=layer_wait, so=sync_only, ns=sleep):
            got = chain_short(pl, x, None if cuda else 1, per_launch, layer_wait=lw, sync_only=so, sleep_ns=ns,
                              check=check)  # the interpreter: one program, tasks in order
            return ref if so and check else got  # sync only: nothing computed to compare
        entry["tasks_a_layer"] = max(plan.tasks)
        row["short"].append(both_ways(entry, call, ref, cuda, repeats, len(layers)))
    return row


def report(row: dict, copy_tbps: float | None) -> None:
    if report_head(row, copy_tbps, "short") is None:
        return
    prod = row["launches_us_a_layer"]
    for e in row["short"]:
        head = (f"    {e['block_n']:3d} columns x {8 * e['rows']:3d} K, {e.get('tasks_a_layer', 0):4d} tasks, "
                f"{'layer' if e['layer_wait'] else 'block'} wait{', sync only' if e['sync_only'] else ''}, "
                f"sleep {e['sleep_ns']}: ")
        print(head + (f"skipped ({e['skipped']})" if "skipped" in e else
                      f"{e['us_a_layer']:.2f} us a layer in one launch (x{e['us_a_layer'] / prod:.2f} of the "
                      f"production GEMV), {e['per_layer_us_a_layer']:.2f} per layer"), flush=True)


def setup_chains(cuda: bool, sms: int):
    if not cuda:  # the interpreter: one program a launch of all layers
        return ({"tiny square": [(64, 64)] * 3, "tiny prefixes": [(64, 96), (64, 64), (32, 160), (96, 64)]}, 32,
                [(32, 4, False, False, 0), (16, 2, True, False, 0), (32, 2, False, True, 0), (16, 8, True, False, 0)])
    # block waits (run 2, stop 38: 512-wide 2.28 us a layer; o-sized x1.77-2.4 of the production GEMV, the summed
    # partials' L2 reads) against whole-K tasks (16 / 32 / 64 columns, 1-2 K splits, layer waits): a task's whole
    # weight tile in registers before the wait, so a layer's weights stream while the layer before computes
    block = [(128, 16, False, True, 0), (128, 16, False, False, 0), (256, 32, False, False, 0)]
    whole = [(16, 512, True, False, 0), (32, 256, True, False, 0), (64, 256, True, False, 0)]
    # the deciding chains first (a call cut short still returns what was printed)
    chains = {"o-sized 32 x 4096": [(4096, 4096)] * 32, "llama-8b step GEMVs, rate 0.0": llama_step(0.0, 128),
              "mlp up/down 8 x 2": pairs(4096, 14336, 8), "tiny 32 x 512": [(512, 512)] * 32,
              "llama-8b step GEMVs, rate 0.35": llama_step(0.35, 128)}
    configs = {name: (block if "mlp" not in name and "step" not in name else []) + whole for name in chains}
    configs["tiny 32 x 512"] += [(16, 64, True, False, 0), (32, 64, True, False, 0)]  # whole K = 512 there
    return chains, 128, configs


def main(argv=None) -> None:
    run_chains(__doc__, "short_path_probe.py", setup_chains, probe, report, argv)


if __name__ == "__main__":
    main()
