"""A study's outputs: the CSV and Markdown tables of paired differences, and their picture."""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from benchmarks.study.cells import Cell, CellResult
from benchmarks.study.statistics import METRICS
from engine.pictures import DPI, number_or_nan, save_figure
from utils.errors import UserError
from utils.metrics import METRIC_NAMES, is_finite_number

# results.json metric key -> panel title of the paired-difference picture.
DIFFERENCE_METRICS: tuple[tuple[str, str], ...] = tuple((key, METRIC_NAMES[key][1]) for key, _ in METRICS)
TABLE_NOTE = ("Metrics in percent: mean ± sample standard deviation over seeds; each difference row gives the mean "
              "paired difference (same seed) with its 95% t-interval, and the seeds it pairs.")
CSV_FIELDS = ("dataset", "student", "reference", "variant", "label", "metric", "n", "seeds", "reference_mean",
              "reference_std", "variant_mean", "variant_std", "difference", "low", "high")


def _pct(value: float, signed: bool = False) -> str:
    if not is_finite_number(value):
        return "-"
    percent = round(100 * value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.0" for a tiny negative
    return f"{percent:+.1f}" if signed else f"{percent:.1f}"


def _mean_std_cell(mean: float, std: float) -> str:
    if not is_finite_number(mean):
        return "-"
    return f"{_pct(mean)} ± {_pct(std)}" if is_finite_number(std) else _pct(mean)


def _difference_cell(row: Mapping[str, Any]) -> str:
    if not is_finite_number(row["difference"]):
        return "-"
    interval = f" [{_pct(row['low'], True)}, {_pct(row['high'], True)}]" if is_finite_number(row["low"]) else " (1 seed)"
    return _pct(row["difference"], True) + interval


def format_markdown(rows: Sequence[Mapping[str, Any]], context: Iterable[str] = ()) -> str:
    """Markdown tables in percent, one block per dataset and student: the reference's mean ± std,
    then each variant's mean ± std and its paired difference with the 95% interval and seeds."""
    lines = [f"- {line}" for line in context]
    lines += [""] if lines else []
    lines += ["| dataset | student | run | " + " | ".join(h for _, h in METRICS) + " | seeds |",
              "|---|---|---|" + "---:|" * len(METRICS) + "---|"]
    # (dataset, student) -> variant -> metric -> row, in the order the rows come.
    blocks: dict[tuple[str, str], dict[str, dict[str, Mapping[str, Any]]]] = {}
    for row in rows:
        blocks.setdefault((row["dataset"], row["student"]), {}).setdefault(row["variant"], {})[row["metric"]] = row

    def line(start: str, run: str, by_metric: Mapping[str, Mapping[str, Any]], cell: Any, seeds: str = "") -> str:
        values = [cell(by_metric[key]) if key in by_metric else "-" for key, _ in METRICS]
        return f"{start} {run} | " + " | ".join(values) + f" | {seeds} |"

    for (dataset, student), variants in blocks.items():
        start = f"| {dataset} | {student.upper()} |"
        first = next(iter(variants.values()))
        reference = next(iter(first.values()))["reference"]
        lines.append(line(start, reference, first, lambda r: _mean_std_cell(r["reference_mean"], r["reference_std"])))
        for variant, by_metric in variants.items():
            lines.append(line(start, variant, by_metric, lambda r: _mean_std_cell(r["variant_mean"], r["variant_std"])))
            lines.append(line(start, f"{variant} − {reference}, 95% CI", by_metric, _difference_cell,
                              next(iter(by_metric.values()))["seeds"]))
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (CSV_FIELDS), metrics as fractions in [0, 1], empty where undefined."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and not math.isfinite(row[k]) else
                             f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})
    return buffer.getvalue()


def context_lines(done: Mapping[Cell, CellResult], seeds: Sequence[int]) -> list[str]:
    """One line per dataset and student saying how its runs were trained (from their results.json)."""
    lines: dict[tuple[str, str], str] = {}
    for cell, result in done.items():
        key = (cell.dataset.name, cell.student)
        if key in lines or not result.results:
            continue
        first = result.results[0]
        config = first.get("config") or {}
        categories = ", ".join(str(r["category"]) for r in result.results)
        lines[key] = (f"{cell.dataset.name} {cell.student.upper()} ({categories}): {first.get('backbone')}, "
                      f"{first.get('image_size')} px, {first.get('epochs')} epochs, batch {config.get('train.batch_size')}, "
                      f"device {first.get('device')}, seeds {' '.join(map(str, seeds))}; "
                      f"teacher: {first.get('teacher_weights')}")
    return list(lines.values())


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, stem: str, title: str,
                  context: Sequence[str]) -> tuple[str, list[Path]]:
    """Write ``{stem}.csv``, ``{stem}.md`` and ``{stem}.png`` into ``out``; return (markdown, paths)."""
    from utils.io import write_text

    markdown = format_markdown(rows, context)
    out = Path(out)
    paths = [write_text(out / f"{stem}.csv", format_csv(rows)),
             write_text(out / f"{stem}.md", f"# {title}\n\n{TABLE_NOTE}\n\n{markdown}"),
             save_paired_differences(rows, out / f"{stem}.png", title=title)]
    return markdown, paths


def finish(rows: Sequence[Mapping[str, Any]], done: Mapping[Cell, CellResult], seeds: Sequence[int], out: Path,
           stem: str, title: str, started: float) -> None:
    """Write ``{stem}``.csv/.md/.png into ``out``, print the table, the files and the wall time since ``started``."""
    markdown, paths = write_outputs(rows, out, stem, title, context_lines(done, seeds))
    trained = sum(result.trained for result in done.values())
    print(f"\n{title} (metrics in %)\n\n{markdown}")
    print(f"written: {', '.join(str(p) for p in paths)}")
    print(f"wall time {time.perf_counter() - started:.0f} s ({trained} runs trained, "
          f"{len(done) - trained} finished earlier and reused)")


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
            difference = number_or_nan(row.get("difference"))
            if math.isnan(difference):
                continue
            low, high = number_or_nan(row.get("low")), number_or_nan(row.get("high"))
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
