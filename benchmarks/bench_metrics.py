"""Time utils.metrics on a synthetic MVTec-sized test set, side by side with scikit-learn.

The test set: 150 anomaly maps of 256x256, ~30% anomalous images carrying 1-3 blob-shaped
ground-truth regions each; maps are the smoothed masks times a random per-region strength, plus
smoothed noise, so scores correlate with the masks without separating them perfectly.

Run: python benchmarks/bench_metrics.py [--repeats 3]. Prints figures only (median seconds of
``--repeats`` runs after one warm-up run, which pays the process's first-touch memory cost;
|diff| is the difference from scikit-learn's value).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from utils.metrics import auroc, aupro, average_precision, evaluate_all, f1_max  # noqa: E402


def make_test_set(
    n_images: int = 150, size: int = 256, anomalous_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_scores [N], image_labels [N], anomaly_maps float32 [N,H,W], masks bool [N,H,W])``."""
    rng = np.random.default_rng(seed)
    n_anomalous = round(n_images * anomalous_fraction)
    labels = np.zeros(n_images, dtype=bool)
    labels[rng.choice(n_images, n_anomalous, replace=False)] = True

    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    signal = np.zeros((n_images, size, size), dtype=np.float32)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            # A rotated ellipse with a wobbly border: a typical defect blob, 10 to 60 pixels across.
            cy, cx = rng.uniform(30, size - 30, 2)
            ry, rx = rng.uniform(5, 30, 2)
            angle = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
            v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
            wobble = 0.15 * np.sin(5 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
            blob = u**2 + v**2 <= (1 + wobble) ** 2
            masks[i] |= blob
            signal[i][blob] = np.maximum(signal[i][blob], rng.uniform(0.3, 1.5))

    smooth = (0, 3, 3)  # smooth within each image only
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape).astype(np.float32), smooth)
    maps = ndimage.gaussian_filter(signal, smooth) + 1.5 * noise
    image_scores = maps.reshape(n_images, -1).max(axis=1)
    return image_scores, labels, maps.astype(np.float32), masks


def timed(fn: Callable[[], object], repeats: int) -> tuple[object, float]:
    """``(fn(), median seconds of `repeats` further calls)``; the first call doubles as warm-up."""
    value = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per entry (median reported)")
    args = parser.parse_args()

    image_scores, image_labels, maps, masks = make_test_set()
    pixels, pixel_labels = maps.ravel(), masks.ravel()
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(
        f"test set: {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]} = {pixels.size / 1e6:.1f} M pixels, "
        f"{int(image_labels.sum())} anomalous images, {n_regions} regions, "
        f"{100 * pixel_labels.mean():.2f}% anomalous pixels; median of {args.repeats} runs"
    )
    # Other work on the machine slows both columns alike; the load says how much to trust seconds.
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start\n")

    rows = [
        ("pixel AUROC", lambda: auroc(pixels, pixel_labels), lambda: roc_auc_score(pixel_labels, pixels)),
        (
            "pixel AP",
            lambda: average_precision(pixels, pixel_labels),
            lambda: average_precision_score(pixel_labels, pixels),
        ),
        ("pixel F1-max", lambda: f1_max(pixels, pixel_labels)[0], lambda: sklearn_f1_max(pixels, pixel_labels)),
        ("pixel AUPRO@0.3", lambda: aupro(maps, masks), None),
        ("evaluate_all", lambda: evaluate_all(image_scores, image_labels, maps, masks), None),
    ]

    print(f"{'metric':<16} {'ours (s)':>9} {'sklearn (s)':>12} {'ratio':>7} {'value':>9} {'|diff|':>9}")
    for name, ours, reference in rows:
        value, ours_s = timed(ours, args.repeats)
        if isinstance(value, dict):  # evaluate_all: no single value to show
            print(f"{name:<16} {ours_s:>9.3f} {'-':>12} {'-':>7} {'-':>9} {'-':>9}")
            continue
        if reference is None:
            print(f"{name:<16} {ours_s:>9.3f} {'-':>12} {'-':>7} {value:>9.5f} {'-':>9}")
            continue
        ref_value, ref_s = timed(reference, args.repeats)
        print(
            f"{name:<16} {ours_s:>9.3f} {ref_s:>12.3f} {ref_s / ours_s:>6.1f}x "
            f"{value:>9.5f} {abs(value - ref_value):>9.1e}"
        )

    print("\nevaluate_all:")
    for key, value in evaluate_all(image_scores, image_labels, maps, masks).items():
        print(f"  {key:<20} {value:.5f}")


if __name__ == "__main__":
    main()
