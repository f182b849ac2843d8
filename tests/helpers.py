"""Test helpers importable from every test module (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _tiny_ssm_config(family: str, vocab: int, hidden: int, chunk: int):
    from transformers import BambaConfig, Mamba2Config, NemotronHConfig

    mamba = {"mamba2": dict(num_heads=8, head_dim=16, n_groups=2, state_size=16, conv_kernel=4, expand=2),
             "bamba": dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
                           mamba_expand=2),
             "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4,
                                expand=2)}[family]
    attn = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    if family == "mamba2":
        return Mamba2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, chunk_size=chunk, **mamba)
    if family == "bamba":  # layers: mamba+mlp, attn+mlp, mamba+mlp
        return BambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=3, attn_layer_indices=[1],
                           mamba_chunk_size=chunk, **mamba, **attn)
    return NemotronHConfig(vocab_size=vocab, hidden_size=hidden, head_dim=16, chunk_size=chunk,  # M - * -
                           layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"], **mamba, **attn)


def tiny_ssm_hf_model(family: str = "mamba2", *, vocab: int = 320, hidden: int = 64, chunk: int = 8, seed: int = 0):
    """Random-init transformers Mamba2 / Bamba / Nemotron-H (8 heads x 16, 2 groups, N 16, conv 4).

    A_log and dt_bias are spread so heads decay at different rates (some clamp-free, some fast) and D is not 1.
    """
    from transformers import BambaForCausalLM, Mamba2ForCausalLM, NemotronHForCausalLM

    cls = {"mamba2": Mamba2ForCausalLM, "bamba": BambaForCausalLM, "nemotron_h": NemotronHForCausalLM}[family]
    torch.manual_seed(seed)
    return randomize_(cls(_tiny_ssm_config(family, vocab, hidden, chunk)).eval())


def randomize_(model):
    """In place: std-0.1 weights (layers matter), norms in [0.5, 1.5], A_log / dt_bias spread so heads decay at
    different rates, D not 1 (from the current torch seed)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-3.0, 0.0)
            elif name.endswith(".D"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def byte_fallback_tokenizer(words: list[str]):
    """A Llama-2 / Mistral style SentencePiece tokenizer: '▁' marks spaces, characters outside the vocab are
    spelled in byte tokens, and its ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any byte
    of it is invalid; decode strips the first leading space. Returns (tokenizer, piece -> id)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tok, vocab


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


TINY_CALIB_FLAGS = TINY_RTN_FLAGS[2:]  # the tiny calibration, without "--quant rtn"
SMALL_FINETUNE_FLAGS = ["--finetune-steps", "1", "--finetune-seqlen", "64", "--finetune-batch-size", "1",
                        "--finetune-grad-accum", "1"]


# The CLI tests' fixtures (tests/test_cli_flags.py, tests/compressor/test_cli_robustness.py), registered in each module
# as ``pytest.fixture(...)(cli_source)`` etc.
def cli_source(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama folder (context 256) with SmolLM2's tokenizer (it has a chat template)."""
    out = tmp_path_factory.mktemp("src")
    tiny_hf_model("llama", vocab=len(tokenizer), hidden=64, inter=128).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cli_data(tmp_path_factory, monkeypatch) -> Path:
    """UNIQL_DATA_DIR set to a fresh small data folder."""
    root = make_data_dir(tmp_path_factory.mktemp("data"))
    monkeypatch.setenv("UNIQL_DATA_DIR", str(root))
    return root


def cli_sorted_ckpt(source, tmp_path_factory) -> Path:
    """``uniql compress --no-quant`` of ``source``: the sorted floating-point checkpoint fine-tuning starts from."""
    import pytest

    from uniql.cli import main

    out = tmp_path_factory.mktemp("ckpt") / "sorted"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIQL_DATA_DIR", str(make_data_dir(tmp_path_factory.mktemp("d"))))
        assert main(["compress", str(source), "--out", str(out), "--no-quant", *TINY_CALIB_FLAGS]) == 0
    return out


def build_tiny_int4_ckpt(source: Path, out: Path, data_dir: Path, tokenizer, seed: int = 0, family: str = "llama",
                         flags: list[str] | None = None) -> Path:
    """`uniql compress` (RTN INT4, light calibration) of a random tiny model with ``tokenizer``: seconds on CPU.

    ``family``: "llama", or an SSM family of ``tiny_ssm_hf_model`` (mamba2, bamba, nemotron_h)."""
    import os

    from uniql.cli import main

    if family == "llama":
        hf = tiny_hf_model("llama", vocab=len(tokenizer), hidden=64, inter=128, seed=seed)
    else:
        hf = tiny_ssm_hf_model(family, vocab=len(tokenizer), seed=seed)
    hf.save_pretrained(source)
    tokenizer.save_pretrained(source)
    old = os.environ.get("UNIQL_DATA_DIR")
    os.environ["UNIQL_DATA_DIR"] = str(data_dir)
    try:
        rc = main(["compress", str(source), "--out", str(out), *(TINY_RTN_FLAGS if flags is None else flags)])
    finally:
        if old is None:
            os.environ.pop("UNIQL_DATA_DIR")
        else:
            os.environ["UNIQL_DATA_DIR"] = old
    assert rc == 0, "uniql compress of the tiny model failed"
    return out


def random_calib_batches(vocab: int = 320, n: int = 4, seqlen: int = 24, seed: int = 0) -> list:
    """One calibration batch of random tokens; row 1 is right-padded from the middle (padding must not enter a
    statistic)."""
    from uniql.compressor.calib_data import CalibBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    mask = torch.ones(n, seqlen, dtype=torch.long)
    mask[1, seqlen // 2:] = 0
    return [CalibBatch(ids, mask)]


def sort_with_random_calibration(model, order: str = "uniql", seqlen: int = 24) -> dict:
    """Sort ``model`` in place layer by layer (``order``: uniql | magnitude | random) on random-token calibration;
    returns each layer's statistics, collected on the original layer."""
    from uniql.compressor.calibrate import SortStatsCollector, run_layerwise
    from uniql.compressor.orders import magnitude_orders, random_orders, uniql_orders
    from uniql.compressor.sorting import apply_orders

    stats_by_layer = {}
    gen = torch.Generator().manual_seed(0)

    def on_layer(i, layer, stats):
        stats_by_layer[i] = stats
        orders = {"uniql": lambda: uniql_orders(layer, stats), "magnitude": lambda: magnitude_orders(layer),
                  "random": lambda: random_orders(layer, gen)}[order]()
        apply_orders(layer, orders)

    run_layerwise(model, random_calib_batches(seqlen=seqlen), [SortStatsCollector(on_layer)])
    return stats_by_layer


def int4_ssm_decoder(hf_model):
    """A UniQL decoder of a transformers model (written for SSMs / hybrids; attention-only ones work the same): a
    three-rung ladder (rates 0 / 0.25 / 0.5, g32 alignment) and every layer projection RTN INT4 (g32), in eval mode."""
    from uniql.compressor.quantize import rtn_linear
    from uniql.runtime.hf_import import decoder_from_hf
    from uniql.runtime.ladder import Alignment, spec_dim_steps, uniform_ladder

    model = decoder_from_hf(hf_model)
    model.ladder = uniform_ladder(model.full_sizes, spec_dim_steps(model.spec, Alignment(group_size=32)),
                                  model.spec.num_layers, rates=(0.0, 0.25, 0.5))
    for layer in model.layers:
        for path in layer.linear_paths:
            layer.set_linear(path, rtn_linear(layer.get_linear(path), 32))
    return model.eval()


def int4_mamba2_decoder(groups: int, seed: int):
    """A two-layer Mamba2 (8 heads of 16 channels in ``groups`` groups, conv width 4) as ``int4_ssm_decoder``."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=8, num_heads=8, head_dim=16,
                          n_groups=groups, state_size=16, conv_kernel=4, expand=2)
    return int4_ssm_decoder(randomize_(Mamba2ForCausalLM(config).eval()))


def interpret_decode_kernels(monkeypatch) -> None:
    """CPU: a decode step over address tables through the Triton kernels, interpreted (what a GPU step runs)."""
    import uniql.runtime.cache as cache_module
    import uniql.runtime.decoder as decoder_module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cache_module, "TRITON_ON_CPU", True)
    monkeypatch.setattr(decoder_module, "_fused_kernels", lambda x: not torch.is_grad_enabled())


def fused_mamba2_for_decode(monkeypatch, groups: int, seed: int):
    """(model, device, prompt ``[1, 6]``): ``int4_mamba2_decoder`` in bf16 with fused projections on the GPU, or on
    the CPU with the decode kernels interpreted (``interpret_decode_kernels``)."""
    from uniql.runtime.fusion import fuse_projections

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        interpret_decode_kernels(monkeypatch)
    model = int4_mamba2_decoder(groups, seed).to(dev, torch.bfloat16)
    assert fuse_projections(model) > 0
    return model, dev, torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(4)).to(dev)


def compile_script_lines(script: str, module_dir: Path) -> list[list[str]]:
    """Run ``script`` (ahead-of-time compiles that print "ok ..." lines) in a fresh interpreter without
    TRITON_INTERPRET, with ``module_dir`` as its argument; its "ok" lines, split. Fails with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script, str(module_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split() for line in done.stdout.splitlines() if line.startswith("ok")]
