"""The decode GEMV's K loop in machine code, without a GPU: instructions, loads, barriers and registers per config.

Compiles ``_gemv_h2_kernel`` (this tree's, or a variant file's) ahead of time for an sm target with the run-time
specialisation the launcher gets (16-byte aligned pointers, strides and segment starts / lengths: every rung keeps
them multiples of 16), disassembles it with the cuobjdump of the triton wheel and reports the longest loop (the
K-tile loop). A static proxy only: an A/B decides (``gemv_ab.py``); the barrier-free scale layout had fewer
instructions in every config here and still measured slower on the H100 (``results/gemv_ab_h100.json``).

    python benchmarks/sass_gemv.py                                  # the default configs, sm_90, a table
    python benchmarks/sass_gemv.py --kernel-file ../.ab/gemv_variants/prefetch_regs.py --arch 87 --json
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TYPES = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
         "ss_out_ptr": "*fp32", "ss_in_ptr": "*fp32", "inv_k": "fp32", "eps": "fp32", "conv_tab": "*i64",
         "cw0": "*bf16", "cw1": "*bf16", "cw2": "*bf16", "cb0": "*bf16", "cb1": "*bf16", "cb2": "*bf16",
         "conv_out": "*bf16"}
ALIGNED_INTS = ("K", "stride_xm", "stride_qw", "stride_sc", "stride_om", "s0", "s1", "s2", "s3", "s4", "l0", "l1",
                "l2", "l3", "l4")
BASE = dict(GROUP=64, NUM_SEG=1, SPLIT=True, HAS_BIAS=False, ALIGNED=True, SUM_STEP=4, SUB_R=4, GLU=False, RES=False,
            NORM=False, PARTS_P=32, X_BF16=True, ASM=True, PDL=False, EARLY=False, PIPE=False,
            CONV=False, CONV_W=2, CONV_ACT=0, CONV_BIAS=False, CONV_DTYPE=None)
CONFIGS = {  # name -> (constexprs over BASE, num_warps): the paths the decode step takes
    "m1_n128": (dict(BLOCK_M=1, BLOCK_N=128), 4),
    "m1_n256": (dict(BLOCK_M=1, BLOCK_N=256), 4),
    "m1_n256_glu_norm": (dict(BLOCK_M=1, BLOCK_N=256, NUM_SEG=2, GLU=True, NORM=True), 4),
    "m1_n128_qkv_norm": (dict(BLOCK_M=1, BLOCK_N=128, NUM_SEG=3, NORM=True), 4),
    "m1_n128_glu_norm": (dict(BLOCK_M=1, BLOCK_N=128, NUM_SEG=2, GLU=True, NORM=True), 4),  # gate|up, WIDE_COLS=128
    "m1_n256_glu_paired_norm": (dict(BLOCK_M=1, BLOCK_N=256, NUM_SEG=2, GLU=2, NORM=True), 4),  # UNIQL_GLU_PAIRED=1
    "m1_n128_glu_paired_norm": (dict(BLOCK_M=1, BLOCK_N=128, NUM_SEG=2, GLU=2, NORM=True), 4),  # the same, 128 wide
    "m4_n128_residual": (dict(BLOCK_M=4, BLOCK_N=128, RES=True, X_BF16=False), 4),
    "m4_n128": (dict(BLOCK_M=4, BLOCK_N=128), 4),  # batch 4 (bf16 activations, as the engine's)
    "m4_n256": (dict(BLOCK_M=4, BLOCK_N=256), 4),
    "m4_n256_w8": (dict(BLOCK_M=4, BLOCK_N=256), 8),
    "m4_n512": (dict(BLOCK_M=4, BLOCK_N=512), 4),
    "m1_n128_residual": (dict(BLOCK_M=1, BLOCK_N=128, RES=True), 4),  # Mamba2's out_proj: the group norm's anchor
    "m1_n256_head": (dict(BLOCK_M=1, BLOCK_N=256, SUB_R=2, GROUP=128, PRELOAD=0), 4),  # the vocab heads (32-K tiles)
    "m1_n256_g32": (dict(BLOCK_M=1, BLOCK_N=256, SUB_R=2, GROUP=32), 4),  # a g32 checkpoint (32-K tiles, preload)
    "m1_n256_conv": (dict(BLOCK_M=1, BLOCK_N=256, NUM_SEG=5, NORM=True, CONV=True, CONV_W=4, CONV_ACT=1, CONV_BIAS=True,
                          CONV_DTYPE="bfloat16"), 4),  # Mamba2's in_proj with the conv epilogue (UNIQL_SSM_CONV_FOLD)
    "m1_n256_in_proj": (dict(BLOCK_M=1, BLOCK_N=256, NUM_SEG=5, NORM=True), 4),  # its anchor
    "m1_n128_conv": (dict(BLOCK_M=1, BLOCK_N=128, NUM_SEG=5, NORM=True, CONV=True, CONV_W=4, CONV_ACT=1, CONV_BIAS=True,
                          CONV_DTYPE="bfloat16", SUM_STEP=16), 4),  # the same at rate 0.35 with UNIQL_WIDE_COLS=auto
}
SHARED = re.compile(r"\b(BAR|STS|LDS|LDSM)\b")


def compiled_gemv_registers() -> list[dict]:
    """Registers, spills and shared memory of each ``_gemv_h2_kernel`` variant this process has compiled so far
    (they set how many programs an SM holds, i.e. what one wave is). Best effort: Triton's cache layout differs
    between versions."""
    from uniql.kernels import int4_gemv

    rows = []
    try:
        for cache in int4_gemv._gemv_h2_kernel.device_caches.values():
            for key, kernel in cache[0].items():
                rows.append({"key": str(key), "n_regs": kernel.n_regs, "n_spills": kernel.n_spills,
                             "shared": kernel.metadata.shared, "num_warps": kernel.metadata.num_warps})
    except (AttributeError, TypeError, IndexError) as exc:
        rows.append({"error": f"{type(exc).__name__}: {exc}"})
    return rows


def load_variant(path: Path):
    """A variant ``int4_gemv.py`` as ``uniql.kernels.<stem>_variant`` (its relative imports resolve inside the
    package; the tree's own module stays as it is)."""
    name = f"uniql.kernels.{path.stem}_variant"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def kernel_from(path: Path | None):
    if path is None:
        from uniql.kernels import int4_gemv
        return int4_gemv._gemv_h2_kernel
    return load_variant(path)._gemv_h2_kernel


def compile_cubin(kernel, consts: dict, warps: int, arch: int, stages: int = 2) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    consts["CONV_DTYPE"] = getattr(triton.language, consts.get("CONV_DTYPE") or "float32")  # a dtype by name
    sig = {a: "constexpr" if a in consts else TYPES.get(a, "*bf16" if a.endswith("_ptr") else "i32")
           for a in kernel.arg_names}
    aligned = [a for a in kernel.arg_names if a not in consts and (a.endswith("_ptr") or a in ALIGNED_INTS)]
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["cubin"]


def loops(sass: str) -> list[list[str]]:
    """Instruction lists of every backward branch's body (address-ordered SASS)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.MULTILINE)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    bodies = []
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            bodies.append([t for _, t in ins[index[int(target.group(1), 16)]:i + 1]])
    return bodies


def opcode(instr: str) -> str:
    words = instr.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def k_loop_stats(sass: str) -> dict:
    body = max(loops(sass), key=len)  # the tile loop; the split-K fixup loop is the short one
    ops = collections.Counter(opcode(t) for t in body)
    loads = collections.Counter(t.split()[1] if t.startswith("@") else t.split()[0] for t in body if "LDG" in t)
    return {"instructions": len(body), "hfma2": ops["HFMA2"], "ldg": dict(loads),
            "shared_or_barrier": sum(bool(SHARED.search(t)) for t in body)}


def config_constexprs(name: str) -> dict:
    """Every constexpr of config ``name``: BASE, the preload and pipelining as the launcher passes them
    (``UNIQL_GEMV_PRELOAD`` / ``UNIQL_GEMV_PIPE``, else their defaults), then the config's own."""
    from uniql.kernels.pdl import gemv_pipe, gemv_preload

    consts = CONFIGS[name][0]
    return {**BASE, "PRELOAD": gemv_preload(), "PIPE": gemv_pipe(consts["BLOCK_M"]), **consts}


def analyse(kernel, arch: int, names) -> list[dict]:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"{name}.cubin"
            path.write_bytes(compile_cubin(kernel, config_constexprs(name), CONFIGS[name][1], arch))
            sass, usage = (subprocess.run([str(cuobjdump), flag, str(path)], capture_output=True, text=True,
                                          check=True).stdout for flag in ("-sass", "-res-usage"))
            regs = int(re.search(r"REG:(\d+)", usage).group(1))
            rows.append({"config": name, "arch": arch, "registers": regs, **k_loop_stats(sass)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel-file", type=Path, help="a variant int4_gemv.py (default: this tree's)")
    ap.add_argument("--arch", type=int, default=90, help="sm target: 90 H100/H200, 87 Jetson Orin, 86 A6000")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout instead of the table")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = analyse(kernel_from(args.kernel_file), args.arch, args.configs)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"| config | sm | registers | K-loop instructions | HFMA2 | loads | shared/barrier |\n|{'---|' * 7}")
    for r in rows:
        loads = ", ".join(f"{k} x{v}" for k, v in sorted(r["ldg"].items()))
        print(f"| {r['config']} | {r['arch']} | {r['registers']} | {r['instructions']} | {r['hfma2']} | {loads} | "
              f"{r['shared_or_barrier']} |")


if __name__ == "__main__":
    main()
