"""Does one persistent kernel remove the per-launch cost of a chain of dependent batch-1 INT4 GEMVs? (GPU probe)

The Llama-8B decode step runs ~0.9 ms above its bytes (docs/performance-log.md, stop 34): ~130 launches a step, each
paying its launch, its first loads and its tail, which only fewer, longer-lived kernels remove (issue 5's 0.75 ratio
needs ~0.4 ms of it gone). This probe measures the idea on the simplest chain: L square layers, x_{l+1} = W_l x_l
(N = K, INT4 codes + fp16 group scales in the project's format), batch 1, timed as

* ``launches``: one production ``int4_matmul`` (default config, bf16) a layer, L launches in one CUDA graph;
* ``persistent``: ONE launch of ``_chain_kernel``: a grid of resident programs takes tasks (layer, column block, K
  split) from a global ticket counter in dependency order, loads its task's weight tile first, then waits until the
  previous layer's tasks are all done (a per-layer counter), then multiplies and adds its partial sums into the
  layer's fp32 output with atomics. The weight stream of layer l+1 thus overlaps the tail of layer l, and there is no
  launch between layers. Tickets are handed out in order, so a task waits only for tasks that running programs
  hold: no deadlock at any grid size, and the Triton interpreter (programs run one after another) runs it too.

Per layer: microseconds and the fraction of a copy's bandwidth (codes + scales over time). Every configuration's
output is checked against the fp32 torch reference first.

    python benchmarks/persistent_probe.py --json benchmarks/results/persistent_probe_h100.json
    TRITON_INTERPRET=1 python benchmarks/persistent_probe.py --cpu-smoke     # tiny shapes, no GPU: code paths only
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from graph_timing import graph_us, probe_args

from uniql.kernels import int4_matmul as im
from uniql.kernels.int4_format import ZERO, dequantize, rtn_quantize

_MAGIC_ZERO = tl.constexpr(8388608.0 + ZERO)  # 2^23 + the zero point: a code's fp32 bit pattern minus it is w / s


@triton.jit
def _chain_kernel(acts_ptr, qw_ptr, sc_ptr, ticket_ptr, done_ptr, K, n_layers, blocks, splits,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """acts fp32 [L + 1, K] (row 0 the input, rows 1..L zeroed: each layer's output, summed by atomics); qw int32
    [L, K / 8, K]; sc fp16 [L, K / GROUP, K]; ticket int32 [1] and done int32 [L] zeroed. A task is ROWS packed rows
    (8 x ROWS K values) of BLOCK_N output columns of one layer."""
    tasks = blocks * splits
    t = tl.atomic_add(ticket_ptr, 1, sem="relaxed")  # a ticket carries no data: no fence
    while t < n_layers * tasks:
        layer = t // tasks
        col = (t % tasks) // splits
        split = t % splits
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = split * ROWS + tl.arange(0, ROWS)
        live = (rows < K // 8)[:, None] & (offs_n < K)[None, :]
        # the weight tile and its scales first: they do not depend on the previous layer
        words = tl.load(qw_ptr + layer * (K // 8) * K + rows[:, None] * K + offs_n[None, :], mask=live, other=0)
        scale = tl.load(sc_ptr + layer * (K // GROUP) * K + (rows * 8 // GROUP)[:, None] * K + offs_n[None, :],
                        mask=live, other=0).to(tl.float32)
        # the next ticket now, so its round trip overlaps this task (the program finishes this task before it starts
        # that one, so no task waits on a ticket its own program holds back)
        t_next = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
        if layer > 0:  # every task of the previous layer has added its part of this layer's input
            while tl.atomic_add(done_ptr + layer - 1, 0, sem="acquire") < tasks:
                pass
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):  # code j of every word: K index 8 x row + j
            x = tl.load(acts_ptr + layer * K + rows * 8 + j, mask=rows < K // 8, other=0.0,
                        cache_modifier=".cg")  # written by other programs: read at L2, not from L1
            # 2^23 + code as an fp32 bit pattern: the int -> float conversion in one OR
            code = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - _MAGIC_ZERO
            acc += code * x[:, None]
        part = tl.sum(acc * scale, axis=0)
        tl.atomic_add(acts_ptr + (layer + 1) * K + offs_n, part, mask=offs_n < K, sem="relaxed")
        # Triton puts a CTA barrier before a scalar atomic: every thread's sums are issued, then one thread's release
        # (fence + add) publishes them (CUTLASS's semaphore does the same)
        tl.atomic_add(done_ptr + layer, 1, sem="release")
        t = t_next


def chain_persistent(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, group: int, programs: int,
                     block_n: int = 128, rows: int = 16, per_launch: int | None = None,
                     buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The chain's output (fp32 [K]) from launches of ``programs`` persistent programs, ``per_launch`` layers each
    (default all: one launch; 1 is the same kernel launched per layer, the anchor). ``buffers``: (acts fp32
    [L + 1, K], sync int32 [2 L]) passed in for graph capture (fixed addresses)."""
    n_layers, k = qw.shape[0], qw.shape[2]
    if qw.shape[1] * 8 != k or sc.shape != (n_layers, k // group, k) or x.shape != (k,):
        raise ValueError(f"a chain of square layers: qw [L, K/8, K], sc [L, K/G, K], x [K]; got {tuple(qw.shape)}, "
                         f"{tuple(sc.shape)}, {tuple(x.shape)}")
    if group % 8 or k % group or any(v < 1 or v & (v - 1) for v in (rows, block_n)):
        raise ValueError(f"the group size ({group}) must be a multiple of 8 dividing K, rows ({rows}) and block_n "
                         f"({block_n}) powers of two")
    acts, sync = buffers or (torch.empty(n_layers + 1, k, dtype=torch.float32, device=x.device),
                             torch.empty(2 * n_layers, dtype=torch.int32, device=x.device))
    acts[1:].zero_()
    sync.zero_()  # [0, L): a ticket counter per launch; [L, 2 L): the done counter of each layer
    acts[0].copy_(x)
    blocks, splits = triton.cdiv(k, block_n), triton.cdiv(k // 8, rows)
    per_launch = per_launch or n_layers
    for launch, first in enumerate(range(0, n_layers, per_launch)):
        last = min(first + per_launch, n_layers)
        _chain_kernel[(programs,)](acts[first:], qw[first:last], sc[first:last], sync[launch:],
                                   sync[n_layers + first:], k, last - first, blocks, splits, GROUP=group,
                                   BLOCK_N=block_n, ROWS=rows, num_warps=4)
    return acts[n_layers]


def chain_launches(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, group: int) -> torch.Tensor:
    """The same chain through the production GEMV, one launch a layer (activations in x's dtype)."""
    h = x[None, :]
    for layer in range(qw.shape[0]):
        h = im.int4_matmul(h, qw[layer], sc[layer], group)
    return h[0]


def chain_reference(x: torch.Tensor, qw: torch.Tensor, sc: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 torch: dequantize each layer and multiply."""
    h = x.float()
    for layer in range(qw.shape[0]):
        h = h @ dequantize(qw[layer], sc[layer], group)
    return h


def random_chain(n_layers: int, k: int, group: int, device, seed: int = 0):
    """INT4 layers of a Gaussian W / sqrt(K) (the activations keep their scale down the chain), and an input."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    qws, scs = [], []
    for _ in range(n_layers):
        qw, sc = rtn_quantize((torch.randn(k, k, generator=gen) / k**0.5).to(device), group)
        qws.append(qw)
        scs.append(sc)
    return torch.randn(k, generator=gen).to(device), torch.stack(qws), torch.stack(scs)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def probe(n_layers: int, k: int, group: int, configs, cuda: bool, repeats: int) -> dict:
    device = "cuda" if cuda else "cpu"
    x, qw, sc = random_chain(n_layers, k, group, device)
    ref = chain_reference(x, qw, sc, group)
    layer_bytes = k * k // 2 + k * (k // group) * 2
    row = {"K": k, "layers": n_layers, "group": group, "layer_bytes": layer_bytes}
    xh = x.to(torch.bfloat16 if cuda else torch.float32)
    row["launches_rel_err"] = _rel_err(chain_launches(xh, qw, sc, group), ref)
    if cuda:
        row["launches_us_a_layer"] = graph_us([lambda: chain_launches(xh, qw, sc, group)], repeats) / n_layers
    row["persistent"] = []
    buffers = (torch.empty(n_layers + 1, k, dtype=torch.float32, device=device),
               torch.empty(2 * n_layers, dtype=torch.int32, device=device))
    for programs, block_n, rows in configs:
        entry = {"programs": programs, "block_n": block_n, "rows": rows}
        for name, per_launch in (("", None), ("per_layer_", 1)):  # one launch; the same kernel once a layer
            def run(p=programs, b=block_n, r=rows, per=per_launch):
                return chain_persistent(x, qw, sc, group, p, b, r, per, buffers)
            entry[name + "rel_err"] = _rel_err(run(), ref)
            if cuda:
                entry[name + "us_a_layer"] = graph_us([run], repeats) / n_layers
        row["persistent"].append(entry)
    return row


def main(argv=None) -> None:
    args, cuda = probe_args(__doc__, "persistent_probe.py", argv)
    out = {"what": __doc__.splitlines()[0], "rows": []}
    if cuda:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        out["device"] = torch.cuda.get_device_name()
        big = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")  # the copy anchor, as kernel_bench.py
        copy_us = graph_us([lambda: torch.add(big[: 2**27], 0, out=big[2**27:])], args.repeats)
        out["copy_TBps"] = 2 * 2**27 * 2 / copy_us / 1e6
        shapes = [(32, 4096, 128), (16, 8192, 128)]
        configs = [(sms * p, b, r) for p in (4, 8) for b in (128, 256) for r in (8, 16)]
    else:
        shapes, configs = [(3, 64, 32)], [(1, 32, 4), (3, 32, 8), (2, 64, 4)]
    for n_layers, k, group in shapes:
        row = probe(n_layers, k, group, configs, cuda, args.repeats)
        out["rows"].append(row)
        best = min(row["persistent"], key=lambda e: e.get("us_a_layer", e["rel_err"]))
        if cuda:
            frac = row["layer_bytes"] / 1e6 / out["copy_TBps"]
            print(f"K={k} x {n_layers} layers: production GEMV {row['launches_us_a_layer']:.2f} us a layer "
                  f"({frac / row['launches_us_a_layer']:.0%} of copy); persistent best {best['us_a_layer']:.2f} "
                  f"({frac / best['us_a_layer']:.0%}) at {best['programs']} programs x {best['block_n']} columns x "
                  f"{best['rows']} rows, the same kernel launched per layer {best['per_layer_us_a_layer']:.2f}; "
                  f"errors {row['launches_rel_err']:.1e} / {best['rel_err']:.1e}", flush=True)
            for e in row["persistent"]:
                print(f"    {e['programs']:5d} programs x {e['block_n']:3d} x {e['rows']:2d}: {e['us_a_layer']:.2f} us "
                      f"a layer in one launch, {e['per_layer_us_a_layer']:.2f} launched per layer", flush=True)
        else:
            worst = max(max(e["rel_err"], e["per_layer_rel_err"]) for e in row["persistent"])
            print(f"K={k} x {n_layers} layers: relative errors launches {row['launches_rel_err']:.1e}, persistent "
                  f"{worst:.1e} (worst of {len(row['persistent'])} configs, one launch and per layer)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
