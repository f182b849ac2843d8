"""Architecture specs: each supported family is data for the one generic elastic decoder.

A spec says which dims exist, which optional parts (biases, tied embeddings, a gate in the MLP) a family has and
which blocks every layer holds; the decoder never branches on the family name. New families are one small
``_<family>_spec(config)`` function here, not new model files.

Layer kinds (``layer_kinds``, one string per layer): blocks joined by ``+``, each block its own pre-norm
residual: ``attn`` (GQA attention), ``mamba`` (Mamba2 mixer), ``mlp``. Llama/Qwen2 layers are ``attn+mlp``;
Bamba's are ``mamba+mlp`` or ``attn+mlp``; Mamba2's ``mamba``; Nemotron-H's one block each (``M``/``*``/``-``).
An empty ``layer_kinds`` (manifests written before SSM support) means ``attn+mlp`` everywhere.

Partial RoPE (Bamba rotates the first half of each head, Nemotron-H nothing) needs no special case: the
pass-through channels are stored as RoPE pairs whose frequency is 0 (``inv_freq`` entries beyond the rotated
ones are zero), so cos = 1, sin = 0 and sorting/truncation move them as whole pairs like any other pair.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields


@dataclass(frozen=True)
class FamilyTraits:
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    bias_flags: bool = False  # transformers' modules read config.attention_bias / mlp_bias (Llama); Mistral and
    # Qwen2 hard-code their biases, so those keys in their config.json change nothing there and nothing here


FAMILIES: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(qkv_bias=False, bias_flags=True),
    "mistral": FamilyTraits(qkv_bias=False),
    "qwen2": FamilyTraits(qkv_bias=True),
}
SSM_FAMILIES = ("mamba2", "bamba", "nemotron_h")
BLOCKS = ("attn", "mamba", "mlp")
MLP_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu", "relu2")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int  # attention heads (0: no attention layer)
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # MLP channels (0: no MLP block)
    rms_norm_eps: float
    tie_embeddings: bool
    qk_bias: bool
    v_bias: bool  # sorting folds a V bias into o_proj (exact: attention rows sum to 1), so it drops to False
    o_bias: bool
    mlp_bias: bool
    act: str
    rope_attention_scaling: float  # HF rope "attention_factor" (1.0 for default/llama3 rope)
    max_position_embeddings: int
    # ---- added with SSM support; defaults keep older manifests loading unchanged
    layer_kinds: tuple[str, ...] = ()  # per layer, e.g. "mamba+mlp"; () = "attn+mlp" everywhere
    mlp_gated: bool = True  # gate_proj present (SwiGLU); False: act(up(x)) (Nemotron-H relu2)
    rotary_fraction: float = 1.0  # share of each head's channels RoPE rotates (Bamba 0.5, Nemotron-H 0)
    ssm_heads: int = 0  # H
    ssm_head_dim: int = 0  # P
    ssm_groups: int = 0  # G (B/C shared by H/G heads)
    ssm_state: int = 0  # N
    ssm_conv: int = 0  # W, causal depthwise conv kernel over x|B|C
    ssm_chunk: int = 256  # prefill scan chunk (numerics only: the scan is exact for any chunk)
    ssm_dt_min: float = 0.0  # dt = clamp(softplus(dt_proj(u) + dt_bias), dt_min, dt_max)
    ssm_dt_max: float | None = None  # None: no upper limit (JSON has no infinity)
    ssm_norm_eps: float = 1e-5
    ssm_norm_groups: int = 1  # the gated RMSNorm normalises each of these groups of heads separately
    ssm_conv_bias: bool = True
    ssm_proj_bias: bool = False  # bias on z/x/B/C/dt and out_proj
    ssm_act: str = "silu"  # after the conv

    def __post_init__(self):
        object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
        bad = [k for k in self.layer_kinds if not k or any(b not in BLOCKS for b in k.split("+"))]
        if bad or (self.layer_kinds and len(self.layer_kinds) != self.num_layers):
            raise ValueError(f"layer_kinds must name {self.num_layers} layers from blocks {BLOCKS}: {bad or ''}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    def blocks(self, layer: int) -> tuple[str, ...]:
        """The blocks of one layer in order, e.g. ``("mamba", "mlp")``."""
        return tuple(self.layer_kinds[layer].split("+")) if self.layer_kinds else ("attn", "mlp")

    def layers_with(self, block: str) -> list[int]:
        return [i for i in range(self.num_layers) if block in self.blocks(i)]

    @property
    def ssm_inner(self) -> int:
        """H * P (x/z channels)."""
        return self.ssm_heads * self.ssm_head_dim

    @property
    def dt_limit(self) -> tuple[float, float]:
        return self.ssm_dt_min, math.inf if self.ssm_dt_max is None else self.ssm_dt_max

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layer_kinds"] = list(self.layer_kinds)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ArchSpec:
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = required - data.keys()
        if missing:
            raise ValueError(f"architecture spec is missing fields {sorted(missing)}")
        for f in fields(cls):
            if f.name in data:
                _check_field(f.name, f.type, data[f.name])
        for name, check in (("act", _check_act), ("ssm_act", _check_ssm_act)):
            try:
                check(data.get(name, "silu"))  # (ssm_act: absent from manifests written before SSM support)
            except ValueError as err:
                raise ValueError(f"arch.{name}: {err}") from None
        names = {f.name for f in fields(cls)}
        return cls(**{k: data[k] for k in names if k in data})


def is_finite_number(value) -> bool:
    """A JSON number that is finite (``true`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# a manifest's field by its annotation (a string: postponed annotations): what it must hold, said in words
_FIELD_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "float": (is_finite_number, "a finite number"),
    "float | None": (lambda v: v is None or is_finite_number(v), "a finite number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[str, ...]": (lambda v: isinstance(v, list | tuple) and all(isinstance(k, str) for k in v),
                        "a list of strings"),
}
_AT_LEAST_ONE = ("vocab_size", "hidden_size", "num_layers", "max_position_embeddings")


def _check_field(name: str, annotation: str, value) -> None:
    """One field of a manifest's arch (a hand edit, a damaged copy): a string, a negative size or a NaN failed
    deep in the model's construction or at the first request, as a TypeError traceback or not at all."""
    accepts, what = _FIELD_KINDS[annotation]
    if name in _AT_LEAST_ONE:
        accepts, what = (lambda v: _FIELD_KINDS["int"][0](v) and v >= 1), "a whole number >= 1"
    if not accepts(value):
        raise ValueError(f"arch.{name} is {value!r}; it must be {what}")


def _check_act(act: str) -> str:
    if act not in MLP_ACTS:
        raise ValueError(f"unsupported MLP activation {act!r}")
    return act


def _attention_dims(config) -> dict:
    heads = config.num_attention_heads
    return {"num_heads": heads, "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def dt_limit_fields(limit) -> dict:
    """ArchSpec's dt clamp fields from a (min, max) limit (None or an infinite max: no bound there)."""
    lo, hi = (0.0, math.inf) if limit is None else limit
    return {"ssm_dt_min": float(lo), "ssm_dt_max": None if math.isinf(hi) else float(hi)}


# RoPE kinds whose frequencies are fixed for every position the context limit allows: the import copies them once
# (dynamic NTK changes them only past max_position_embeddings, which no request may reach)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
SSM_ACTS = ("silu", "swish", "relu", "gelu")


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"RoPE type {kind!r} is not supported (its frequencies depend on the sequence length); "
                         f"supported: {ROPE_TYPES}")


def _check_ssm_act(act: str) -> str:
    if act not in SSM_ACTS:
        raise ValueError(f"unsupported Mamba activation {act!r}; supported: {SSM_ACTS}")
    return act


def _context_limit(config) -> int:
    """max_position_embeddings, capped to the sliding window when layers use one: sliding-window attention is
    not implemented, and up to the window it equals full attention (Mistral, Qwen2 with use_sliding_window)."""
    limit = int(getattr(config, "max_position_embeddings", 4096))
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window and (types is None or "sliding_attention" in types):
        limit = min(limit, int(window))
    return limit


def _llama_like_spec(config, family: str) -> ArchSpec:
    _check_rope(config)
    traits = FAMILIES[family]
    attention_bias = traits.bias_flags and bool(getattr(config, "attention_bias", False))
    qkv_bias = attention_bias or traits.qkv_bias
    return ArchSpec(
        family=family, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, **_attention_dims(config),
        intermediate_size=config.intermediate_size, rms_norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qk_bias=qkv_bias, v_bias=qkv_bias,
        o_bias=attention_bias, mlp_bias=traits.bias_flags and bool(getattr(config, "mlp_bias", False)),
        act=_check_act(getattr(config, "hidden_act", "silu")),
        rope_attention_scaling=1.0, max_position_embeddings=_context_limit(config),
    )


def _no_attention() -> dict:
    return {"num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "qk_bias": False, "v_bias": False, "o_bias": False}


def _mamba2_spec(config) -> ArchSpec:
    """Mamba2ForCausalLM: every layer one pre-norm Mamba2 mixer, no MLP, no attention."""
    if config.num_heads * config.head_dim != int(config.expand * config.hidden_size):
        raise ValueError("Mamba2 config: num_heads * head_dim must equal expand * hidden_size")
    return ArchSpec(
        family="mamba2", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, **_no_attention(), intermediate_size=0,
        rms_norm_eps=float(config.layer_norm_epsilon), tie_embeddings=bool(config.tie_word_embeddings),
        mlp_bias=False, act="silu", rope_attention_scaling=1.0,
        max_position_embeddings=int(getattr(config, "max_position_embeddings", None) or 1 << 20),
        layer_kinds=("mamba",) * config.num_hidden_layers, rotary_fraction=0.0,
        ssm_heads=config.num_heads, ssm_head_dim=config.head_dim, ssm_groups=config.n_groups,
        ssm_state=config.state_size, ssm_conv=config.conv_kernel, ssm_chunk=config.chunk_size,
        **dt_limit_fields(config.time_step_limit), ssm_norm_eps=float(config.layer_norm_epsilon),
        ssm_norm_groups=config.n_groups, ssm_conv_bias=bool(config.use_conv_bias),
        ssm_proj_bias=bool(config.use_bias), ssm_act=_check_ssm_act(config.hidden_act),
    )


def _bamba_spec(config) -> ArchSpec:
    """BambaForCausalLM: Mamba2 or attention (partial RoPE), then a SwiGLU MLP, in every layer."""
    _check_rope(config)
    rope = getattr(config, "rope_parameters", None) or {}
    fraction = float(rope.get("partial_rotary_factor", 0.5))
    kinds = tuple("attn+mlp" if t == "full_attention" else "mamba+mlp" for t in config.layers_block_type)
    return ArchSpec(
        family="bamba", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, **_attention_dims(config),
        intermediate_size=config.intermediate_size, rms_norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(config.tie_word_embeddings), qk_bias=bool(config.attention_bias),
        v_bias=bool(config.attention_bias), o_bias=bool(config.attention_bias), mlp_bias=bool(config.mlp_bias),
        act=_check_act(config.hidden_act), rope_attention_scaling=1.0,
        max_position_embeddings=int(config.max_position_embeddings), layer_kinds=kinds, rotary_fraction=fraction,
        ssm_heads=config.mamba_n_heads, ssm_head_dim=config.mamba_d_head, ssm_groups=config.mamba_n_groups,
        ssm_state=config.mamba_d_state, ssm_conv=config.mamba_d_conv, ssm_chunk=config.mamba_chunk_size,
        **dt_limit_fields(config.time_step_limit), ssm_norm_eps=float(config.rms_norm_eps),
        ssm_norm_groups=config.mamba_n_groups, ssm_conv_bias=bool(config.mamba_conv_bias),
        ssm_proj_bias=bool(config.mamba_proj_bias), ssm_act=_check_ssm_act(config.hidden_act),
    )


_NEMOTRON_KINDS = {"linear_attention": "mamba", "full_attention": "attn", "mlp": "mlp"}


def _nemotron_h_spec(config) -> ArchSpec:
    """NemotronHForCausalLM: one block per layer (M / * / -); attention without RoPE or biases; relu2 MLP."""
    unknown = sorted(set(config.layers_block_type) - _NEMOTRON_KINDS.keys())
    if unknown:
        raise ValueError(f"Nemotron-H layer types {unknown} (MoE) are not supported; supported: M, *, -")
    return ArchSpec(
        family="nemotron_h", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers, **_attention_dims(config),
        intermediate_size=config.intermediate_size, rms_norm_eps=float(config.layer_norm_epsilon),
        tie_embeddings=bool(config.tie_word_embeddings), qk_bias=False, v_bias=False, o_bias=False,
        mlp_bias=bool(config.mlp_bias), act=_check_act(config.mlp_hidden_act), rope_attention_scaling=1.0,
        max_position_embeddings=int(config.max_position_embeddings),
        layer_kinds=tuple(_NEMOTRON_KINDS[t] for t in config.layers_block_type), mlp_gated=False,
        rotary_fraction=0.0, ssm_heads=config.mamba_num_heads, ssm_head_dim=config.mamba_head_dim,
        ssm_groups=config.n_groups, ssm_state=config.ssm_state_size, ssm_conv=config.conv_kernel,
        ssm_chunk=config.chunk_size,
        # the mixer clamps dt to config.time_step_limit (the import reads the mixer's own value: versions differ)
        **dt_limit_fields(config.time_step_limit), ssm_norm_eps=float(config.layer_norm_epsilon),
        ssm_norm_groups=config.n_groups, ssm_conv_bias=bool(config.use_conv_bias),
        ssm_proj_bias=bool(config.use_bias), ssm_act=_check_ssm_act(config.mamba_hidden_act),
    )


_SSM_BUILDERS = {"mamba2": _mamba2_spec, "bamba": _bamba_spec, "nemotron_h": _nemotron_h_spec}


def spec_from_hf_config(config) -> ArchSpec:
    """Build a spec from a transformers config; raise a clear error for unsupported models."""
    family = getattr(config, "model_type", None)
    if family in _SSM_BUILDERS:
        return _SSM_BUILDERS[family](config)
    if family not in FAMILIES:
        raise ValueError(f"model_type {family!r} is not supported yet; "
                         f"supported: {sorted(FAMILIES) + sorted(_SSM_BUILDERS)}")
    return _llama_like_spec(config, family)
