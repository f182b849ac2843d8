"""Turn transformers Mamba2 / Bamba / Nemotron-H models into the elastic decoder's layout (a pure re-ordering).

* Mamba mixer (layout in ``mamba.py``): HF's fused ``in_proj`` rows ``[z | x | B | C | dt]`` split into five
  linears; x/z rows, the x conv channels, the gated-norm weight and out_proj's columns go from head-major
  ``(h, c)`` to rank-major ``c * H + h``; B/C rows and conv channels from group-major ``(g, n)`` to state-major
  ``n * G + g``.
* Attention (hybrids): each head's channels become RoPE pairs. With rotary dim R (Bamba: R = d/2, Nemotron-H:
  R = 0), rotated channel ``m < R/2`` pairs with ``m + R/2`` at frequency ``m``; the pass-through channels
  ``R + 2j, R + 2j + 1`` form pair ``R/2 + j`` with frequency 0 (``inv_freq`` is padded with zeros), so RoPE,
  sorting and truncation treat every pair alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .decoder import ElasticDecoder
from .hf_import import head_is_table, o_cols_to_rank_major, rope_frequencies, v_rows_to_rank_major
from .spec import ArchSpec, dt_limit_fields, spec_from_hf_config


@dataclass(frozen=True)
class NameMap:
    """Where a family keeps each tensor in its HF state dict (``layer`` is formatted with the layer index)."""

    embed: str
    final_norm: str
    layer: str
    mixer_norm: str
    mlp_norm: str | None
    attn: str | None
    mamba: str
    mlp: str | None


NAMES = {
    "mamba2": NameMap("backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers.{i}.",
                      "norm", None, None, "mixer", None),
    "bamba": NameMap("model.embed_tokens.weight", "model.final_layernorm.weight", "model.layers.{i}.",
                     "input_layernorm", "pre_ff_layernorm", "self_attn", "mamba", "feed_forward"),
    "nemotron_h": NameMap("model.embeddings.weight", "model.norm_f.weight", "model.layers.{i}.",
                          "norm", "norm", "mixer", "mixer", "mixer"),  # one block per layer
}


def qk_channel_map(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """HF in-head channel of our channel ``c = 2m + t`` (pair ``m``, member ``t``), see the module doc."""
    half_rot = rotary_dim // 2
    ours = []
    for m in range(head_dim // 2):
        if m < half_rot:
            ours += [m, m + half_rot]
        else:
            j = m - half_rot
            ours += [rotary_dim + 2 * j, rotary_dim + 2 * j + 1]
    return torch.tensor(ours)


def qk_rows_pairs(w: torch.Tensor, heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """HF rows (head, channel) -> ours (c * heads + head), c in pair order; weights and biases."""
    rest = w.shape[1:]
    per_head = w.reshape(heads, head_dim, *rest)[:, qk_channel_map(head_dim, rotary_dim)]
    return per_head.transpose(0, 1).reshape(heads * head_dim, *rest).contiguous()


def _attention(sd: dict, p: str, spec: ArchSpec, rotary_dim: int) -> dict:
    n, g, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    out = {"attn.q_proj.weight": qk_rows_pairs(sd[p + "q_proj.weight"], n, d, rotary_dim),
           "attn.k_proj.weight": qk_rows_pairs(sd[p + "k_proj.weight"], g, d, rotary_dim),
           "attn.v_proj.weight": v_rows_to_rank_major(sd[p + "v_proj.weight"], g, d),
           "attn.o_proj.weight": o_cols_to_rank_major(sd[p + "o_proj.weight"], n, d)}
    if spec.qk_bias:
        out["attn.q_proj.bias"] = qk_rows_pairs(sd[p + "q_proj.bias"], n, d, rotary_dim)
        out["attn.k_proj.bias"] = qk_rows_pairs(sd[p + "k_proj.bias"], g, d, rotary_dim)
    if spec.v_bias:
        out["attn.v_proj.bias"] = v_rows_to_rank_major(sd[p + "v_proj.bias"], g, d)
    if spec.o_bias:
        out["attn.o_proj.bias"] = sd[p + "o_proj.bias"]
    return out


def _mlp(sd: dict, p: str, spec: ArchSpec) -> dict:
    names = ("gate", "up", "down") if spec.mlp_gated else ("up", "down")
    out = {f"mlp.{k}_proj.weight": sd[p + f"{k}_proj.weight"] for k in names}
    if spec.mlp_bias:
        out.update({f"mlp.{k}_proj.bias": sd[p + f"{k}_proj.bias"] for k in names})
    return out


def _split_xbc(t: torch.Tensor, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """Rows (or conv channels) of x | B | C in HF order -> ours (rank-major x, state-major B/C)."""
    hp, gn = spec.ssm_inner, spec.ssm_groups * spec.ssm_state
    x, b, c = t.split((hp, gn, gn))
    heads, groups = (spec.ssm_heads, spec.ssm_head_dim), (spec.ssm_groups, spec.ssm_state)
    return {"x": v_rows_to_rank_major(x, *heads), "B": v_rows_to_rank_major(b, *groups),
            "C": v_rows_to_rank_major(c, *groups)}


def _mamba(sd: dict, p: str, spec: ArchSpec) -> dict:
    hp, heads, head_dim = spec.ssm_inner, spec.ssm_heads, spec.ssm_head_dim
    out = {}
    for kind in ("weight", "bias") if spec.ssm_proj_bias else ("weight",):
        z, xbc, dt = sd[p + f"in_proj.{kind}"].split((hp, hp + 2 * spec.ssm_groups * spec.ssm_state, heads))
        out[f"mamba.z_proj.{kind}"] = v_rows_to_rank_major(z, heads, head_dim)
        out[f"mamba.dt_proj.{kind}"] = dt
        out.update({f"mamba.{k}_proj.{kind}": v for k, v in _split_xbc(xbc, spec).items()})
    out.update({f"mamba.conv_{k}_weight": v for k, v in _split_xbc(sd[p + "conv1d.weight"][:, 0], spec).items()})
    if spec.ssm_conv_bias:
        out.update({f"mamba.conv_{k}_bias": v for k, v in _split_xbc(sd[p + "conv1d.bias"], spec).items()})
    out["mamba.out_proj.weight"] = o_cols_to_rank_major(sd[p + "out_proj.weight"], heads, head_dim)
    if spec.ssm_proj_bias:
        out["mamba.out_proj.bias"] = sd[p + "out_proj.bias"]
    out["mamba.norm_weight"] = v_rows_to_rank_major(sd[p + "norm.weight"], heads, head_dim)
    out.update({f"mamba.{k}": sd[p + k] for k in ("dt_bias", "A_log", "D")})
    return out


def _layer(sd: dict, i: int, spec: ArchSpec, names: NameMap, rotary_dim: int) -> dict:
    p = names.layer.format(i=i)
    blocks = spec.blocks(i)
    out = {}
    if blocks[0] != "mlp":
        out["input_norm.weight"] = sd[p + names.mixer_norm + ".weight"]
    if "attn" in blocks:
        out.update(_attention(sd, p + names.attn + ".", spec, rotary_dim))
    if "mamba" in blocks:
        out.update(_mamba(sd, p + names.mamba + ".", spec))
    if "mlp" in blocks:
        out["post_attn_norm.weight"] = sd[p + names.mlp_norm + ".weight"]
        out.update(_mlp(sd, p + names.mlp + ".", spec))
    return {f"layers.{i}.{k}": v for k, v in out.items()}


def _rope(hf_model, spec: ArchSpec) -> tuple[ArchSpec, torch.Tensor, int]:
    """(spec with the measured rotary fraction, our inv_freq [d/2] zero-padded, rotary dim R)."""
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    half = spec.head_dim // 2
    if rotary is None or not spec.num_heads:  # Nemotron-H, Mamba2: no RoPE
        return spec, torch.zeros(half), 0
    inv_freq = rope_frequencies(rotary)
    if float(rotary.attention_scaling) != 1.0 and inv_freq.numel() < half:
        raise ValueError("partial RoPE with attention scaling != 1 is not supported (pass-through pairs "
                         "would be scaled too)")
    spec = replace(spec, rotary_fraction=2 * inv_freq.numel() / spec.head_dim,
                   rope_attention_scaling=float(rotary.attention_scaling))
    return spec, torch.cat((inv_freq, torch.zeros(half - inv_freq.numel()))), 2 * inv_freq.numel()


def _mixer_dt_limit(hf_model, spec: ArchSpec) -> ArchSpec:
    """The dt clamp the model's own mixers apply: transformers versions differ (Nemotron-H's mixer used
    (time_step_min, inf) before it read config.time_step_limit), so the module decides, not the config."""
    mixer = next((m for m in hf_model.modules() if hasattr(m, "A_log") and hasattr(m, "dt_bias")), None)
    if mixer is None:
        return spec
    limit = getattr(mixer, "time_step_limit", None)
    if limit is None and hasattr(mixer, "time_step_min"):
        limit = (mixer.time_step_min, math.inf)
    if limit is None:
        return spec
    return replace(spec, **dt_limit_fields(limit))


def ssm_decoder_from_hf(hf_model, dtype: torch.dtype = torch.float32, share: bool = False) -> ElasticDecoder:
    """An unsorted elastic decoder with exactly the HF model's function (no ladder yet); see hf_import."""
    spec, inv_freq, rotary_dim = _rope(hf_model, _mixer_dt_limit(hf_model, spec_from_hf_config(hf_model.config)))
    spec = replace(spec, tie_embeddings=head_is_table(hf_model, spec.tie_embeddings))
    names = NAMES[spec.family]
    sd = hf_model.state_dict()
    tensors = {"embed.weight": sd[names.embed], "norm.weight": sd[names.final_norm], "inv_freq": inv_freq}
    if not spec.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(spec.num_layers):
        tensors.update(_layer(sd, i, spec, names, rotary_dim))
    model = ElasticDecoder(spec)
    tensors = {k: v.detach() if share else v.detach().clone() for k, v in tensors.items()}
    expected = {k for k, _ in model.named_parameters()} | {"inv_freq"}
    if expected != tensors.keys():
        raise ValueError(f"HF model and decoder disagree on tensors: missing {sorted(expected - tensors.keys())[:5]}, "
                         f"extra {sorted(tensors.keys() - expected)[:5]}")
    model.load_state_dict(tensors, strict=False, assign=share)
    return model.to(dtype).requires_grad_(False)
