"""Masked LoRA recovery: ONE fine-tuning run whose merged weights serve every rung of the ladder.

Every optimizer step draws a rung (rate 0 included; heavier rungs more often, like the paper's
``exp(-0.1 * rank)``) and runs the whole step at that rung: the decoder truncates every projection to the rung's
kept sizes from the checkpoint's ladder (runtime/ladder.py, the same sizes the kernels and the server use) and the
LoRA deltas are truncated with them (compressor/lora.py). The rung is a pure function of (seed, step), so every
DDP rank draws the same one and gradients are never averaged across rungs; batches are a pure function of
(seed, step) too (compressor/finetune_data.py), so a resumed run continues exactly where it stopped.

Runs single-process or under ``accelerate launch`` (DDP; ``--cpu --num_processes 2`` for tests): bf16 autocast
on GPU, gradient accumulation, adapter checkpoints every ``save_every`` steps, a progress bar on the main process.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from uniql.runtime.checkpoint import sha256_file
from uniql.runtime.decoder import ElasticDecoder

from .calib_data import resolve_source, source_file
from .finetune_data import IGNORE, Batch, Example, StepSchedule, collate, load_examples, loss_tokens
from .finetune_state import latest_step, load_state, save_state
from .lora import LoraSettings, adapter_state, add_lora, merge_lora, resolve_targets

LOSS_ON = {"instruction": "response + EOS (Alpaca template)", "text": "every token",
           "mixed": "response + EOS for Alpaca records, every token for text records"}


@dataclass
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 8  # sequences per micro-batch on each process
    grad_accum: int = 2  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    seqlen: int = 512
    lr: float = 2e-4
    warmup_steps: int | None = None  # None: 10 % of the steps (at most 100)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    data: str = "alpaca"  # a source, or several joined by commas (their examples are pooled)
    max_examples: int | None = None
    rung_decay: float = 0.1  # P(rung) ~ exp(-decay * (heaviest rung - rung)); 0 = uniform
    rung_weights: list[float] | None = None  # explicit weights per rung (override rung_decay)
    # self-distillation: loss = (1 - distill) * NLL + distill * T^2 * KL(teacher || student) on the same tokens,
    # the teacher being the model itself at rung 0 with the adapters switched off (0 = plain causal-LM loss)
    distill: float = 0.0
    distill_temperature: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 1234
    save_every: int = 100  # adapter checkpoint period in steps (0: only at the end)
    state_dir: str | None = None  # where adapter checkpoints go; None: no checkpoints
    resume: bool = False  # continue from the latest checkpoint in state_dir
    device: str | None = None  # "cpu" forces CPU; None lets accelerate pick (GPU when present)
    # bf16 autocast: "auto" = on GPU only (CPU runs stay fp32, so their numbers do not depend on the CPU model);
    # "bf16" also on CPU (AMX / AVX512-BF16 make its matmuls ~8x faster, a step ~10-20 %); "no" = fp32 everywhere.
    # The weights and the LoRA masters stay fp32 either way.
    mixed_precision: str = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seqlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"fine-tuning {name} must be positive")
        # each had a silent meaning: max_examples 0 = all of them, -1 = all but the last record; save_every -1 =
        # every step; a negative warmup a schedule that starts part-way down its decay
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"--finetune-max-examples must be at least 1, got {self.max_examples}")
        if self.save_every < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError(f"--finetune-save-every and --finetune-warmup must be >= 0, got {self.save_every} "
                             f"and {self.warmup_steps}")
        if self.state_dir and Path(self.state_dir).exists() and not Path(self.state_dir).is_dir():
            # found now, not at the first adapter checkpoint after the training it was to keep
            raise ValueError(f"fine-tuning state directory {self.state_dir} is a file")
        # nan / inf passed these comparisons and trained to a NaN checkpoint, written with exit 0
        if not (0 < self.lr < math.inf and 0 <= self.rung_decay < math.inf):
            raise ValueError(f"fine-tuning needs a finite lr > 0 and rung_decay >= 0, got {self.lr} and "
                             f"{self.rung_decay}")
        if not (0.0 <= self.distill <= 1.0 and 0 < self.distill_temperature < math.inf):
            raise ValueError("distillation needs a weight in [0, 1] and a positive, finite temperature")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no or bf16, not {self.mixed_precision!r}")
        if self.resume and not self.state_dir:
            raise ValueError("resuming needs the state directory of the run to continue")
        saved = None if self.resume or not self.state_dir else latest_step(self.state_dir)
        if saved is not None:  # a fresh run would replace that run's checkpoint at its first save
            raise ValueError(f"{self.state_dir} holds the adapter checkpoint of a run at step {saved}: pass --resume "
                             "to continue it, or choose another state directory (--finetune-state-dir / --out)")
        if self.rung_weights is not None and not (all(0 <= w < math.inf for w in self.rung_weights)
                                                  and sum(self.rung_weights) > 0):
            raise ValueError(f"rung weights must be >= 0 with a positive sum, got {self.rung_weights}")
        for source in self.sources():
            source_file(source, "fine-tuning data")
        self.lora.validate()

    def sources(self) -> list[str]:
        return [d.strip() for d in self.data.split(",") if d.strip()]  # "alpaca,wikitext2" pools sources

    def warmup(self) -> int:
        return min(100, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


def rung_probabilities(n_rungs: int, decay: float = 0.1, weights: list[float] | None = None) -> list[float]:
    """Draw probability of each rung; by default heavier pruning is drawn more often (paper: exp(-0.1 rank))."""
    if weights is not None:
        if len(weights) != n_rungs or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"rung weights need {n_rungs} non-negative values with a positive sum, got {weights}")
        raw = list(weights)
    else:
        raw = [math.exp(-decay * (n_rungs - 1 - i)) for i in range(n_rungs)]
    total = sum(raw)
    return [w / total for w in raw]


def draw_rung(probs: list[float], seed: int, step: int) -> int:
    """The rung of optimizer step ``step``: identical on every process and after a resume."""
    return random.Random(seed * 1_000_003 + step).choices(range(len(probs)), weights=probs)[0]


class RungLoss(nn.Module):
    """The module DDP wraps: summed next-token loss over the label tokens at a rung, divided by ``denom``.

    With ``distill > 0`` the loss mixes in a KL term towards the frozen model's own predictions at rung 0
    (the sorted model without adapters): pruned rungs are pulled towards what the full model says on every
    token, not only towards the fine-tuning text, which keeps the knowledge zero-shot tasks measure."""

    def __init__(self, model, distill: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.distill = distill
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, labels, rung: int, denom: float) -> torch.Tensor:
        logits = self.model(input_ids, rung=rung, attention_mask=attention_mask)[:, :-1]
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        if self.distill == 0.0:
            return nll / denom
        keep = targets != IGNORE
        kl = self._distill_kl(input_ids, attention_mask, keep, logits[keep])
        return ((1.0 - self.distill) * nll + self.distill * kl) / denom

    def _distill_kl(self, input_ids, attention_mask, keep, student: torch.Tensor) -> torch.Tensor:
        """Summed T^2 * KL(teacher || student) over the label positions ``keep`` (student logits [n, V])."""
        with torch.no_grad(), self.model.disable_adapter():
            teacher = self.model(input_ids, rung=0, attention_mask=attention_mask)[:, :-1][keep]
        t = self.temperature
        log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
        log_p_student = F.log_softmax(student.float() / t, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * (t * t)


def _lr_lambda(cfg: FinetuneConfig):
    warmup, steps = cfg.warmup(), cfg.steps

    def factor(step: int) -> float:  # linear warmup, then linear decay to 0 (HF Trainer's default)
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


def _accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", precision) != precision:
        # accelerate keeps one process-wide state and refuses a second run in another precision; the process
        # group (PartialState) survives the reset, so this is safe under `accelerate launch` too
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Run:
    """What a training run accumulates (saved with the adapter, reported in the manifest)."""
    step: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    rungs: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def _micro_step(acc, module, batch: Batch, rung: int, denom: float, sync: bool) -> float:
    ids, mask, labels = (t.to(acc.device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
    if sync:
        loss = module(ids, mask, labels, rung, denom)
        acc.backward(loss)
    else:
        with acc.no_sync(module):
            loss = module(ids, mask, labels, rung, denom)
            acc.backward(loss)
    return loss.detach().float()


def train_lora(peft_model, examples: list[Example], pad_id: int, cfg: FinetuneConfig, n_rungs: int,
               acc=None, identity: dict | None = None) -> tuple[dict, _Run]:
    """Train the adapters of ``peft_model`` in place; returns (provenance fields, run record). ``identity``
    (base weights, data files) joins the settings a resume must share."""
    acc = acc or _accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    global_batch = cfg.batch_size * cfg.grad_accum * world
    schedule = StepSchedule(len(examples), global_batch, cfg.seed)
    probs = rung_probabilities(n_rungs, cfg.rung_decay, cfg.rung_weights)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))  # stepped by us, once per step
    loss_module = RungLoss(peft_model, cfg.distill, cfg.distill_temperature).train()
    module, optimizer = acc.prepare(loss_module, optimizer)
    key = _resume_key(cfg, world, identity, acc.mixed_precision)
    run = None
    if cfg.resume:  # after prepare: the optimizer state lands on the parameters' device
        run = load_state(cfg.state_dir, peft_model, optimizer, scheduler, rank, _Run, key)
    if run is None:
        run = _Run()
        torch.manual_seed(cfg.seed + 17 * rank)  # LoRA dropout differs by rank; restored exactly on resume
    first_step = run.step
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=run.step, desc="masked LoRA", unit="step", disable=not acc.is_main_process)
    while run.step < cfg.steps:
        rung = draw_rung(probs, cfg.seed, run.step)
        chunks = schedule.micro_batches(run.step, rank, world, cfg.grad_accum)
        global_examples = [examples[i] for i in schedule.global_indices(run.step)]
        denom = sum(loss_tokens(e) for e in global_examples) / world  # DDP averages over ranks
        local = torch.zeros((), device=acc.device)
        for a, chunk in enumerate(chunks):
            batch = collate([examples[i] for i in chunk], pad_id)
            local += _micro_step(acc, module, batch, rung, denom, sync=a == len(chunks) - 1)
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = acc.reduce(local, reduction="sum").item() / world
        run.step += 1
        run.rungs.append(rung)
        run.losses.append(round(loss, 5))
        run.tokens += sum(len(e.input_ids) for e in global_examples)
        run.loss_tokens += sum(loss_tokens(e) for e in global_examples)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", rung=rung)
        if cfg.state_dir and (run.step == cfg.steps or (cfg.save_every and run.step % cfg.save_every == 0)):
            run.wall_s += time.perf_counter() - start
            start = time.perf_counter()
            save_state(cfg.state_dir, peft_model, optimizer, scheduler, acc, run, key)
    bar.close()
    run.wall_s += time.perf_counter() - start
    return {**_provenance(cfg, acc, peft_model, probs, run, global_batch), "resumed_from_step": first_step}, run


def _resume_key(cfg: FinetuneConfig, world: int, identity: dict | None = None, precision: str | None = None) -> dict:
    """Everything a resumed run must share with the run it continues: the settings that shape batches, rungs and
    updates, and (``identity``) the base weights and data files themselves. ``precision``: the one the run
    resolved (``auto`` is bf16 on a GPU, fp32 on CPU: the setting as typed let a GPU run resume on CPU)."""
    return {"steps": cfg.steps, "seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "world": world, "seqlen": cfg.seqlen, "data": cfg.data, "rung_decay": cfg.rung_decay,
            "rung_weights": cfg.rung_weights, "lora": asdict(cfg.lora), "lr": cfg.lr, "distill": cfg.distill,
            "distill_temperature": cfg.distill_temperature, "warmup": cfg.warmup(), "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm, "max_examples": cfg.max_examples,
            "mixed_precision": cfg.mixed_precision, **({"precision": precision} if precision else {}),
            **(identity or {})}


def fingerprint(model: nn.Module) -> str:
    """The weights' identity for a resume check: per tensor, the sum, the sum of squares and a position-weighted sum
    (each element times its flat index / numel) in float64 to 6 digits. fp noise leaves it unchanged; another model,
    rung ladder or sorting changes it, and so does a channel permutation: the saved adapters' rows and columns are
    bound to positions, so a base sorted into another order (near-ties broken otherwise) must not resume them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        total = squares = moment = 0.0
        flat, start = t.detach().reshape(-1), 0
        for chunk in flat.split(1 << 22):  # float64 in slices: no full-size copy of a big table
            c64 = chunk.double()
            position = torch.arange(start, start + c64.numel(), dtype=torch.float64, device=c64.device)
            total += c64.sum().item()
            squares += c64.square().sum().item()
            moment += (c64 * position).sum().item() / max(1, flat.numel())
            start += c64.numel()
        h.update(f"{name}:{tuple(t.shape)}:{total:.6g}:{squares:.6g}:{moment:.6g}".encode())
    return h.hexdigest()[:16]


def _provenance(cfg, acc, peft_model, probs, run: _Run, global_batch: int) -> dict:
    from accelerate.utils import gather_object

    per_rank = gather_object([{"rank": acc.process_index, "adapter_sha256": _digest(adapter_state(peft_model)),
                               "rungs": run.rungs}])
    device = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
    return {
        "steps": run.step, "tokens": run.tokens, "loss_tokens": run.loss_tokens, "wall_s": round(run.wall_s, 2),
        "device": device, "processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
        "global_batch": global_batch, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "seqlen": cfg.seqlen, "lr": cfg.lr, "warmup_steps": cfg.warmup(), "weight_decay": cfg.weight_decay,
        "schedule": "linear warmup, linear decay", "seed": cfg.seed,
        "rung_weighting": {"decay": cfg.rung_decay, "weights": cfg.rung_weights, "probabilities": probs,
                           "drawn": [run.rungs.count(i) for i in range(len(probs))]},
        "distill": {"weight": cfg.distill, "temperature": cfg.distill_temperature,
                    "teacher": "the sorted model at rung 0 without adapters" if cfg.distill else None},
        "lora": asdict(cfg.lora), "loss_first": run.losses[0] if run.losses else None,
        "loss_last_10": sum(run.losses[-10:]) / max(1, len(run.losses[-10:])),
        "ranks": per_rank,
    }


def load_sources(tokenizer, cfg: FinetuneConfig) -> list[tuple[list[Example], str]]:
    """(examples, kind) of each of ``cfg``'s data sources."""
    return [load_examples(tokenizer, src, cfg.seqlen, cfg.max_examples) for src in cfg.sources()]


def finetune_decoder(model: ElasticDecoder, tokenizer, cfg: FinetuneConfig,
                     loaded: list | None = None) -> tuple[ElasticDecoder, dict]:
    """Masked LoRA on a sorted decoder with a ladder; returns the merged decoder (on CPU) and the provenance
    (``loaded``: ``load_sources(tokenizer, cfg)`` if already read)."""
    cfg.validate()
    if model.ladder is None:
        raise ValueError("fine-tuning needs a sorted model with a rate ladder (run the compressor's sorting first)")
    sources = cfg.sources()
    loaded = load_sources(tokenizer, cfg) if loaded is None else loaded
    examples = [e for part, _ in loaded for e in part]
    targets = resolve_targets(model, cfg.lora.targets)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    digests = [sha256_file(resolve_source(src)) for src in sources]
    identity = None if not cfg.state_dir else {  # what a resume must match; nothing to resume without a state dir
        "base": fingerprint(model), "data_sha256": digests, "ladder": list(model.ladder.rates)}
    peft_model = add_lora(model, cfg.lora, cfg.seed)
    acc = _accelerator(cfg)
    provenance, _ = train_lora(peft_model, examples, pad_id, cfg, len(model.ladder.rates), acc, identity)
    provenance["lora"]["targets"] = targets
    provenance["data"] = [{"source": src, "path": str(resolve_source(src)), "sha256": digest,
                           "examples": len(part), "kind": kind, "loss_on": LOSS_ON[kind]}
                          for src, (part, kind), digest in zip(sources, loaded, digests, strict=True)]
    merged = merge_lora(peft_model).cpu()
    acc.free_memory()
    return merged, provenance
