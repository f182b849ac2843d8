"""Plot and table helpers for ``benchmarks/report.py`` (matplotlib, headless).

Every figure is saved as a PNG at a fixed size and resolution with large enough fonts to read on GitHub.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: CI machines and the device machine are headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

plt.rcParams.update({
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
})

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def new_figure(ncols: int = 1, width: float = 7.5, height: float = 4.3, nrows: int = 1):
    """A figure of ``nrows`` x ``ncols`` axes of ``width`` x ``height`` inches each, as a flat list."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def lines_by_group(ax, series: dict[str, list[tuple[float, float]]], *, logy: bool = False,
                   annotate_last: bool = False) -> None:
    """One marked line per group; ``series`` maps a legend label to (x, y) points."""
    for i, (label, points) in enumerate(series.items()):
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], label=label)
        if annotate_last and xs:
            ax.annotate(f"{ys[-1]:.3g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0),
                        fontsize=8, va="center")
    if annotate_last:
        ax.margins(x=0.1)  # room for the value labels at the right end
    if logy:
        ax.set_yscale("log")
    ax.legend()


def plain_log_y(ax) -> None:
    """Log y axis with plain tick labels (3, 5, 80 rather than 3x10^0)."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=8)


def hlines(ax, anchors: Iterable[tuple[str, float]], *, styles: Sequence[str] = ("--", ":", "-.")) -> None:
    """Horizontal reference lines with labels in the legend (anchors measured in the same run or published)."""
    for i, (label, y) in enumerate(anchors):
        ax.axhline(y, linestyle=styles[i % len(styles)], color=f"C{(i + 5) % 10}", label=label)
    ax.legend()


def grouped_bars(ax, groups: Sequence[str], bars: dict[str, Sequence[float | None]], *, fmt: str = "{:.2f}") -> None:
    """Bars of several series side by side for each group, each labelled with its value (None: no bar)."""
    n = max(1, len(bars))
    width = 0.8 / n
    for i, (label, values) in enumerate(bars.items()):
        kept = [(g + (i - (n - 1) / 2) * width, v) for g, v in enumerate(values) if v is not None]
        rects = ax.bar([x for x, _ in kept], [v for _, v in kept], width, label=label)
        ax.bar_label(rects, labels=[fmt.format(v) for _, v in kept], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend()


def rate_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("pruning rate (rung)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A GitHub markdown table; floats are printed with 3 significant digits unless already strings."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def image(rel_path: str, alt: str) -> str:
    return f"![{alt}]({rel_path})"
