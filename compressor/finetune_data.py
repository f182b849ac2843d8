"""Fine-tuning data: token sequences with loss labels, and a step -> global batch schedule.

Sources (``--finetune-data``): ``alpaca`` (shared/data/alpaca/alpaca_5000.json), ``wikitext2`` (the validation
split as text), or a path: ``.json`` / ``.jsonl`` records with Alpaca fields (instruction, input, output) or a
``text`` field, anything else plain text. Alpaca records use the standard prompt template; the loss is on the
response tokens (and the closing EOS) only. Text is cut into ``seqlen`` windows trained on every token.
Padding is always masked out of the loss (label -100) and out of attention.

Batches are a pure function of (seed, step): an epoch is a seeded permutation of the examples, step ``s``
takes the next ``global_batch`` of them. Every DDP rank computes the same global batch and takes its own rows,
and a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .calib_data import alpaca_prompt, read_records, read_text, source_file

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss (prompt); else the token itself (shifted inside the loss)


def instruction_example(tokenizer, record: dict, seqlen: int) -> Example:
    """Prompt (no loss) + response + EOS (loss), truncated to ``seqlen``; prompt and response tokenized apart
    so the boundary never merges into one token."""
    output = record.get("output", "")
    if not isinstance(output, str):
        raise ValueError(f"an Alpaca record's output must be a string, got {output!r}")
    prompt = tokenizer(alpaca_prompt(record))["input_ids"]
    response = tokenizer(output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + response)[:seqlen]
    labels = ([IGNORE] * len(prompt) + response)[:seqlen]
    return Example(ids, labels)


def text_windows(tokenizer, text: str, seqlen: int) -> list[Example]:
    stream = tokenizer(text)["input_ids"]
    windows = [stream[s:s + seqlen] for s in range(0, len(stream) - seqlen + 1, seqlen)]
    if not windows:
        raise ValueError(f"the fine-tuning text has {len(stream)} tokens, fewer than one window of {seqlen}")
    return [Example(w, list(w)) for w in windows]


def record_windows(tokenizer, text: str, seqlen: int) -> list[Example]:
    """A ``text`` record in ``seqlen`` windows, its shorter tail included (one record is one document)."""
    ids = tokenizer(text)["input_ids"]
    return [Example(w, list(w)) for w in (ids[s:s + seqlen] for s in range(0, len(ids), seqlen))]


def load_examples(tokenizer, source: str, seqlen: int, max_examples: int | None = None) -> tuple[list[Example], str]:
    """(examples with at least one loss token in file order, kind: "instruction" | "text" | "mixed")."""
    path = source_file(source, "fine-tuning data")
    records = read_records(path)
    if records is None:
        examples, kinds = text_windows(tokenizer, read_text(path), seqlen), {"text"}
    else:
        examples, kinds = [], set()
        for i, r in enumerate(records[:max_examples] if max_examples else records):
            if "instruction" in r:
                try:
                    examples.append(instruction_example(tokenizer, r, seqlen))
                except ValueError as err:
                    raise ValueError(f"{path}: record {i}: {err}") from None
                kinds.add("instruction")
            elif isinstance(r.get("text"), str):
                examples += record_windows(tokenizer, r["text"], seqlen)
                kinds.add("text")
            else:
                raise ValueError(f"{path}: record {i} has neither Alpaca fields nor a 'text' string (keys {sorted(r)})")
    kind = kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "text"
    examples = [e for e in examples if sum(label != IGNORE for label in e.labels[1:]) > 0]
    if not examples:
        raise ValueError(f"fine-tuning data {source!r} gave no example with a response token")
    return (examples[:max_examples] if max_examples else examples), kind


def loss_tokens(example: Example) -> int:
    """Tokens that are predicted with a loss (the first position is never a target)."""
    return sum(label != IGNORE for label in example.labels[1:])


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    labels: torch.Tensor  # [B, T], IGNORE on prompt and padding


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


class StepSchedule:
    """Which examples each optimizer step uses, split over ranks and accumulation micro-batches."""

    def __init__(self, n_examples: int, global_batch: int, seed: int):
        if global_batch < 1:
            raise ValueError("the global batch must hold at least one example")
        self.n, self.global_batch, self.seed = n_examples, global_batch, seed
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(self.n))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._epochs = {epoch: order}  # only the current epoch is kept
        return self._epochs[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        return [self._epoch(i // self.n)[i % self.n] for i in range(start, start + self.global_batch)]

    def micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[list[int]]:
        """``accum`` lists of example indices for ``rank``: the global batch dealt out row by row."""
        mine = self.global_indices(step)[rank::world]
        size = len(mine) // accum
        return [mine[a * size:(a + 1) * size] for a in range(accum)]
