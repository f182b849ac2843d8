"""Calibration text -> token batches (with attention masks), from local files only.

Sources: ``alpaca`` (instruction data, one example per sequence, right-padded), ``wikitext2`` (the tokenized
validation split as a stream, random windows, no padding), ``shakespeare`` (public-domain text shipped in the
package: the fallback when the data folder is missing), or any path: ``.json``/``.jsonl`` with Alpaca fields or a
``text`` field (examples), anything else is plain text (stream).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from uniql.paths import NAMED_DATA_FILES, PACKAGED_TEXT, data_file

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
NAMED_SOURCES = NAMED_DATA_FILES


@dataclass
class CalibBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 = real token, 0 = right padding


def alpaca_prompt(record: dict) -> str:
    has_input = bool(record.get("input"))
    return ALPACA_TEMPLATE.format(
        ctx=", paired with an input that provides further context" if has_input else "",
        instruction=record["instruction"],
        input=f"### Input:\n{record['input']}\n\n" if has_input else "",
    )


def _record_text(record: dict) -> str:
    if "instruction" in record:
        return alpaca_prompt(record) + record.get("output", "")
    if isinstance(record.get("text"), str):  # not a null or a number: the tokenizer's error would not say which
        return record["text"]
    raise ValueError(f"calibration record has neither Alpaca fields nor 'text' (a string): keys {sorted(record)}")


def read_text(path: Path) -> str:
    """A text file's contents; a binary file is named in the error (the codec's message alone does not say which
    of the sources it was)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def resolve_source(source: str) -> Path:
    if source == "shakespeare":
        return PACKAGED_TEXT
    return data_file(NAMED_SOURCES[source]) if source in NAMED_SOURCES else Path(source)


def source_file(source: str, role: str) -> Path:
    """``resolve_source``, or FileNotFoundError naming the role (e.g. "fine-tuning data") when no file is there."""
    path = resolve_source(source)
    if not path.is_file():
        raise FileNotFoundError(f"{role} {source!r}: no file at {path}")
    return path


def read_records(path: Path) -> list[dict] | None:
    """Records of a .json/.jsonl file, or None for plain text (a bad record names its file and line)."""
    if path.suffix == ".json":
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: expected a JSON list of records (objects)")
        return records
    if path.suffix == ".jsonl":
        records = []
        for no, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{no}: expected a JSON object per line")
            records.append(record)
        return records
    return None


def load_texts(source: str) -> tuple[list[str], bool]:
    """(texts, is_examples): examples are separate sequences; otherwise one stream to cut windows from."""
    path = source_file(source, "calibration source")
    records = read_records(path)
    if records is not None:
        if not records:  # the tokenizer fails on an empty batch with an IndexError (a traceback)
            raise ValueError(f"calibration source {source!r}: {path} holds no records")
        return [_record_text(r) for r in records], True
    return [read_text(path)], False


def _pad_batches(seqs: list[list[int]], batch_size: int, pad_id: int) -> list[CalibBatch]:
    seqs = sorted(seqs, key=len, reverse=True)  # similar lengths together: little padding
    batches = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append(CalibBatch(ids, mask))
    return batches


def calibration_batches(tokenizer, source: str, n_samples: int, seqlen: int, seed: int = 1234,
                        batch_size: int = 8) -> list[CalibBatch]:
    """``n_samples`` sequences of at most ``seqlen`` tokens, batched with right padding."""
    texts, is_examples = load_texts(source)
    rng = random.Random(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if is_examples:
        rng.shuffle(texts)
        seqs = [ids[:seqlen] for ids in tokenizer(texts[: n_samples * 2])["input_ids"] if len(ids) > 1]
        seqs = seqs[:n_samples]
    else:
        stream = tokenizer(texts[0])["input_ids"]
        if len(stream) < seqlen:
            raise ValueError(f"calibration text has {len(stream)} tokens; need at least seqlen={seqlen}")
        starts = [rng.randrange(0, len(stream) - seqlen + 1) for _ in range(n_samples)]
        seqs = [stream[s:s + seqlen] for s in starts]
    if not seqs:
        raise ValueError(f"calibration source {source!r} gave no usable sequences")
    return _pad_batches(seqs, batch_size, pad_id)
