"""`uniql compress`: source model -> calibrated, sorted floating-point UniQL checkpoint with a rate ladder."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from uniql.kernels.int4_format import GROUP_SIZES
from uniql.paths import drop_dead_process_folders
from uniql.runtime.checkpoint import (
    DTYPES,
    MANIFEST,
    WRITE_PROBE_PREFIX,
    checked_device,
    load_checkpoint,
    load_tokenizer,
    prepare_out_dir,
    read_manifest,
    save_checkpoint,
)
from uniql.runtime.decoder import ElasticDecoder
from uniql.runtime.hf_import import decoder_from_hf
from uniql.runtime.ladder import DEFAULT_RATES, Alignment, spec_dim_steps

from .allocation import build_ladder
from .calib_data import calibration_batches, source_file
from .calibrate import BlockImportanceCollector, SortStatsCollector, run_layerwise
from .finetune import FinetuneConfig, finetune_decoder, load_sources
from .model_input import load_source, resolve_model_path, source_config, source_spec
from .orders import ORDERS, magnitude_orders, random_orders, uniql_orders
from .quantize import QuantConfig, gptq_batches, quantize_model
from .sorting import apply_orders

log = logging.getLogger(__name__)


@dataclass
class CompressConfig:
    order: str = "uniql"
    calib_source: str = "alpaca"  # sorting statistics
    calib_samples: int = 128
    calib_seqlen: int = 2048
    bi_source: str = "wikitext2"  # block importance for the layer-wise allocation
    bi_samples: int = 32
    bi_seqlen: int = 2048
    batch_size: int = 8
    rates: tuple = DEFAULT_RATES
    eps: float = 0.05  # allocation temperature (paper: 0.1; 0.05 is better at every rate on wikitext2 valid)
    max_prune: float = 0.85  # no layer loses more than this share of a dim
    ridge_lambda: float = 0.1  # relative to the mean channel energy (ablation: benchmarks/results)
    group_size: int | None = None  # quantization group along K; None: largest of 128/64/32 dividing every input width
    device: str = "cpu"
    seed: int = 1234
    quant: QuantConfig | None = field(default_factory=QuantConfig)  # None: keep floating point
    finetune: FinetuneConfig | None = None  # masked LoRA recovery between sorting and quantization

    def validate(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        for name in ("calib_samples", "calib_seqlen", "bi_samples", "bi_seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        # checked now, not by the allocation after calibration (a ridge lambda of 0 makes every leverage 1: no order;
        # an infinite eps flattens the allocation without a word)
        if not (0 < self.eps < math.inf and 0 < self.max_prune <= 1 and 0 < self.ridge_lambda < math.inf):
            raise ValueError(f"need a finite eps > 0, max_prune in (0, 1] and ridge_lambda > 0; got eps {self.eps}, "
                             f"max_prune {self.max_prune}, ridge_lambda {self.ridge_lambda}")
        if not all(0 <= r <= self.max_prune for r in self.rates):
            raise ValueError(f"ladder rates {list(self.rates)} must lie within [0, max_prune={self.max_prune}]")
        if any(r >= 1 for r in self.rates):  # check_ladder refuses such a checkpoint on load: refuse it before the work
            raise ValueError(f"ladder rates {list(self.rates)} must each be below 1 (a rate of 1 prunes every "
                             "channel: no model is left)")
        checked_device(self.device)  # `--device gpu` was a traceback from the first calibration batch
        for stage in (self.quant, self.finetune):  # their mistakes show now, not after hours of calibration
            if stage is not None:
                stage.validate()


def calibration_data(tokenizer, cfg: CompressConfig) -> dict:
    """The block-importance and sorting batches, both read before either runs: a sorting file that could not be
    used (not text, too short, records without text) failed only after the block-importance pass."""
    data = {"bi": calibration_batches(tokenizer, cfg.bi_source, cfg.bi_samples, cfg.bi_seqlen, cfg.seed,
                                      cfg.batch_size)}
    if cfg.order == "uniql":  # random / magnitude read no data
        data["sort"] = calibration_batches(tokenizer, cfg.calib_source, cfg.calib_samples, cfg.calib_seqlen,
                                           cfg.seed, cfg.batch_size)
    return data


def block_importance(model: ElasticDecoder, batches, cfg: CompressConfig) -> list[float]:
    collector = BlockImportanceCollector()
    run_layerwise(model, batches, [collector], cfg.device, desc="block importance")
    return collector.scores


def sort_layers(model: ElasticDecoder, batches, cfg: CompressConfig) -> str | None:
    """Apply the chosen order to every layer in place (a re-parameterisation: rate 0 is unchanged); every block
    kind (attention, MLP, Mamba2 mixer) is sorted by its own rule (``batches``: the sorting data of
    ``--order uniql``). Returns None (no reason to skip)."""
    if cfg.order == "uniql":
        def on_layer(index, layer, stats):
            apply_orders(layer, uniql_orders(layer, stats, cfg.ridge_lambda))

        run_layerwise(model, batches, [SortStatsCollector(on_layer)], cfg.device, desc="sorting")
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        for layer in tqdm(model.layers, desc=f"sorting ({cfg.order})", unit="layer"):
            orders = magnitude_orders(layer) if cfg.order == "magnitude" else random_orders(layer, generator)
            apply_orders(layer, orders)
    spec = model.spec
    model.spec = dataclasses.replace(spec, v_bias=False, o_bias=spec.o_bias or spec.v_bias)
    return None


@contextmanager
def stage(name: str, timings: dict, device: str):
    """Record a stage's wall time and, on CUDA, its peak GPU memory (the driver streams layers: this stays small)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    timings[name] = {"s": round(time.perf_counter() - start, 3),
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def _input_widths(model: ElasticDecoder) -> list[int]:
    """Every projection's input width and the tables' (what INT4 quantizes, in groups along these)."""
    return sorted({layer.get_linear(path).weight.shape[1] for layer in model.layers for path in layer.linear_paths}
                  | {model.embed.weight.shape[1]})


def _auto_group(model: ElasticDecoder, quantized: bool) -> Alignment:
    """No ``--group-size``: the largest group size dividing EVERY input width (not only the hidden size: an MLP
    width like OpenLLaMA-3B's 8640 takes 64, not the hidden size's 128), refused now if none does and the model is
    to be quantized (a float checkpoint keeps the hidden size's alignment, 16 where no group divides it)."""
    widths = _input_widths(model)
    group = Alignment.largest_group(widths, GROUP_SIZES)
    if group is not None:
        return Alignment(group)
    if quantized:
        raise ValueError(f"no INT4 group size of {GROUP_SIZES} divides all input widths {widths} of this model's "
                         "projections; it cannot be quantized (--no-quant keeps it floating point)")
    return Alignment.for_hidden(model.spec.hidden_size)


def _undivided(widths: list[int], group_size: int) -> list[int]:
    """The input widths a quantization group of ``group_size`` does not divide."""
    return [k for k in widths if k % group_size]


def _checked_group(model: ElasticDecoder, group_size: int) -> Alignment:
    """``--group-size``, checked against every projection's input width before any calibration runs."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--group-size must be one of {GROUP_SIZES}, got {group_size}")
    widths = _input_widths(model)
    bad = _undivided(widths, group_size)
    if bad:
        raise ValueError(f"--group-size {group_size} does not divide the input widths {bad} of this model's "
                         f"projections (all of them: {widths}); pick a group size dividing them")
    return Alignment(group_size)


def _check_quantizable(model: ElasticDecoder, group_size: int) -> None:
    """`uniql finetune` quantizes in the group size the sorted checkpoint's ladder is aligned to; a float checkpoint
    of a model no INT4 group size fits (hidden 72) failed on it only after the training."""
    widths = _input_widths(model)
    if group_size not in GROUP_SIZES or _undivided(widths, group_size):
        raise ValueError(f"this checkpoint cannot be quantized: its group size {group_size} is not an INT4 group size "
                         f"of {GROUP_SIZES} dividing every input width {widths}; add --no-quant to keep it floating "
                         "point")


def compress_decoder(model: ElasticDecoder, tokenizer, cfg: CompressConfig,
                     timings: dict | None = None) -> tuple[ElasticDecoder, dict]:
    """Sort ``model`` in place, attach its rate ladder; return it with the calibration provenance."""
    cfg.validate()
    timings = {} if timings is None else timings
    spec = model.spec
    align = _auto_group(model, cfg.quant is not None) if cfg.group_size is None else _checked_group(model,
                                                                                                    cfg.group_size)
    steps = spec_dim_steps(spec, align)
    data = calibration_data(tokenizer, cfg)
    with stage("block_importance", timings, cfg.device):
        scores = block_importance(model, data["bi"], cfg)
    with stage("sorting", timings, cfg.device):
        skipped = sort_layers(model, data.get("sort"), cfg)
    model.ladder = build_ladder(scores, model.full_sizes, steps, cfg.rates, cfg.eps, cfg.max_prune)
    provenance = {
        "order": "none" if skipped else cfg.order, "sorting_skipped": skipped, "seed": cfg.seed,
        "block_importance": scores, "eps": cfg.eps,
        "max_prune": cfg.max_prune,
        "ridge_lambda_rel": cfg.ridge_lambda, "dim_steps": dataclasses.asdict(steps),
        # random / magnitude read none: recording the unused settings said they had
        "sort_data": {"source": cfg.calib_source, "samples": cfg.calib_samples, "seqlen": cfg.calib_seqlen}
        if cfg.order == "uniql" else None,
        "bi_data": {"source": cfg.bi_source, "samples": cfg.bi_samples, "seqlen": cfg.bi_seqlen},
        "timings": timings,
    }
    return model, {"provenance": provenance, "alignment": align}


def compress(model_name: str, out_dir: str | Path, cfg: CompressConfig, dtype: str = "float32") -> Path:
    """Full offline pipeline: load, calibrate, sort, allocate the ladder, quantize (unless ``cfg.quant`` is None)."""
    cfg.validate()
    inputs = (resolve_model_path(model_name),)
    with _out_dir(out_dir, inputs):  # --out checked first: a default state dir lies inside it
        _check_state_dir(cfg.finetune, inputs)
        _check_sources(cfg.quant, [("sorting data", cfg.calib_source)] * (cfg.order == "uniql")
                       + [("block-importance data", cfg.bi_source)])
        sort_seqlen = cfg.calib_seqlen if cfg.order == "uniql" else 0  # random / magnitude read no data
        config = source_config(model_name)  # read once: the checks below, then the load
        _check_context(source_spec(model_name, config).max_position_embeddings, cfg.quant, cfg.finetune,
                       {"--bi-seqlen": cfg.bi_seqlen, "--calib-seqlen": sort_seqlen})
        timings: dict = {}
        with stage("load", timings, cfg.device):
            source = load_source(model_name, config=config)
            model = decoder_from_hf(source.hf_model, share=True)  # no second copy of the weights in host memory
            del source.hf_model
        # every file the later stages read, used now: a bad one failed only after the calibration before it
        later = _later_data(source.tokenizer, cfg.finetune, cfg.quant)
        model, result = compress_decoder(model, source.tokenizer, cfg, timings)
        return _finish(model, source.tokenizer, cfg.finetune, cfg.quant, out_dir, timings, cfg.device, dtype,
                       later, alignment=result["alignment"], source=source.info, calibration=result["provenance"])


def _later_data(tokenizer, finetune: FinetuneConfig | None, quant: QuantConfig | None) -> dict:
    """The fine-tuning examples and the GPTQ batches, read before the work that comes before them."""
    return {"examples": None if finetune is None else load_sources(tokenizer, finetune),
            "gptq": gptq_batches(tokenizer, quant)}


def _check_state_dir(finetune: FinetuneConfig | None, inputs: tuple) -> None:
    """``--finetune-state-dir`` at or inside the model being read wrote latest.json and step-N/ into it.

    A file source (a .gguf) is treated as ``prepare_out_dir`` treats it: only the file itself or its folder is
    refused, not everything below that folder (the default ``--out/finetune_state`` of an --out next to the file
    was refused, naming a flag the user never passed)."""
    if finetune is None or not finetune.state_dir:
        return
    state = Path(finetune.state_dir).expanduser().resolve()
    for source in inputs:
        src = Path(source).expanduser().resolve()
        if (state == src or src in state.parents) if src.is_dir() else state in (src, src.parent):
            raise ValueError(f"--finetune-state-dir {finetune.state_dir} would write into the model being read "
                             f"({source}); choose another directory")


def _check_context(context: int, quant: QuantConfig | None, finetune: FinetuneConfig | None,
                   seqlens: dict[str, int]) -> None:
    """Calibration and training windows no longer than the model's context, as `uniql eval` and the engine require:
    RoPE was never trained past it, so statistics (and LoRA updates) from there describe inputs the model never
    serves; they were silently accepted."""
    if quant is not None and quant.method == "gptq":
        seqlens = {**seqlens, "--quant-seqlen": quant.calib_seqlen}
    if finetune is not None:
        seqlens = {**seqlens, "--finetune-seqlen": finetune.seqlen}
    too_long = [f"{flag} {n}" for flag, n in seqlens.items() if n > context]
    if too_long:
        raise ValueError(f"{', '.join(too_long)} exceeds the model's context of {context} tokens; pass {context} or "
                         "less")


def _check_sources(quant: QuantConfig | None, sources: list[tuple[str, str]]) -> None:
    """Every calibration file the run will read, found now: a missing --quant-data otherwise showed only after
    sorting and fine-tuning, i.e. after the hours it was meant to save."""
    if quant is not None and quant.method == "gptq":
        sources = [*sources, ("GPTQ calibration data", quant.calib_source)]
    for role, source in sources:
        source_file(source, role)


@contextmanager
def _out_dir(out_dir, inputs: tuple):
    """``prepare_out_dir`` (checked before any work), and on an error or Ctrl-C the ``--out`` directory it created
    removed again if nothing landed in it (an adapter checkpoint to resume from keeps it): a failed run leaves no
    trace."""
    created = not Path(out_dir).expanduser().exists()
    prepare_out_dir(out_dir, inputs)
    try:
        yield
    except BaseException:
        out = Path(out_dir).expanduser()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


# what transformers' save_pretrained writes for a tokenizer (a replaced checkpoint's set may differ from the new one)
SAVED_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                                   "tokenizer.model", "vocab.json", "merges.txt"})


def _save_replacing(model, out_dir, **kwargs) -> Path:
    """``save_checkpoint`` into a staging folder inside ``out_dir``, then moved in, the manifest last.

    Written in place, an interrupted save (Ctrl-C, a full disk) left an earlier checkpoint's manifest over half-new
    weights (`uniql info` showed it whole), or a partial model.safetensors that prepare_out_dir then refused as a
    foreign directory; and files the new tokenizer does not write (an earlier model's chat_template.jinja) stayed
    and were loaded with the new model. Now an interruption before the move leaves ``out_dir`` as it was."""
    out = Path(out_dir)
    # the probe prefix: prepare_out_dir ignores a leftover
    staging = out / f"{WRITE_PROBE_PREFIX}staging-{os.getpid()}"
    # a run killed outright (no ``finally``) left its half-written weights hidden in --out for good
    drop_dead_process_folders(out, f"{WRITE_PROBE_PREFIX}staging-*")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_checkpoint(model, staging, **kwargs)
        (out / MANIFEST).unlink(missing_ok=True)  # first: until the new manifest lands, this is no checkpoint
        for old in out.iterdir():  # the replaced checkpoint's tokenizer files (the new one may write fewer); a
            if old.is_file() and old.name in SAVED_TOKENIZER_FILES:  # user's own files and folders stay
                old.unlink()
        for new in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
            os.replace(new, out / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _finish(model, tokenizer, finetune: FinetuneConfig | None, quant: QuantConfig | None, out_dir, timings: dict,
            device: str, dtype: str, later: dict | None = None, **manifest) -> Path | None:
    """Fine-tune (optional), quantize (optional) and save a sorted decoder (``later``: their data, from
    ``_later_data``; None: read when each starts). Under ``accelerate launch`` every process trains; only the main
    one quantizes and writes (the others return None)."""
    ft_provenance, later = None, later or {"examples": None, "gptq": None}
    if finetune is not None:
        with stage("finetune", timings, device):
            model, ft_provenance = finetune_decoder(model, tokenizer, finetune, loaded=later["examples"])
        from accelerate import PartialState

        if not PartialState().is_main_process:
            return None
    quantization = None
    if quant is not None:
        quant.group_size = manifest["alignment"].group_size
        with stage("quantize", timings, device):
            quantization = quantize_model(model, tokenizer, quant, device, batches=later["gptq"])
    with stage("save", timings, device):
        out = _save_replacing(model, out_dir, tokenizer=tokenizer, dtype=DTYPES[dtype], quantization=quantization,
                              finetune=ft_provenance, **manifest)
    log.info("wrote %s", out)
    return out


def finetune_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, finetune: FinetuneConfig,
                        quant: QuantConfig | None, device: str = "cpu", dtype: str = "float32") -> Path | None:
    """`uniql finetune`: masked LoRA on a SORTED checkpoint (floating-point weights, as `uniql compress --no-quant`
    writes it), merged, then quantized like `uniql compress` (unless ``quant`` is None)."""
    manifest = read_manifest(ckpt_dir)
    if manifest.get("weights") != "float":  # before prepare_out_dir: a refused run creates no --out
        raise ValueError(f"{ckpt_dir} holds {manifest.get('weights')} weights; fine-tuning needs the sorted "
                         "floating-point checkpoint: `uniql compress MODEL --no-quant --out DIR`")
    finetune.validate()  # its mistakes and quantization's before --out is created, not after loading the model
    checked_device(device)  # quantization runs there: a bad one was a traceback after the training
    if quant is not None:
        quant.validate()
    with _out_dir(out_dir, (ckpt_dir,)):
        _check_state_dir(finetune, (ckpt_dir,))
        _check_sources(quant, [])
        model, manifest = load_checkpoint(ckpt_dir, dtype=torch.float32)
        if quant is not None:
            _check_quantizable(model, manifest["alignment"]["group_size"])
        _check_context(model.spec.max_position_embeddings, quant, finetune, {})
        tokenizer = load_tokenizer(ckpt_dir)
        later = _later_data(tokenizer, finetune, quant)  # the GPTQ data failed only after the training
        timings: dict = {}
        calibration = {**manifest["calibration"], "finetuned_from": str(ckpt_dir), "timings": timings}
        return _finish(model, tokenizer, finetune, quant, out_dir, timings, device, dtype, later,
                       alignment=Alignment(**manifest["alignment"]), source=manifest["source"],
                       calibration=calibration)
