"""The ONE generic elastic decoder (Llama family, Qwen2, Mamba2, Bamba, Nemotron-H: specs, not copies).

A layer is a list of pre-norm residual blocks from its spec (``spec.blocks(i)``): a mixer (``attn`` or
``mamba``, after ``input_norm``) and/or an MLP (after ``post_attn_norm``, named for the Llama layer it came
from). The Mamba2 mixer and its storage layout live in ``mamba.py``.

Storage layout (what makes every rung a zero-copy prefix, DESIGN.md section 3):
* q_proj rows are rank-major across heads: row ``c * num_heads + head``, where channel ``c = 2 * m + t``
  is the ``t``-th member (0 = first, 1 = partner) of the head's ``m``-th RoPE pair in importance order.
  k_proj rows likewise across KV heads. Keeping ``qk`` channels per head = the first ``heads * qk`` rows.
* ``rope_index[g, m]`` is the original frequency index of KV group ``g``'s ``m``-th pair, shared by the query
  heads of the group, so RoPE stays exact after sorting.
* v_proj rows are ``j * kv_heads + g`` (rank ``j``), o_proj columns ``j * num_heads + head``: keeping rank
  ``vo`` = the first ``kv_heads * vo`` rows of v_proj and the first ``num_heads * vo`` columns of o_proj.
* MLP: gate/up rows and down columns in importance order.
The softmax scale stays the original ``head_dim ** -0.5`` at every rung.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniql.kernels import elementwise, ops
from uniql.kernels.pdl import head_gemv_preload
from uniql.kernels.rope import decode_rope_tables, rope_tables
from uniql.kernels.switches import switch

from .cache import DecodeBatch, KVCache
from .ladder import LayerSizes, RateLadder, full_layer_sizes
from .linear import DenseLinear, FusedInt4, Int4Linear, Prenormed, fold_norm
from .mamba import ElasticMamba
from .spec import ArchSpec

_ACTS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "relu2": lambda x: F.relu(x).square()}  # Nemotron-H


def _fused_kernels(x: torch.Tensor) -> bool:
    """Inference on CUDA takes the Triton kernels; training (autograd) and CPU keep the torch ops."""
    return x.is_cuda and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused_kernels(x):
            return elementwise.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_forward(self, x: torch.Tensor, delta) -> tuple[torch.Tensor, torch.Tensor | Prenormed]:
        """Residual stream ``x + delta`` (``x`` when delta is None) and its norm: one launch on the fused path, none
        when the block before already did the add and half the norm (``delta`` a :class:`Prenormed`: the next
        projection finishes it)."""
        if isinstance(delta, Prenormed):  # begun for this norm (else, defensively, the plain norm of its stream)
            return (delta.x, delta) if delta.norm is self else (delta.x, self(delta.x))
        if delta is None:
            return x, self(x)
        if _fused_kernels(x):
            return elementwise.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on pair-interleaved channels: x [..., P, 2], cos/sin [..., P]."""
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)


class ElasticAttention(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, n, g, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = n, g, d
        self.q_proj = DenseLinear(h, n * d, spec.qk_bias)
        self.k_proj = DenseLinear(h, g * d, spec.qk_bias)
        self.v_proj = DenseLinear(h, g * d, spec.v_bias)
        self.o_proj = DenseLinear(n * d, h, spec.o_bias)
        self.register_buffer("rope_index", torch.arange(d // 2).repeat(g, 1))
        self.scale = d ** -0.5
        self.qkv: FusedInt4 | None = None  # q|k|v in one packed tensor (runtime/fusion.py), one launch

    @staticmethod
    def _pairs_view(flat, heads, qk):
        """Rank-major ``[B, T, heads*qk]`` -> ``[B, heads, T, qk/2, 2]`` (a view)."""
        b, t, _ = flat.shape
        return flat.view(b, t, qk // 2, 2, heads).permute(0, 4, 1, 2, 3)

    def rope_cos_sin(self, inv_freq, positions, pairs, scaling):
        """cos/sin [B, kv_heads, T, pairs] from each group's stored frequency indices."""
        freqs = inv_freq[self.rope_index[:, :pairs]]  # [g, P]
        angles = positions.float()[:, None, :, None] * freqs[None, :, None, :]
        return angles.cos() * scaling, angles.sin() * scaling

    def project(self, x, sizes: LayerSizes):
        """Flat q ``[B, T, heads*qk]``, k ``[B, T, kv*qk]``, v ``[B, T, kv*vo]`` at this rung (rank-major)."""
        n, g, qk, vo = self.n_heads, self.n_kv, sizes.qk, sizes.vo
        if self.qkv is not None:
            return self.qkv(x, (n * qk, g * qk, g * vo))
        return self.q_proj(x, n=n * qk), self.k_proj(x, n=g * qk), self.v_proj(x, n=g * vo)

    def decode(self, x, sizes: LayerSizes, cache: DecodeBatch, layer: int, cos, sin, residual=None):
        """One token per request (x ``[B, 1, hidden]``, or a :class:`Prenormed` residual) attending over each
        request's own cache. ``residual`` = (stream, next norm): return the stream after this block, with that
        norm half done by o_proj (a Prenormed), where the decode GEMV serves it."""
        n, g, vo = self.n_heads, self.n_kv, sizes.vo
        b = (x.x if isinstance(x, Prenormed) else x).shape[0]
        q, k, v = (t.reshape(b, -1) for t in self.project(x, sizes))
        v = v.view(b, vo, g).transpose(1, 2)  # [B, kv, vo], a view of the rank-major projection
        out = cache.attend_rope(layer, q, k, v, cos, sin, self.rope_index, n, self.scale).view(b, 1, n * vo)
        done = fold_norm(self.o_proj, out, n * vo, residual)
        return done if done is not None else self.o_proj(out, k=n * vo)

    def forward(self, x, sizes: LayerSizes, inv_freq, positions, mask, rope_scaling=1.0,
                cache: KVCache | None = None, layer: int = 0, rope=None, residual=None):
        if isinstance(cache, DecodeBatch):
            return self.decode(x, sizes, cache, layer, *rope, residual=residual)
        n, g, qk, vo = self.n_heads, self.n_kv, sizes.qk, sizes.vo
        q_flat, k_flat, v = self.project(x, sizes)
        b, t, _ = v.shape
        if rope is not None:  # CUDA inference: the forward's tables, q and k rotated in one launch (as decode)
            q, k = ops.rope(q_flat.reshape(b * t, -1), k_flat.reshape(b * t, -1), *rope, self.rope_index, n, g, qk)
            q, k = q.view(n, b, t, qk).transpose(0, 1), k.view(g, b, t, qk).transpose(0, 1)
        else:
            q, k = self._pairs_view(q_flat, n, qk), self._pairs_view(k_flat, g, qk)
            cos, sin = self.rope_cos_sin(inv_freq, positions, qk // 2, rope_scaling)
            k = rotate_pairs(k, cos, sin).flatten(-2).to(x.dtype)  # fp32 angles, activations in the model dtype
            rep = n // g
            q = rotate_pairs(q, cos.repeat_interleave(rep, 1), sin.repeat_interleave(rep, 1)).flatten(-2).to(x.dtype)
        v = v.view(b, t, vo, g).permute(0, 3, 1, 2)
        if cache is not None:
            k, v = cache.update(layer, k.to(cache.k[layer].dtype), v.to(cache.v[layer].dtype))
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None,
                                             scale=self.scale, enable_gqa=n > g)
        out = out.permute(0, 2, 3, 1).reshape(b, t, vo * n)  # rank-major, matches o_proj's columns
        return self.o_proj(out, k=n * vo)


class ElasticMLP(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = DenseLinear(h, i, spec.mlp_bias) if spec.mlp_gated else None  # Nemotron-H: no gate
        self.up_proj = DenseLinear(h, i, spec.mlp_bias)
        self.down_proj = DenseLinear(i, h, spec.mlp_bias)
        self.act_name = spec.act
        self.act = _ACTS[spec.act]
        self.gate_up: FusedInt4 | None = None  # gate|up in one packed tensor (runtime/fusion.py), one launch

    @property
    def takes_prenormed(self) -> bool:
        """Its input projection can finish an RMSNorm begun by the block before (``Prenormed``): a fused SiLU GLU,
        or an ungated INT4 up projection (Nemotron-H)."""
        if self.gate_up is not None:
            return self.act_name == "silu"
        return self.gate_proj is None and isinstance(self.up_proj, Int4Linear)

    def forward(self, x, keep: int, residual=None):
        """``residual`` = (stream, next norm): return the stream after this block with that norm half done by
        down_proj (a Prenormed), where the decode GEMV serves it."""
        hidden = self._hidden(x, keep)
        done = fold_norm(self.down_proj, hidden, keep, residual)
        return done if done is not None else self.down_proj(hidden, k=keep)

    def _hidden(self, x, keep: int):
        if self.gate_up is not None:
            if self.act_name == "silu" and (isinstance(x, Prenormed) or _fused_kernels(x)):
                return self.gate_up.glu(x, keep)  # the activation is the projection's epilogue
            gate, up = self.gate_up(x, (keep, keep))
            return self.act(gate) * up
        if self.gate_proj is None:
            return self.act(self.up_proj(x, n=keep))
        return self.act(self.gate_proj(x, n=keep)) * self.up_proj(x, n=keep)


BLOCK_LINEARS = {
    "attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"),
    "mamba": ("mamba.z_proj", "mamba.x_proj", "mamba.B_proj", "mamba.C_proj", "mamba.dt_proj", "mamba.out_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
LINEAR_PATHS = BLOCK_LINEARS["attn"] + BLOCK_LINEARS["mlp"]  # an attn+mlp layer (Llama, Qwen2)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, blocks: tuple[str, ...] = ("attn", "mlp")):
        super().__init__()
        self.blocks = tuple(blocks)
        has_mixer = self.blocks[0] in ("attn", "mamba")
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if has_mixer else None
        self.attn = ElasticAttention(spec) if "attn" in self.blocks else None
        self.mamba = ElasticMamba(spec) if "mamba" in self.blocks else None
        has_mlp = "mlp" in self.blocks
        self.post_attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps) if has_mlp else None
        self.mlp = ElasticMLP(spec) if has_mlp else None

    @property
    def linear_paths(self) -> tuple[str, ...]:
        """The projections this layer holds, in block order (``LINEAR_PATHS`` for a Llama layer)."""
        paths = [p for b in self.blocks for p in BLOCK_LINEARS[b]]
        return tuple(p for p in paths if not (p == "mlp.gate_proj" and self.mlp.gate_proj is None))

    def get_linear(self, path: str) -> nn.Module:
        """A projection by its LINEAR_PATHS name, e.g. ``"attn.o_proj"``."""
        parent, name = path.split(".")
        return getattr(getattr(self, parent), name)

    def set_linear(self, path: str, module: nn.Module) -> None:
        parent, name = path.split(".")
        setattr(getattr(self, parent), name, module)

    @property
    def first_norm(self) -> RMSNorm:
        return self.input_norm if self.input_norm is not None else self.post_attn_norm

    @property
    def takes_prenormed(self) -> bool:
        """Its first projection can finish the norm begun by the block before (fused q|k|v, fused z|x|B|C|dt, or
        a fused GLU MLP)."""
        if self.blocks[0] == "attn":
            return self.attn.qkv is not None
        if self.blocks[0] == "mamba":
            return self.mamba.in_proj is not None
        return self.blocks[0] == "mlp" and self.mlp.takes_prenormed

    def forward(self, x, sizes: LayerSizes, ctx: dict, layer: int = 0, pending=None, defer: bool = False,
                next_norm: RMSNorm | None = None):
        """Pre-norm residual blocks. ``pending``: the previous layer's last block output, not yet added to ``x``
        (the add rides with this layer's first norm); ``defer`` returns ``(x, pending)`` the same way. In a CUDA
        decode step a block's output GEMV may also do the add and half of the next norm (``Prenormed``): the MLP's
        within the layer when it takes it, else ``next_norm`` (the next layer's first, when that layer takes it)."""
        decode = isinstance(ctx.get("cache"), DecodeBatch) and _fused_kernels(x)
        mixer = self.attn if self.attn is not None else self.mamba
        if mixer is not None:
            x, h = self.input_norm.add_forward(x, pending)
            after = next_norm if self.mlp is None else (self.post_attn_norm if self.mlp.takes_prenormed else None)
            fold = decode and after is not None
            pending = mixer(h, sizes, layer=layer, **ctx, **({"residual": (x, after)} if fold else {}))
        if self.mlp is not None:
            x, h = self.post_attn_norm.add_forward(x, pending)
            fold = decode and next_norm is not None
            pending = self.mlp(h, sizes.mlp, residual=(x, next_norm) if fold else None)
        if defer:
            return x, pending
        return x if pending is None else x + pending


class ElasticDecoder(nn.Module):
    def __init__(self, spec: ArchSpec, ladder: RateLadder | None = None):
        super().__init__()
        self.spec = spec
        self.ladder = ladder
        # the embedding table is a linear [hidden -> vocab]: tied models use it as the head too
        self.embed = DenseLinear(spec.hidden_size, spec.vocab_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, spec.blocks(i)) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_embeddings else DenseLinear(spec.hidden_size, spec.vocab_size)
        self.register_buffer("inv_freq", torch.zeros(spec.head_dim // 2))
        # Optional orthogonal Q [hidden, hidden] (Hadamard before INT4) for a TIED table: the stored table is
        # E Q, so lookup yields the rotated stream directly, and the final norm (whose weight cannot be folded
        # into a shared table) runs in the original basis: x -> norm(x Q^T) Q -> head(E Q) = norm(x Q^T) E^T.
        self.register_buffer("hidden_rotation", None)

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay fp32 whatever dtype the weights are cast to (bf16 angles drift by radians)
        inv_freq = self.inv_freq.float()
        rotation = None if self.hidden_rotation is None else self.hidden_rotation.float()
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        if rotation is not None:
            self.hidden_rotation = rotation.to(self.inv_freq.device)
        return self

    @property
    def full_sizes(self) -> LayerSizes:
        return full_layer_sizes(self.spec)

    def sizes_for(self, rung: int | None) -> list[LayerSizes]:
        if rung is None or (rung == 0 and self.ladder is None):
            return [self.full_sizes] * self.spec.num_layers
        if self.ladder is None:
            raise ValueError("this model has no rate ladder; only the full model (rung 0) runs")
        if not 0 <= rung < len(self.ladder.rates):
            raise ValueError(f"rung {rung} is outside the ladder (0..{len(self.ladder.rates) - 1})")
        return self.ladder.sizes[rung]

    def new_cache(self, batch: int, max_len: int, rung: int | None = None, dtype=None) -> KVCache:
        dtype = dtype or self.norm.weight.dtype
        return KVCache(self.sizes_for(rung), self.spec.num_kv_heads, batch, max_len, dtype, self.norm.weight.device,
                       spec=self.spec)

    @property
    def head(self) -> nn.Module:
        return self.embed if self.lm_head is None else self.lm_head

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an INT4 table's rows come out of its kernel in the model dtype (fp32 math, one rounding: the bits of a
        # cast after it), so a decode step spends no launch on a cast
        return self.embed.lookup(input_ids, self.norm.weight.dtype)

    def final_hidden(self, x: torch.Tensor, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm of ``x + pending`` (in the original basis when a tied table is rotated, see
        ``hidden_rotation``)."""
        if self.hidden_rotation is None:
            return self.norm.add_forward(x, pending)[1]
        x = x if pending is None else x + pending
        rot = self.hidden_rotation.to(x.dtype)
        return self.norm(x @ rot.T) @ rot

    def attention_mask(self, attention_mask, batch: int, steps: int, past: int, device) -> torch.Tensor | None:
        """Boolean [B, 1, T, past+T]: causal, and padded key positions (attention_mask == 0) hidden. None when
        nothing is cached and nothing padded: plain causal attention, which SDPA runs as ``is_causal`` (its flash
        kernels on GPU and CPU; an explicit mask takes slower ones: 1.5-1.8x on a 2-core CPU at 1024 tokens)."""
        if past == 0 and (attention_mask is None or bool(attention_mask.all())):
            return None
        total = past + steps
        q_pos = torch.arange(past, total, device=device)[:, None]
        causal = torch.arange(total, device=device)[None, :] <= q_pos
        mask = causal[None, None].expand(batch, 1, steps, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :total].bool()
        return mask

    def context(self, input_ids, attention_mask=None, positions=None, cache=None) -> dict:
        """What every layer needs besides the hidden states (mask, positions, RoPE tables, cache)."""
        if isinstance(cache, DecodeBatch):  # one token per request at positions [B]; no mask, one RoPE table
            return {"inv_freq": self.inv_freq, "positions": positions, "mask": None, "cache": cache,
                    "rope": self._decode_rope(positions, cache)}
        b, t = input_ids.shape
        past = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        mask = self.attention_mask(attention_mask, b, t, past, input_ids.device)
        scaling = self.spec.rope_attention_scaling
        # fused path: the tables once a forward, on the ids' device (layer-wise calibration keeps the model on the host)
        rope = rope_tables(self.inv_freq.to(positions.device), positions.reshape(-1), scaling) \
            if self.spec.num_heads and _fused_kernels(input_ids) else None
        return {"inv_freq": self.inv_freq, "positions": positions, "mask": mask, "rope_scaling": scaling,
                "cache": cache, "rope": rope}

    def _decode_rope(self, positions, cache: DecodeBatch):
        """The step's cos / sin tables: at ``positions`` when given, else at each request's last position
        (``cache.lengths - 1``, one launch: what the decode graphs use). None without attention layers."""
        scaling = self.spec.rope_attention_scaling
        if not self.spec.num_heads:
            return None
        if positions is None:
            return decode_rope_tables(self.inv_freq, cache.lengths, scaling)
        return rope_tables(self.inv_freq, positions.reshape(-1), scaling)

    def forward(self, input_ids, rung: int | None = None, attention_mask=None, positions=None,
                cache: KVCache | None = None, sizes: list[LayerSizes] | None = None,
                logits_to_keep: int = 0, last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] at a rung of the ladder (or explicit per-layer ``sizes``); ``[B, 1, V]`` at the one
        position a device index ``last_index`` [1] names (a graphed prefill's last real token, no host sync)."""
        sizes = sizes or (cache.sizes if cache is not None else self.sizes_for(rung))
        ctx = self.context(input_ids, attention_mask, positions, cache)
        x, pending = self._embed(input_ids, cache)
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            next_norm = after.first_norm if after is not None and after.takes_prenormed else None
            if after is None and self.head_takes_prenormed:
                next_norm = self.norm
            x, pending = layer(x, sizes[i], ctx, layer=i, pending=pending, defer=True, next_norm=next_norm)
        if isinstance(cache, KVCache):
            cache.advance(input_ids.shape[1])
        if last_index is not None and not isinstance(pending, Prenormed):
            x, pending = x.index_select(1, last_index), None if pending is None else pending.index_select(1, last_index)
        elif logits_to_keep and not isinstance(pending, Prenormed):  # a Prenormed comes from a one-token step
            x, pending = x[:, -logits_to_keep:], None if pending is None else pending[:, -logits_to_keep:]
        hidden = self.final_hidden(x, pending)
        with head_gemv_preload():
            return self.head(hidden)

    def _embed(self, input_ids, cache) -> tuple[torch.Tensor, Prenormed | None]:
        """The token rows, and ``pending``: in a fused decode step (bf16, INT4 table) whose first layer finishes a
        norm begun before it, that norm's first half from the lookup itself (one launch less a step)."""
        first = self.layers[0] if len(self.layers) else None
        if (isinstance(cache, DecodeBatch) and _fused_kernels(input_ids) and isinstance(self.embed, Int4Linear)
                and self.norm.weight.dtype == torch.bfloat16 and first is not None and first.takes_prenormed
                and not torch.compiler.is_compiling()):  # as forward_residual: the fold is for eager / graphs
            begun = self.embed.lookup_prenormed(input_ids, torch.bfloat16, first.first_norm)
            return begun.x, begun
        return self.embed_tokens(input_ids), None

    @property
    def head_takes_prenormed(self) -> bool:
        """The INT4 vocab projection can finish the final norm begun by the last block's output GEMV in a decode
        step (not a rotated tied table, normalised in the original basis: ``final_hidden``). Off unless
        ``UNIQL_HEAD_FOLD=1``: its prologue slows the 8B head by more than the launch it saves (README switches)."""
        fold = switch("UNIQL_HEAD_FOLD") == "1"
        return fold and self.hidden_rotation is None and isinstance(self.head, Int4Linear)
