"""`uniql info CKPT [--json] [--verify]`: a checkpoint's architecture, ladder and bytes per rung, from the manifest."""

from __future__ import annotations

import json
import sys

# the ladder dims and the block each belongs to: a dim is reported over the layers holding its block only
DIM_BLOCKS = {"mlp": "mlp", "qk": "attn", "vo": "attn", "ssm_p": "mamba", "ssm_n": "mamba"}


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="summary of a checkpoint: architecture, ladder, bytes resident per rung")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="also recompute the sha256 of every file the manifest lists and load the tokenizer (exit 2 "
                        "if a file differs or is missing)")


def _mean_kept(spec, sizes) -> dict:
    """Mean kept size of each dim over the layers that have its block. Averaged over every layer, a hybrid's
    attention width mixed in its Mamba layers (which have none), and a Mamba2 model showed mlp / qk / vo 0 and no
    SSM dim at all."""
    kept = {}
    for dim, block in DIM_BLOCKS.items():
        layers = spec.layers_with(block)
        if layers:
            kept[dim] = sum(getattr(sizes[i], dim) for i in layers) / len(layers)
    return kept


def info_report(manifest: dict) -> dict:
    from uniql.runtime.checkpoint import spec_and_ladder
    from uniql.runtime.memory import fp16_bytes, rung_bytes

    spec, ladder = spec_and_ladder(manifest)  # a size past the full width showed as a rung bigger than the model
    quant = manifest.get("quantization") or {}
    kind, group = manifest["weights"], quant.get("group_size", 128)
    # norms, biases and float tables keep the dtype the checkpoint was written in, INT4 or not
    float_bytes = 4 if manifest["tensors"]["norm.weight"]["dtype"] == "float32" else 2
    fp16 = fp16_bytes(spec)
    rotation = (quant.get("rotation") or {}).get("runtime_rotation", False)
    rungs = []
    for rate, sizes in zip(ladder.rates, ladder.sizes, strict=True):
        row = rung_bytes(spec, sizes, kind, group, float_bytes, runtime_rotation=rotation)
        rungs.append({"rate": rate, **row, "reduction_vs_fp16": fp16 / row["total_bytes"],
                      "mean_kept": _mean_kept(spec, sizes)})
    return {"format_version": manifest["format_version"], "weights": kind, "quantization": quant or None,
            "arch": manifest["arch"], "source": manifest["source"], "order": manifest["calibration"].get("order"),
            "fp16_bytes": fp16, "rungs": rungs}


def _damaged_files(ckpt: str, manifest: dict) -> bool:
    """``uniql info --verify``: one error line per missing or altered file (the summary alone reads only the
    manifest, so it looks fine for a checkpoint whose weights were truncated by a copy), and one for a tokenizer
    that cannot be loaded (the manifest lists no tokenizer file: a copy without it passed as OK, and no command
    could use it)."""
    from pathlib import Path

    from uniql.runtime.checkpoint import CheckpointError, file_problems, load_tokenizer

    problems = file_problems(Path(ckpt), manifest)
    try:
        load_tokenizer(ckpt)
    except CheckpointError as err:
        problems.append(str(err))
    for problem in problems:
        print(f"uniql info: error: {problem}", file=sys.stderr)
    return bool(problems)


def _arch_line(ckpt: str, arch: dict) -> str:
    """The architecture in one line, naming only the blocks the model has ("heads 0/0x0, mlp 0" said nothing of
    a Mamba2 model's mixers)."""
    from uniql.runtime.spec import ArchSpec

    spec = ArchSpec.from_dict(arch)
    parts = [f"{arch['family']} {arch['num_layers']} layers", f"hidden {arch['hidden_size']}"]
    if spec.layers_with("attn"):
        parts.append(f"heads {arch['num_heads']}/{arch['num_kv_heads']}x{arch['head_dim']}")
    if spec.layers_with("mlp"):
        parts.append(f"mlp {arch['intermediate_size']}")
    if spec.layers_with("mamba"):
        parts.append(f"ssm {arch['ssm_heads']} heads x{arch['ssm_head_dim']}, state {arch['ssm_state']}")
    return f"{ckpt}: " + ", ".join(parts)


def _print_report(ckpt: str, report: dict) -> None:
    quant = report["quantization"] or {}
    print(_arch_line(ckpt, report["arch"]))
    weights = f"int4 {quant.get('method')} g{quant.get('group_size')}" if quant else report["weights"]
    print(f"source {report['source'].get('name')} ({report['source'].get('format')}), order {report['order']}, "
          f"weights {weights}; fp16 size {report['fp16_bytes'] / 1e6:.1f} MB")
    for r in report["rungs"]:
        kept = ", ".join(f"{dim} {value:.0f}" if dim == "mlp" else f"{dim} {value:.1f}"
                         for dim, value in r["mean_kept"].items())
        print(f"  rate {r['rate']:.2f}: weights {r['weight_bytes'] / 1e6:7.1f} MB, "
              f"total {r['total_bytes'] / 1e6:7.1f} MB (fp16 / total = {r['reduction_vs_fp16']:.2f}x); "
              f"mean kept {kept}")


def cmd_info(args) -> int:
    from uniql.runtime.checkpoint import CheckpointError, read_manifest

    manifest = read_manifest(args.ckpt)
    try:
        report = info_report(manifest)
    except CheckpointError:  # names the field already
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{args.ckpt}: the manifest is damaged ({type(err).__name__}: {err}); "
                              "re-run `uniql compress`") from None
    if args.verify:
        if _damaged_files(args.ckpt, manifest):
            return 2
        report["verified_files"] = sorted(manifest["files"])
    if args.json:
        print(json.dumps(report))
        return 0
    _print_report(args.ckpt, report)
    if args.verify:
        print(f"checksums OK: {', '.join(report['verified_files'])}")
    return 0
