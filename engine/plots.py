"""Line and interval plots: a run's training curves, and a study's paired differences.

``save_training_curves`` draws ``curves.png`` from the records of a run's history.json (one per
epoch); ``save_paired_differences`` draws one PNG per study (benchmarks/memory_ablation.py,
benchmarks/memory_study.py) with each setting's paired difference and its 95% interval. Both draw
on matplotlib's Agg canvas without pyplot (no global backend state, no window) and write the
file atomically through :func:`engine.visualize.save_figure`; matplotlib is imported inside the
functions, so importing this module costs nothing.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from utils.errors import UserError
from engine.visualize import DPI, save_figure

# history.json key -> legend label. Losses share one axis; entropies (in [0, 1]) get their own panel.
LOSS_CURVES: tuple[tuple[str, str], ...] = (
    ("loss", "L (total)"), ("kd", "L_KD"), ("nm", "L_NM"), ("orth", "L_Orth"), ("val_kd", "validation L_KD"),
)
ENTROPY_CURVES: tuple[tuple[str, str], ...] = (
    ("recall_entropy", "student queries"), ("exemplar_entropy", "exemplar queries"),
)
# results.json metric key -> panel title of the paired-difference plot.
DIFFERENCE_METRICS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "AUPRO"),
)


def _number(value: Any) -> float:
    """``value`` as a float, NaN when it is missing or not a finite number (drawn as a gap)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


def training_curves_figure(history: Sequence[Mapping[str, Any]], title: str | None = None) -> Any:
    """The matplotlib Figure of :func:`save_training_curves` (exposed so tests can inspect its lines).

    Left panel: every loss term present in ``history`` by epoch, on a log scale when all drawn
    values are positive (the terms differ by orders of magnitude), else linear. Right panel: the
    normalised recall entropy of student and exemplar queries on [0, 1], or a note when the run
    had no memory. Keys absent from every record are left out of the legend.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = [r for r in history if isinstance(r, Mapping)]
    if not records:
        raise UserError("the training history is empty: no epoch was trained, so there are no curves to draw; "
                        "train at least one epoch (train.epochs >= 1, phase=train)")
    epochs = [_number(r.get("epoch", i + 1)) for i, r in enumerate(records)]
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    loss_ax, entropy_ax = fig.subplots(1, 2)

    drawn: list[float] = []
    for key, label in LOSS_CURVES:
        values = [_number(r.get(key)) for r in records]
        if all(math.isnan(v) for v in values):
            continue
        loss_ax.plot(epochs, values, marker="o", markersize=3, label=label)
        drawn += [v for v in values if not math.isnan(v)]
    if drawn and min(drawn) > 0:
        loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="losses")
    if drawn:
        loss_ax.legend(fontsize="small")

    has_entropy = False
    for key, label in ENTROPY_CURVES:
        values = [_number(r.get(key)) for r in records]
        if all(math.isnan(v) for v in values):
            continue
        entropy_ax.plot(epochs, values, marker="o", markersize=3, label=label)
        has_entropy = True
    entropy_ax.set(xlabel="epoch", ylabel="normalised entropy (1 = uniform read)", ylim=(0, 1.02),
                   title="recall entropy of the memory reads")
    if has_entropy:
        entropy_ax.legend(fontsize="small")
    else:
        entropy_ax.text(0.5, 0.5, "no memory in this run:\nno recall entropy", ha="center", va="center",
                        transform=entropy_ax.transAxes, color="grey")
    known_epochs = [e for e in epochs if not math.isnan(e)] or [1.0]
    for ax in (loss_ax, entropy_ax):
        ax.grid(True, alpha=0.3)
        # Integer epochs only, on the same range in both panels: a one-epoch run would otherwise get
        # ticks at 0.96, 0.98, ... and the entropy panel of a baseline run an unrelated 0..1 axis.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(known_epochs) - 0.5, max(known_epochs) + 0.5)
    if title:
        fig.suptitle(title)
    return fig


def save_training_curves(history: list[dict], path: Path, title: str | None = None) -> Path:
    """Write ``path`` (curves.png) from a run's history.json records and return ``path``.

    Each record is one epoch: ``epoch``, ``loss``, ``kd``, and with memory ``nm``, ``orth``,
    ``recall_entropy``, ``exemplar_entropy``; ``val_kd`` when a validation slice exists. Any of
    them may be missing (a baseline run has no memory terms). The file is replaced atomically;
    an empty history is a UserError and leaves any earlier file untouched.
    """
    return save_figure(training_curves_figure(history, title), Path(path))


def paired_differences_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Any:
    """The matplotlib Figure of :func:`save_paired_differences` (exposed so tests can inspect it)."""
    from matplotlib.figure import Figure

    if not rows:
        raise UserError("there are no paired differences to draw: no comparison had a finished run on both sides; "
                        "run the study (with at least one seed) first")
    known = {key for key, _ in DIFFERENCE_METRICS}
    unknown = sorted({str(r.get("metric")) for r in rows} - known)
    if unknown:
        raise UserError(f"cannot draw paired differences of metric '{unknown[0]}'; "
                        f"use one of {', '.join(sorted(known))}")
    labels = list(dict.fromkeys(str(r["label"]) for r in rows))  # first-appearance order, top to bottom
    position = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    fig = Figure(figsize=(13, 1.4 + 0.32 * len(labels)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(DIFFERENCE_METRICS), sharey=True)
    for ax, (metric, name) in zip(axes, DIFFERENCE_METRICS):
        ax.axvline(0.0, color="black", linewidth=0.8)
        for row in (r for r in rows if r["metric"] == metric):
            difference = _number(row.get("difference"))
            if math.isnan(difference):
                continue
            low, high = _number(row.get("low")), _number(row.get("high"))
            y = position[str(row["label"])]
            if math.isnan(low) or math.isnan(high):  # a single seed: a point without an interval
                ax.plot(100 * difference, y, marker="o", color="grey", linestyle="none")
                continue
            # Coloured when the interval excludes zero: the difference is then beyond seed noise.
            colour = "tab:blue" if low > 0 or high < 0 else "grey"
            ax.errorbar(100 * difference, y, xerr=[[100 * (difference - low)], [100 * (high - difference)]],
                        marker="o", color=colour, capsize=3, linestyle="none")
        ax.set(title=name, xlabel="difference (percentage points)")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), [labels[len(labels) - 1 - i] for i in range(len(labels))])
    axes[0].set_ylim(-0.7, len(labels) - 0.3)
    explanation = "mean paired difference over seeds with its 95% t-interval; blue: the interval excludes 0; grey dot: one seed"
    fig.suptitle(f"{title}\n{explanation}" if title else explanation)
    return fig


def save_paired_differences(rows: Sequence[Mapping[str, Any]], path: Path, title: str | None = None) -> Path:
    """Write one PNG of paired differences to ``path`` and return ``path``.

    ``rows``: one mapping per (setting, metric) with ``label`` (the y-axis name of the setting,
    e.g. "demo ST: memory on - off"), ``metric`` (``image_auroc``, ``pixel_auroc`` or
    ``pixel_aupro``), ``difference`` (mean paired difference, a fraction as in results.json) and
    ``low``/``high`` (its 95% interval; NaN or None with a single seed, then drawn as a grey point
    without bars). One panel per metric, in percentage points, with a vertical line at zero; a
    difference whose interval excludes zero is blue. ``title`` goes above a line that says how to
    read the picture. The file is replaced atomically.
    """
    return save_figure(paired_differences_figure(rows, title), Path(path))
