"""Quantize a sorted elastic decoder into the packed INT4 format: RTN or GPTQ, layer by layer.

Each projection keeps its sorted order (no act-order), so every rung stays a prefix of the same bytes.
q/k/v share one input Hessian, gate/up another (up alone in an ungated MLP), Mamba z/x/B/C/dt a third; o_proj,
down_proj and Mamba out_proj see their own inputs (rank-major and importance-ordered). Embedding table and
untied lm_head use round-to-nearest with groups along the hidden dim. The Mamba mixers' conv, gated-norm weight,
dt_bias, A_log and D stay floating point (small, and the recurrence is sensitive to them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from uniql.kernels import int4_format
from uniql.runtime.decoder import LINEAR_PATHS, ElasticDecoder
from uniql.runtime.linear import DenseLinear, Int4Linear
from uniql.runtime.memory import active_shapes

from .calib_data import calibration_batches
from .calibrate import Collector, gram, real_tokens, run_layerwise
from .gptq import gptq_quantize, rung_weighted_hessian, weighted_error
from .hadamard import rotate_hidden

# projections that read the same input (one Hessian per group, hooked on the first member a layer holds)
SHARED_INPUTS = (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
                 ("mamba.z_proj", "mamba.x_proj", "mamba.B_proj", "mamba.C_proj", "mamba.dt_proj"),
                 ("mamba.out_proj",))


def input_sources(paths) -> dict[str, str]:
    """projection -> the projection whose input it shares, for the projections ``paths`` of one layer."""
    sources = {}
    for group in SHARED_INPUTS:
        present = [p for p in group if p in paths]
        sources.update({p: present[0] for p in present})
    return {p: sources[p] for p in paths}


LAYER_LINEARS = input_sources(LINEAR_PATHS)  # an attn+mlp layer


@dataclass
class QuantConfig:
    method: str = "gptq"  # or "rtn"
    group_size: int = 128
    damp: float = 0.01
    block: int = 128
    calib_source: str = "wikitext2"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 8
    seed: int = 1234
    # rotate the hidden dim by a randomized Hadamard first (QuaRot-style). None = auto: on for GPTQ (SmolLM2
    # wikitext2 ppl 39.2 -> 27.8 at rate 0), off for RTN (45.9 -> 54.0); see benchmarks/results/quant_smollm2.json
    hadamard: bool | None = None
    # GPTQ objective of K-truncated projections (o/down/out_proj): "full" = the full width's output error only;
    # "rungs" = the sum of every ladder rung's error on its own prefix (rung_weighted_hessian), with rung 0
    # weighted ``rung0_weight`` times the others. On SmolLM2 (8 rungs) "rungs" cuts o/down output errors by 14-34 %
    # at rates 0.15-0.35 for +1.9 % at full width (results/gptq_objective_smollm2.json), and perplexity by
    # 0.3-1.6 % at 0.15-0.35, level at rate 0 (benchmarks/results/lora_smollm2_uniform_400_q32_rungs.json)
    gptq_objective: str = "rungs"
    rung0_weight: float = 3.0

    def __post_init__(self):
        if self.hadamard is None:
            self.hadamard = self.method == "gptq"

    def validate(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"quantization method must be gptq or rtn, got {self.method!r}")
        if self.group_size not in int4_format.GROUP_SIZES:
            raise ValueError(f"group size must be one of {int4_format.GROUP_SIZES}")
        if self.gptq_objective not in ("full", "rungs"):
            raise ValueError(f"gptq objective must be full or rungs, got {self.gptq_objective!r}")
        if not 0 < self.rung0_weight < math.inf:  # nan / inf: a Cholesky traceback after the calibration
            raise ValueError(f"--gptq-rung0-weight must be positive and finite, got {self.rung0_weight}")
        for name in ("calib_samples", "calib_seqlen", "batch_size", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"quantization {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.damp < math.inf:
            raise ValueError(f"GPTQ damp must be positive, got {self.damp}")

    def manifest(self) -> dict:
        return {**int4_format.FORMAT, **asdict(self)}


def rtn_linear(dense: DenseLinear, group_size: int) -> Int4Linear:
    qweight, scales = int4_format.rtn_quantize(dense.weight.data, group_size)
    return Int4Linear.from_packed(qweight, scales, group_size, dense.bias)


class GPTQCollector(Collector):
    """Accumulates each distinct projection input's Hessian (sum of x x^T over real tokens); GPTQ at finish.

    ``model`` gives the ladder (each rung's prefixes: the rung-weighted objective). With ``error_log`` (a list) it
    also records, for every projection and rung, the Hessian-weighted output error of GPTQ and of RTN on that
    rung's active prefix (evidence per layer type).
    """

    def __init__(self, cfg: QuantConfig, model: ElasticDecoder, error_log: list | None = None):
        self.cfg, self.model, self.error_log = cfg, model, error_log

    def attach(self, index, layer):
        self.hessians = {}
        self.sources = input_sources(layer.linear_paths)
        return [layer.get_linear(path).register_forward_pre_hook(self._hook(path))
                for path in sorted(set(self.sources.values()))]

    def _hook(self, path):
        def hook(module, args):
            h = gram(real_tokens(args[0], self.mask))
            self.hessians[path] = h if path not in self.hessians else self.hessians[path] + h
        return hook

    def _rung_shapes(self, index, path) -> list[tuple[int, int]]:
        """(n_active, k_active) of projection ``path`` of layer ``index`` at every rung of the ladder."""
        return [active_shapes(self.model.spec, sizes[index])[path] for sizes in self.model.ladder.sizes]

    def _objective(self, index, path, hessian):
        """The Hessian GPTQ minimises for ``path``: H itself, or the rungs' weighted sum for a K-truncated one."""
        if self.cfg.gptq_objective == "full":
            return hessian
        prefixes = [k for _, k in self._rung_shapes(index, path)]
        if min(prefixes) == hessian.shape[0]:  # N-truncated (q/k/v, gate/up, Mamba in_proj): every rung keeps K
            return hessian
        return rung_weighted_hessian(hessian, prefixes, [self.cfg.rung0_weight] + [1.0] * (len(prefixes) - 1))

    def finish(self, index, layer):
        for path, source in self.sources.items():
            dense = layer.get_linear(path)
            qweight, scales = gptq_quantize(dense.weight.data, self._objective(index, path, self.hessians[source]),
                                            self.cfg.group_size, self.cfg.damp, self.cfg.block)
            if self.error_log is not None:
                self._log_errors(index, path, dense.weight.data, (qweight, scales), self.hessians[source])
            layer.set_linear(path, Int4Linear.from_packed(qweight, scales, self.cfg.group_size, dense.bias))
        self.hessians = None

    def _log_errors(self, index, path, weight, gptq_packed, hessian):
        rtn_packed = int4_format.rtn_quantize(weight, self.cfg.group_size)
        g = self.cfg.group_size
        for rung, (n, k) in enumerate(self._rung_shapes(index, path)):
            errors = {name: weighted_error(weight[:n], qw[:, :n], sc[:, :n], g, hessian, k)
                      for name, (qw, sc) in (("gptq", gptq_packed), ("rtn", rtn_packed))}
            self.error_log.append({"layer": index, "proj": path, "rung": rung, "n": n, "k": k, **errors})


def quantize_tables(model: ElasticDecoder, group_size: int) -> None:
    """Embedding table (and untied lm_head): RTN, groups along hidden. Tied models keep ONE packed table."""
    model.embed = rtn_linear(model.embed, group_size)
    if model.lm_head is not None:
        model.lm_head = rtn_linear(model.lm_head, group_size)


def gptq_batches(tokenizer, cfg: QuantConfig | None) -> list | None:
    """GPTQ's calibration batches (None: no quantization, or RTN, which reads no data)."""
    if cfg is None or cfg.method != "gptq":
        return None
    return calibration_batches(tokenizer, cfg.calib_source, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                               cfg.batch_size)


def quantize_model(model: ElasticDecoder, tokenizer, cfg: QuantConfig, device="cpu",
                   error_log: list | None = None, batches: list | None = None) -> dict:
    """Replace every projection of ``model`` by an Int4Linear in place; return provenance for the manifest
    (``batches``: ``gptq_batches(tokenizer, cfg)`` if already read)."""
    cfg.validate()
    rotation = rotate_hidden(model, cfg.seed) if cfg.hadamard else None
    # tables first: GPTQ then calibrates layer 0 on the embeddings the INT4 model really looks up (sequential GPTQ,
    # each layer compensating the error before it; the reference does the same)
    quantize_tables(model, cfg.group_size)
    if cfg.method == "rtn":
        for layer in tqdm(model.layers, desc="quantizing (rtn)", unit="layer"):
            for path in layer.linear_paths:
                layer.set_linear(path, rtn_linear(layer.get_linear(path), cfg.group_size))
    else:
        batches = gptq_batches(tokenizer, cfg) if batches is None else batches
        collector = GPTQCollector(cfg, model, error_log)
        run_layerwise(model, batches, [collector], device, desc="quantizing (gptq)", recompute_outputs=True)
    return {**cfg.manifest(), "rotation": rotation}

