"""Compile the TMA-staged GEMV (``kernels/int4_staged.py``) for sm_90 ahead of time (no GPU needed) and report its
registers, shared memory, TMA loads, spills and packed-fp16 dot count from the triton wheel's cuobjdump.

    python benchmarks/sass_staged.py --k 4096 2688 512 --dtype bf16 --json
Run without TRITON_INTERPRET (an interpreted helper cannot be compiled into a Gluon kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from uniql.kernels import int4_staged as staged

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


VARIANTS = {"plain": {}, "res": {"RES": True}, "norm": {"NORM": True, "PARTS_P": 128}}  # o / down, q|k|v


def compile_asm(config: staged.StagedConfig, k: int, dtype: str, variant: str = "plain", group: int = 128,
                  arch: int = 90) -> dict:
    """PTX and cubin of the kernel as the launcher specialises it (PDL on; ``variant``: the epilogue / prologue),
    compiled for ``arch``."""
    consts = staged.staged_constexprs(config, k, group)
    layout = gl.NVMMASharedLayout.get_default_for([consts["RB"], consts["BN"]], gl.int32)
    desc = f"tensordesc<i32[{consts['RB']}, {consts['BN']}],{layout!r}>"
    fn = staged._staged_gemv_kernel
    names = list(fn.arg_names)
    runtime = ["*i32", desc, desc, "*fp16", f"*{dtype}", "i32", "i32", "i32", f"*{dtype}", f"*{dtype}", f"*{dtype}",
               "*fp32", "*fp32", "i32", "fp32", "fp32"]
    values = {**consts, "F16": dtype == "fp16", "PDL": True, "RES": False, "NORM": False, "PARTS_P": 1,
              **VARIANTS[variant]}
    sig = dict(zip(names, runtime + ["constexpr"] * (len(names) - len(runtime)), strict=True))
    src = GluonASTSource(fn, sig, constexprs={(names.index(name),): v for name, v in values.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in (0, 3, 4)})
    options = {"num_warps": consts["WARPS"], "maxnreg": staged.MAX_REGISTERS}  # as the launcher
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm


def analyse(config: staged.StagedConfig, k: int, dtype: str, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        asm = compile_asm(config, k, dtype, variant)
        path.write_bytes(asm["cubin"])
        usage, sass = (subprocess.run([str(CUOBJDUMP), flag, str(path)], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    return {"k": k, "dtype": dtype, "variant": variant, "config": dataclasses.asdict(config),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "tma_loads": len(re.findall(r"\bUTMALDG\b", sass)), "local_memory": bool(re.search(r"\b(LDL|STL)\b", sass)),
            "hfma2": len(re.findall(r"\bHFMA2\b", sass)), "staged_bytes": staged.staged_smem_bytes(config, k),
            **wait_order(asm["ptx"])}


def wait_order(ptx: str) -> dict:
    """What the PTX issues before ``griddepcontrol.wait``: TMA copies and global loads (weights, scales, a
    residual: none depends on the previous kernel), and the loads after it."""
    before, _, after = ptx.partition("griddepcontrol.wait")
    return {"tma_before_wait": before.count("cp.async.bulk.tensor"),
            "loads_before_wait": len(re.findall(r"\bld\.global", before)),
            "loads_after_wait": len(re.findall(r"\bld\.global", after))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4096, 2688, 512])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout instead of lines")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted helpers cannot be compiled")
    # the configs staged_config picks on an sm_90 device (its decision is host-side arithmetic)
    torch.cuda.get_device_capability = lambda *a, **kw: (9, 0)
    rows = [analyse(staged.staged_config(1, args.n, k, 128, torch.device("cuda", 0)), k, args.dtype, variant)
            for k in args.k for variant in args.variants]
    print(json.dumps(rows) if args.json else "\n".join(map(str, rows)))


if __name__ == "__main__":
    main()
