"""W4A16 Triton kernels (`uniql.kernels.int4_matmul`) vs cuBLAS bf16 and torch's int4 tinygemm, 8B-class shapes.

Decode (batch 1/4/16, rates 0-0.35) on Llama-3.1-8B / Qwen2.5-7B linears, prefill (M=2048). Random weights rotated
(> 128 MiB, so L2 flatters nobody) in one CUDA graph; time = median replay / launches; bandwidth also as a fraction of
a copy in the same run; the UNIQL_* switches set are recorded; our output is checked against a reference first.

    python benchmarks/kernel_bench.py                       # H100: table on stdout, JSON in results/kernels_h100.json
    python benchmarks/kernel_bench.py --quick --sweep       # fewer cases; time every candidate config too
    python benchmarks/kernel_bench.py --cpu-smoke           # tiny shapes, Triton interpreter, no CUDA: code paths only
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from uniql.kernels.int4_format import PACK, dequantize, packed_bytes
from uniql.kernels.switches import check_switches, set_switches
from uniql.runtime.ladder import Alignment, dim_steps, kept_size

RESULTS = Path(__file__).parent / "results" / "kernels_h100.json"
ROTATE_BYTES = 128 * 2**20  # 2.5x the H100's 50 MB L2: a weight is never still cached when it is read again
COPY_BYTES = 2**30
TINY_K_TILES = 8  # tinygemm's inner_k_tiles: K must be a multiple of 8 * 16
LAYERS = ("qkv", "o", "gate_up", "down", "lm_head")
NOTES = [
    "copy_TBps = 2 * bytes / time of a copy kernel (torch.add(src, 0, out=dst), bf16) on 1 GiB (read + write); "
    "copy_engine_TBps the same for dst.copy_(src), a DMA memcpy node inside a graph (slower; not the bound); "
    "ours_TBps counts packed active weights + scales + activations + output, so frac_of_copy compares like with like",
    "timing: one CUDA graph runs the op once per rotated weight copy (> 128 MiB touched); median replay / launches",
    "cublas_bf16_us: F.linear in bf16 on the ACTIVE shape [n_active, k_active]; tinygemm_int4_full_us: "
    "aten._weight_int4pack_mm (bf16, inner_k_tiles 8) on the FULL shape at every rate (or null + tinygemm_error)",
    "lm_head is never pruned: rate 0 rows only. Fused qkv/gate_up pass `segments` only where pruning leaves gaps",
    "our output is checked (max abs error <= 2e-2 * max abs ref) on the first buffer before every timing",
]


ModelShape = namedtuple("ModelShape", "hidden heads kv_heads head_dim mlp vocab")
MODELS = {
    "llama-3.1-8b": ModelShape(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, vocab=128256),
    "qwen2.5-7b": ModelShape(hidden=3584, heads=28, kv_heads=4, head_dim=128, mlp=18944, vocab=152064),
    "tiny": ModelShape(hidden=128, heads=4, kv_heads=2, head_dim=32, mlp=256, vocab=64),  # --cpu-smoke
}


@dataclass(frozen=True)
class Case:
    """One linear at one rate: the stored (full) weight and the active part the kernel reads."""
    model: str
    layer: str
    rate: float
    n_full: int
    k_full: int
    k_active: int
    segments: tuple[tuple[int, int], ...]  # (first column, active columns) per fused part

    @property
    def n_active(self) -> int:
        return sum(n for _, n in self.segments)

    def kernel_kwargs(self) -> dict:
        """What a runtime would pass: one plain `n` prefix when nothing is cut between fused parts."""
        pairs = zip(self.segments, self.segments[1:], strict=False)
        if self.segments[0][0] == 0 and all(start + n == following for (start, n), (following, _) in pairs):
            return {"n": self.n_active, "k": self.k_active}
        return {"segments": [list(seg) for seg in self.segments], "k": self.k_active}

    def fields(self) -> dict:
        return {"model": self.model, "layer": self.layer, "rate": self.rate, "N": self.n_full, "K": self.k_full,
                "n_active": self.n_active, "k_active": self.k_active}


def build_case(model: str, layer: str, rate: float, group_size: int) -> Case:
    """Active sizes from the project's one rounding rule (runtime/ladder.py), as a uniform ladder would keep."""
    s = MODELS[model]
    steps = dim_steps(s.heads, s.kv_heads, s.head_dim, Alignment(group_size=group_size))
    keep = 1.0 - rate
    mlp, qk, vo = (kept_size(s.mlp, keep, steps.mlp), kept_size(s.head_dim, keep, steps.qk),
                   kept_size(s.head_dim, keep, steps.vo))
    q_full, kv_full = s.heads * s.head_dim, s.kv_heads * s.head_dim
    case = partial(Case, model, layer, rate)
    if layer == "qkv":
        segments = ((0, s.heads * qk), (q_full, s.kv_heads * qk), (q_full + kv_full, s.kv_heads * vo))
        return case(q_full + 2 * kv_full, s.hidden, s.hidden, segments)
    if layer == "o":
        return case(s.hidden, q_full, s.heads * vo, ((0, s.hidden),))
    if layer == "gate_up":
        return case(2 * s.mlp, s.hidden, s.hidden, ((0, mlp), (s.mlp, mlp)))
    if layer == "down":
        return case(s.hidden, s.mlp, mlp, ((0, s.hidden),))
    if rate != 0.0:
        raise ValueError("lm_head is never pruned")
    return case(s.vocab, s.hidden, s.hidden, ((0, s.vocab),))


class Timer:
    """Median microseconds per launch of a list of launches (one per rotated buffer)."""

    def __init__(self, cuda: bool, repeats: int):
        self.cuda, self.repeats, self.notes = cuda, repeats, []

    def per_launch_us(self, fns) -> float:
        def run_all():
            for fn in fns:
                fn()

        if not self.cuda:
            return self._median_us(run_all, len(fns))
        warm = torch.cuda.Stream()  # warm up off the capture stream: Triton compiles, cuBLAS picks its algorithm
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            run_all()
        torch.cuda.current_stream().wait_stream(warm)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_all()
        except RuntimeError as exc:  # keep the number, but say it carries launch overhead
            note = f"graph capture failed, timed eagerly (launch overhead included): {str(exc)[:200]}"
            self.notes += [] if note in self.notes else [note]
            return self._median_us(run_all, len(fns))
        return self._median_us(graph.replay, len(fns))

    def _median_us(self, run, launches: int) -> float:
        run()
        return statistics.median(self._once_ms(run) * 1e3 / launches for _ in range(self.repeats))

    def _once_ms(self, run) -> float:
        if not self.cuda:
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


@dataclass
class Bench:
    kernel: object  # the uniql.kernels.int4_matmul module, imported once the interpreter flag is set
    device: torch.device
    dtype: torch.dtype
    group_size: int
    timer: Timer
    rotate_bytes: int
    sweep: list | None  # per-config timings when --sweep


def copies_for(nbytes: int, rotate_bytes: int) -> int:
    return max(2, math.ceil(rotate_bytes / max(nbytes, 1)))


def int4_buffers(bench: Bench, case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full-size random packed weights (the kernel reads views of them); copies sized by the ACTIVE bytes."""
    touched = packed_bytes(case.k_active, case.n_active, bench.group_size)
    shape = (case.k_full // PACK, case.n_full)
    groups = math.ceil(case.k_full / bench.group_size)
    return [(torch.randint(-(2**31), 2**31, shape, dtype=torch.int32, device=bench.device),
             (torch.rand(groups, case.n_full, device=bench.device) * 1e-2 + 5e-3).half())
            for _ in range(copies_for(touched, bench.rotate_bytes))]


def check_output(out: torch.Tensor, x: torch.Tensor, qweight, scales, case: Case, group_size: int) -> None:
    """A wrong kernel must not report a speed: max |out - ref| <= 2e-2 * max |ref|."""
    parts = [dequantize(qweight[:, s:s + n], scales[:, s:s + n], group_size, case.k_active, n)
             for s, n in case.segments]
    ref = x.float() @ torch.cat(parts, dim=1)
    err = (out.float() - ref).abs().max().item() if out.shape == ref.shape else math.inf
    bound = 2e-2 * ref.abs().max().item()
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{case} M={x.shape[0]}: max abs error {err:.4g} > {bound:.4g} (out {tuple(out.shape)})")


def time_ours(bench: Bench, case: Case, bufs, x: torch.Tensor, config=None) -> float:
    from uniql.kernels.pdl import head_gemv_preload  # not at the top: --cpu-smoke sets the interpreter first
    fns = [partial(bench.kernel.int4_matmul, x, qw, sc, bench.group_size, config=config, **case.kernel_kwargs())
           for qw, sc in bufs]
    with head_gemv_preload() if case.layer == "lm_head" else nullcontext():  # the head's preload, as the decoder's
        check_output(fns[0](), x, *bufs[0], case, bench.group_size)
        return bench.timer.per_launch_us(fns)


def time_cublas(bench: Bench, case: Case, x: torch.Tensor) -> float:
    """bf16 F.linear on the ACTIVE shape (what a pruned bf16 model would run), contiguous weights."""
    nbytes = case.n_active * case.k_active * 2
    weights = [torch.randn(case.n_active, case.k_active, dtype=torch.bfloat16, device=bench.device)
               for _ in range(copies_for(nbytes, bench.rotate_bytes))]
    xb = x.to(torch.bfloat16)
    return bench.timer.per_launch_us([partial(F.linear, xb, w) for w in weights])


def pack_tinygemm(n: int, k: int, device: torch.device) -> torch.Tensor:
    convert = torch.ops.aten._convert_weight_to_int4pack
    try:  # torch >= 2.5: two codes per uint8, [N, K/2]
        return convert(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device), TINY_K_TILES)
    except (RuntimeError, TypeError):  # older torch: one code per int32, [N, K]
        return convert(torch.randint(0, 16, (n, k), dtype=torch.int32, device=device), TINY_K_TILES)


def time_tinygemm(bench: Bench, case: Case, batches) -> tuple[dict, str | None]:
    """torch's int4 `_weight_int4pack_mm` on the FULL shape (it cannot read pruned prefixes), bf16 activations."""
    n, k, g = case.n_full, case.k_full, bench.group_size
    try:
        packed = pack_tinygemm(n, k, bench.device)
        scales_zeros = (torch.rand(k // g, n, 2, device=bench.device) * 1e-2).to(torch.bfloat16)
        copies = copies_for(n * k // 2 + scales_zeros.numel() * 2, bench.rotate_bytes)
        bufs = [(packed, scales_zeros)] + [(packed.clone(), scales_zeros.clone()) for _ in range(copies - 1)]
        times = {}
        for batch in batches:
            x = torch.randn(batch, k, dtype=torch.bfloat16, device=bench.device)
            fns = [partial(torch.ops.aten._weight_int4pack_mm, x, p, g, sz) for p, sz in bufs]
            times[batch] = bench.timer.per_launch_us(fns)
        return times, None
    except Exception as exc:  # a baseline that is missing must not stop the run: record why
        return {}, f"{type(exc).__name__}: {str(exc)[:300]}"


def describe(config) -> object:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)


def default_config(bench: Bench, case: Case, m: int) -> object:
    try:
        return describe(bench.kernel.pick_config(m, case.n_active, case.k_active, bench.group_size, bench.device))
    except Exception as exc:  # metadata only: an API mismatch here should not cost the timings
        return f"pick_config failed: {type(exc).__name__}: {exc}"


def sweep_configs(bench: Bench, case: Case, bufs, x: torch.Tensor, default: dict) -> None:
    """Every candidate config on the same buffers; wrong or failing configs are recorded, not fatal."""
    candidates = bench.kernel.candidate_configs
    # the device decides split-K targets (SM count); pass it where the signature takes it (CPU smoke needs it)
    extra = {"device": bench.device} if "device" in inspect.signature(candidates).parameters else {}
    configs = []
    for config in candidates(x.shape[0], case.n_active, case.k_active, bench.group_size, **extra):
        try:
            configs.append({"config": describe(config), "us": time_ours(bench, case, bufs, x, config)})
        except Exception as exc:
            configs.append({"config": describe(config), "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    best = min((c for c in configs if "us" in c), key=lambda c: c["us"], default=None)
    bench.sweep.append({**default, "configs": configs, "best": best})


def measure(bench: Bench, case: Case, m: int, sweep: bool) -> dict:
    """Ours (checked, then timed) and cuBLAS bf16 on one case; buffers live only for this call."""
    bufs = int4_buffers(bench, case)
    x = torch.randn(m, case.k_active, dtype=bench.dtype, device=bench.device)
    result = {**case.fields(), "M": m, "ours_us": time_ours(bench, case, bufs, x),
              "cublas_bf16_us": time_cublas(bench, case, x), "config": default_config(bench, case, m)}
    if sweep and bench.sweep is not None and hasattr(bench.kernel, "candidate_configs"):
        sweep_configs(bench, case, bufs, x, result)
    print(f"{case.model} {case.layer} rate {case.rate} M {m}: ours {result['ours_us']:.1f} us, "
          f"cuBLAS {result['cublas_bf16_us']:.1f} us", file=sys.stderr, flush=True)  # progress; tables at the end
    return result


def decode_rows(bench: Bench, model: str, layer: str, rates, batches, copy_tbps, sweep_batches=(1,), sweep_rates=(0,)):
    tiny_us, tiny_error = time_tinygemm(bench, build_case(model, layer, 0.0, bench.group_size), batches)
    elt = torch.finfo(bench.dtype).bits // 8
    rows = []
    for rate in rates if layer != "lm_head" else [0.0]:
        case = build_case(model, layer, rate, bench.group_size)
        for batch in batches:
            row = measure(bench, case, batch, sweep=rate in sweep_rates and batch in sweep_batches)
            row["batch"] = row.pop("M")
            row["bytes"] = packed_bytes(case.k_active, case.n_active, bench.group_size) + batch * elt * (
                case.k_active + case.n_active)
            row["ours_TBps"] = row["bytes"] / (row["ours_us"] * 1e-6) / 1e12
            row["frac_of_copy"] = row["ours_TBps"] / copy_tbps
            row["tinygemm_int4_full_us"] = tiny_us.get(batch)
            row["segments"] = case.kernel_kwargs().get("segments")
            if tiny_error:
                row["tinygemm_error"] = tiny_error
            rows.append(row)
    return rows


def prefill_row(bench: Bench, model: str, layer: str, rate: float, m: int) -> dict:
    row = measure(bench, build_case(model, layer, rate, bench.group_size), m, sweep=True)
    return {**row, "ratio": row["ours_us"] / row["cublas_bf16_us"]}


def rate_ratios(rows: list[dict], high: float) -> list[dict]:
    """Time at the highest rate over time at rate 0, per (model, layer, batch), next to the bytes ratio."""
    top = {(r["model"], r["layer"], r["batch"]): r for r in rows if r["rate"] == high}
    name = "ratio_035_over_0" if high == 0.35 else "ratio_over_0"  # the name for the usual top rate
    return [{"model": r["model"], "layer": r["layer"], "batch": r["batch"], "rate": high,
             name: p["ours_us"] / r["ours_us"], "bytes_ratio": p["bytes"] / r["bytes"],
             "cublas_ratio": p["cublas_bf16_us"] / r["cublas_bf16_us"]}
            for r in rows if r["rate"] == 0.0 and high > 0.0 and (p := top.get((r["model"], r["layer"], r["batch"])))]


def copy_bandwidth(bench: Bench, nbytes: int, engine: bool = False) -> float:
    """TB/s (2 * bytes: read + write) of a copy kernel, or (``engine``) of ``dst.copy_(src)``, which a graph runs
    on the DMA engines: 2.69 TB/s on an H200 vs 4.19 (gemv_floor.py); results before 2026-12-04 divided by it."""
    src = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device=bench.device)
    dst = torch.empty_like(src)
    copy = partial(dst.copy_, src) if engine else partial(torch.add, src, 0, out=dst)
    return 2 * nbytes / (bench.timer.per_launch_us([copy]) * 1e-6) / 1e12


DECODE_TABLE = ("model", "layer", "N", "K", "batch", "rate", "n_active", "k_active", "ours_us", "ours_TBps",
                "frac_of_copy", "cublas_bf16_us", "tinygemm_int4_full_us")
PREFILL_TABLE = ("model", "layer", "rate", "M", "n_active", "k_active", "ours_us", "cublas_bf16_us", "ratio")


def print_table(rows: list[dict], columns) -> None:  # markdown, headed by the JSON field names
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = (f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        print("| " + " | ".join(cells) + " |")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: both 8B-class models")
    ap.add_argument("--layers", nargs="+", choices=LAYERS, help="default: all")
    ap.add_argument("--rates", nargs="+", type=float, help="default 0 0.15 0.25 0.35 (--quick: 0 0.35)")
    ap.add_argument("--batches", nargs="+", type=int, help="decode M; default 1 4 16 (--quick: 1)")
    ap.add_argument("--prefill-m", type=int, default=2048, help="0: no prefill rows (e.g. a small-batch sweep)")
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), help="default bfloat16 (float16 for --cpu-smoke)")
    ap.add_argument("--repeats", type=int, help="graph replays per timing; default 20 (--quick: 5)")
    ap.add_argument("--quick", action="store_true", help="Llama only, rates 0/0.35, batch 1, prefill at rate 0")
    ap.add_argument("--sweep", action="store_true", help="also time every kernel.candidate_configs() config")
    ap.add_argument("--sweep-batches", type=int, nargs="+", default=[1], help="decode batches --sweep tunes")
    ap.add_argument("--sweep-rates", type=float, nargs="+", default=[0.0], help="rates --sweep tunes (of --rates)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    ap.add_argument("--out", type=Path, help=f"JSON path (default {RESULTS}; a temp file for --cpu-smoke)")
    args = ap.parse_args(argv)
    check_switches(strict=True)  # an A/B under a misspelt switch would time the default
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    smoke, quick = args.cpu_smoke, args.quick or args.cpu_smoke
    if smoke:  # Triton reads the flag when a kernel is defined (@triton.jit), so it must precede the import
        if "uniql.kernels.pdl" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("kernels were imported before --cpu-smoke could set it: run with TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    from uniql.kernels import int4_matmul
    from uniql.kernels.pdl import pdl_enabled

    args.dtype = args.dtype or ("float16" if smoke else "bfloat16")
    models = args.models or (["tiny"] if smoke else ["llama-3.1-8b"] if quick else ["llama-3.1-8b", "qwen2.5-7b"])
    layers = args.layers or (["qkv", "o"] if smoke else list(LAYERS))
    rates = sorted(set(args.rates or ([0.0, 0.35] if quick else [0.0, 0.15, 0.25, 0.35])))
    batches = args.batches or ([1] if quick else [1, 4, 16])
    prefill_m = min(8, args.prefill_m) if smoke else args.prefill_m
    timer = Timer(cuda=not smoke, repeats=args.repeats or (2 if smoke else 5 if quick else 20))
    bench = Bench(int4_matmul, torch.device("cpu" if smoke else "cuda"), getattr(torch, args.dtype), args.group_size,
                  timer, rotate_bytes=0 if smoke else ROTATE_BYTES, sweep=[] if args.sweep else None)
    torch.manual_seed(0)
    copy_bytes = 16 * 2**20 if smoke else COPY_BYTES
    copy_tbps, engine_tbps = copy_bandwidth(bench, copy_bytes), copy_bandwidth(bench, copy_bytes, engine=True)
    rows, prefill = [], []
    for model in models:
        for layer in layers:
            rows += decode_rows(bench, model, layer, rates, batches, copy_tbps, args.sweep_batches, args.sweep_rates)
            for rate in [] if not prefill_m else [0.0, 0.35] if layer == "gate_up" and not quick else [0.0]:
                prefill.append(prefill_row(bench, model, layer, rate, prefill_m))
    report = {"device": "cpu (TRITON_INTERPRET smoke)" if smoke else torch.cuda.get_device_name(),
              "pdl": not smoke and pdl_enabled(torch.device("cuda")), "switches": set_switches(),
              "torch": torch.__version__, "triton": getattr(sys.modules.get("triton"), "__version__", None),
              "dtype": args.dtype, "group_size": args.group_size, "repeats": timer.repeats, "sweep": bench.sweep,
              "rotate_bytes": bench.rotate_bytes, "copy_TBps": copy_tbps, "copy_engine_TBps": engine_tbps,
              "notes": NOTES + timer.notes, "rows": rows, "rate_ratios": rate_ratios(rows, max(rates)),
              "prefill": prefill}
    print(f"\n{report['device']}: copy {copy_tbps:.2f} TB/s (read + write)")
    print_table(rows, DECODE_TABLE)
    print_table(prefill, PREFILL_TABLE)
    out = args.out or (Path(tempfile.gettempdir()) / "uniql_kernels_smoke.json" if smoke else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
