"""The printed table at the end of a run, and results/summary.md / summary.csv over every run."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from datasets.layouts import BENCHMARKS
from utils.io import write_text
from utils.metrics import is_finite_number, metric_columns

# (results.json key, column header); values are fractions, printed as percentages like the papers.
COLUMNS: tuple[tuple[str, str], ...] = metric_columns(
    ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max", "image_ap"))
# The benchmarks scored by their own metrics (datasets.layouts.Benchmark.scoring) print those.
SCORING_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "mvtec": COLUMNS,
    "loco": metric_columns(("image_auroc", "image_auroc_logical", "image_auroc_structural", "pixel_auroc",
                            "pixel_spro_05", "pixel_spro_05_logical", "pixel_spro_05_structural", "pixel_spro_30")),
    "ad2": metric_columns(("image_auroc", "pixel_auroc", "pixel_aupro_05", "pixel_segf1")),
}


def columns_for(dataset: str) -> tuple[tuple[str, str], ...]:
    """The table columns of ``dataset``: its benchmark's own metrics, or the MVTec AD set."""
    benchmark = BENCHMARKS.get(dataset)
    return SCORING_COLUMNS[benchmark.scoring if benchmark else "mvtec"]


def mean_row(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS) -> dict[str, Any]:
    """Mean of each metric of ``columns`` over categories, ignoring categories where it is undefined
    (None, NaN or inf), as the row labelled "mean"; None where no category defines it."""
    mean: dict[str, Any] = {"category": "mean"}
    for key, _ in columns:
        values = [float(r[key]) for r in rows if is_finite_number(r.get(key))]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def format_table(title: str, rows: Sequence[dict[str, Any]], with_mean: bool,
                 columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A fixed-width table: one row per category (and a mean row), metrics in percent."""
    body = list(rows) + ([mean_row(rows, columns)] if with_mean else [])
    width = max([len("category")] + [len(str(r["category"])) for r in body])
    header = f"{'category':<{width}}  " + "  ".join(f"{h:>8}" for _, h in columns)
    lines = [title, header, "-" * len(header)]
    for row in body:
        if row["category"] == "mean":
            lines.append("-" * len(header))
        lines.append(f"{row['category']:<{width}}  " + "  ".join(f"{_cell(row.get(k)):>8}" for k, _ in columns))
    return "\n".join(lines)


# --------------------------------------------------------------------------- results/summary.md and .csv

# MVTec AD means reported by the papers (image / pixel AUROC, fractions); printed as "paper" rows.
PAPER_DATASET = "mvtec"
PAPER_MEANS: dict[str, dict[str, float]] = {
    "MemKD": {"image_auroc": 0.996, "pixel_auroc": 0.982},  # Gu et al., ICCV 2023
    "RD4AD": {"image_auroc": 0.985, "pixel_auroc": 0.978},  # Deng & Li, CVPR 2022
    "STPM": {"image_auroc": 0.955, "pixel_auroc": 0.970},   # Wang et al., BMVC 2021
}
METHOD_ORDER = ("MemKD-ST", "STPM", "MemKD-RD", "RD4AD")
SUMMARY_FIELDS: tuple[str, ...] = ("dataset", "method", "source", "category",
                                   *dict.fromkeys(key for columns in SCORING_COLUMNS.values() for key, _ in columns))


def collect_results(output_dir: Path) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[Path]]:
    """Every run's results.json under ``output_dir/{method}/{dataset}/{category}/``.

    Returns ``({dataset: {method: [results sorted by category]}}, unreadable files)``; methods
    are in the order of METHOD_ORDER, then by name.
    """
    found: dict[str, dict[str, list[dict[str, Any]]]] = {}
    unreadable: list[Path] = []
    for path in sorted(Path(output_dir).glob("*/*/*/results.json")):
        try:
            results = json.loads(path.read_text())
            dataset, method, category = results["dataset"], results["method"], results["category"]
        except (OSError, ValueError, KeyError, TypeError):
            unreadable.append(path)
            continue
        found.setdefault(str(dataset), {}).setdefault(str(method), []).append({**results, "category": str(category)})
    rank = {name: i for i, name in enumerate(METHOD_ORDER)}
    ordered = {
        dataset: {m: sorted(methods[m], key=lambda r: r["category"])
                  for m in sorted(methods, key=lambda m: (rank.get(m, len(rank)), m))}
        for dataset, methods in sorted(found.items())
    }
    return ordered, unreadable


def summary_rows(collected: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Flat rows (SUMMARY_FIELDS) for the CSV: per dataset and method, its categories and a mean row;
    for MVTec AD, the papers' means as rows with source "paper"."""
    rows: list[dict[str, Any]] = []
    for dataset, methods in collected.items():
        columns = columns_for(dataset)
        for method, results in methods.items():
            for row in [*results, mean_row(results, columns)]:
                rows.append({"dataset": dataset, "method": method, "source": "ours", "category": row["category"],
                             **{key: row.get(key) for key, _ in columns}})
        if dataset == PAPER_DATASET:
            for method, means in PAPER_MEANS.items():
                rows.append({"dataset": dataset, "method": method, "source": "paper", "category": "mean",
                             **{key: means.get(key) for key, _ in COLUMNS}})
    return rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def format_summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as CSV text: metrics as fractions in [0, 1], empty where undefined."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(row.get(k)) for k in SUMMARY_FIELDS} for row in rows)
    return buffer.getvalue()


def _markdown_table(first: Sequence[str], rows: Sequence[tuple[Sequence[str], dict[str, Any]]],
                    columns: Sequence[tuple[str, str]]) -> list[str]:
    """A markdown table: the ``first`` label columns, then one column per ``columns`` entry in percent."""
    lines = ["| " + " | ".join([*first, *(header for _, header in columns)]) + " |",
             "|" + "---|" * len(first) + "---:|" * len(columns)]
    for labels, row in rows:
        lines.append("| " + " | ".join([*labels, *(_cell(row.get(key)) for key, _ in columns)]) + " |")
    return lines


def _setting(results: Sequence[dict[str, Any]]) -> str:
    """'resnet18, 256 px' (several values joined with '/' when categories differ)."""
    def values(key: str) -> str:
        return "/".join(sorted({str(r.get(key, "?")) for r in results}))
    return f"{values('backbone')}, {values('image_size')} px"


def format_summary_markdown(collected: dict[str, dict[str, list[dict[str, Any]]]],
                            unreadable: Sequence[Path] = ()) -> str:
    """results/summary.md: per dataset, a table per method (categories and mean, metrics in %),
    then the methods' means side by side, with the papers' means on MVTec AD."""
    lines = ["# Results", "", "Metrics in percent; `-` where a metric is undefined. "
             "Regenerated at the end of every run from the results.json files below this folder.", ""]
    if not collected:
        lines.append("No finished runs yet.")
    for dataset, methods in collected.items():
        columns = columns_for(dataset)
        lines += [f"## {dataset}", ""]
        for method, results in methods.items():
            lines += [f"### {method} ({_setting(results)})", ""]
            body = [((r["category"],), r) for r in results] + [(("**mean**",), mean_row(results, columns))]
            lines += _markdown_table(("category",), body, columns) + [""]
        means = [((method, "ours"), mean_row(results, columns)) for method, results in methods.items()]
        if dataset == PAPER_DATASET:
            means += [((method, "paper"), dict(values)) for method, values in PAPER_MEANS.items()]
        lines += ["### Means", ""] + _markdown_table(("method", "source"), means, columns) + [""]
    if unreadable:
        lines += ["Skipped (unreadable results.json): " + ", ".join(str(p) for p in unreadable), ""]
    return "\n".join(lines)


def write_summary(output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.csv`` into ``output_dir`` from every run found there."""
    collected, unreadable = collect_results(Path(output_dir))
    markdown = write_text(Path(output_dir) / "summary.md", format_summary_markdown(collected, unreadable))
    table = write_text(Path(output_dir) / "summary.csv", format_summary_csv(summary_rows(collected)))
    return markdown, table
