"""Test helpers importable from every test module (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def tiny_hf_model(family: str = "llama", *, tie: bool = False, vocab: int = 320, layers: int = 2,
                  heads: int = 4, kv_heads: int = 2, hidden: int = 64, inter: int = 128, seed: int = 0):
    """Random-init transformers model with weights large enough that layers matter (std 0.1)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  tie_word_embeddings=tie, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, computed in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def make_data_dir(root: Path) -> Path:
    """A data folder laid out like shared/data, from the small fixtures (calibration never leaves the repo)."""
    import shutil

    for src, dst in (("wikitext2_small.raw", "wikitext2/wiki.test.raw"),
                     ("wikitext2_small.raw", "wikitext2/wiki.valid.tokens"),
                     ("alpaca_small.json", "alpaca/alpaca_5000.json")):
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / src, root / dst)
    return root


TINY_RTN_FLAGS = ["--quant", "rtn", "--calib-samples", "8", "--calib-seqlen", "64", "--bi-samples", "2",
                  "--bi-seqlen", "64", "--group-size", "32"]


def build_tiny_int4_ckpt(source: Path, out: Path, data_dir: Path, tokenizer, seed: int = 0) -> Path:
    """`uniql compress` (RTN INT4, light calibration) of a random tiny Llama with ``tokenizer``: seconds on CPU."""
    import os

    from uniql.cli import main

    tiny_hf_model("llama", vocab=len(tokenizer), hidden=64, inter=128, seed=seed).save_pretrained(source)
    tokenizer.save_pretrained(source)
    old = os.environ.get("UNIQL_DATA_DIR")
    os.environ["UNIQL_DATA_DIR"] = str(data_dir)
    try:
        rc = main(["compress", str(source), "--out", str(out), *TINY_RTN_FLAGS])
    finally:
        if old is None:
            os.environ.pop("UNIQL_DATA_DIR")
        else:
            os.environ["UNIQL_DATA_DIR"] = old
    assert rc == 0, "uniql compress of the tiny model failed"
    return out
