"""The rate ladder and the ONE function that turns a keep ratio into a kept size.

Every consumer of kept sizes (decoder truncation, training masks, quantization order, kernels, cache shapes,
the server's controller) reads them from a ``RateLadder`` built here, so they can never disagree
(the paper's code has four different rules; see docs/uniql-method.md, "bugs").

Kept sizes per layer and rung:
* ``mlp``: MLP intermediate channels. Gate/up are pruned along N, down along K, so the step is a multiple of
  both the kernels' N alignment and the quantization group (whole groups drop out of down_proj).
* ``qk``: channels per Q/K head; always whole RoPE pairs. Rows are stored rank-major across heads, so
  ``heads * qk`` must meet the N alignment for q_proj (all heads) and k_proj (KV heads).
* ``vo``: V/O rank per head. v_proj is N-pruned (KV heads), o_proj K-pruned (all heads, rank-major). A K
  prefix must be a whole number of packed int32 words; it may end inside a quantization group (kernels mask
  the tail of that group; its scale stays valid), which keeps small models like SmolLM2 (9 heads) prunable.
* ``ssm_p``: Mamba channels per head P' (x/z rows and out_proj columns rank-major across the H heads): even,
  and ``H * P'`` on the N alignment (z/x are N-pruned, out_proj K-pruned by the same prefix).
* ``ssm_n``: SSM state size N' (B/C rows state-major across the G groups): a multiple of 16 (or the full N
  when N is smaller), and ``G * N'`` on the N alignment.
A dim a layer does not have (``mlp`` of a Mamba2 layer, ``ssm_*`` of an attention layer) is carried along with
the others (at full size, or scaled like them by a uniform ladder; 0 where the model has none) and never read:
consumers only read the dims of the blocks a layer holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .spec import is_finite_number

DEFAULT_RATES = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35)


@dataclass(frozen=True)
class Alignment:
    group_size: int = 128  # quantization group along K
    n_align: int = 16  # kernels' output-row granularity
    k_pack: int = 8  # 4-bit values per int32 word along K

    @staticmethod
    def largest_group(widths, candidates=(128, 64, 32, 16)) -> int | None:
        """The largest candidate group size dividing every width (None if none does)."""
        return next((g for g in sorted(candidates, reverse=True) if all(k % g == 0 for k in widths)), None)

    @staticmethod
    def for_hidden(hidden_size: int) -> Alignment:
        """Largest usual group size dividing the hidden size (SmolLM2's 576 needs 64), else the finest, 16.

        The alignment of a floating-point checkpoint, whose group size quantizes nothing and only sets the MLP's
        rounding step (a multiple of it and of ``n_align``; the float kernels take any width). A hidden size no
        group divides (72) was refused, with --no-quant too; such a model cannot be quantized (`uniql compress`
        and `uniql finetune` refuse that)."""
        return Alignment(group_size=Alignment.largest_group([hidden_size]) or 16)


@dataclass(frozen=True)
class LayerSizes:
    mlp: int
    qk: int
    vo: int
    ssm_p: int = 0  # defaults: manifests written before SSM support
    ssm_n: int = 0


@dataclass(frozen=True)
class DimSteps:
    mlp: int
    qk: int
    vo: int
    ssm_p: int = 2
    ssm_n: int = 16


def kept_size(full: int, keep_ratio: float, step: int) -> int:
    """THE rounding rule: nearest multiple of ``step`` to ``keep_ratio * full``, within [step, full].

    ``full`` itself is always allowed (a dim that is not a multiple of ``step`` is never pruned partially
    past its last whole step). Ties round half to even, like Python's ``round``.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in [0, 1], got {keep_ratio}")
    if step <= 0 or full <= 0:
        raise ValueError(f"full ({full}) and step ({step}) must be positive")
    if keep_ratio == 1.0 or step >= full:
        return full
    size = step * round(keep_ratio * full / step)
    return full if size >= full else max(step, size)


def dim_steps(num_heads: int, num_kv_heads: int, head_dim: int, align: Alignment, *, ssm_heads: int = 0,
              ssm_groups: int = 0, ssm_head_dim: int = 0, ssm_state: int = 0) -> DimSteps:
    """Granularity of each structured dim so every rung is an aligned prefix (see module doc)."""

    def per_head(heads: int, multiple: int) -> int:
        return multiple // math.gcd(heads, multiple)

    qk = math.lcm(2, per_head(num_heads, align.n_align), per_head(num_kv_heads, align.n_align))
    vo = math.lcm(per_head(num_kv_heads, align.n_align), per_head(num_heads, align.k_pack))
    ssm_p = math.lcm(2, per_head(ssm_heads, align.n_align))
    ssm_n = math.lcm(16, per_head(ssm_groups, align.n_align))
    return DimSteps(mlp=math.lcm(align.n_align, align.group_size), qk=min(qk, head_dim), vo=min(vo, head_dim),
                    ssm_p=min(ssm_p, ssm_head_dim) or ssm_p, ssm_n=min(ssm_n, ssm_state) or ssm_n)


def spec_dim_steps(spec, align: Alignment) -> DimSteps:
    """``dim_steps`` for every dim of an ArchSpec (attention and SSM)."""
    return dim_steps(spec.num_heads, spec.num_kv_heads, spec.head_dim, align, ssm_heads=spec.ssm_heads,
                     ssm_groups=spec.ssm_groups, ssm_head_dim=spec.ssm_head_dim, ssm_state=spec.ssm_state)


def full_layer_sizes(spec) -> LayerSizes:
    """Every dim of an ArchSpec at full size (0 for dims the model does not have)."""
    return LayerSizes(mlp=spec.intermediate_size, qk=spec.head_dim, vo=spec.head_dim, ssm_p=spec.ssm_head_dim,
                      ssm_n=spec.ssm_state)


def _kept_or_absent(full: int, keep_ratio: float, step: int) -> int:
    return 0 if full == 0 else kept_size(full, keep_ratio, step)


def layer_sizes(full: LayerSizes, keep_ratio: float, steps: DimSteps) -> LayerSizes:
    return LayerSizes(**{name: _kept_or_absent(getattr(full, name), keep_ratio, getattr(steps, name))
                         for name in ("mlp", "qk", "vo", "ssm_p", "ssm_n")})


@dataclass
class RateLadder:
    """Global pruning rates and, for each rung, every layer's kept sizes (rung 0 = rate 0 = full)."""

    rates: list[float]
    layer_keep: list[list[float]]  # [rung][layer] keep ratio from the BI allocation
    sizes: list[list[LayerSizes]]  # [rung][layer]

    def __post_init__(self):
        if not self.rates or self.rates[0] != 0.0:
            raise ValueError("a ladder starts at rate 0.0")
        if any(b <= a for a, b in zip(self.rates, self.rates[1:], strict=False)):
            raise ValueError(f"ladder rates must increase: {self.rates}")
        if len(self.sizes) != len(self.rates) or len(self.layer_keep) != len(self.rates):
            raise ValueError("one row of sizes and keep ratios per rate")

    def nearest(self, rate: float) -> int:
        """Index of the rung nearest ``rate`` (ties go to the lighter pruning)."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
        # distances rounded so decimal midpoints (0.275) tie exactly and go to the lighter rung
        return min(range(len(self.rates)), key=lambda i: (round(abs(self.rates[i] - rate), 9), i))

    @classmethod
    def build(cls, full: LayerSizes, steps: DimSteps, rates, layer_keep: list[list[float]]) -> RateLadder:
        sizes = [[layer_sizes(full, keep, steps) for keep in row] for row in layer_keep]
        return cls(rates=list(rates), layer_keep=[list(r) for r in layer_keep], sizes=sizes)

    def to_dict(self) -> dict:
        return {
            "rates": self.rates,
            "layer_keep": self.layer_keep,
            "sizes": [[asdict(s) for s in row] for row in self.sizes],
        }

    @classmethod
    def from_dict(cls, data: dict) -> RateLadder:
        sizes = [[LayerSizes(**s) for s in row] for row in data["sizes"]]
        return cls(rates=list(data["rates"]), layer_keep=data["layer_keep"], sizes=sizes)


def uniform_ladder(full: LayerSizes, steps: DimSteps, num_layers: int, rates=DEFAULT_RATES) -> RateLadder:
    """Every layer pruned at the global rate (no BI allocation): used before calibration and in tests."""
    return RateLadder.build(full, steps, rates, [[1.0 - r] * num_layers for r in rates])


# the ArchSpec field each ladder dim is a prefix of (what an error about a size names)
FULL_FIELDS = {"mlp": "intermediate_size", "qk": "head_dim", "vo": "head_dim", "ssm_p": "ssm_head_dim",
               "ssm_n": "ssm_state"}


def check_ladder(ladder: RateLadder, spec) -> None:
    """A ladder read from a manifest, against the architecture it prunes: ValueError naming the first bad field.

    Each rung lists every layer, and every kept size is a whole number within [1, full] (0 for a dim the model
    lacks). A hand-edited size past the full width was accepted (a slice past the end takes the whole weight, so
    `info` showed a rung bigger than the model and `generate` ran). Sizes are not held to the alignment's steps:
    prefixes that end inside a quantization group are valid (the kernels take them), and a first version of this
    check refused a checkpoint the test suite builds that way."""
    rates = ladder.rates
    if not all(is_finite_number(r) for r in rates) or not rates[-1] < 1.0:
        raise ValueError(f"ladder.rates {rates} must be pruning rates in [0, 1)")
    full = full_layer_sizes(spec)
    for r, row in enumerate(ladder.sizes):
        if len(row) != spec.num_layers:
            raise ValueError(f"ladder.sizes[{r}] lists {len(row)} layers; the architecture has {spec.num_layers}")
        for i, sizes in enumerate(row):
            for dim, arch_field in FULL_FIELDS.items():
                _check_kept(f"ladder.sizes[{r}][{i}].{dim}", getattr(sizes, dim), getattr(full, dim),
                            f"arch.{arch_field}")


def _check_kept(name: str, value, full: int, full_name: str) -> None:
    low = min(1, full)  # a dim the model lacks (full 0) is carried as 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= full:
        raise ValueError(f"{name} is {value!r}; it must be a whole number in [{low}, {full}] ({full_name} is "
                         f"{full})")
