"""Zero-shot accuracy through lm-evaluation-harness's own task definitions, fully offline.

lm-eval owns the prompts, choices, targets and metrics (its shipped YAML configs); we only swap each task's
dataset source for the local files described in ``shared/data/README.md`` and score requests with an
:class:`ElasticLM`, an ``lm_eval`` model wrapping our :class:`~uniql.runtime.decoder.ElasticDecoder`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from uniql.paths import cache_dir, data_file

_Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), ctx ids, cont ids)


@dataclass(frozen=True)
class LocalTask:
    """One of our task names, the lm-eval task it runs, and where its documents come from."""

    lm_eval_name: str  # task name in lm-eval's index
    folder: str  # folder under lm_eval/tasks holding its YAML
    split: str  # the split lm-eval evaluates on (must match the YAML's *_split key)
    default_file: str  # under the shared data folder
    metrics: Mapping[str, str]  # lm-eval metric name -> our key


ZERO_SHOT_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa", "piqa", "validation", "piqa/valid.jsonl",
                      {"acc": "acc", "acc_norm": "acc_norm"}),
    "arc_easy": LocalTask("arc_easy", "arc", "test", "arc/arc_easy_test.jsonl",
                          {"acc": "acc", "acc_norm": "acc_norm"}),
    "lambada": LocalTask("lambada_openai", "lambada", "test", "lambada/lambada_test.jsonl",
                         {"acc": "acc", "perplexity": "ppl"}),
}


class ElasticLM(TemplateLM):
    """``lm_eval`` model over an ElasticDecoder at one rung; scores log-likelihoods only.

    ``TemplateLM`` (lm-eval) turns each (context, continuation) into token ids exactly as HFLM does:
    trailing whitespace of the context moves to the continuation, ``context + continuation`` is encoded
    whole and the continuation ids are the tail beyond the encoded context.
    """

    def __init__(self, model, tokenizer, *, rung: int | None = None, batch_size: int = 16,
                 device: torch.device | str | None = None, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.rung, self.batch_size = model, tokenizer, rung, batch_size
        self._device = torch.device(device) if device else next(model.parameters()).device
        spec = getattr(model, "spec", None)
        self.max_length = max_length or getattr(spec, "max_position_embeddings", None) or 2048

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # The token that stands in for an empty context; HFLM prefers BOS, then EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        flags = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **flags)

    def _loglikelihood_tokens(self, requests: list[_Request], disable_tqdm: bool = False):
        """(sum of continuation logprobs, whether greedy decoding yields the continuation) per request."""
        # Longest first: every batch is padded to its first row, and memory peaks at once, not at the end.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="loglikelihood", disable=disable_tqdm):
            batch = order[start: start + self.batch_size]
            scores = self._score_batch([requests[i] for i in batch])
            for i, score in zip(batch, scores, strict=True):
                results[i] = score
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Request]) -> list[tuple[float, bool]]:
        # The model sees context + continuation minus its last token (that one is only predicted), cut from
        # the left to max_length like HFLM; right padding keeps every real token at its own position.
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
        width = max(len(row) for row in inputs)
        ids = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for b, row in enumerate(inputs):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        logits = self.model(ids.to(self._device), rung=self.rung, attention_mask=mask.to(self._device))
        scores = []
        for b, (_, _, cont) in enumerate(batch):
            end = len(inputs[b])  # logits at positions end-len(cont) .. end-1 predict the continuation
            logprobs = logits[b, end - len(cont): end].float().log_softmax(-1)  # [C, V]
            target = torch.tensor(cont, device=logprobs.device)
            total = logprobs.gather(-1, target[:, None]).sum().item()
            scores.append((total, bool((logprobs.argmax(-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ElasticLM scores loglikelihood only; use wikitext2_ppl for perplexity")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("ElasticLM scores loglikelihood only; generation tasks are not supported")


def _cache_dir() -> Path:
    return cache_dir() / "eval_data"  # UNIQL_CACHE_DIR honoured, as for the default model


def _piqa_with_labels(questions: Path) -> Path:
    """PIQA keeps labels in ``<stem>-labels.lst``; lm-eval's YAML reads a ``label`` field, so merge them."""
    labels_path = questions.with_name(f"{questions.stem}-labels.lst")
    raw, labels = questions.read_bytes(), labels_path.read_bytes()
    # Named by content: a changed source never reuses a stale merge, and datasets' cache keys stay stable.
    digest = hashlib.sha256(raw + b"\0" + labels).hexdigest()[:16]
    merged = _cache_dir() / f"piqa_{digest}.jsonl"
    if merged.exists():
        return merged
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    label_values = [int(x) for x in labels.split()]
    if len(rows) != len(label_values):
        raise ValueError(f"{questions} has {len(rows)} rows but {labels_path} has {len(label_values)} labels")
    merged.parent.mkdir(parents=True, exist_ok=True)
    tmp = merged.with_name(f"{merged.name}.{os.getpid()}.tmp")  # then an atomic rename: no torn reads
    tmp.write_text("".join(json.dumps({**r, "label": y}) + "\n" for r, y in zip(rows, label_values, strict=True)))
    tmp.replace(merged)
    return merged


def _local_file(task: str, data_paths: Mapping[str, str | Path] | None) -> Path:
    if data_paths and task in data_paths:
        path = Path(data_paths[task])
    else:
        path = data_file(ZERO_SHOT_TASKS[task].default_file)
    return _piqa_with_labels(path) if task == "piqa" else path


def _local_config(task: str, task_manager, data_paths) -> dict:
    """lm-eval's own config for ``task``, reading its one evaluated split from a local JSON-lines file."""
    spec = ZERO_SHOT_TASKS[task]
    config = deepcopy(task_manager.task_index[spec.lm_eval_name].cfg)
    config.update(
        dataset_path="json", dataset_name=None,
        dataset_kwargs={"data_files": {spec.split: str(_local_file(task, data_paths))}},
        # Only the evaluated split exists locally; lm-eval would otherwise index the absent train split
        # for few-shot sampling while building the task, even at zero shots.
        training_split=None,
        validation_split=spec.split if spec.split == "validation" else None,
        test_split=spec.split if spec.split == "test" else None,
    )
    return config


@contextmanager
def _offline() -> Iterator[None]:
    """Hub libraries offline while lm-eval builds tasks (local json files need no hub; this makes it certain).

    datasets and huggingface_hub read these variables when first imported, which in a process that has not
    touched them yet happens inside this block (``import lm_eval``); otherwise the caller's settings rule.
    """
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _no_git_probe() -> Iterator[None]:
    """lm-eval stamps its results with ``git describe`` of the working directory, whose "fatal: not a git
    repository" lands on the user's terminal outside a repository; we never read that stamp, so skip the probe."""
    import lm_eval.evaluator

    if not hasattr(lm_eval.evaluator, "get_git_commit_hash"):  # another lm-eval version: leave it alone
        yield
        return
    saved = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = saved


def _task_manager(tasks: Sequence[str]):
    """A TaskManager indexing only our tasks' folders (indexing all of lm-eval's takes ~10 s)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({root / ZERO_SHOT_TASKS[t].folder for t in tasks})
    return lm_eval.tasks.TaskManager(include_defaults=False, include_path=folders)


def _our_metrics(task: str, results: dict) -> dict:
    spec = ZERO_SHOT_TASKS[task]
    row = results["results"][spec.lm_eval_name]
    out = {ours: float(row[f"{name},none"]) for name, ours in spec.metrics.items()}
    out["n"] = int(results["n-samples"][spec.lm_eval_name]["effective"])
    if results.get("samples"):  # per_doc: "1" / "0" per document in document order (paired comparisons)
        samples = sorted(results["samples"][spec.lm_eval_name], key=lambda s: s["doc_id"])
        out["correct"] = "".join("1" if s["acc"] else "0" for s in samples)
    return out


def zero_shot(model, tokenizer, tasks: Sequence[str] = ("piqa", "arc_easy", "lambada"), *,
              rung: int | None = None, limit: int | None = None, batch_size: int = 16,
              device: torch.device | str | None = None,
              data_paths: Mapping[str, str | Path] | None = None, per_doc: bool = False) -> dict[str, dict]:
    """Zero-shot metrics per task, e.g. ``{"piqa": {"acc", "acc_norm", "n"}, "lambada": {"acc", "ppl", "n"}}``.

    ``limit`` evaluates the first ``limit`` documents of each task; ``data_paths`` maps a task name to a
    JSON-lines file replacing the shared data (for PIQA, labels are read from ``<stem>-labels.lst`` beside it).
    ``per_doc`` adds ``"correct"``: one "1"/"0" per document, in document order, for paired comparisons of two
    models on the same documents (:func:`uniql.compressor.evaluate.paired_change`).
    """
    unknown = [t for t in tasks if t not in ZERO_SHOT_TASKS]
    if unknown:
        raise ValueError(f"unknown zero-shot task(s) {unknown}; valid: {sorted(ZERO_SHOT_TASKS)}")
    tasks = list(dict.fromkeys(tasks))  # lm-eval rejects a task listed twice
    with _offline():
        # Imported here: the evaluator pulls in datasets and friends (seconds), which perplexity runs skip.
        import lm_eval

        manager = _task_manager(tasks)
        configs = [_local_config(t, manager, data_paths) for t in tasks]
        lm = ElasticLM(model, tokenizer, rung=rung, batch_size=batch_size, device=device)
        # bootstrap_iters=0: stderr bootstraps (100k resamples by default) cost more than small runs.
        # The *_seed=None: zero-shot scoring draws no random numbers, and simple_evaluate would otherwise
        # reseed the caller's global python/numpy/torch generators.
        with _no_git_probe():
            results = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=manager, limit=limit,
                                              bootstrap_iters=0, log_samples=per_doc, random_seed=None,
                                              numpy_random_seed=None, torch_random_seed=None)
    return {t: _our_metrics(t, results) for t in tasks}
