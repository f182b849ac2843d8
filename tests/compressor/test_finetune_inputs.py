"""Fine-tuning inputs: data files (errors that name file and line, text records, mixed kinds), settings checked
before any work, and resumes refused when anything that shapes the run differs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DATA

from uniql.compressor.finetune import FinetuneConfig, _resume_key, fingerprint
from uniql.compressor.finetune_data import load_examples
from uniql.compressor.finetune_state import _changed


def test_a_bad_jsonl_line_is_named_with_its_file_and_number(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})
    path.write_text("\n".join([good, "", good, '{"instruction": oops}']))
    with pytest.raises(ValueError, match=rf"{path}:4: not valid JSON"):
        load_examples(tokenizer, str(path), seqlen=64)
    records = tmp_path / "data.json"
    records.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": None}]))
    with pytest.raises(ValueError, match="record 0: an Alpaca record's output must be a string"):
        load_examples(tokenizer, str(records), seqlen=64)


def test_text_records_are_cut_into_windows_not_truncated(tokenizer, tmp_path):
    text = (DATA / "wikitext2_small.raw").read_text()[:6000]
    n_tokens = len(tokenizer(text)["input_ids"])
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": text}))
    examples, kind = load_examples(tokenizer, str(path), seqlen=64)
    assert kind == "text" and len(examples) == -(-n_tokens // 64)  # every token, in windows of 64
    assert sum(len(e.input_ids) for e in examples) == n_tokens


def test_a_file_mixing_record_kinds_says_so(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"text": "Plain text to learn from, long enough for a window."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."})))
    examples, kind = load_examples(tokenizer, str(path), seqlen=64)
    assert kind == "mixed" and len(examples) == 2


def test_settings_are_checked_before_any_work(tmp_path):
    local = str(DATA / "alpaca_small.json")  # CI has no shared data folder: the checks must not need it
    with pytest.raises(FileNotFoundError, match="typo.jsonl"):
        FinetuneConfig(data=f"{local},/nonexistent/typo.jsonl").validate()
    with pytest.raises(ValueError, match="rung weights"):
        FinetuneConfig(data=local, rung_weights=[-1.0, 2.0]).validate()
    state = tmp_path / "state"
    state.mkdir()
    (state / "latest.json").write_text(json.dumps({"step": 3, "dir": "step-3"}))
    with pytest.raises(ValueError, match="step 3: pass --resume"):
        FinetuneConfig(data=local, state_dir=str(state)).validate()  # a fresh run would replace that checkpoint
    FinetuneConfig(data=local, state_dir=str(state), resume=True).validate()


def test_a_resume_compares_every_setting_and_the_run_identity():
    cfg = FinetuneConfig(steps=4)
    key = _resume_key(cfg, 1, {"base": "abc", "data_sha256": ["d1"]})
    assert _changed(key, key) == {}
    for change in ({"distill": 0.5}, {"warmup_steps": 3}, {"weight_decay": 0.1}, {"max_grad_norm": 0.5},
                   {"max_examples": 10}, {"mixed_precision": "bf16"}):
        other = _resume_key(FinetuneConfig(**{**cfg.__dict__, **change}), 1, {"base": "abc", "data_sha256": ["d1"]})
        assert _changed(key, other), change
    assert set(_changed(key, _resume_key(cfg, 1, {"base": "xyz", "data_sha256": ["d1"]}))) == {"base"}
    # a state saved before these were recorded: distillation absent = off; the others are not compared
    legacy = {k: v for k, v in key.items() if k not in ("distill", "distill_temperature", "warmup", "base")}
    assert _changed(legacy, key) == {}
    assert set(_changed(legacy, _resume_key(FinetuneConfig(steps=4, distill=0.5), 1,
                                            {"base": "abc", "data_sha256": ["d1"]}))) == {"distill"}
    # "auto" as typed on both sides, resolved differently (a GPU run resumed on CPU): the resolved one tells
    gpu, cpu = (_resume_key(cfg, 1, {"base": "abc", "data_sha256": ["d1"]}, p) for p in ("bf16", "no"))
    assert _changed(gpu, cpu) == {"precision": ("bf16", "no")}
    assert _changed(key, cpu) == {}  # a state saved before the resolved precision was recorded


def test_the_fingerprint_sees_permutations_and_other_weights_but_not_fp_noise():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    permuted = torch.nn.Linear(16, 8)
    order = torch.randperm(8)
    with torch.no_grad():
        permuted.weight.copy_(model.weight[order])
        permuted.bias.copy_(model.bias[order])
    # adapters are bound to positions: a base sorted into another order must not resume them
    assert fingerprint(model) != fingerprint(permuted)
    with torch.no_grad():
        permuted.weight.copy_(model.weight * (1 + 1e-9 * torch.randn_like(model.weight)))
        permuted.bias.copy_(model.bias)
    assert fingerprint(model) == fingerprint(permuted)
    with torch.no_grad():
        permuted.weight[0, 0] += 0.5
    assert fingerprint(model) != fingerprint(permuted)
