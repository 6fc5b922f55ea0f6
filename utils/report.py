"""The printed AUROC table and the sweep summary."""
from __future__ import annotations

import math
from typing import Any, Sequence

# (results.json key, column header); values are fractions, printed as percentages like the papers.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("pixel_aupro", "AUPRO"),
    ("image_f1_max", "I-F1max"), ("pixel_f1_max", "P-F1max"), ("image_ap", "I-AP"),
)


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over categories, ignoring categories where it is undefined (NaN/None)."""
    mean: dict[str, Any] = {"category": "mean"}
    for key, _ in COLUMNS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def format_table(title: str, rows: Sequence[dict[str, Any]], with_mean: bool) -> str:
    """A fixed-width table: one row per category (and a mean row), metrics in percent."""
    body = list(rows) + ([mean_row(rows)] if with_mean else [])
    width = max([len("category")] + [len(str(r["category"])) for r in body])
    header = f"{'category':<{width}}  " + "  ".join(f"{h:>8}" for _, h in COLUMNS)
    lines = [title, header, "-" * len(header)]
    for row in body:
        if row["category"] == "mean":
            lines.append("-" * len(header))
        lines.append(f"{row['category']:<{width}}  " + "  ".join(f"{_cell(row.get(k)):>8}" for k, _ in COLUMNS))
    return "\n".join(lines)
