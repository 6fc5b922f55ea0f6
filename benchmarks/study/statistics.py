"""Paired differences over seeds: two variants trained with the same seed, compared per metric."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from benchmarks.study.cells import Cell, CellResult, DatasetSpec, Variant
from utils.metrics import is_finite_number, metric_columns

# (results.json key, column header); values are fractions, tables print percent.
METRICS: tuple[tuple[str, str], ...] = metric_columns(("image_auroc", "pixel_auroc", "pixel_aupro"))
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference over ``n`` seeds with its two-sided interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    low: float
    high: float


def paired_difference(variant: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The mean of ``variant[i] - reference[i]`` (pairs from the same seed) with its t-interval.

    The interval is mean +- t.ppf((1 + confidence) / 2, n - 1) * sd / sqrt(n), sd the sample
    standard deviation (n - 1) of the differences: Student's t for a mean of n paired
    differences. With one pair the mean is returned with NaN bounds; with none, NaN throughout.
    """
    from scipy.stats import t

    if len(variant) != len(reference):
        raise ValueError(f"paired values must come in pairs: {len(variant)} vs {len(reference)}")
    differences = [float(v) - float(r) for v, r in zip(variant, reference)]
    n = len(differences)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan)
    mean = sum(differences) / n
    if n < 2:
        return PairedDifference(1, mean, math.nan, math.nan)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is NaN for fewer than two values."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def compare(done: Mapping[Cell, CellResult], dataset: DatasetSpec, student: str, reference: Variant,
            variant: Variant, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per metric comparing ``variant`` with ``reference`` (CSV_FIELDS; fractions).

    Means and deviations use every seed where the side has a value; the difference pairs only
    seeds where both have one (a metric can be undefined, e.g. AUPRO without masks).
    """
    rows = []
    for key, _ in METRICS:
        by_seed = {}
        for seed in seeds:
            ref = done.get(Cell(dataset, student, reference, seed))
            var = done.get(Cell(dataset, student, variant, seed))
            by_seed[seed] = (ref.metrics.get(key) if ref else None, var.metrics.get(key) if var else None)
        ref_values = [r for r, _ in by_seed.values() if is_finite_number(r)]
        var_values = [v for _, v in by_seed.values() if is_finite_number(v)]
        paired_seeds = [s for s, (r, v) in by_seed.items() if is_finite_number(r) and is_finite_number(v)]
        diff = paired_difference([by_seed[s][1] for s in paired_seeds], [by_seed[s][0] for s in paired_seeds])
        (ref_mean, ref_std), (var_mean, var_std) = mean_std(ref_values), mean_std(var_values)
        rows.append({
            "dataset": dataset.name, "student": student, "reference": reference.name, "variant": variant.name,
            "label": f"{dataset.name} {student.upper()}: {variant.name} - {reference.name}", "metric": key,
            "n": diff.n, "seeds": " ".join(str(s) for s in paired_seeds),
            "reference_mean": ref_mean, "reference_std": ref_std, "variant_mean": var_mean, "variant_std": var_std,
            "difference": diff.mean, "low": diff.low, "high": diff.high,
        })
    return rows
