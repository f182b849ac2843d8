"""`uniql` command line: thin wrappers over library functions (compress, eval, info, generate, bench, serve)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

from uniql.cli_finetune import (
    add_finetune_args,
    add_finetune_parser,
    changed_flags,
    cmd_finetune,
    finetune_config,
    refuse_ignored,
    refuse_ignored_flags,
)
from uniql.cli_info import add_info_parser, cmd_info, info_report  # noqa: F401 (info_report: its old home)
from uniql.kernels.switches import check_switches
from uniql.paths import DEFAULT_MODEL_ALIAS
from uniql.runtime.dtypes import add_dtype_arg


def _add_quant_args(p) -> None:
    p.add_argument("--quant", default="gptq", choices=["gptq", "rtn"], help="INT4 method (default gptq)")
    p.add_argument("--no-quant", action="store_true", help="keep floating-point weights")
    p.add_argument("--hadamard", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate the hidden dim by a randomized Hadamard before INT4 (default: on for gptq, "
                        "off for rtn; a tied embedding / lm_head stays one table)")
    p.add_argument("--quant-data", default="wikitext2",
                   help="GPTQ calibration data: wikitext2, alpaca, shakespeare (shipped) or a path")
    p.add_argument("--quant-samples", type=int, default=128)
    p.add_argument("--quant-seqlen", type=int, default=2048)
    p.add_argument("--gptq-objective", default="rungs", choices=["full", "rungs"],
                   help="GPTQ on o/down/out_proj minimises the full width's error (full) or every rung's error on "
                        "its own K prefix (rungs)")
    p.add_argument("--gptq-rung0-weight", type=float, default=3.0,
                   help="with --gptq-objective rungs: weight of the full width against each pruned rung's 1")


def _quant_config(args):
    from uniql.compressor.quantize import QuantConfig

    return None if args.no_quant else QuantConfig(method=args.quant, calib_source=args.quant_data,
                                                  calib_samples=args.quant_samples, calib_seqlen=args.quant_seqlen,
                                                  seed=args.seed, hadamard=args.hadamard,
                                                  gptq_objective=args.gptq_objective,
                                                  rung0_weight=args.gptq_rung0_weight)


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="calibrate + sort a model into a UniQL checkpoint")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL_ALIAS,
                   help=f"HF model directory, .gguf file or alias (default: {DEFAULT_MODEL_ALIAS})")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    _add_quant_args(p)
    p.add_argument("--order", default="uniql", choices=["uniql", "random", "magnitude"])
    p.add_argument("--calib-data", default="alpaca",
                   help="sorting data: alpaca, wikitext2, shakespeare (shipped) or a file path")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--bi-data", default="wikitext2",
                   help="block-importance data: wikitext2, alpaca, shakespeare (shipped) or a path")
    p.add_argument("--bi-samples", type=int, default=32)
    p.add_argument("--bi-seqlen", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=None, help="quantization group along K (default: auto)")
    p.add_argument("--eps", type=float, default=0.05, help="allocation temperature")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=1234)
    add_finetune_args(p, steps_default=0)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a checkpoint at one rate")
    p.add_argument("ckpt", help="UniQL checkpoint directory")
    p.add_argument("--rate", type=float, default=0.0, help="pruning rate; snaps to the nearest rung")
    p.add_argument("--tasks", default="wikitext2", help="comma list of wikitext2,piqa,arc_easy,lambada")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    p.add_argument("--max-windows", type=int, default=None, help="perplexity windows to evaluate")
    p.add_argument("--seqlen", type=int, default=None,
                   help="perplexity window length (default: 2048, or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per batch of the zero-shot tasks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the model to this dtype (default: as stored)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(flag_default=p.get_default)  # `_eval_tasks` names the flags set to something else


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint at one rate (a quick look)")
    p.add_argument("ckpt", help="UniQL checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message (chat template)")
    p.add_argument("--rate", type=float, default=0.0, help="pruning rate; snaps to the nearest rung")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)


def cmd_generate(args) -> int:
    from uniql.runtime.checkpoint import eos_token_ids, load_tokenizer
    from uniql.runtime.detokenizer import render_chat
    from uniql.runtime.dtypes import dtype_name, load_for_inference
    from uniql.runtime.engine import Engine
    from uniql.runtime.request import SamplingParams

    model, manifest = load_for_inference(args.ckpt, args.device, args.dtype)
    tokenizer = load_tokenizer(args.ckpt)
    engine = Engine(model, tokenizer, max_num_seqs=1, eos_token_ids=eos_token_ids(manifest))
    rung = model.ladder.nearest(args.rate)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this checkpoint's tokenizer has no chat template: drop --chat")
    ids = (render_chat(tokenizer, [{"role": "user", "content": args.prompt}]) if args.chat
           else tokenizer(args.prompt)["input_ids"])
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    req = engine.add_request(ids, params, rung=rung)
    start = time.perf_counter()
    for event in engine.stream(req):
        print(event.text, end="", flush=True)
    elapsed = time.perf_counter() - start
    print()  # the text's own line end, on stdout: `uniql generate ... > out.txt` keeps it
    print(f"[rate {model.ladder.rates[rung]:.2f} (rung {rung}), {dtype_name(model.norm.weight.dtype)}, "
          f"{len(req.output_ids)} tokens in {elapsed:.2f} s, finish: {req.finish_reason}]", file=sys.stderr)
    if req.finish_reason == "error":  # the engine failed this request (e.g. non-finite logits): say why
        print(f"uniql generate: error: {event.error}", file=sys.stderr)
        return 1
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measurements; `bench decode CKPT`: TTFT / TPOT / tokens/s per rung")
    p.add_argument("what", choices=["decode"])
    p.add_argument("ckpt", help="UniQL checkpoint directory")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.15, 0.25, 0.35])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_bench(args) -> int:
    from uniql.runtime.bench import RequestFailed, decode_rows
    from uniql.runtime.checkpoint import load_tokenizer
    from uniql.runtime.dtypes import dtype_name, load_for_inference
    from uniql.runtime.engine import Engine

    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 (TPOT is the time between tokens), got {args.new_tokens}")
    model, _ = load_for_inference(args.ckpt, args.device, args.dtype)
    dtype = dtype_name(model.norm.weight.dtype)
    tokenizer = load_tokenizer(args.ckpt)
    try:
        rows = decode_rows(Engine(model, tokenizer, max_num_seqs=1), tokenizer, args.rates, args.new_tokens)
    except RequestFailed as err:  # no speed from a request the engine failed (it logged the cause)
        print(f"uniql bench: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(json_safe({"ckpt": args.ckpt, "device": args.device, "dtype": dtype, "rows": rows}),
                         allow_nan=False))
        return 0
    print(f"{args.ckpt} on {args.device} in {dtype}")
    for r in rows:
        asked = f", asked {r['requested_rate']:.2f}" if abs(r["requested_rate"] - r["rate"]) > 1e-9 else ""
        print(f"rate {r['rate']:.2f} (rung {r['rung']}{asked}): TTFT {r['ttft_ms']:.1f} ms  "
              f"TPOT {r['tpot_ms']:.2f} ms  {r['tokens_per_s']:.1f} tok/s")
    return 0


def cmd_compress(args) -> int:
    from uniql.compressor.compress import CompressConfig, compress

    refuse_ignored_flags(args, finetune_optional=True)
    cfg = CompressConfig(quant=_quant_config(args), finetune=finetune_config(args), order=args.order,
                         calib_source=args.calib_data, calib_samples=args.calib_samples,
                         calib_seqlen=args.calib_seqlen, bi_source=args.bi_data, bi_samples=args.bi_samples,
                         bi_seqlen=args.bi_seqlen, group_size=args.group_size, eps=args.eps,
                         device=args.device, seed=args.seed)
    start = time.perf_counter()
    out = compress(args.model, args.out, cfg, dtype=args.dtype)
    if out is not None:  # under `accelerate launch` only the main process writes
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def json_safe(value):
    """``value`` with every NaN / infinity as null: json.dumps wrote them as bare NaN / Infinity, which is not JSON
    (jq and JSON.parse reject the whole line), e.g. the perplexity of a checkpoint whose logits are NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _eval_tasks(args) -> list[str]:
    """``--tasks`` as a list, checked before the checkpoint loads, with the flags none of them reads refused:
    `uniql eval CKPT --limit 5` (lm-eval's flag for a quick look) evaluated every wikitext2 window without a
    word."""
    from uniql.compressor.evaluate import TASKS

    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # a repeat ran twice
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {list(TASKS)}" if unknown else
                         f"no task given; valid tasks: {list(TASKS)}")
    zero_shot = [t for t in tasks if t != "wikitext2"]
    refuse_ignored([(changed_flags(args, ["limit", "batch_size"]) if not zero_shot else [],
                     "without a zero-shot task (--tasks piqa, arc_easy, lambada)"),
                    (changed_flags(args, ["max_windows", "seqlen"]) if "wikitext2" not in tasks else [],
                     "without wikitext2 in --tasks")])
    return tasks


def cmd_eval(args) -> int:
    from uniql.compressor.evaluate import evaluate
    from uniql.runtime.checkpoint import DTYPES, load_checkpoint, load_tokenizer

    tasks = _eval_tasks(args)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model, manifest = load_checkpoint(args.ckpt, device=args.device, dtype=dtype)
    rung = model.ladder.nearest(args.rate)
    # `is None`, not `or`: --seqlen 0 silently became the default instead of being refused like -5
    seqlen = min(2048, model.spec.max_position_embeddings) if args.seqlen is None else args.seqlen
    results = evaluate(model, load_tokenizer(args.ckpt), tasks, rung=rung, limit=args.limit,
                       max_windows=args.max_windows, seqlen=seqlen, batch_size=args.batch_size,
                       device=args.device)
    report = {"ckpt": args.ckpt, "rate": model.ladder.rates[rung], "requested_rate": args.rate, "rung": rung,
              "order": manifest["calibration"].get("order"), "limit": args.limit, "tasks": results}
    if args.json:
        print(json.dumps(json_safe(report), allow_nan=False))
    else:
        print(f"rate {report['rate']:.2f} (rung {rung}, asked {args.rate})")
        for task, metrics in results.items():
            print(f"  {task:10s} " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def _add_serve(sub) -> None:
    from uniql.server.serve import add_parser

    add_parser(sub)


def cmd_serve(args) -> int:
    from uniql.server.serve import cmd_serve as serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniql", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    add_finetune_parser(sub, _add_quant_args)
    _add_eval(sub)
    add_info_parser(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


COMMANDS = {"compress": cmd_compress, "finetune": lambda args: cmd_finetune(args, _quant_config), "eval": cmd_eval,
            "info": cmd_info, "generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        check_switches()  # a mistyped UNIQL_* switch fails here, before any model loads
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `uniql info CKPT | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as err:  # OSError (after BrokenPipeError, one of them): a path we cannot read or
        # write (permissions, a file where a folder belongs, a full disk)
        print(f"uniql {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (compress leaves no half-written checkpoint)
        print(f"\nuniql {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped


if __name__ == "__main__":
    sys.exit(main())
