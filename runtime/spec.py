"""Architecture specs: each supported family is data for the one generic elastic decoder.

A spec says which dims exist and which optional parts (biases, tied embeddings) a family has; the decoder
never branches on the family name. New families are new rows in ``FAMILIES``, not new model files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class FamilyTraits:
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)


FAMILIES: dict[str, FamilyTraits] = {
    "llama": FamilyTraits(qkv_bias=False),
    "mistral": FamilyTraits(qkv_bias=False),
    "qwen2": FamilyTraits(qkv_bias=True),
}


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tie_embeddings: bool
    qk_bias: bool
    v_bias: bool  # sorting folds a V bias into o_proj (exact: attention rows sum to 1), so it drops to False
    o_bias: bool
    mlp_bias: bool
    act: str
    rope_attention_scaling: float  # HF rope "attention_factor" (1.0 for default/llama3 rope)
    max_position_embeddings: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ArchSpec:
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"architecture spec is missing fields {sorted(missing)}")
        return cls(**{k: data[k] for k in names})


def spec_from_hf_config(config) -> ArchSpec:
    """Build a spec from a transformers config; raise a clear error for unsupported models."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(
            f"model_type {family!r} is not supported yet; supported: {sorted(FAMILIES)}"
        )
    traits = FAMILIES[family]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise ValueError(f"unsupported MLP activation {act!r}")
    qkv_bias = bool(getattr(config, "attention_bias", False)) or traits.qkv_bias
    return ArchSpec(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qk_bias=qkv_bias,
        v_bias=qkv_bias,
        o_bias=bool(getattr(config, "attention_bias", False)) and family != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        act=act,
        rope_attention_scaling=1.0,
        max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)),
    )
