"""Probe (GPU): can a side branch of the decode graph hide the small GEMVs' DRAM latency by pulling their weights
into L2 while latency-bound kernels run on the main stream?

A Llama-3.1-8B-shaped layer at batch 1 is replayed as one CUDA graph over 8 distinct layers (~930 MB of INT4
weights, far past the 60 MB L2): rms-norm proxy, q|k|v GEMV, an attention proxy (four small dependent launches),
o GEMV, norm proxy, gate|up GEMV, SiLU-mul proxy, down GEMV. Variants fork a side stream inside the graph:

* ``o``: prefetch o_proj's packed weights + scales at the layer's start (joined before the o GEMV);
* ``o+qkv``: also prefetch the NEXT layer's q|k|v weights after gate|up (joined before that GEMV);

each with ``prefetch.global.L2`` (fire and forget) or ``.cg`` loads XOR-ed into a sink, on 32 or 132 programs.
Also: the o GEMV alone from DRAM vs from L2 (the same weights twice in a row). Median microseconds per layer.

    python benchmarks/l2_prefetch_probe.py --json benchmarks/results/l2_prefetch_probe_h200.json

H200 result (``results/l2_prefetch_probe_h200.json``): no. Serial 62.0 us per layer, every prefetch variant
66.4-67.8 us (the side kernels cost more than they hide), and the o GEMV reading its weights from L2 still takes
5.54 us against 6.79 from DRAM: most of the small GEMVs' floor is the kernel's own chain (launch, loads, the
split-K fixup), not DRAM latency.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from graph_timing import graph_us

from uniql.kernels import int4_matmul as im

HIDDEN, Q_KV, MLP, GROUP, LAYERS = 4096, 6144, 14336, 64, 8
_PREFETCH = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }")


@triton.jit
def _prefetch_kernel(ptr, n_lines, per_program, LOADS: tl.constexpr, BLOCK: tl.constexpr, sink_ptr):
    """Touch ``per_program`` 128-byte lines from this program's start (int32 view)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * per_program, pid * per_program + per_program, BLOCK):
        line = start + tl.arange(0, BLOCK)
        live = line < n_lines
        ptrs = ptr + line.to(tl.int64) * 32
        if LOADS:
            acc ^= tl.load(ptrs, mask=live, other=0, cache_modifier=".cg")
        else:
            acc ^= tl.inline_asm_elementwise(_PREFETCH, "=r,l,r", [ptrs, live.to(tl.int32)], dtype=tl.int32,
                                             is_pure=False, pack=1)
    if LOADS:
        tl.atomic_xor(sink_ptr + pid % 64, tl.xor_sum(acc, axis=0))


def prefetch(tensors, programs: int, loads: bool, sink) -> None:
    for t in tensors:
        n_lines = t.numel() * t.element_size() // 128
        per = triton.cdiv(triton.cdiv(n_lines, programs), 256) * 256
        _prefetch_kernel[(triton.cdiv(n_lines, per),)](t.view(torch.int32), n_lines, per, LOADS=loads, BLOCK=256,
                                                       sink_ptr=sink, num_warps=4)


def packed(k: int, n: int, dev):
    return (torch.randint(-(2**31), 2**31, (k // 8, n), dtype=torch.int32, device=dev),
            (torch.rand(k // GROUP, n, device=dev) * 1e-2 + 5e-3).half())


class Layers:
    def __init__(self, dev):
        self.w = [{"qkv": packed(HIDDEN, Q_KV, dev), "o": packed(HIDDEN, HIDDEN, dev),
                   "gate_up": packed(HIDDEN, 2 * MLP, dev), "down": packed(MLP, HIDDEN, dev)} for _ in range(LAYERS)]
        self.x = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
        self.x_mlp = torch.randn(1, MLP, device=dev, dtype=torch.bfloat16)
        self.side = torch.cuda.Stream()
        self.small = torch.randn(HIDDEN, device=dev)
        self.sink = torch.zeros(64, dtype=torch.int32, device=dev)

    def small_op(self, times: int = 1) -> None:
        for _ in range(times):
            self.small.mul_(1.0001)

    def gemv(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        return im.int4_matmul(x, *self.w[layer][name], GROUP)

    def run(self, variant: str, programs: int, loads: bool) -> None:
        main = torch.cuda.current_stream()
        side = self.side
        for layer in range(LAYERS):
            if variant != "serial":
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(self.w[layer]["o"], programs, loads, self.sink)
            self.small_op()  # norm
            self.gemv(layer, "qkv", self.x)
            self.small_op(4)  # rope + attention proxies
            if variant != "serial":
                main.wait_stream(side)
            self.gemv(layer, "o", self.x)
            self.small_op()  # add + norm
            self.gemv(layer, "gate_up", self.x)
            if variant == "o+qkv" and layer + 1 < LAYERS:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(self.w[layer + 1]["qkv"], programs, loads, self.sink)
            self.small_op(2)  # silu * up
            self.gemv(layer, "down", self.x_mlp)
            if variant == "o+qkv" and layer + 1 < LAYERS:
                main.wait_stream(side)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    im.reserve_workspace(dev)
    layers = Layers(dev)
    rows = {"serial": graph_us([lambda: layers.run("serial", 0, False)], per=LAYERS)}
    for variant in ("o", "o+qkv"):
        for programs in (32, 132):
            for loads in (False, True):
                key = f"{variant}_{'ld' if loads else 'pf'}_{programs}"
                rows[key] = graph_us([lambda v=variant, p=programs, ld=loads: layers.run(v, p, ld)], per=LAYERS)
    o_dram = graph_us([lambda: [layers.gemv(i, "o", layers.x) for i in range(LAYERS)]], per=LAYERS)
    o_l2 = graph_us([lambda: [layers.gemv(i // 2, "o", layers.x) for i in range(2 * LAYERS)]], per=2 * LAYERS)
    rows.update({"o_gemv_dram_us": o_dram, "o_gemv_l2_us": 2 * o_l2 - o_dram})  # pairs: one DRAM + one L2 read
    for name, us in rows.items():
        print(f"{name:28s} {us:8.2f} us per layer" if "gemv" not in name else f"{name:28s} {us:8.2f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "per_layer_us": rows}, f, indent=1)


if __name__ == "__main__":
    main()
