"""benchmarks/bound_ab.py times decode with another decode_attention.py swapped in: the file loads as its own
module (relative imports resolved in uniql.kernels), the decode batch's calls go to it, and back to the tree's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bound_ab  # noqa: E402

import uniql.kernels.decode_attention as tree  # noqa: E402
import uniql.runtime.cache as cache_mod  # noqa: E402


def test_attention_b_is_swapped_in_and_back(tmp_path):
    b_file = tmp_path / "att_b.py"
    b_file.write_text((ROOT / "kernels" / "decode_attention.py").read_text())
    module = bound_ab.load_attention(b_file)
    assert module is not tree and module.decode_attention_rope is not tree.decode_attention_rope
    assert module.split_len(1280, module.split_count(131072, 8)) == 32  # its own code runs, imports resolved
    try:
        bound_ab.use_attention(module)
        assert cache_mod.decode_attention is module.decode_attention
        assert cache_mod.decode_attention_rope is module.decode_attention_rope
    finally:
        bound_ab.use_attention(None)
    assert cache_mod.decode_attention is tree.decode_attention
    assert cache_mod.decode_attention_rope is tree.decode_attention_rope


def test_a_file_without_the_attention_functions_is_refused(tmp_path):
    bad = tmp_path / "not_attention.py"
    bad.write_text("from .pdl import pdl_mode\n")
    with pytest.raises(ValueError, match="not a version of kernels/decode_attention.py"):
        bound_ab.load_attention(bad)
