"""Does one persistent kernel remove the per-launch cost of a chain of dependent batch-1 INT4 GEMVs? (GPU probe)

The Llama-8B decode step runs ~0.9 ms above its bytes (docs/performance-log.md, stop 34): ~130 launches a step, each
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
* ``per_layer``: the same kernel launched once a layer (the anchor with the same arithmetic).

Per layer: microseconds and the fraction of a copy's bandwidth (codes + scales over time). Every configuration's
output is checked against the fp32 torch reference first.

    python benchmarks/persistent_probe.py --json benchmarks/results/persistent_probe_h100.json
    TRITON_INTERPRET=1 python benchmarks/persistent_probe.py --cpu-smoke     # tiny shapes, no GPU: code paths only
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import torch
import triton
import triton.language as tl
from graph_timing import graph_us, probe_args

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_format import ZERO, dequantize, rtn_quantize

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
        # every width and offset is a multiple of 16 (plan_chain checks): 16-byte loads along the columns
        n, k, splits = tl.multiple_of(tl.load(row), 16), tl.multiple_of(tl.load(row + 1), 16), tl.load(row + 2)
        task = t - tl.load(start_ptr + layer)
        offs_n = (task // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (task % splits) * ROWS + tl.arange(0, ROWS)
        live = (rows < k // 8)[:, None] & (offs_n < n)[None, :]
        # the weight tile and its scales first: they do not depend on the previous layer
        codes_at, scales_at = tl.multiple_of(tl.load(row + 3), 16), tl.multiple_of(tl.load(row + 4), 16)
        words = tl.load(qw_ptr + codes_at + rows[:, None] * n + offs_n[None, :], mask=live, other=0)
        scale = tl.load(sc_ptr + scales_at + (rows * 8 // GROUP)[:, None] * n + offs_n[None, :], mask=live,
                        other=0).to(tl.float32)
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
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        inputs = acts_ptr + tl.load(row + 5)
        for j in tl.static_range(8):  # code j of every word: K index 8 x row + j
            x = tl.load(inputs + rows * 8 + j, mask=rows < k // 8, other=0.0,
                        cache_modifier=".cg")  # written by other programs: read at L2, not from L1
            # 2^23 + code as an fp32 bit pattern: the int -> float conversion in one OR
            code = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - _MAGIC_ZERO
            acc += code * x[:, None]
        part = tl.sum(acc * scale, axis=0)
        tl.atomic_add(acts_ptr + tl.multiple_of(tl.load(row + 6), 16) + offs_n, part, mask=offs_n < n, sem="relaxed")
        # Triton puts a CTA barrier before a scalar atomic: every thread's sums are issued, then one thread's release
        # (fence + add) publishes them (CUTLASS's semaphore does the same)
        tl.atomic_add(done_ptr + layer, 1, sem="release")
        t = t_next


@dataclasses.dataclass
class ChainPlan:
    """A chain laid out for ``_chain_kernel`` at one tiling (the weights copied into flat buffers)."""
    qw: torch.Tensor
    sc: torch.Tensor
    start: torch.Tensor
    meta: torch.Tensor
    acts: torch.Tensor
    sync: torch.Tensor  # [0, L): a ticket counter per launch; [L, 2 L): each layer's done counter; [2 L]: errors
    dims: list[int]  # K of the first layer, then every layer's N
    group: int
    block_n: int
    rows: int


def plan_chain(layers: list[tuple[torch.Tensor, torch.Tensor]], group: int, block_n: int = 128,
               rows: int = 16) -> ChainPlan:
    """Lay out ``layers`` ((qw [K/8, N], sc [K/G, N]) each, K of one = N of the one before)."""
    if group % 8 or any(v < 1 or v & (v - 1) for v in (rows, block_n)):
        raise ValueError(f"the group size ({group}) must be a multiple of 8, rows ({rows}) and block_n ({block_n}) "
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
                     torch.empty(2 * len(layers) + 1, dtype=torch.int32, device=device), dims, group, block_n, rows)


def chain_persistent(plan: ChainPlan, x: torch.Tensor, programs: int, per_launch: int | None = None,
                     check: bool = False) -> torch.Tensor:
    """The chain's output (fp32 [N of the last layer]) from launches of ``programs`` persistent programs,
    ``per_launch`` layers each (default all: one launch; 1 is the same kernel launched per layer, the anchor).
    ``check`` (a host sync: not in a graph): raise if a task ran before its input was complete (interpreter)."""
    n_layers = len(plan.dims) - 1
    if x.shape != (plan.dims[0],):
        raise ValueError(f"the chain takes a [{plan.dims[0]}] input, got {tuple(x.shape)}")
    plan.acts.zero_()
    plan.sync.zero_()
    plan.acts[: plan.dims[0]].copy_(x)
    per_launch = per_launch or n_layers
    for launch, first in enumerate(range(0, n_layers, per_launch)):
        _chain_kernel[(programs,)](plan.acts, plan.qw, plan.sc, plan.start, plan.meta, plan.sync[launch:],
                                   plan.sync[n_layers:], plan.sync[2 * n_layers:], first,
                                   min(first + per_launch, n_layers), GROUP=plan.group, BLOCK_N=plan.block_n,
                                   ROWS=plan.rows, WAIT=x.is_cuda, num_warps=4)
    if check and plan.sync[2 * n_layers].item():
        raise RuntimeError(f"{plan.sync[2 * n_layers].item()} tasks ran before their input was complete")
    return plan.acts[-plan.dims[-1]:]


def chain_launches(layers, x: torch.Tensor, group: int) -> torch.Tensor:
    """The same chain through the production GEMV, one launch a layer (activations in x's dtype)."""
    h = x[None, :]
    for qw, sc in layers:
        h = im.int4_matmul(h, qw, sc, group)
    return h[0]


def chain_reference(layers, x: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 torch: dequantize each layer and multiply."""
    h = x.float()
    for qw, sc in layers:
        h = h @ dequantize(qw, sc, group)
    return h


def random_chain(dims: list[int], group: int, device, seed: int = 0):
    """INT4 layers dims[l] -> dims[l + 1] of a Gaussian W / sqrt(K) (the activations keep their scale down the
    chain), and an input."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layers = [rtn_quantize((torch.randn(n, k, generator=gen) / k**0.5).to(device), group)
              for k, n in itertools.pairwise(dims)]
    return torch.randn(dims[0], generator=gen).to(device), layers


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def probe(name: str, dims: list[int], group: int, configs, cuda: bool, repeats: int) -> dict:
    x, layers = random_chain(dims, group, "cuda" if cuda else "cpu")
    ref = chain_reference(layers, x, group)
    n_layers = len(layers)
    row = {"chain": name, "dims": dims, "group": group,
           "bytes_a_layer": sum(qw.numel() * 4 + sc.numel() * 2 for qw, sc in layers) / n_layers}
    xh = x.to(torch.bfloat16 if cuda else torch.float32)
    row["launches_rel_err"] = _rel_err(chain_launches(layers, xh, group), ref)
    if cuda:
        row["launches_us_a_layer"] = graph_us([lambda: chain_launches(layers, xh, group)], repeats) / n_layers
    row["persistent"] = []
    for programs, block_n, rows in configs:
        plan = plan_chain(layers, group, block_n, rows)
        entry = {"programs": programs, "block_n": block_n, "rows": rows}
        for prefix, per_launch in (("", None), ("per_layer_", 1)):
            def run(pl=plan, p=programs, per=per_launch):
                return chain_persistent(pl, x, p, per)
            entry[prefix + "rel_err"] = _rel_err(chain_persistent(plan, x, programs, per_launch, check=True), ref)
            if cuda:
                entry[prefix + "us_a_layer"] = graph_us([run], repeats) / n_layers
        row["persistent"].append(entry)
    return row


def report(row: dict, copy_tbps: float | None) -> None:
    if copy_tbps is None:
        worst = max(max(e["rel_err"], e["per_layer_rel_err"]) for e in row["persistent"])
        print(f"{row['chain']}: relative errors launches {row['launches_rel_err']:.1e}, persistent {worst:.1e} "
              f"(worst of {len(row['persistent'])} configs, one launch and per layer)")
        return
    ideal = row["bytes_a_layer"] / 1e6 / copy_tbps
    best = min(row["persistent"], key=lambda e: e["us_a_layer"])
    print(f"{row['chain']}: production GEMV {row['launches_us_a_layer']:.2f} us a layer "
          f"({ideal / row['launches_us_a_layer']:.0%} of copy); one persistent launch {best['us_a_layer']:.2f} "
          f"({ideal / best['us_a_layer']:.0%}) at {best['programs']} programs x {best['block_n']} columns x "
          f"{best['rows']} rows, the same kernel per layer {best['per_layer_us_a_layer']:.2f}; errors "
          f"{row['launches_rel_err']:.1e} / {best['rel_err']:.1e}", flush=True)
    for e in row["persistent"]:
        print(f"    {e['programs']:5d} programs x {e['block_n']:3d} x {e['rows']:2d}: {e['us_a_layer']:.2f} us a layer "
              f"in one launch, {e['per_layer_us_a_layer']:.2f} launched per layer", flush=True)


def main(argv=None) -> None:
    args, cuda = probe_args(__doc__, "persistent_probe.py", argv)
    out = {"what": __doc__.splitlines()[0], "device": "cpu (interpreter)", "copy_TBps": None, "rows": []}
    if cuda:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        out["device"] = torch.cuda.get_device_name()
        big = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")  # the copy anchor, as kernel_bench.py
        copy_us = graph_us([lambda: torch.add(big[: 2**27], 0, out=big[2**27:])], args.repeats)
        out["copy_TBps"] = 2 * 2**28 / copy_us / 1e6
        del big
        chains = {"o-sized 32 x 4096": [4096] * 33, "mlp up/down 16 x 2": [4096, 14336] * 16 + [4096]}
        group, configs = 128, [(sms * p, b, r) for p in (4, 8) for b in (128, 256) for r in (8, 16)]
    else:
        chains = {"tiny square": [64] * 4, "tiny mixed": [64, 96, 32, 64]}
        group, configs = 32, [(1, 32, 4), (3, 32, 8), (2, 64, 4)]
    for name, dims in chains.items():
        row = probe(name, dims, group, configs, cuda, args.repeats)
        out["rows"].append(row)
        report(row, out["copy_TBps"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
