"""UniQL checkpoint: a directory with ``uniql.json`` (manifest), ``model.safetensors`` and tokenizer files.

Loading checks the manifest's format version, every file's sha256 and every tensor's shape and dtype, and
says what is wrong and how to fix it. The format is never inferred from file names.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .decoder import ElasticDecoder
from .ladder import Alignment, RateLadder, check_ladder
from .linear import DenseLinear, Int4Linear
from .spec import ArchSpec

FORMAT_VERSION = 1
MANIFEST = "uniql.json"
WEIGHTS = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


FORMAT_DTYPE_SUFFIXES = (".qweight", ".scales", "hidden_rotation")  # format dtypes, whatever --dtype says


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, truncated, foreign or from another format version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def int4_skeleton(model: ElasticDecoder, group_size: int) -> ElasticDecoder:
    """Swap every dense projection and table of a fresh decoder for an empty Int4Linear of the same shape."""
    def empty(dense: DenseLinear) -> Int4Linear:
        return Int4Linear(dense.in_features, dense.out_features, group_size, dense.bias is not None)

    for layer in model.layers:
        for path in layer.linear_paths:
            layer.set_linear(path, empty(layer.get_linear(path)))
    model.embed = empty(model.embed)
    if model.lm_head is not None:
        model.lm_head = empty(model.lm_head)
    return model


def weights_kind(model: ElasticDecoder) -> str:
    return "int4" if isinstance(model.embed, Int4Linear) else "float"


# what a UniQL checkpoint directory may hold besides the manifest (a directory with anything else is not ours)
FINETUNE_STATE = "finetune_state"
WRITE_PROBE_PREFIX = ".uniql-write-probe-"


def prepare_out_dir(out_dir: str | Path, sources: tuple[str | Path, ...] = ()) -> Path:
    """Check, before hours of work, that ``out_dir`` can take a checkpoint without losing anything; create it.

    Refused: an existing file; a directory that is, holds or sits inside one of ``sources`` (the model being
    read); a non-empty directory that is not a UniQL checkpoint (replacing an earlier checkpoint, or continuing
    into one that holds only adapter checkpoints, is fine); a directory we cannot write.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    resolved = out.resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if (resolved == src or src in resolved.parents or resolved in src.parents) if src.is_dir() \
                else resolved == src.parent:  # a model directory: in, at or around it; a file: its folder
            raise CheckpointError(f"--out {out} would write over the model being read ({source}); "
                                  "choose another directory")
    if out.is_dir():  # (another process of the same `accelerate launch` may be probing it right now)
        entries = {p.name for p in out.iterdir() if not p.name.startswith(WRITE_PROBE_PREFIX)}
        if entries and MANIFEST not in entries and entries != {FINETUNE_STATE}:
            raise CheckpointError(f"--out {out} is not empty and is not a UniQL checkpoint; choose a new or empty "
                                  "directory (nothing was written)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"--out {out} cannot be written: {err}") from None
    return out


def _as_umask_allows(path: Path) -> None:
    """safetensors writes its file 0600 (a temporary file renamed): give it the mode any other file would get, so
    a checkpoint built by one user serves as another (the images' uid 1000, the unit's ``uniql`` user)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def save_checkpoint(model: ElasticDecoder, out_dir: str | Path, *, alignment: Alignment, source: dict,
                    calibration: dict, tokenizer=None, dtype: torch.dtype = torch.float32,
                    quantization: dict | None = None, finetune: dict | None = None) -> Path:
    """Write the model (floating point or packed INT4) with its ladder, provenance and tokenizer.

    ``finetune``: provenance of the masked LoRA recovery merged into the weights (None: not fine-tuned).
    """
    if model.ladder is None:
        raise ValueError("a UniQL checkpoint needs a rate ladder; sort the model first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() and not k.endswith(FORMAT_DTYPE_SUFFIXES)
                                else v.dtype).contiguous() for k, v in model.state_dict().items()}
    tensors["inv_freq"] = model.inv_freq.float().cpu()  # RoPE frequencies stay fp32 whatever the weights
    save_file(tensors, out / WEIGHTS, metadata={"format": "uniql"})
    _as_umask_allows(out / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest = {
        "format": "uniql", "format_version": FORMAT_VERSION, "weights": weights_kind(model),
        "quantization": quantization,
        "created_unix": int(time.time()), "source": source,
        "arch": model.spec.to_dict(), "alignment": alignment.__dict__,
        "ladder": model.ladder.to_dict(), "calibration": calibration, "finetune": finetune,
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype), "file": WEIGHTS}
                    for k, v in tensors.items()},
        "files": {WEIGHTS: sha256_file(out / WEIGHTS)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def read_manifest(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    if Path(ckpt_dir).is_file():  # e.g. the manifest itself, or the weights file
        raise CheckpointError(f"{ckpt_dir} is a file: pass the checkpoint's directory (the one holding {MANIFEST})")
    if not Path(ckpt_dir).exists():
        raise CheckpointError(f"{ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a UniQL checkpoint: {MANIFEST} is missing "
                              "(create one with `uniql compress MODEL --out DIR`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt, recreate it") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "uniql":
        raise CheckpointError(f"{path} is not a UniQL manifest (no \"format\": \"uniql\")")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version}; this UniQL reads {FORMAT_VERSION}. "
                              "Re-run `uniql compress` with this version")
    missing = [k for k in ("arch", "ladder", "tensors", "files", "calibration", "weights", "source")
               if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: the manifest is incomplete; re-run `uniql compress`")
    malformed = [k for k in ("arch", "ladder", "tensors", "files", "calibration", "source")
                 if not isinstance(manifest[k], dict)]
    if malformed:
        raise CheckpointError(f"{path}: {malformed} should be JSON objects; the manifest is damaged, re-run "
                              "`uniql compress`")
    return manifest


def file_problems(ckpt: Path, manifest: dict) -> list[str]:
    """One message per file the manifest lists that is missing or does not match its sha256 (empty: all intact).
    Every file is checked, so `uniql info --verify` names each damaged one, not only the first."""
    problems = []
    for name, digest in manifest["files"].items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            # a file of the checkpoint folder itself: a name with a path in it could point anywhere on the disk
            raise CheckpointError(f"{ckpt / MANIFEST} lists {name!r} as a checkpoint file; the manifest is damaged")
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path} is missing; the checkpoint is incomplete")
        elif sha256_file(path) != digest:
            problems.append(f"{path} does not match its sha256 in {MANIFEST}: the file is corrupt or truncated; "
                            "copy it again or re-run `uniql compress`")
    return problems


def _verify_files(ckpt: Path, manifest: dict) -> None:
    problems = file_problems(ckpt, manifest)
    if problems:
        raise CheckpointError(problems[0])


def _check_tensors(tensors: dict, manifest: dict) -> None:
    for name, info in manifest["tensors"].items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"tensor {name!r} listed in {MANIFEST} is missing from {info['file']}")
        if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
            raise CheckpointError(f"tensor {name!r} is {list(t.shape)} {t.dtype}; manifest says "
                                  f"{info['shape']} {info['dtype']}")


def spec_and_ladder(manifest: dict) -> tuple[ArchSpec, RateLadder]:
    """The manifest's architecture and its ladder, checked against each other (CheckpointError naming the field):
    what loading and `uniql info` (which reads the manifest alone) build everything else from."""
    try:
        spec, ladder = ArchSpec.from_dict(manifest["arch"]), RateLadder.from_dict(manifest["ladder"])
        check_ladder(ladder, spec)
    except ValueError as err:  # (a KeyError / TypeError: the callers' "damaged" message, with its type)
        raise CheckpointError(f"{MANIFEST}: {err}; the manifest is damaged, re-run `uniql compress`") from None
    return spec, ladder


def _skeleton(manifest: dict, tensors: dict) -> ElasticDecoder:
    """The empty model the manifest describes (its tensors are assigned from the file afterwards)."""
    model = ElasticDecoder(*spec_and_ladder(manifest))
    if manifest.get("weights") == "int4":
        group_size = (manifest.get("quantization") or {}).get("group_size")
        if group_size is None:
            raise CheckpointError(f"{MANIFEST} says int4 weights but has no quantization.group_size; "
                                  "the manifest is incomplete, re-run `uniql compress`")
        int4_skeleton(model, group_size)
        if "hidden_rotation" in tensors:  # a tied model rotated before INT4 (see compressor/hadamard.py)
            model.hidden_rotation = torch.empty_like(tensors["hidden_rotation"])
    elif manifest.get("weights") != "float":
        raise CheckpointError(f"unknown weights kind {manifest.get('weights')!r} in {MANIFEST}")
    return model


def _check_against(model: ElasticDecoder, tensors: dict) -> None:
    """Every tensor the architecture needs, with its shape; packed codes in their integer dtype (floats may be
    stored in any float dtype); nothing else."""
    expected = model.state_dict()
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{WEIGHTS} holds tensors this architecture does not have: {extra[:5]}")
    for name, ref in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{WEIGHTS} lacks tensor {name!r} that the architecture in {MANIFEST} needs")
        if t.shape != ref.shape or (not ref.is_floating_point() and t.dtype != ref.dtype):
            raise CheckpointError(f"tensor {name!r} is {list(t.shape)} {t.dtype}; the architecture in {MANIFEST} "
                                  f"needs {list(ref.shape)}" + ("" if ref.is_floating_point() else f" {ref.dtype}"))


def checked_device(device) -> torch.device:
    """``device`` as a torch.device, or a ValueError that says what is wrong with it (before any file is read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r} ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: UniQL runs on cpu or cuda")
    # an index past the last device failed only when the weights were read, blamed on the checkpoint
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ValueError(f"device {device!r} does not exist: the CPU is one device, cpu")
        dev = torch.device("cpu")  # safetensors refuses "cpu:0", which torch accepts
    return dev


def load_checkpoint(ckpt_dir: str | Path, *, device="cpu", dtype: torch.dtype | None = None,
                    verify: bool = True) -> tuple[ElasticDecoder, dict]:
    """(model, manifest). ``verify`` checks sha256 of every file (seconds for small models)."""
    ckpt = Path(ckpt_dir)
    device = checked_device(device)
    manifest = read_manifest(ckpt)
    if verify:
        _verify_files(ckpt, manifest)
    try:
        tensors = load_file(ckpt / WEIGHTS, device=str(device))
    except Exception as err:  # safetensors raises several types for damaged headers
        raise CheckpointError(f"{ckpt / WEIGHTS} cannot be read ({err}); re-run `uniql compress`") from err
    try:
        _check_tensors(tensors, manifest)
        model = _skeleton(manifest, tensors)
        _check_against(model, tensors)
        model.load_state_dict(tensors, strict=True, assign=True)
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:  # a damaged manifest
        raise CheckpointError(f"{ckpt / MANIFEST} and {WEIGHTS} do not describe a model ({type(err).__name__}: "
                              f"{err}); the checkpoint is damaged, re-run `uniql compress`") from err
    if dtype is not None:
        model.to(dtype)
    return model.requires_grad_(False).eval(), manifest


def eos_token_ids(manifest: dict) -> tuple[int, ...]:
    """The ids that end generation as the source model's generation config lists them (recorded by `uniql
    compress` since stop 26; an older checkpoint has none, and the tokenizer's eos alone applies)."""
    ids = (manifest.get("source") or {}).get("eos_token_ids") or ()
    return tuple(t for t in ids if isinstance(t, int) and not isinstance(t, bool) and t >= 0)


def load_tokenizer(ckpt_dir: str | Path):
    from transformers import AutoTokenizer

    ckpt = Path(ckpt_dir)
    if not any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise CheckpointError(f"{ckpt} has no tokenizer files (tokenizer.json / tokenizer_config.json); copy them "
                              "from the source model or re-run `uniql compress`")
    try:
        return AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as err:  # transformers raises many types (ValueError, OSError, ...) for broken files
        raise CheckpointError(f"the tokenizer in {ckpt} cannot be loaded ({type(err).__name__}: {err})") from err
