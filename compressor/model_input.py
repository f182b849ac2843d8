"""Source models: a Hugging Face directory (safetensors), a GGUF file, or the alias ``smollm2-135m``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from uniql.paths import DEFAULT_MODEL_ALIAS, smollm2_gguf
from uniql.runtime.checkpoint import sha256_file
from uniql.runtime.spec import ArchSpec, spec_from_hf_config


@dataclass
class SourceModel:
    hf_model: object
    tokenizer: object
    info: dict  # provenance for the manifest: name, format, path, sha256


def resolve_model_path(model: str) -> Path:
    if model == DEFAULT_MODEL_ALIAS:
        return smollm2_gguf()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: give a Hugging Face model directory, a .gguf file, "
            f"or the alias {DEFAULT_MODEL_ALIAS!r} (no hub downloads)"
        )
    return path


def _dir_sha256(path: Path) -> str:
    """Hash of the weight files' hashes, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors or .bin weights")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def _located(model: str) -> tuple[Path, Path, str, dict]:
    """(path, folder transformers reads, format, its extra loading arguments)."""
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path, path.parent, "gguf", {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return path, path, "hf", {}
    raise ValueError(f"{path} is neither a .gguf file nor a model directory with config.json")


def source_config(model: str):
    """The source's transformers config, read alone (a GGUF's takes ~3 s to parse: ``load_source`` takes it back
    instead of parsing it again)."""
    from transformers import AutoConfig

    path, root, _, kwargs = _located(model)
    return _loaded("config", path, lambda: AutoConfig.from_pretrained(str(root), local_files_only=True, **kwargs))


def source_spec(model: str, config=None) -> ArchSpec:
    """The source's architecture from its config alone (``config``: ``source_config(model)`` if already read),
    before any weight is read: an unsupported family (GPT-2, BERT) was refused only after the whole model had
    loaded, as "GPT2LMHeadModel is not a causal language model"; and the model's context is known before the
    load."""
    config = source_config(model) if config is None else config
    try:
        return spec_from_hf_config(config)
    except ValueError as err:
        raise ValueError(f"{resolve_model_path(model)}: {err}") from None


def load_source(model: str, dtype: torch.dtype = torch.float32, config=None) -> SourceModel:
    """Load tokenizer and transformers model from local files only (``config``: its ``source_config``, if read)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, root, fmt, kwargs = _located(model)
    if config is not None:
        kwargs = {**kwargs, "config": config}
    digest = sha256_file(path) if fmt == "gguf" else _dir_sha256(path)
    if fmt == "hf" and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the tokenizer of "
                         "the model into it (a UniQL checkpoint carries it)")
    tok_kwargs = {k: v for k, v in kwargs.items() if k != "config"}  # the model's config is no tokenizer's
    tokenizer = _loaded("tokenizer", path, lambda: AutoTokenizer.from_pretrained(str(root), local_files_only=True,
                                                                                 **tok_kwargs))
    hf_model = _loaded("model", path, lambda: AutoModelForCausalLM.from_pretrained(
        str(root), local_files_only=True, dtype=dtype, **kwargs))
    info = {"name": model, "format": fmt, "path": str(path), "sha256": digest,
            "eos_token_ids": generation_eos_ids(hf_model, tokenizer)}
    return SourceModel(hf_model.eval(), tokenizer, info)


# any one of these says the folder carries a tokenizer (compress.SAVED_TOKENIZER_FILES: all that a save writes)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _loaded(what: str, path: Path, load):
    """``load()``; transformers' errors (many types, often several lines) become one line naming the source."""
    try:
        return load()
    except (ValueError, OSError, KeyError, TypeError, RuntimeError, ImportError) as err:
        raise ValueError(f"the {what} in {path} cannot be loaded ({type(err).__name__}: "
                         f"{' '.join(str(err).split())})") from None


def generation_eos_ids(hf_model, tokenizer) -> list[int]:
    """Every id that ends generation: the generation config's (Llama-3 lists <|end_of_text|>, <|eom_id|> and
    <|eot_id|>; SmolLM2's <|endoftext|> is not its tokenizer's eos) with the tokenizer's own. The engine stops
    on any of them, as transformers' generate and vLLM do."""
    ids: list[int] = []
    for source in (getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        for t in [source] if isinstance(source, int) else list(source or ()):
            if isinstance(t, int) and t not in ids:
                ids.append(t)
    return ids
