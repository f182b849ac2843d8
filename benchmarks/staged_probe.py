"""A decode GEMV stage whose weights are staged in shared memory by TMA before its PDL wait (GPU probe, issue 5).

``docs/decode-megakernel.md`` ends with the one design the stage-latency model does not bind: a stage that streams
its weights while the stage before it still computes. Triton keeps a preloaded tile in registers (one or two tiles
before the wait, ``UNIQL_GEMV_PRELOAD``), and stop 38's whole-K register tiles held two programs an SM, too few loads
in flight. A TMA copy has no such limit: one thread queues a program's whole weight slice (64 KB for o) into shared
memory, the copy engine streams it, and the registers stay free. This probe (Gluon, sm_90) builds that stage:

* a program owns BN output columns and ALL of K (no split-K partials, no finishing round trip, no atomics): its
  codes (two TMA descriptors, the even and the odd packed rows, so one scale row serves each pair of words) and its
  scales are requested before ``griddepcontrol.wait``; they depend on no kernel;
* after the wait it releases the next launch at once (``griddepcontrol.launch_dependents``), so the next layer's
  programs queue THEIR copies while this one computes (64 KB a program leaves room for both on an SM);
* then it loads its input, runs the production GEMV's half2 PTX (``int4_gemv._dot_asm``, ``_x_bf16_asm``: the same
  products, summed in another order) over the staged words, reduces over K inside the program and stores bf16.

Chains of 32 layers (distinct weights, > 128 MB for o: L2 flatters nobody) are timed per layer in one CUDA graph
against the production GEMV a layer (PDL, ``persistent_probe.chain_launches``) in the same run, for the 512-wide
chain (all boundary: the stage latency itself), o (4096 x 4096) and q|k|v (4096 -> 6144) sizes, with and without
PDL (without it the staging cannot overlap anything: what the early start buys). Outputs are checked against the
fp32 torch reference first. Weights larger than the shared memory (down, gate|up) would need a ring of buffers:
not built until this stage pays.

    python benchmarks/staged_probe.py --json benchmarks/results/staged_probe_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from graph_timing import copy_tbps, graph_us
from persistent_probe import _rel_err, chain_launches, chain_reference, random_layers
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# the product kernel's PTX strings, griddepcontrol and TMA-load shim (kernels/int4_staged.py grew out of this probe)
from uniql.kernels.int4_staged import _ASM_DOT as ASM_DOT
from uniql.kernels.int4_staged import _ASM_X_BF16 as ASM_X
from uniql.kernels.int4_staged import _CON_DOT as CON_DOT
from uniql.kernels.int4_staged import _CON_X as CON_X
from uniql.kernels.int4_staged import _griddep, _tma_load, staged_gemv

GROUP = 128
SMEM_PER_SM = 227 * 1024


@gluon.jit
def _x_pairs(x_ptr, base):
    """The fp16 pairs of 8 consecutive bf16 activations (4 int32 from ``base`` on, one set per row of ``base``)."""
    w0 = gl.load(x_ptr + base)
    w1 = gl.load(x_ptr + base + 1)
    w2 = gl.load(x_ptr + base + 2)
    w3 = gl.load(x_ptr + base + 3)
    return gl.inline_asm_elementwise(ASM_X, CON_X, [w0, w1, w2, w3],
                                     dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)


@gluon.jit
def _staged_gemv(x_ptr, wa_desc, wb_desc, s_ptr, out_ptr, N, PAIRS: gl.constexpr, RB: gl.constexpr,
                 NBUF: gl.constexpr, BN: gl.constexpr, G16: gl.constexpr, SPT: gl.constexpr, TN: gl.constexpr,
                 WARPS: gl.constexpr, PDL: gl.constexpr, EARLY: gl.constexpr):
    """out[n0:n0+BN] = x @ W[:, n0:n0+BN]; x as int32 (bf16 pairs), W as its even / odd packed rows (PAIRS each) in
    chunks of RB, NBUF of them in shared memory at a time (NBUF = PAIRS / RB: the whole slice before the wait)."""
    CH: gl.constexpr = PAIRS // RB
    L: gl.constexpr = gl.BlockedLayout([1, SPT], [32 // TN, TN], [WARPS, 1], [1, 0])
    n0 = gl.program_id(0) * BN
    wa_s = gl.allocate_shared_memory(gl.int32, [NBUF, RB, BN], wa_desc.layout)
    wb_s = gl.allocate_shared_memory(gl.int32, [NBUF, RB, BN], wb_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(NBUF):
        mbarrier.init(bars.index(b), count=1)
    if EARLY:  # the next launch may start before this one waits (it still waits for this one to finish)
        _griddep(False)
    for b in gl.static_range(NBUF):  # queued before the wait: the weights depend on no kernel
        mbarrier.expect(bars.index(b), 2 * RB * BN * 4)
        _tma_load(wa_desc, [b * RB, n0], bars.index(b), wa_s.index(b))
        _tma_load(wb_desc, [b * RB, n0], bars.index(b), wb_s.index(b))
    rows = gl.arange(0, RB, layout=gl.SliceLayout(1, L))  # pair p: packed rows 2p (K 16p ..) and 2p + 1
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, L))
    scale = gl.load(s_ptr + gl.expand_dims(rows // G16, 1) * N + gl.expand_dims(cols, 0)).to(gl.float32)
    if PDL:
        _griddep(True)
        _griddep(False)
    acc = gl.zeros([RB, BN], gl.float32, L)
    for c in gl.static_range(CH):
        pair = c * RB + rows
        xa0, xa1, xa2, xa3 = _x_pairs(x_ptr, pair * 8)
        xb0, xb1, xb2, xb3 = _x_pairs(x_ptr, pair * 8 + 4)
        mbarrier.wait(bars.index(c % NBUF), (c // NBUF) % 2)
        dot = gl.inline_asm_elementwise(
            ASM_DOT, CON_DOT,
            [wa_s.index(c % NBUF).load(L), wb_s.index(c % NBUF).load(L), gl.expand_dims(xa0, 1),
             gl.expand_dims(xa1, 1), gl.expand_dims(xa2, 1), gl.expand_dims(xa3, 1), gl.expand_dims(xb0, 1),
             gl.expand_dims(xb1, 1), gl.expand_dims(xb2, 1), gl.expand_dims(xb3, 1)],
            dtype=gl.float32, is_pure=True, pack=1)
        acc += dot * scale
        if c + NBUF < CH:  # refill this buffer once every thread has read it
            gl.thread_barrier()
            fence_async_shared()
            mbarrier.expect(bars.index(c % NBUF), 2 * RB * BN * 4)
            _tma_load(wa_desc, [(c + NBUF) * RB, n0], bars.index(c % NBUF),
                                            wa_s.index(c % NBUF))
            _tma_load(wb_desc, [(c + NBUF) * RB, n0], bars.index(c % NBUF),
                                            wb_s.index(c % NBUF))
        if c + 1 < CH:
            scale = gl.load(s_ptr + gl.expand_dims((pair + RB) // G16, 1) * N
                            + gl.expand_dims(cols, 0)).to(gl.float32)
    for b in gl.static_range(NBUF):
        mbarrier.invalidate(bars.index(b))
    y = gl.sum(acc, axis=0) * 16.0
    gl.store(out_ptr + cols, y.to(gl.bfloat16))


def plan(k: int, n: int, bn: int, warps: int, rb: int, nbuf: int) -> dict:
    """Tile constants of one layer, or ValueError where the stage does not fit (shared memory, shapes)."""
    pairs, rb = k // 16, min(rb, k // 16)
    spt = min(8, bn)
    tn = bn // spt
    nbuf = min(nbuf, pairs // max(rb, 1))
    # a chunk is one TMA box (at most 256 rows), a power of two for the layout
    if k % 16 or n % bn or pairs % rb or rb > 256 or rb & (rb - 1) or tn > 32 or rb < (32 // tn) * warps:
        raise ValueError(f"K {k} / N {n} / BN {bn} / {warps} warps / {rb} rows a chunk do not tile")
    smem = nbuf * 2 * rb * bn * 4
    if 2 * smem > SMEM_PER_SM:
        raise ValueError(f"{smem} B a program leaves no room for the next layer's on an SM")
    return {"PAIRS": pairs, "RB": rb, "NBUF": nbuf, "BN": bn, "G16": GROUP // 16, "SPT": spt, "TN": tn,
            "WARPS": warps}


class StagedLayer:
    """One layer's descriptors and constants, built once (a graph replays the launches)."""

    def __init__(self, qw: torch.Tensor, sc: torch.Tensor, config: tuple[int, int, int, int]):
        k, n = qw.shape[0] * 8, qw.shape[1]
        self.consts, self.n, self.k, self.sc = plan(k, n, *config), n, k, sc
        box = [self.consts["RB"], config[0]]
        layout = gl.NVMMASharedLayout.get_default_for(box, gl.int32)
        even, odd = qw[0::2], qw[1::2]
        self.wa = TensorDescriptor(even, [k // 16, n], [2 * n, 1], box, layout)
        self.wb = TensorDescriptor(odd, [k // 16, n], [2 * n, 1], box, layout)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, pdl: bool, early: bool) -> torch.Tensor:
        x32 = x[: self.k].view(torch.int32)
        _staged_gemv[(self.n // self.consts["BN"],)](x32, self.wa, self.wb, self.sc, out, self.n, **self.consts,
                                                     PDL=pdl, EARLY=early, num_warps=self.consts["WARPS"],
                                                     launch_pdl=pdl)
        return out


def staged_chain(layers: list[StagedLayer], x: torch.Tensor, outs: list[torch.Tensor], pdl: bool, early: bool):
    h = x
    for layer, out in zip(layers, outs, strict=True):
        h = layer(h, out, pdl, early)
    return h


CHAINS = {"512": [(512, 512)] * 32, "o": [(4096, 4096)] * 32, "qkv": [(4096, 6144)] * 32,
          "mlp": [(4096, 14336), (14336, 4096)] * 16}
# (columns a program, warps, pair rows a chunk, chunks in shared memory at once)
CONFIGS = [(16, 4, 256, 4), (16, 8, 256, 4), (32, 4, 256, 4), (32, 8, 256, 4), (32, 16, 256, 4), (64, 8, 256, 4),
           (32, 8, 128, 2), (16, 8, 128, 3)]
MODES = [("pdl", True, False), ("pdl_early", True, True), ("no_pdl", False, False)]


def probe(name: str, shapes, repeats: int) -> dict:
    x, layers = random_layers(shapes, GROUP, "cuda")
    ref = chain_reference(layers, x, GROUP)
    xh = x.to(torch.bfloat16)
    row = {"chain": name, "shapes": shapes[0], "layers": len(shapes),
           "bytes_a_layer": sum(qw.numel() * 4 + sc.numel() * 2 for qw, sc in layers) / len(layers),
           "production_rel_err": _rel_err(chain_launches(layers, xh, GROUP), ref),
           "production_us_a_layer": graph_us([lambda: chain_launches(layers, xh, GROUP)], repeats) / len(layers),
           "staged": []}
    for config in CONFIGS:
        entry = dict(zip(("block_n", "warps", "chunk_rows", "buffers"), config, strict=True))
        try:
            staged = [StagedLayer(qw, sc, config) for qw, sc in layers]
        except ValueError as exc:
            row["staged"].append({**entry, "skipped": str(exc)})
            continue
        outs = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _, n in shapes]
        for mode, pdl, early in MODES:
            try:
                got = staged_chain(staged, xh, outs, pdl, early).clone()
                entry[mode + "_rel_err"] = _rel_err(got, ref)
                entry[mode + "_us_a_layer"] = graph_us(
                    [lambda s=staged, o=outs, p=pdl, e=early: staged_chain(s, xh, o, p, e)], repeats) / len(layers)
            except Exception as exc:  # a config the compiler or the launch refuses is recorded, not fatal
                entry[mode + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["staged"].append(entry)
        print(name, entry, flush=True)
    row["module"] = module_row(layers, xh, ref, repeats)
    print(name, "kernels/int4_staged.py:", row["module"], flush=True)
    return row


def module_row(layers, xh: torch.Tensor, ref: torch.Tensor, repeats: int) -> dict:
    """The same chain through ``kernels/int4_staged.staged_gemv`` (its default config: K / N masks, <= 128
    registers), or why it does not serve."""
    def chain():
        h = xh[None, :]
        for qw, sc in layers:
            h = staged_gemv(h, qw, sc, GROUP, k=qw.shape[0] * 8)
        return h[0]

    try:
        return {"rel_err": _rel_err(chain(), ref), "us_a_layer": graph_us([chain], repeats) / len(layers)}
    except (ValueError, RuntimeError) as exc:
        return {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--chains", nargs="*", default=list(CHAINS))
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("staged_probe needs an sm_90+ GPU (TMA, PDL)")
    rows, copy = [], copy_tbps(args.repeats)
    print(f"copy {copy:.2f} TB/s", flush=True)
    for name in args.chains:
        rows.append(probe(name, CHAINS[name], args.repeats))
        r = rows[-1]
        print(f"{name}: production {r['production_us_a_layer']:.2f} us a layer (rel err "
              f"{r['production_rel_err']:.2e}), {r['bytes_a_layer'] / 1e6:.2f} MB a layer", flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "group": GROUP, "copy_TBps": copy,
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
