"""The layer-wise calibration driver (padding never enters a statistic) and the calibration batches."""

import copy
import json

import pytest
import torch
from helpers import max_rel_diff, tiny_hf_model

from uniql.compressor.calib_data import CalibBatch, calibration_batches, load_texts
from uniql.compressor.calibrate import BlockImportanceCollector, SortStatsCollector, run_layerwise
from uniql.runtime.hf_import import decoder_from_hf

TOL = 1e-5  # statistics are fp32 grams accumulated in fp64; a leaked padded token would be O(1)
STATS = ("attn_in_corr", "attn_in_sum", "mlp_hidden_corr")
PAD = 7

_gen = torch.Generator().manual_seed(0)
SEQ_A = torch.randint(0, 320, (12,), generator=_gen)
SEQ_B = torch.randint(0, 320, (7,), generator=_gen)


@pytest.fixture(scope="module")
def model():
    return decoder_from_hf(tiny_hf_model("qwen2", layers=3))


def _padded_batch() -> CalibBatch:
    ids = torch.full((2, 12), PAD, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, seq in enumerate((SEQ_A, SEQ_B)):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return CalibBatch(ids, mask)


def _alone(seq) -> CalibBatch:
    return CalibBatch(seq[None], torch.ones(1, len(seq), dtype=torch.long))


def _calibrate(model, batches, extra=None):
    stats = []

    def on_layer(index, layer, s):
        stats.append(s)
        if extra is not None:
            extra(index, layer)

    bi = BlockImportanceCollector()
    run_layerwise(model, batches, [SortStatsCollector(on_layer), bi])
    return stats, bi.scores


def test_padding_never_enters_a_statistic(model):
    padded, bi_padded = _calibrate(model, [_padded_batch()])
    alone, bi_alone = _calibrate(model, [_alone(SEQ_A), _alone(SEQ_B)])
    assert len(padded) == len(alone) == 3
    for p, a in zip(padded, alone, strict=True):
        assert p.tokens == a.tokens == 19
        for name in STATS:
            assert max_rel_diff(getattr(p, name), getattr(a, name)) <= TOL, name
    assert bi_padded == pytest.approx(bi_alone, rel=TOL, abs=1e-7)
    assert min(bi_padded) > 1e-3  # layers change their input: the scores are not trivially zero


def test_layer0_attention_input_is_the_normed_embedding(model):
    (stats, *_), _ = _calibrate(model, [_padded_batch()])
    norm = model.layers[0].input_norm
    x = model.embed.weight[torch.cat((SEQ_A, SEQ_B))].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
    assert stats.attn_in_corr.dtype == torch.float64
    assert max_rel_diff(stats.attn_in_corr, x.T @ x) <= TOL
    assert max_rel_diff(stats.attn_in_sum, x.sum(0)) <= TOL


def test_driver_leaves_the_model_on_cpu_in_its_dtype_unchanged():
    bf16 = decoder_from_hf(tiny_hf_model("llama", layers=2), dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    _calibrate(bf16, [_padded_batch()])
    after = bf16.state_dict()
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert value.device.type == "cpu" and value.dtype == before[name].dtype, name
        assert torch.equal(value, before[name]), name
    assert bf16.inv_freq.dtype == torch.float32 and bf16.embed.weight.dtype == torch.bfloat16


def test_next_layer_sees_outputs_from_before_the_collector_edit(model):
    def zero_layer(index, layer):
        for p in layer.parameters():
            p.zero_()

    edited_model = copy.deepcopy(model)
    ref, bi_ref = _calibrate(model, [_padded_batch()])
    edited, bi_edited = _calibrate(edited_model, [_padded_batch()], extra=zero_layer)
    assert all(p.abs().max() == 0 for p in edited_model.layers[0].parameters())  # the edit happened
    for r, e in zip(ref, edited, strict=True):
        for name in STATS:
            assert torch.equal(getattr(r, name), getattr(e, name)), name
    assert bi_ref == bi_edited
    # and the test can tell: a layer zeroed BEFORE calibration does change what the next layer sees
    zeroed_first = copy.deepcopy(model)
    zero_layer(0, zeroed_first.layers[0])
    changed, _ = _calibrate(zeroed_first, [_padded_batch()])
    assert max_rel_diff(changed[1].attn_in_corr, ref[1].attn_in_corr) > 1e-2


# ---- calibration_batches ------------------------------------------------------------------------------------



RECORDS = [{"instruction": f"Name {n} colors.", "input": "", "output": ", ".join(["red"] * n)} for n in range(1, 8)]
RECORDS += [{"instruction": "Translate.", "input": "Guten Morgen", "output": "Good morning."},
            {"instruction": "Repeat.", "input": "long " * 80, "output": "long " * 80},
            {"text": "A plain text example record."}]
SEQLEN = 64  # the Alpaca preamble alone is ~30 tokens


@pytest.fixture
def alpaca_jsonl(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    return path


def test_alpaca_texts_follow_the_template(alpaca_jsonl):
    texts, is_examples = load_texts(str(alpaca_jsonl))
    assert is_examples and len(texts) == len(RECORDS)
    assert texts[7].endswith("### Instruction:\nTranslate.\n\n### Input:\nGuten Morgen\n\n### Response:\nGood morning.")
    assert texts[0].endswith("### Instruction:\nName 1 colors.\n\n### Response:\nred")
    assert texts[-1] == "A plain text example record."


@pytest.mark.parametrize("n_samples", [6, len(RECORDS)])
def test_example_batches_are_right_padded_truncated_records(tokenizer, alpaca_jsonl, n_samples):
    batches = calibration_batches(tokenizer, str(alpaca_jsonl), n_samples, SEQLEN, batch_size=4)
    texts, _ = load_texts(str(alpaca_jsonl))
    expected = {tuple(ids[:SEQLEN]) for ids in tokenizer(texts)["input_ids"]}
    rows = []
    for batch in batches:
        assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[1] <= SEQLEN
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), strict=True):
            n = sum(mask)
            assert mask == [1] * n + [0] * (len(mask) - n)  # zeros exactly on the right padding
            assert ids[n:] == [tokenizer.pad_token_id] * (len(ids) - n)
            rows.append(tuple(ids[:n]))
    assert len(rows) == n_samples and len(set(rows)) == n_samples
    assert set(rows) <= expected  # each row is one whole record, truncated to SEQLEN
    if n_samples == len(RECORDS):
        assert set(rows) == expected and max(len(r) for r in rows) == SEQLEN


@pytest.fixture
def plain_txt(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"Sentence {i} says the number {i * 7}." for i in range(150)))
    return path


def test_text_windows_are_full_unpadded_and_reproducible(tokenizer, plain_txt):
    batches = calibration_batches(tokenizer, str(plain_txt), 5, 16, seed=3, batch_size=2)
    assert [b.input_ids.shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(bool(b.attention_mask.eq(1).all()) for b in batches)
    stream = tokenizer(plain_txt.read_text())["input_ids"]
    windows = {tuple(stream[s:s + 16]) for s in range(len(stream) - 15)}
    assert all(tuple(row) in windows for b in batches for row in b.input_ids.tolist())
    again = calibration_batches(tokenizer, str(plain_txt), 5, 16, seed=3, batch_size=2)
    other = calibration_batches(tokenizer, str(plain_txt), 5, 16, seed=4, batch_size=2)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again, strict=True))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, other, strict=True))


def test_the_shipped_text_is_a_calibration_source_that_needs_no_data_folder(tokenizer, monkeypatch):
    import uniql.paths

    def no_data_folder():
        raise FileNotFoundError("offline data folder not found")

    monkeypatch.setattr(uniql.paths, "data_dir", no_data_folder)
    batches = calibration_batches(tokenizer, "shakespeare", 4, 64, batch_size=4)
    assert [b.input_ids.shape for b in batches] == [(4, 64)] and bool(batches[0].attention_mask.eq(1).all())
    assert "ROMEO" in uniql.paths.PACKAGED_TEXT.read_text()  # the packaged copy, found without the data folder
    with pytest.raises(FileNotFoundError, match="offline data folder"):  # named sources still need the folder
        calibration_batches(tokenizer, "wikitext2", 4, 64)


def test_text_shorter_than_a_window_is_refused(tokenizer, tmp_path):
    (tmp_path / "short.txt").write_text("only a few words")
    with pytest.raises(ValueError, match="need at least seqlen"):
        calibration_batches(tokenizer, str(tmp_path / "short.txt"), 2, 64)


def test_missing_source_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        calibration_batches(tokenizer, str(tmp_path / "nope.jsonl"), 2, 16)


def test_records_without_known_fields(tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "why?", "answer": "because"}) + "\n")
    with pytest.raises(ValueError, match="neither Alpaca fields nor 'text'"):
        calibration_batches(tokenizer, str(tmp_path / "bad.jsonl"), 2, 16)


def test_ssm_statistics_ignore_padding_too():
    """Mamba2 sorting statistics (C and dt*B energies, chunk-state correlation) of a right-padded batch equal those
    of its sequences run alone: padded steps get dt = 0, so they write nothing into any state."""
    from helpers import tiny_ssm_hf_model

    ssm = decoder_from_hf(tiny_ssm_hf_model("mamba2"))
    padded, bi_padded = _calibrate(ssm, [_padded_batch()])
    alone, bi_alone = _calibrate(ssm, [_alone(SEQ_A), _alone(SEQ_B)])
    for p, a in zip(padded, alone, strict=True):
        for name in ("c_sq", "dtb_sq", "state_corr"):
            assert max_rel_diff(getattr(p.mamba, name), getattr(a.mamba, name)) <= TOL, name
    assert bi_padded == pytest.approx(bi_alone, rel=TOL, abs=1e-7)


def test_example_sources_are_a_seeded_shuffle_not_the_first_records(tokenizer, alpaca_jsonl):
    """uniql-method.md bug 16: the reference's ``dataset.shuffle()`` result is discarded, so it always calibrates on
    the first records. Here the examples are a seeded sample: reproducible, different per seed, not the head."""
    texts, _ = load_texts(str(alpaca_jsonl))
    head = {tuple(ids[:SEQLEN]) for ids in tokenizer(texts[:3])["input_ids"]}

    def chosen(seed):
        batches = calibration_batches(tokenizer, str(alpaca_jsonl), 3, SEQLEN, seed=seed, batch_size=4)
        return {tuple(ids[:n]) for b in batches for ids, n in zip(b.input_ids.tolist(),
                                                                  b.attention_mask.sum(1).tolist(), strict=True)}

    picks = [chosen(seed) for seed in range(4)]
    assert chosen(0) == picks[0] and len({frozenset(p) for p in picks}) > 1
    assert any(p != head for p in picks)
