"""Turn a transformers Llama/Qwen2 model into the elastic decoder's layout (see decoder.py); Mamba2, Bamba and
Nemotron-H go through ``hf_import_ssm.py``.

The conversion is a pure re-ordering of rows/columns: head-major HF tensors become rank-major, and each
rotate-half pair (i, i + d/2) becomes an adjacent (first, partner) channel pair with frequency index i.
"""

from __future__ import annotations

import torch

from .decoder import ElasticDecoder
from .spec import SSM_FAMILIES, ArchSpec, spec_from_hf_config


def qk_rows_to_rank_major(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """HF rows (head, t * d/2 + m) -> ours ((2m + t) * heads + head); works for weights and biases."""
    rest = w.shape[1:]
    w = w.reshape(heads, 2, head_dim // 2, *rest).permute(2, 1, 0, *range(3, 3 + len(rest)))
    return w.reshape(heads * head_dim, *rest).contiguous()


def v_rows_to_rank_major(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """HF rows (head, j) -> ours (j * heads + head)."""
    rest = w.shape[1:]
    return w.reshape(heads, head_dim, *rest).transpose(0, 1).reshape(heads * head_dim, *rest).contiguous()


def o_cols_to_rank_major(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """HF o_proj columns (head, j) -> ours (j * heads + head)."""
    out = w.shape[0]
    return w.reshape(out, heads, head_dim).transpose(1, 2).reshape(out, heads * head_dim).contiguous()


def _layer_tensors(sd: dict, i: int, spec: ArchSpec) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    n, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    out = {
        "input_norm.weight": sd[p + "input_layernorm.weight"],
        "post_attn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        "attn.q_proj.weight": qk_rows_to_rank_major(sd[p + "self_attn.q_proj.weight"], n, d),
        "attn.k_proj.weight": qk_rows_to_rank_major(sd[p + "self_attn.k_proj.weight"], g, d),
        "attn.v_proj.weight": v_rows_to_rank_major(sd[p + "self_attn.v_proj.weight"], g, d),
        "attn.o_proj.weight": o_cols_to_rank_major(sd[p + "self_attn.o_proj.weight"], n, d),
        "mlp.gate_proj.weight": sd[p + "mlp.gate_proj.weight"],
        "mlp.up_proj.weight": sd[p + "mlp.up_proj.weight"],
        "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"],
    }
    if spec.qk_bias:
        out["attn.q_proj.bias"] = qk_rows_to_rank_major(sd[p + "self_attn.q_proj.bias"], n, d)
        out["attn.k_proj.bias"] = qk_rows_to_rank_major(sd[p + "self_attn.k_proj.bias"], g, d)
    if spec.v_bias:
        out["attn.v_proj.bias"] = v_rows_to_rank_major(sd[p + "self_attn.v_proj.bias"], g, d)
    if spec.o_bias:
        out["attn.o_proj.bias"] = sd[p + "self_attn.o_proj.bias"]
    if spec.mlp_bias:
        for name in ("gate", "up", "down"):
            out[f"mlp.{name}_proj.bias"] = sd[p + f"mlp.{name}_proj.bias"]
    return {f"layers.{i}.{k}": v for k, v in out.items()}


def rope_frequencies(rotary) -> torch.Tensor:
    """The rotary module's frequencies as built: dynamic-type RoPE rewrites ``inv_freq`` in place after a forward
    past its limit, ``original_inv_freq`` keeps the ones for positions within it."""
    return getattr(rotary, "original_inv_freq", rotary.inv_freq).float()


def head_is_table(hf_model, config_says: bool) -> bool:
    """Whether the model's output head IS its input embedding table. The config's ``tie_word_embeddings`` is only
    what a model class may do with it (transformers' Nemotron-H never ties: its head stays a separate weight), so
    the modules decide; the config only where they cannot tell (weights not materialised)."""
    head, table = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    if head is None or table is None or head.weight.is_meta:
        return config_says
    a, b = head.weight, table.weight
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr())


def decoder_from_hf(hf_model, dtype: torch.dtype = torch.float32, share: bool = False) -> ElasticDecoder:
    """An unsorted elastic decoder with exactly the HF model's function (no ladder yet).

    ``share`` reuses the HF tensors that need no re-ordering instead of copying them (halves host memory for
    big models); the HF model must then not be used afterwards.
    """
    ssm = getattr(hf_model.config, "model_type", None) in SSM_FAMILIES
    spec = None if ssm else spec_from_hf_config(hf_model.config)  # first: an unsupported family says so by name
    if not type(hf_model).__name__.endswith("ForCausalLM"):
        raise ValueError(f"{type(hf_model).__name__} is not a causal language model (load it with "
                         "AutoModelForCausalLM)")
    if ssm:
        from .hf_import_ssm import ssm_decoder_from_hf

        return ssm_decoder_from_hf(hf_model, dtype, share)
    rotary = hf_model.model.rotary_emb
    spec = ArchSpec.from_dict({**spec.to_dict(), "rope_attention_scaling": float(rotary.attention_scaling),
                               "tie_embeddings": head_is_table(hf_model, spec.tie_embeddings)})
    sd = hf_model.state_dict()
    tensors = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
               "inv_freq": rope_frequencies(rotary)}
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(spec.num_layers):
        tensors.update(_layer_tensors(sd, i, spec))
    model = ElasticDecoder(spec)
    tensors = {k: v.detach() if share else v.detach().clone() for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=share)
    _check_loaded(model, tensors)
    return model.to(dtype).requires_grad_(False)


def _check_loaded(model: ElasticDecoder, tensors: dict) -> None:
    expected = {k for k, _ in model.named_parameters()} | {"inv_freq"}
    missing = expected - tensors.keys()
    if missing:
        raise ValueError(f"HF model lacks tensors the decoder needs: {sorted(missing)[:5]}")
