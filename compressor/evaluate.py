"""Quality of a (compressed) model at a rung: WikiText-2 perplexity and lm-eval zero-shot accuracy.

Perplexity follows the GPTQ protocol so numbers compare with the papers: the HF ``wikitext-2-raw-v1`` test
rows joined by blank lines, tokenized once, cut into non-overlapping ``seqlen`` windows (the last partial
window dropped), ``exp`` of the mean next-token NLL over every predicted token. Zero-shot tasks run through
lm-eval's own task definitions (see :mod:`uniql.compressor.eval_tasks`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from uniql.paths import data_file

from .eval_tasks import ZERO_SHOT_TASKS, ElasticLM, zero_shot

__all__ = ["ElasticLM", "TASKS", "evaluate", "paired_change", "wikitext2_ppl", "zero_shot"]

PPL_TASKS = ("wikitext2",)
TASKS = PPL_TASKS + tuple(ZERO_SHOT_TASKS)


def wikitext2_rows(path: str | Path) -> list[str]:
    """The HF ``wikitext-2-raw-v1`` test rows: lines keep their newline, blank lines become ""."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f.readlines()]


def _token_stream(tokenizer, path: str | Path) -> torch.Tensor:
    """All test tokens [N], tokenized in one go with the tokenizer's own defaults (BOS only if it adds one)."""
    text = "\n\n".join(wikitext2_rows(path))
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _windows_nll(model, windows: torch.Tensor, rung: int | None) -> float:
    """Summed next-token NLL (fp64) of ``windows`` [B, T], each window scored on its own."""
    logits = model(windows, rung=rung)  # [B, T, V]
    total = 0.0
    # Row by row: a [T, V] fp32 copy at a time instead of the whole [B, T, V] batch upcast at once.
    for row_logits, row_ids in zip(logits, windows, strict=True):
        total += F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum").double().item()
    return total


@torch.inference_mode()
def wikitext2_ppl(model, tokenizer, *, rung: int | None = None, path: str | Path | None = None,
                  seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 4,
                  device: torch.device | str | None = None) -> dict:
    """``{"ppl", "nll", "tokens", "windows", "seqlen"}``; ``tokens`` counts predicted tokens (seqlen - 1 a window)."""
    stream = _token_stream(tokenizer, path or data_file("wikitext2/wiki.test.raw"))
    n_windows = stream.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)  # [W, seqlen]
    device = torch.device(device) if device else _model_device(model)
    nll = 0.0
    with tqdm(total=n_windows, desc=f"wikitext2 ppl (seqlen {seqlen})", unit="win") as bar:
        for start in range(0, n_windows, batch_size):
            batch = windows[start: start + batch_size].to(device)
            nll += _windows_nll(model, batch, rung)
            bar.update(len(batch))
    tokens = n_windows * (seqlen - 1)
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
            "windows": n_windows, "seqlen": seqlen}


def evaluate(model, tokenizer, tasks: Sequence[str], *, rung: int | None = None, limit: int | None = None,
             seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 16,
             ppl_batch_size: int = 4, device: torch.device | str | None = None,
             data_paths: Mapping[str, str | Path] | None = None, per_doc: bool = False) -> dict[str, dict]:
    """Run ``tasks`` (any of :data:`TASKS`) at ``rung``: ``{"wikitext2": {"ppl": ...}, "piqa": {"acc": ...}}``.

    ``limit`` caps the documents of each zero-shot task, ``max_windows`` the perplexity windows;
    ``data_paths`` maps a task name to a local file replacing the shared data; ``per_doc`` adds each zero-shot
    task's per-document ``"correct"`` string.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {list(TASKS)}")
    if not tasks:
        raise ValueError(f"no task given; valid tasks: {list(TASKS)}")
    counts = {"batch_size": batch_size, "ppl_batch_size": ppl_batch_size,
              "limit": 1 if limit is None else limit, "max_windows": 1 if max_windows is None else max_windows}
    bad = [f"{name}={value}" for name, value in counts.items() if value < 1]
    if bad:
        raise ValueError(f"these must be at least 1: {', '.join(bad)}")
    if seqlen < 2:  # a window predicts seqlen - 1 tokens
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    context = getattr(getattr(model, "spec", None), "max_position_embeddings", None)
    if "wikitext2" in tasks and context is not None and seqlen > context:
        raise ValueError(f"seqlen {seqlen} exceeds the model's context of {context} tokens")
    results: dict[str, dict] = {}
    if "wikitext2" in tasks:
        path = (data_paths or {}).get("wikitext2")
        results["wikitext2"] = wikitext2_ppl(model, tokenizer, rung=rung, path=path, seqlen=seqlen,
                                             max_windows=max_windows, batch_size=ppl_batch_size, device=device)
    zero_shot_tasks = [t for t in tasks if t in ZERO_SHOT_TASKS]
    if zero_shot_tasks:
        results.update(zero_shot(model, tokenizer, zero_shot_tasks, rung=rung, limit=limit,
                                 batch_size=batch_size, device=device, data_paths=data_paths, per_doc=per_doc))
    return {t: results[t] for t in tasks}


def paired_change(before: str, after: str) -> dict:
    """Accuracy change between two models on the same documents (``"correct"`` strings of :func:`zero_shot`).

    A difference of a point on PIQA's 1838 documents is within the noise of either accuracy alone, but the two
    models share the documents: only those where they disagree carry information. McNemar's exact test: under
    "no change", each disagreement is a fair coin; ``p`` is the two-sided binomial probability of a split at
    least as uneven as ``gained`` vs ``lost``."""
    if len(before) != len(after) or not before or set(before + after) - {"0", "1"}:
        raise ValueError("need two equally long, non-empty strings of '0'/'1' (same documents, same order)")
    gained = sum(b == "0" and a == "1" for b, a in zip(before, after, strict=True))
    lost = sum(b == "1" and a == "0" for b, a in zip(before, after, strict=True))
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n if n else 1.0
    return {"n": len(before), "delta": (gained - lost) / len(before), "gained": gained, "lost": lost,
            "p_mcnemar": min(1.0, 2 * tail)}
