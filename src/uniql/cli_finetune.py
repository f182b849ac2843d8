"""Masked LoRA flags shared by `uniql compress --finetune-steps N` and `uniql finetune` (its own stage)."""

from __future__ import annotations

import time


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_finetune_args(p, steps_default: int) -> None:
    group = p.add_argument_group("masked LoRA recovery (run under `accelerate launch` for several GPUs)")
    dests: list[str] = []

    def add(*names, **kwargs) -> None:  # each flag's name noted: `refuse_ignored_flags` reads them
        dests.append(group.add_argument(*names, **kwargs).dest)

    add("--finetune-steps", type=int, default=steps_default,
        help=f"optimizer steps of masked LoRA (default {steps_default}; 0 = none)")
    add("--finetune-data", default="alpaca",
        help="alpaca, wikitext2, or a file: .json/.jsonl Alpaca records (or a 'text' field), plain text")
    add("--finetune-batch-size", type=int, default=8, help="sequences per micro-batch per process")
    add("--finetune-grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    add("--finetune-seqlen", type=int, default=512)
    add("--finetune-lr", type=float, default=2e-4)
    add("--finetune-warmup", type=int, default=None, help="warmup steps (default 10 %% of the steps)")
    add("--finetune-max-examples", type=int, default=None)
    add("--lora-rank", type=int, default=8)
    add("--lora-alpha", type=float, default=16.0)
    add("--lora-dropout", type=float, default=0.05)
    add("--lora-targets", default=None,
        help="comma list of projections (default: all, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,...)")
    add("--rung-decay", type=float, default=0.1,
        help="P(rung) ~ exp(-decay * (heaviest - rung)): heavier rungs drawn more often; 0 = uniform")
    add("--rung-weights", type=_floats, default=None, help="explicit draw weights, one per rung")
    add("--distill", type=float, default=0.0,
        help="weight in [0, 1] of self-distillation towards the model's own rung-0 predictions "
             "(KL on the loss tokens; 0 = plain causal-LM loss)")
    add("--distill-temperature", type=float, default=1.0)
    add("--finetune-precision", default="auto", choices=["auto", "no", "bf16"],
        help="bf16 autocast: auto = on GPU only; bf16 also on CPU (fast with AMX / AVX512-BF16)")
    add("--finetune-state-dir", default=None,
        help="adapter checkpoints (default: OUT/finetune_state)")
    add("--finetune-save-every", type=int, default=100, help="adapter checkpoint period in steps")
    add("--resume", action="store_true", help="continue from the latest adapter checkpoint")
    p.set_defaults(finetune_dests=tuple(dests), flag_default=p.get_default)


GPTQ_ONLY = ("quant_data", "quant_samples", "quant_seqlen", "gptq_objective", "gptq_rung0_weight")
SORT_DATA = ("calib_data", "calib_samples", "calib_seqlen")  # read by `--order uniql` only
QUANT_FLAGS = ("quant", "hadamard", *GPTQ_ONLY)


def changed_flags(args, dests) -> list[str]:
    """The flags among ``dests`` set to something other than their default (the parser's, kept in the args)."""
    default = getattr(args, "flag_default", None)
    names = {"hadamard": "--[no-]hadamard"}
    return [] if default is None else [names.get(d, "--" + d.replace("_", "-")) for d in dests
                                       if getattr(args, d) != default(d)]


def ignored_flag_sets(args, finetune_optional: bool) -> list[tuple[list[str], str]]:
    """(flags, why they do nothing) for the flags this run would silently ignore."""
    finetune = [d for d in getattr(args, "finetune_dests", ()) if d != "finetune_steps"]
    return [
        (changed_flags(args, QUANT_FLAGS), "with --no-quant") if args.no_quant else
        (changed_flags(args, GPTQ_ONLY), "with --quant rtn") if args.quant == "rtn" else
        (changed_flags(args, ["gptq_rung0_weight"]) if args.gptq_objective == "full" else [],
         "with --gptq-objective full"),
        (changed_flags(args, finetune) if finetune_optional and args.finetune_steps <= 0 else [],
         "without --finetune-steps N"),
        (changed_flags(args, ["distill_temperature"]) if args.distill == 0 else [], "without --distill W"),
        (changed_flags(args, ["rung_decay"]) if args.rung_weights is not None else [], "with --rung-weights"),
        (changed_flags(args, SORT_DATA) if getattr(args, "order", "uniql") != "uniql" else [],
         f"with --order {getattr(args, 'order', '')} (it reads no data)"),
    ]


def refuse_ignored_flags(args, finetune_optional: bool) -> None:
    """A flag the run would ignore is a mistake about what it does (`--no-quant --hadamard`, `compress --lora-rank
    16` without `--finetune-steps`): it was accepted without a word; refused now, before any work."""
    refuse_ignored(ignored_flag_sets(args, finetune_optional))


def refuse_ignored(flag_sets: list[tuple[list[str], str]]) -> None:
    """ValueError naming the first (flags, why they do nothing) with any flag in it."""
    for flags, why in flag_sets:
        if flags:
            verb, pronoun = ("has", "it") if len(flags) == 1 else ("have", "them")
            raise ValueError(f"{', '.join(flags)} {verb} no effect {why}; drop {pronoun}")


def finetune_config(args):
    """A FinetuneConfig from the flags, or None when no fine-tuning was asked for."""
    from pathlib import Path

    from uniql.compressor.finetune import FinetuneConfig
    from uniql.compressor.lora import LoraSettings

    if args.finetune_steps < 0:  # meant no fine-tuning, without a word
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps == 0:
        return None
    targets = [t.strip() for t in args.lora_targets.split(",")] if args.lora_targets else None
    lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
    return FinetuneConfig(
        steps=args.finetune_steps, batch_size=args.finetune_batch_size, grad_accum=args.finetune_grad_accum,
        seqlen=args.finetune_seqlen, lr=args.finetune_lr, warmup_steps=args.finetune_warmup,
        data=args.finetune_data, max_examples=args.finetune_max_examples, rung_decay=args.rung_decay,
        rung_weights=args.rung_weights, distill=args.distill, distill_temperature=args.distill_temperature,
        lora=lora, seed=args.seed, save_every=args.finetune_save_every,
        state_dir=args.finetune_state_dir or str(Path(args.out) / "finetune_state"), resume=args.resume,
        device="cpu" if args.device.startswith("cpu") else None, mixed_precision=args.finetune_precision)


def add_finetune_parser(sub, add_quant_args) -> None:
    p = sub.add_parser("finetune", help="masked LoRA recovery on a sorted (--no-quant) checkpoint, then INT4")
    p.add_argument("ckpt", help="sorted floating-point UniQL checkpoint (`uniql compress MODEL --no-quant`)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    add_quant_args(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", help="cpu or cuda (under `accelerate launch`: its devices)")
    p.add_argument("--seed", type=int, default=1234)
    add_finetune_args(p, steps_default=200)


def cmd_finetune(args, quant_config) -> int:
    import torch

    from uniql.compressor.compress import finetune_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available (use --device cpu)")
    if args.finetune_steps < 1:
        raise ValueError("uniql finetune needs --finetune-steps >= 1")
    refuse_ignored_flags(args, finetune_optional=False)
    start = time.perf_counter()
    out = finetune_checkpoint(args.ckpt, args.out, finetune_config(args), quant_config(args),
                              device=args.device, dtype=args.dtype)
    if out is not None:  # the main process wrote it
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0

