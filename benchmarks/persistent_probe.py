"""Does one persistent kernel remove the per-launch cost of a chain of dependent batch-1 INT4 GEMVs? (GPU probe)

The Llama-8B decode step runs ~0.9 ms above its bytes (docs/performance-log.md, stop 34): ~200 launches a step, each
paying its launch, its first loads and its tail, which only fewer, longer-lived kernels remove (issue 5's 0.75 ratio
needs ~0.4 ms of it gone). This probe measures the idea on chains of layers x_{l+1} = W_l x_l (INT4 codes + fp16
group scales in the project's format, batch 1): 32 square 4096 layers (o-sized), and 16 pairs of the Llama-8B MLP's
up (14336 x 4096) and down (4096 x 14336) shapes. Each chain is timed as

* ``launches``: one production ``int4_matmul`` (default config, bf16) a layer, L launches in one CUDA graph;
* ``persistent``: ONE launch of ``_chain_kernel``: a grid of resident programs takes tasks (layer, column block, K
  split) from a global ticket counter in dependency order, loads its task's weight tile first, then waits until the
  previous layer's tasks are all done (a per-layer counter), then multiplies and adds its partial sums into the
  layer's fp32 output with atomics. The weight stream of layer l+1 thus overlaps the tail of layer l, and there is no
  launch between layers. Tickets are handed out in order, so a task waits only for tasks that running programs
  hold: no deadlock at any grid size, and the Triton interpreter (programs run one after another) runs it too;
* ``static`` / ``static_once``: ONE launch of ``_static_chain_kernel``: no tickets; program p takes tasks p, p + P, ...
  of every layer and loads its next task's tile before it waits, publishing after each task or once a layer (the
  grid must be resident at once: checked);
* ``per_layer``: the same kernel launched once a layer (the anchor with the same arithmetic).

Per layer: microseconds and the fraction of a copy's bandwidth (codes + scales over time). Every configuration's
output is checked against the fp32 torch reference first.

    python benchmarks/persistent_probe.py --json benchmarks/results/persistent_probe_h100.json
    TRITON_INTERPRET=1 python benchmarks/persistent_probe.py --cpu-smoke     # tiny shapes, no GPU: code paths only
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import torch
import triton
import triton.language as tl
from graph_timing import copy_tbps, graph_us, probe_args, programs_held

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_format import ZERO, dequantize, rtn_quantize

SCHEDULES = ("tickets", "static", "static_once")
_MAGIC_ZERO = tl.constexpr(8388608.0 + ZERO)  # 2^23 + the zero point: a code's fp32 bit pattern minus it is w / s
# a layer's row of the table: N, K, K splits, codes offset, scales offset, input offset, output offset
META = tl.constexpr(7)


@triton.jit
def _chain_kernel(acts_ptr, qw_ptr, sc_ptr, start_ptr, meta_ptr, ticket_ptr, done_ptr, err_ptr, first, last,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, WAIT: tl.constexpr):
    """Layers [first, last) of a chain. acts fp32 (the input, then each layer's output: zeroed, summed by atomics);
    qw int32 / sc fp16: every layer's [K / 8, N] codes and [K / GROUP, N] scales, flat; start int32 [L + 1]: each
    layer's first task; meta int64 [L, META]; ticket int32 [1] and done int32 [L] zeroed. A task is ROWS packed rows
    (8 x ROWS K values) of BLOCK_N output columns of one layer. WAIT False (the interpreter, which runs programs one
    after another): a task whose input is unfinished never gets it, so it counts an error in err instead of
    spinning (a broken dependency order fails a test rather than hanging it)."""
    first_task, end = tl.load(start_ptr + first), tl.load(start_ptr + last)
    t = first_task + tl.atomic_add(ticket_ptr, 1, sem="relaxed")  # a ticket carries no data
    layer = first
    while t < end:
        while t >= tl.load(start_ptr + layer + 1):  # a program's tickets only grow: its layer too
            layer += 1
        row = meta_ptr + layer * META
        # the weight tile and its scales first: they do not depend on the previous layer
        words, scale, rows, offs_n, n, k = _task_tile(qw_ptr, sc_ptr, row, t - tl.load(start_ptr + layer), True,
                                                      GROUP, BLOCK_N, ROWS)
        # the next ticket now, so its round trip overlaps this task (the program finishes this task before it starts
        # that one, so no task waits on a ticket its own program holds back)
        t_next = first_task + tl.atomic_add(ticket_ptr, 1, sem="relaxed")
        if layer > 0:  # every task of the previous layer has added its part of this layer's input
            before = tl.load(start_ptr + layer) - tl.load(start_ptr + layer - 1)
            if WAIT:
                while tl.atomic_add(done_ptr + layer - 1, 0, sem="acquire") < before:
                    pass
            elif tl.atomic_add(done_ptr + layer - 1, 0, sem="acquire") < before:
                tl.atomic_add(err_ptr, 1, sem="relaxed")
        _add_partial(acts_ptr, row, words, scale, rows, offs_n, n, k, GROUP, ROWS, BLOCK_N)
        tl.atomic_add(done_ptr + layer, 1, sem="release")  # see _add_partial
        t = t_next


@triton.jit
def _static_chain_kernel(acts_ptr, qw_ptr, sc_ptr, start_ptr, meta_ptr, done_ptr, err_ptr, first, last,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, WAIT: tl.constexpr,
                         ONCE: tl.constexpr):
    """``_chain_kernel``'s layers without tickets, one tile ahead: program p takes tasks p, p + P, ... of every layer
    (P programs, each layer has >= P tasks: the launcher checks) and loads its NEXT task's tile, which may be the next
    layer's, before it waits for the current task's input, so a layer's wait overlaps the following layer's weight
    stream. Every program must be resident at once (a program waits on tasks of all others): the launcher keeps P
    within what the SMs hold. ONCE: a program publishes its sums once a layer, after its last task there (one
    release fence a layer instead of one a task; a layer is then done at P releases). WAIT False (the interpreter): a
    task whose input is unfinished counts an error."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    layer, task = first, pid
    words, scale, rows, offs_n, n, k = _task_tile(qw_ptr, sc_ptr, meta_ptr + layer * META, task, True, GROUP,
                                                  BLOCK_N, ROWS)
    while layer < last:
        count = tl.load(start_ptr + layer + 1) - tl.load(start_ptr + layer)
        wrap = task + programs >= count
        next_layer, next_task = layer + wrap.to(tl.int32), tl.where(wrap, pid, task + programs)
        ahead = _task_tile(qw_ptr, sc_ptr, meta_ptr + tl.minimum(next_layer, last - 1) * META, next_task,
                           next_layer < last, GROUP, BLOCK_N, ROWS)
        if layer > first and task == pid:  # the previous layer of this launch is complete (the launch before
            # finished its own; a program's later tasks of a layer follow its first)
            before = programs if ONCE else tl.load(start_ptr + layer) - tl.load(start_ptr + layer - 1)
            if WAIT:
                while _load_acquire(done_ptr + layer - 1) < before:
                    pass
            elif tl.atomic_add(done_ptr + layer - 1, 0, sem="acquire") < before:
                tl.atomic_add(err_ptr, 1, sem="relaxed")
        _add_partial(acts_ptr, meta_ptr + layer * META, words, scale, rows, offs_n, n, k, GROUP, ROWS,
                     BLOCK_N)
        if wrap or not ONCE:
            tl.atomic_add(done_ptr + layer, 1, sem="release")  # see _add_partial
        layer, task = next_layer, next_task
        words, scale, rows, offs_n, n, k = ahead


@triton.jit
def _load_acquire(ptr):
    """A GPU-scope acquire load (a plain load, not an atomic: spinning programs do not queue read-modify-writes at
    the counter's L2 slice)."""
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _add_partial(acts_ptr, row, words, scale, rows, offs_n, n, k, GROUP: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """A task's partial sums (its K rows against its columns) added into the layer's fp32 output. The caller then
    publishes them with a release add on the layer's done counter: Triton puts a CTA barrier before a scalar atomic,
    so every thread's sums are issued before one thread's release (fence + add), as CUTLASS's semaphore does."""
    SCALE_ROWS: tl.constexpr = (ROWS * 8 + GROUP - 1) // GROUP
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    inputs = acts_ptr + tl.load(row + 5)
    for j in tl.static_range(8):  # code j of every word: K index 8 x row + j
        x = tl.load(inputs + rows * 8 + j, mask=rows < k // 8, other=0.0,
                    cache_modifier=".cg")  # written by other programs: read at L2, not from L1
        # 2^23 + code as an fp32 bit pattern: the int -> float conversion in one OR
        code = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - _MAGIC_ZERO
        acc += code * x[:, None]
    # the sums of each scale group's rows, then scaled: one scale row per group in registers, not one per row
    part = tl.sum(tl.sum(tl.reshape(acc, [SCALE_ROWS, ROWS // SCALE_ROWS, BLOCK_N]), axis=1) * scale, axis=0)
    tl.atomic_add(acts_ptr + tl.multiple_of(tl.load(row + 6), 16) + offs_n, part, mask=offs_n < n, sem="relaxed")


@triton.jit
def _task_tile(qw_ptr, sc_ptr, row, task, live, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Task ``task`` of the layer whose table row is ``row``: its K rows, columns, codes and scales (zeros where
    not ``live``: a program's look-ahead past its last task)."""
    # every width and offset is a multiple of 16 (plan_chain checks): 16-byte loads along the columns
    n, k, splits = tl.multiple_of(tl.load(row), 16), tl.multiple_of(tl.load(row + 1), 16), tl.load(row + 2)
    offs_n = (task // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (task % splits) * ROWS + tl.arange(0, ROWS)
    inside = (rows < tl.where(live, k // 8, 0))[:, None] & (offs_n < n)[None, :]  # no rows where not live
    codes_at, scales_at = tl.multiple_of(tl.load(row + 3), 16), tl.multiple_of(tl.load(row + 4), 16)
    words = tl.load(qw_ptr + codes_at + rows[:, None] * n + offs_n[None, :], mask=inside, other=0)
    # the tile's scale groups (plan_chain: a tile holds whole groups, or lies in one)
    SCALE_ROWS: tl.constexpr = (ROWS * 8 + GROUP - 1) // GROUP
    groups = (task % splits) * ROWS * 8 // GROUP + tl.arange(0, SCALE_ROWS)
    in_groups = (groups < tl.where(live, k // GROUP, 0))[:, None] & (offs_n < n)[None, :]
    scale = tl.load(sc_ptr + scales_at + groups[:, None] * n + offs_n[None, :], mask=in_groups,
                    other=0).to(tl.float32)
    return words, scale, rows, offs_n, n, k


@dataclasses.dataclass
class ChainPlan:
    """A chain laid out for ``_chain_kernel`` / ``_static_chain_kernel`` at one tiling (the weights copied into flat
    buffers)."""
    qw: torch.Tensor
    sc: torch.Tensor
    start: torch.Tensor
    meta: torch.Tensor
    acts: torch.Tensor
    sync: torch.Tensor  # [0, L): a ticket counter per launch; [L, 2 L): each layer's done counter; [2 L]: errors
    dims: list[int]  # K of the first layer, then every layer's N
    tasks: list[int]  # each layer's task count (host side: the launcher checks grids without a sync)
    group: int
    block_n: int
    rows: int


def plan_chain(layers: list[tuple[torch.Tensor, torch.Tensor]], group: int, block_n: int = 128,
               rows: int = 16) -> ChainPlan:
    """Lay out ``layers`` ((qw [K/8, N], sc [K/G, N]) each, K of one = N of the one before)."""
    if any(v < 1 or v & (v - 1) for v in (group // 8, rows, block_n)) or group % 8:
        raise ValueError(f"the group size ({group}) must be 8 x a power of two, rows ({rows}) and block_n ({block_n}) "
                         "powers of two")
    dims = [layers[0][0].shape[0] * 8]
    for i, (qw, sc) in enumerate(layers):
        k, n = qw.shape[0] * 8, qw.shape[1]
        if k != dims[-1] or k % group or n % 16 or sc.shape != (k // group, n):
            raise ValueError(f"layer {i}: qw {tuple(qw.shape)}, sc {tuple(sc.shape)} do not follow a layer with "
                             f"{dims[-1]} outputs in groups of {group} (widths: multiples of 16)")
        dims.append(n)
    starts, meta, q_at, s_at, a_at = [0], [], 0, 0, 0
    for k, n in itertools.pairwise(dims):
        splits = triton.cdiv(k // 8, rows)
        meta.append([n, k, splits, q_at, s_at, a_at, a_at + k])
        starts.append(starts[-1] + triton.cdiv(n, block_n) * splits)
        q_at, s_at, a_at = q_at + k // 8 * n, s_at + k // group * n, a_at + k
    device = layers[0][0].device
    return ChainPlan(torch.cat([qw.reshape(-1) for qw, _ in layers]), torch.cat([sc.reshape(-1) for _, sc in layers]),
                     torch.tensor(starts, dtype=torch.int32, device=device),
                     torch.tensor(meta, dtype=torch.int64, device=device),
                     torch.empty(sum(dims), dtype=torch.float32, device=device),
                     torch.empty(2 * len(layers) + 1, dtype=torch.int32, device=device), dims,
                     [b - a for a, b in itertools.pairwise(starts)], group, block_n, rows)


def chain_persistent(plan: ChainPlan, x: torch.Tensor, programs: int, per_launch: int | None = None,
                     check: bool = False, schedule: str = "tickets") -> torch.Tensor:
    """The chain's output (fp32 [N of the last layer]) from launches of ``programs`` persistent programs,
    ``per_launch`` layers each (default all: one launch; 1 is the same kernel launched per layer, the anchor).
    ``schedule``: "tickets" (``_chain_kernel``), "static" or "static_once" (``_static_chain_kernel``, publishing
    each task or once a layer; both take at most every layer's task
    count and, on a GPU, what the SMs hold at once). ``check`` (a host sync: not in a graph): raise if a task ran
    before its input was complete (interpreter)."""
    n_layers = len(plan.dims) - 1
    if x.shape != (plan.dims[0],):
        raise ValueError(f"the chain takes a [{plan.dims[0]}] input, got {tuple(x.shape)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    plan.acts.zero_()
    plan.sync.zero_()
    plan.acts[: plan.dims[0]].copy_(x)
    per_launch = per_launch or n_layers
    common = {"GROUP": plan.group, "BLOCK_N": plan.block_n, "ROWS": plan.rows, "WAIT": x.is_cuda, "num_warps": 4}
    for launch, first in enumerate(range(0, n_layers, per_launch)):
        last = min(first + per_launch, n_layers)
        if schedule == "tickets":
            _chain_kernel[(programs,)](plan.acts, plan.qw, plan.sc, plan.start, plan.meta, plan.sync[launch:],
                                       plan.sync[n_layers:], plan.sync[2 * n_layers:], first, last, **common)
            continue
        args = (plan.acts, plan.qw, plan.sc, plan.start, plan.meta, plan.sync[n_layers:], plan.sync[2 * n_layers:],
                first, last)
        consts = {**common, "ONCE": schedule == "static_once"}
        _check_static(plan, programs, args, consts)
        _static_chain_kernel[(programs,)](*args, **consts)
    if check and plan.sync[2 * n_layers].item():
        raise RuntimeError(f"{plan.sync[2 * n_layers].item()} tasks ran before their input was complete")
    return plan.acts[-plan.dims[-1]:]


def _check_static(plan: ChainPlan, programs: int, args, consts: dict) -> None:
    """Refuse a static grid that could not run: more programs than a layer has tasks, or (GPU) more than the SMs
    hold at once (programs that never start would leave the others waiting forever)."""
    fewest = min(plan.tasks)
    if programs > fewest:
        raise ValueError(f"a static schedule takes at most {fewest} programs here (a layer's tasks), not {programs}")
    if consts["WAIT"] and programs > (resident := programs_held(_static_chain_kernel, args, consts)):
        raise ValueError(f"{programs} programs do not fit on the GPU at once (it holds {resident} of them)")


def chain_launches(layers, x: torch.Tensor, group: int) -> torch.Tensor:
    """The same chain through the production GEMV, one launch a layer (activations in x's dtype). A layer reads
    the first K outputs of the one before (all of them in a plain chain)."""
    h = x[None, :]
    for qw, sc in layers:
        h = im.int4_matmul(h[:, : qw.shape[0] * 8], qw, sc, group)
    return h[0]


def chain_reference(layers, x: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 torch: dequantize each layer and multiply (a layer reads the first K outputs of the one before)."""
    h = x.float()
    for qw, sc in layers:
        h = h[: qw.shape[0] * 8] @ dequantize(qw, sc, group)
    return h


def random_chain(dims: list[int], group: int, device, seed: int = 0):
    """INT4 layers dims[l] -> dims[l + 1] (``random_layers``) and an input."""
    return random_layers(list(itertools.pairwise(dims)), group, device, seed)


def random_layers(shapes: list[tuple[int, int]], group: int, device, seed: int = 0):
    """INT4 layers of the (K, N) ``shapes``, a Gaussian W / sqrt(K) each (the activations keep their scale down the
    chain), and an input of the first K, drawn on ``device`` (the GPU's generator: a Llama-8B step is 7 G values)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = [rtn_quantize(torch.randn(n, k, generator=gen, device=device) / k**0.5, group) for k, n in shapes]
    return torch.randn(shapes[0][0], generator=gen, device=device), layers


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def anchor_row(name: str, shapes, group: int, cuda: bool, repeats: int, act_dtype: torch.dtype):
    """A chain of random (K, N) layers and its row: bytes a layer, the production GEMV a layer (error against the
    fp32 reference; on a GPU, microseconds a layer). Returns (row, input, layers, reference)."""
    x, layers = random_layers(shapes, group, "cuda" if cuda else "cpu")
    ref, n_layers, xh = chain_reference(layers, x, group), len(layers), x.to(act_dtype)
    row = {"chain": name, "shapes": shapes, "group": group,
           "launches_rel_err": _rel_err(chain_launches(layers, xh, group), ref),
           "bytes_a_layer": sum(qw.numel() * 4 + sc.numel() * 2 for qw, sc in layers) / n_layers}
    if cuda:
        row["launches_us_a_layer"] = graph_us([lambda: chain_launches(layers, xh, group)], repeats) / n_layers
    return row, x, layers, ref


def both_ways(entry: dict, call, ref: torch.Tensor, cuda: bool, repeats: int, n_layers: int) -> dict:
    """``call(per_launch, check)`` in one launch (per_launch None) and launched per layer (1): its error against
    ``ref`` and, on a GPU, microseconds a layer; a grid that cannot run (ValueError) is recorded as skipped."""
    try:
        for prefix, per_launch in (("", None), ("per_layer_", 1)):
            entry[prefix + "rel_err"] = _rel_err(call(per_launch, True), ref)
            if cuda:
                entry[prefix + "us_a_layer"] = graph_us([functools.partial(call, per_launch, False)],
                                                        repeats) / n_layers
    except ValueError as exc:
        entry = {**entry, "skipped": str(exc)}
    return entry


def probe(name: str, dims: list[int], group: int, configs, cuda: bool, repeats: int) -> dict:
    """One chain: the production GEMV a layer, then each (schedule, programs, block_n, rows) config in one launch
    and launched per layer (a config the static schedule refuses is recorded with the reason)."""
    row, x, layers, ref = anchor_row(name, list(itertools.pairwise(dims)), group, cuda, repeats,
                                     torch.bfloat16 if cuda else torch.float32)
    row["persistent"] = []
    for schedule, programs, block_n, rows in configs:
        plan = plan_chain(layers, group, block_n, rows)
        def call(per_launch, check, pl=plan, p=programs, sch=schedule):
            return chain_persistent(pl, x, p, per_launch, check, schedule=sch)
        entry = {"schedule": schedule, "programs": programs, "block_n": block_n, "rows": rows}
        row["persistent"].append(both_ways(entry, call, ref, cuda, repeats, len(layers)))
    return row


def report_head(row: dict, copy_tbps: float | None, key: str) -> tuple[list[dict], float] | None:
    """A chain's first report line: the worst error of the configs under ``key`` (interpreter: then None), or the
    production GEMV's time against the bytes'. Returns the configs that ran and the bytes' microseconds a layer."""
    ran = [e for e in row[key] if "skipped" not in e]
    if copy_tbps is None:
        worst = max(max(e["rel_err"], e["per_layer_rel_err"]) for e in ran)
        print(f"{row['chain']}: relative errors launches {row['launches_rel_err']:.1e}, {key} {worst:.1e} "
              f"(worst of {len(ran)} configs, one launch and per layer)")
        return None
    ideal = row["bytes_a_layer"] / 1e6 / copy_tbps
    print(f"{row['chain']}: production GEMV {row['launches_us_a_layer']:.2f} us a layer "
          f"({ideal / row['launches_us_a_layer']:.0%} of copy, the bytes alone {ideal:.2f} us)", flush=True)
    return ran, ideal


def report(row: dict, copy_tbps: float | None) -> None:
    if (head := report_head(row, copy_tbps, "persistent")) is None:
        return
    ran, ideal = head
    for schedule in SCHEDULES:
        mine = [e for e in ran if e["schedule"] == schedule]
        if mine:
            best = min(mine, key=lambda e: e["us_a_layer"])
            us, vs = best["us_a_layer"], best["us_a_layer"] / row["launches_us_a_layer"]
            print(f"  best {schedule}: {us:.2f} us a layer in one launch ({ideal / us:.0%} of copy; x{vs:.2f} of the "
                  f"production GEMV) at {best['programs']} programs x {best['block_n']} x {best['rows']}, "
                  f"{best['per_layer_us_a_layer']:.2f} launched per layer, error {best['rel_err']:.1e}", flush=True)
    for e in row["persistent"]:
        head = f"    {e['schedule']:7s} {e['programs']:5d} programs x {e['block_n']:3d} x {e['rows']:2d}: "
        print(head + (f"skipped ({e['skipped']})" if "skipped" in e else
                      f"{e['us_a_layer']:.2f} us a layer in one launch, {e['per_layer_us_a_layer']:.2f} per layer"),
              flush=True)


def run_chains(doc: str, script: str, setup, probe_fn, report_fn, argv=None) -> None:
    """The chain probes' main: ``setup(cuda, sms)`` gives (chains, group, configs); each chain's row from
    ``probe_fn(name, chain, group, configs, cuda, repeats)``, printed by ``report_fn``; JSON with the copy anchor."""
    args, cuda = probe_args(doc, script, argv)
    out = {"what": doc.splitlines()[0], "device": "cpu (interpreter)", "copy_TBps": None, "rows": []}
    if cuda:
        out["device"], out["copy_TBps"] = torch.cuda.get_device_name(), copy_tbps(args.repeats)
    chains, group, configs = setup(cuda, torch.cuda.get_device_properties(0).multi_processor_count if cuda else 1)
    for name, chain in chains.items():
        out["rows"].append(probe_fn(name, chain, group, configs, cuda, args.repeats))
        report_fn(out["rows"][-1], out["copy_TBps"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def setup_chains(cuda: bool, sms: int):
    if not cuda:
        return ({"tiny square": [64] * 4, "tiny mixed": [64, 96, 32, 64]}, 32,
                [("tickets", 1, 32, 4), ("tickets", 3, 32, 8), ("tickets", 2, 64, 4), ("static", 1, 32, 4),
                 ("static_once", 1, 64, 8)])  # the interpreter: one static program
    # the tickets' and the static grids' best of stop 36's first runs, then static grids publishing once a layer at
    # 1-4 programs an SM, up to one task a program a layer (128 x 64 tiles: 256 tasks in an o-sized layer)
    tiles = ((128, 16), (256, 16), (128, 32), (128, 64))  # 256 x 32 spills (ptxas, sm_90)
    return ({"o-sized 32 x 4096": [4096] * 33, "mlp up/down 16 x 2": [4096, 14336] * 16 + [4096]}, 128,
            [("tickets", sms * 8, 128, 16), ("static", sms * 2, 128, 32)]
            + [("static_once", sms * p, b, r) for p in (1, 2, 3, 4) for b, r in tiles])


def main(argv=None) -> None:
    run_chains(__doc__, "persistent_probe.py", setup_chains, probe, report, argv)


if __name__ == "__main__":
    main()
