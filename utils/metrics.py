"""Evaluation metrics for unsupervised anomaly detection, at image level and pixel level.

Every public function is pure: it takes numpy arrays or torch tensors (any device; a tensor is
moved to the CPU once), never modifies its inputs, and returns plain Python floats.

Conventions shared by all metrics:

* Higher score = more anomalous; label / mask value 1 (or True) = anomalous, 0 = normal.
* A prediction at threshold ``t`` is ``score >= t``.
* A metric that is undefined for the data it is given (only one class present, a NaN among the
  scores, no anomalous region for AUPRO) comes back as ``float('nan')``; it never raises.
* Malformed input (mismatched shapes, labels or masks that are not binary) raises ``ValueError``:
  that is a bug in the caller, not a property of the data.

Speed (~10M pixels per MVTec category): every ranking metric needs the scores sorted once, and
``np.argsort`` is slow at that size. float32 scores are instead packed into the high 32 bits of a
uint64 whose low 32 bits carry a small integer payload (the label, or the ground-truth region id)
and sorted with ``np.sort``, several times faster, the payload coming out in score order. AUROC,
AP and F1-max are then summed over the thresholds whose tie group holds a positive only (~1% of
pixels), and AUPRO over the part of the curve below ``fpr_limit`` only. ``evaluate_all`` sorts
the pixels once for all pixel metrics.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from scipy import ndimage

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

# The keys of evaluate_all's result, in the order reports should print them.
METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "image_f1_max",
    "image_f1_threshold",
    "pixel_f1_max",
    "pixel_f1_threshold",
    "image_ap",
    "pixel_ap",
)

# How tables and plots name each metric of evaluate_all: key -> (column header, title).
METRIC_NAMES: dict[str, tuple[str, str]] = {
    "image_auroc": ("I-AUROC", "image AUROC"), "pixel_auroc": ("P-AUROC", "pixel AUROC"),
    "pixel_aupro": ("AUPRO", "AUPRO"), "image_f1_max": ("I-F1max", "image F1-max"),
    "pixel_f1_max": ("P-F1max", "pixel F1-max"), "image_ap": ("I-AP", "image AP"), "pixel_ap": ("P-AP", "pixel AP"),
    # MVTec LOCO AD and MVTec AD 2 (engine/benchmark_metrics.py)
    "image_auroc_logical": ("I-log", "image AUROC, logical anomalies"),
    "image_auroc_structural": ("I-str", "image AUROC, structural anomalies"),
    "pixel_spro_05": ("sPRO5", "AU-sPRO up to FPR 0.05"),
    "pixel_spro_05_logical": ("sPRO5log", "AU-sPRO up to FPR 0.05, logical anomalies"),
    "pixel_spro_05_structural": ("sPRO5str", "AU-sPRO up to FPR 0.05, structural anomalies"),
    "pixel_spro_30": ("sPRO30", "AU-sPRO up to FPR 0.3"),
    "pixel_aupro_05": ("AUPRO5", "AU-PRO up to FPR 0.05"), "pixel_segf1": ("SegF1", "pixel F1 at the segmentation threshold"),
}


def is_finite_number(value: object) -> bool:
    """True for an int or float that is neither nan nor inf (a defined metric); False for None, bools."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_columns(keys: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``(key, column header)`` of each metric of ``keys``, for a table."""
    return tuple((key, METRIC_NAMES[key][0]) for key in keys)


_NAN = float("nan")


# --------------------------------------------------------------------------- input conversion


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view or copy of ``x``; a torch tensor is detached and moved to the CPU once."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # numpy has no bfloat16; float32 holds both exactly
        return x.numpy()
    return np.asarray(x)


def _as_scores(x: ArrayLike) -> np.ndarray:
    """Flattened scores as float32 when that is exact for every value, else float64.

    float32 enables the fast sort; float64 data that float32 cannot hold exactly stays float64 so
    that rounding never creates ties the data does not have.
    """
    a = _to_numpy(x).ravel()
    if a.dtype == np.float32:
        return a
    if a.dtype == np.float16:
        return a.astype(np.float32)
    a64 = a.astype(np.float64, copy=False)
    a32 = a64.astype(np.float32)
    return a32 if np.array_equal(a32, a64) else a64


def _as_binary(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a bool array of the same shape; raises ValueError unless every value is 0 or 1."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if not ((a == 0) | (a == 1)).all():
        raise ValueError(
            f"{name} must be binary (0/1 or bool), got values outside {{0, 1}}; "
            "threshold or rescale it (e.g. mask > 0) before evaluation"
        )
    return a != 0


def _as_stack(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as an [N, H, W] array; a singleton channel axis ([N, 1, H, W]) is dropped."""
    a = _to_numpy(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape [N, H, W] or [N, 1, H, W], got {tuple(a.shape)}")
    return a


def _check_same_size(scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.size != labels.size:
        raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


# --------------------------------------------------------------------------- sorting core


@dataclass(frozen=True)
class _Ranking:
    """Scores sorted in descending order, with their payload codes, grouped by distinct value.

    ``codes[i]`` is the payload of the i-th highest score; ``ends[j]`` is the index in ``codes`` of
    the last element of the j-th group of tied scores; ``positives`` holds the indices in
    ``codes`` of the positive (non-zero) codes, increasing. ``sorted_keys`` are the sorted scores
    themselves (float64) or their uint32 sort keys (float32 scores), read by ``thresholds``.
    """

    codes: np.ndarray  # unsigned ints, one per element, descending score order (may be a view)
    ends: np.ndarray  # int64, one per distinct score, increasing
    positives: np.ndarray  # int64, one per positive element, increasing
    sorted_keys: np.ndarray  # one per element, descending score order (may be a view)

    def thresholds(self, groups: np.ndarray) -> np.ndarray:
        """The score values (float64) of the given tie groups; decoded on demand because the
        few groups that need one are a small part of the millions of distinct pixel scores."""
        keys = self.sorted_keys[self.ends[groups]]
        if keys.dtype == np.uint32:
            bits = keys.view(np.int32)  # the fancy index above made a copy: safe to flip in place
            _flip_float32_order(bits)
            keys = bits.view(np.float32)
        return keys.astype(np.float64)


def _group_ends(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the last element of every run of equal values in a sorted, non-empty array."""
    is_end = np.empty(sorted_values.size, dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=is_end[:-1])
    is_end[-1] = True
    return np.flatnonzero(is_end)


def _flip_float32_order(bits: np.ndarray) -> None:
    """In place, map float32 bit patterns (viewed as int32) to keys whose unsigned order is the
    descending order of the floats; the map is its own inverse.

    Negative floats already order descending by their unsigned bits (sign set, larger magnitude =
    larger bits), positives ascending: flipping their 31 low bits reverses them and keeps them
    below every negative.
    """
    flip = bits >> 31  # -1 on negatives, 0 on positives
    np.invert(flip, out=flip)
    flip &= 0x7FFFFFFF
    bits ^= flip


def _rank(scores: np.ndarray, codes: np.ndarray) -> _Ranking:
    """Sort ``scores`` (1-D float32 or float64, no NaN, not empty) descending, carrying ``codes``.

    ``codes`` is a 1-D array of unsigned integers below 2**32, same size as ``scores``.
    """
    if scores.dtype != np.float32:
        order = np.argsort(scores)[::-1]  # tie order is irrelevant: only group boundaries are used
        sorted_keys = scores[order]
        sorted_codes = codes[order]
    else:
        # Build each uint64 in place: sort key in the high 32 bits, code in the low 32 bits.
        packed = np.empty(scores.size, dtype=np.uint64)
        halves = packed.view(np.uint32).reshape(-1, 2)
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        np.add(scores, np.float32(0.0), out=halves[:, high].view(np.float32))  # -0.0 + 0.0 = +0.0: ties
        _flip_float32_order(halves[:, high].view(np.int32))
        halves[:, low] = codes
        packed.sort()
        sorted_keys, sorted_codes = halves[:, high], halves[:, low]
    return _Ranking(
        codes=sorted_codes,
        ends=_group_ends(sorted_keys),
        positives=np.flatnonzero(sorted_codes),
        sorted_keys=sorted_keys,
    )


def _rank_binary(scores: ArrayLike, labels: ArrayLike) -> _Ranking | None:
    """Ranking of ``scores`` carrying ``labels``; None when a ranking metric is undefined
    (a class is absent, or a score is NaN)."""
    s = _as_scores(scores)
    y = _as_binary(labels, "labels").ravel()
    _check_same_size(s, y)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size or np.isnan(s).any():
        return None
    return _rank(s, y.view(np.uint8))


# --------------------------------------------------------------------------- curve summaries


@dataclass(frozen=True)
class _PositiveGroups:
    """Counts at the thresholds whose tie group holds at least one positive, descending.

    A group without positives only adds false positives; AUROC, AP and F1-max can all be written
    as sums or maxima over the other groups (see each function). On pixels, where ~1% are
    anomalous, that is a small fraction of the distinct scores.
    """

    n_pos: int
    n_neg: int
    tps: np.ndarray  # int64: positives with score >= threshold
    fps: np.ndarray  # int64: negatives with score >= threshold
    new_tps: np.ndarray  # int64: positives with score == threshold
    new_fps: np.ndarray  # int64: negatives with score == threshold
    thresholds: np.ndarray  # float64


def _positive_groups(ranking: _Ranking) -> _PositiveGroups:
    """The tie groups of ``ranking`` that hold positives, with their counts (ranking must hold
    at least one positive)."""
    ends, positives = ranking.ends, ranking.positives
    group = np.searchsorted(ends, positives)  # the tie group of each positive, non-decreasing
    last = _group_ends(group)  # per group with positives, the index of its last positive
    groups = group[last]
    tps = last + 1  # positives are listed in score order: those up to `last` score >= threshold
    new_tps = np.diff(tps, prepend=0)
    seen = ends[groups] + 1  # elements with score >= threshold
    seen_before = np.where(groups > 0, ends[groups - 1] + 1, 0)  # elements with score > threshold
    return _PositiveGroups(
        n_pos=int(positives.size),
        n_neg=int(ranking.codes.size - positives.size),
        tps=tps,
        fps=seen - tps,
        new_tps=new_tps,
        new_fps=seen - seen_before - new_tps,
        thresholds=ranking.thresholds(groups),
    )


def _auroc_from_groups(g: _PositiveGroups) -> float:
    # AUROC = P(positive scores above negative) + P(tie) / 2 over all (positive, negative) pairs:
    # the trapezoid under the ROC curve with tied scores as one diagonal step, sklearn's convention.
    # The new_tps positives of a group beat the n_neg - fps negatives below it and tie with its
    # new_fps negatives; counting twice the wins in int64 keeps the result exact until the division.
    twice_wins = 2 * np.dot(g.new_tps, g.n_neg - g.fps) + np.dot(g.new_tps, g.new_fps)
    return int(twice_wins) / (2 * g.n_pos * g.n_neg)


def _ap_from_groups(g: _PositiveGroups) -> float:
    # sum_j (R_j - R_{j-1}) * P_j over all thresholds; recall only moves where positives are added.
    precision = g.tps / (g.tps + g.fps)
    return float(np.dot(g.new_tps, precision)) / g.n_pos


def _f1_from_groups(g: _PositiveGroups) -> tuple[float, float]:
    # F1 = 2TP / (2TP + FP + FN) = 2 * tps / (tps + fps + n_pos), since FN = n_pos - TP. A group
    # without positives lowers F1 below that of the threshold before it, so the first (highest)
    # threshold reaching the maximum is always one with positives.
    half_f1 = g.tps / (g.tps + g.fps + g.n_pos)
    best = int(np.argmax(half_f1))  # first maximum = the highest threshold reaching it
    return 2.0 * float(half_f1[best]), float(g.thresholds[best])


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline through (x, y) over x in [0, limit].

    ``x`` is non-decreasing, starts at 0 and reaches at least ``limit``; the polyline is
    interpolated linearly at exactly ``x = limit``.
    """
    n = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:n], y[:n]
    if n < x.size:  # x[n - 1] <= limit < x[n]: close the area at the interpolated point
        t = (limit - x[n - 1]) / (x[n] - x[n - 1])
        xs = np.append(xs, limit)
        ys = np.append(ys, y[n - 1] + t * (y[n] - y[n - 1]))
    return float(np.trapezoid(ys, xs))


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool [N, H, W] stack, with 8-connectivity inside each image.

    Returns ``(region_ids, sizes)``: ``region_ids`` is uint32 [N, H, W], 0 on normal pixels and
    1..R on the R regions of all images (ids unique across images); ``sizes[k]`` is the pixel count
    of region k, and ``sizes[0]`` the number of normal pixels.
    """
    # A 3x3x3 structure whose only non-zero plane is the middle one connects the 8 neighbours within
    # an image and nothing across images, so one label() call handles the whole stack.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    region_ids, n_regions = ndimage.label(masks, structure=structure)
    region_ids = region_ids.view(np.uint32)  # labels are non-negative int32
    # Count over the (few) anomalous pixels only: a bincount over all pixels costs an int64 copy.
    anomalous_ids = region_ids[masks]
    sizes = np.bincount(anomalous_ids, minlength=n_regions + 1)
    sizes[0] = masks.size - anomalous_ids.size
    return region_ids, sizes


def _aupro_from_ranking(ranking: _Ranking, sizes: np.ndarray, fpr_limit: float) -> float:
    """AUPRO from a pixel ranking whose codes are region ids, ``sizes`` as from ``_label_regions``
    (at least one region and one normal pixel)."""
    n_regions = sizes.size - 1
    n_normal = int(sizes[0])
    ends = ranking.ends
    # Only the curve up to fpr_limit matters. Its points run up to the tie group holding normal
    # pixel number k (0-based), the first group whose FPR surely exceeds the limit: the + 1 pixel
    # absorbs float rounding in fps / n_normal.
    k = math.floor(fpr_limit * n_normal) + 1
    if k < n_normal:
        # The i-th anomalous pixel has positives[i] - i normal pixels before it, so normal pixel k
        # comes after exactly the anomalous pixels that have at most k normal pixels before them.
        normal_before = ranking.positives - np.arange(ranking.positives.size)
        position = k + int(np.searchsorted(normal_before, k, side="right"))
        ends = ends[: int(np.searchsorted(ends, position)) + 1]
    codes = ranking.codes[: ends[-1] + 1]
    fpr = np.cumsum(codes == 0, dtype=np.int64)[ends] / n_normal
    # Region r's detected fraction enters PRO divided by n_regions, so each of its pixels carries
    # weight 1 / (n_regions * size_r): PRO at a threshold is the summed weight above it.
    weights = np.zeros(n_regions + 1, dtype=np.float64)
    weights[1:] = 1.0 / (n_regions * sizes[1:])
    pro = weights[codes]
    np.cumsum(pro, out=pro)
    pro = np.minimum(pro[ends], 1.0)  # summation rounding may overshoot 1 by ~1e-16
    area = _area_up_to(np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro)), fpr_limit)
    return area / fpr_limit


# --------------------------------------------------------------------------- public metrics


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels`` (1 = anomalous).

    Equal to ``sklearn.metrics.roc_auc_score``: tied scores are one threshold, i.e. one trapezoid
    (they count half). Inputs of any shape are flattened; they must have the same number of
    elements. Returns nan when only one class is present or a score is NaN.
    """
    ranking = _rank_binary(scores, labels)
    if ranking is None:
        return _NAN
    return _auroc_from_groups(_positive_groups(ranking))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, ``sum_j (R_j - R_{j-1}) * P_j`` over distinct thresholds, descending.

    Equal to ``sklearn.metrics.average_precision_score`` (step-wise, no interpolation). Returns
    nan when only one class is present or a score is NaN.
    """
    ranking = _rank_binary(scores, labels)
    if ranking is None:
        return _NAN
    return _ap_from_groups(_positive_groups(ranking))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The best F1 over all thresholds, and the threshold achieving it.

    Every distinct score value ``t`` is tried with the prediction ``score >= t``; the threshold
    returned is such a score value (the highest one when several reach the best F1). Returns
    ``(nan, nan)`` when only one class is present or a score is NaN.
    """
    ranking = _rank_binary(scores, labels)
    if ranking is None:
        return _NAN, _NAN
    return _f1_from_groups(_positive_groups(ranking))


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    The curve is computed over the whole set at once, as in the MVTec AD reference code:

    * regions are the connected components of each ground-truth mask, 8-connectivity
      (``scipy.ndimage.label`` with a 3x3 ones structure), pooled over all images;
    * at threshold ``t`` (every distinct map value, prediction ``map >= t``), PRO is the mean over
      all regions of the fraction of the region's pixels predicted anomalous, and FPR is the
      fraction of all normal pixels (mask 0, all images) predicted anomalous;
    * PRO is integrated over FPR from 0 to ``fpr_limit`` with the trapezoid rule, starting at
      (0, 0) and interpolating the curve at exactly ``fpr_limit``, then divided by
      ``fpr_limit``: a perfect map gives 1.0, a map ranking every normal pixel above every
      anomalous one gives 0.0.

    ``anomaly_maps``: float [N, H, W] (or [N, 1, H, W]); ``masks``: binary, same shape.
    Returns nan when there is no anomalous region, no normal pixel, or a NaN in the maps.
    """
    _check_fpr_limit(fpr_limit)
    maps = _as_stack(anomaly_maps, "anomaly_maps")
    gt = _as_binary(_as_stack(masks, "masks"), "masks")
    if maps.shape != gt.shape:
        raise ValueError(f"anomaly_maps {tuple(maps.shape)} and masks {tuple(gt.shape)} differ in shape")
    region_ids, sizes = _label_regions(gt)
    scores = _as_scores(maps)
    if sizes.size == 1 or sizes[0] == 0 or np.isnan(scores).any():
        return _NAN
    return _aupro_from_ranking(_rank(scores, region_ids.ravel()), sizes, fpr_limit)


def threshold_from_normal_scores(scores: ArrayLike, quantile: float = 0.99) -> float:
    """Deployment threshold from the anomaly scores of normal (validation) images only.

    Returns the ``quantile`` quantile of ``scores`` (numpy's default linear interpolation), to be
    used as ``score >= threshold`` => anomalous, so that about ``1 - quantile`` of normal images
    are flagged. Raises ValueError for an empty or non-finite ``scores`` or a ``quantile``
    outside [0, 1]: a threshold that silently became nan would flag nothing.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    s = _to_numpy(scores).ravel().astype(np.float64, copy=False)
    if s.size == 0:
        raise ValueError("no normal scores given: a threshold needs at least one normal image")
    if not np.isfinite(s).all():
        raise ValueError("normal scores contain NaN or infinity")
    return float(np.quantile(s, quantile))


def _ranking_metrics(ranking: _Ranking | None, prefix: str) -> dict[str, float]:
    """``{prefix}_auroc``, ``_ap``, ``_f1_max`` and ``_f1_threshold`` of a binary ranking; all nan
    when the ranking is None (metrics undefined)."""
    if ranking is None:
        return {f"{prefix}_{name}": _NAN for name in ("auroc", "ap", "f1_max", "f1_threshold")}
    groups = _positive_groups(ranking)
    best_f1, threshold = _f1_from_groups(groups)
    return {
        f"{prefix}_auroc": _auroc_from_groups(groups),
        f"{prefix}_ap": _ap_from_groups(groups),
        f"{prefix}_f1_max": best_f1,
        f"{prefix}_f1_threshold": threshold,
    }


def evaluate_all(
    image_scores: ArrayLike,
    image_labels: ArrayLike,
    anomaly_maps: ArrayLike,
    masks: ArrayLike,
    has_mask: ArrayLike | None = None,
) -> dict[str, float]:
    """All image- and pixel-level metrics of one test set, as plain Python floats.

    Inputs (numpy or torch, CPU or CUDA): ``image_scores`` [N] and ``image_labels`` [N] (binary,
    1 = anomalous); ``anomaly_maps`` [N, H, W] (or [N, 1, H, W]) and binary ``masks`` of the same
    shape: pixel metrics are computed at that resolution, so resize the maps to the masks first.
    ``has_mask`` [N] (bool, optional): images where it is False are anomalous images without a
    ground-truth mask; they are left out of every pixel-level metric and kept in image-level ones.

    Returns the keys of ``METRIC_KEYS``: ``image_/pixel_auroc``, ``image_/pixel_ap``,
    ``image_/pixel_f1_max`` (see the functions of the same name), ``pixel_aupro`` (``aupro`` with
    ``fpr_limit=0.3``), all in [0, 1], not percent; and ``image_/pixel_f1_threshold``, the score
    values achieving the F1 maxima (in score units, so not necessarily in [0, 1]). A metric that is
    undefined (one class only, a NaN score) is nan. Raises ValueError on mismatched sizes,
    non-binary labels or masks, or an image labelled normal whose mask marks anomalous pixels.
    """
    img_scores = _as_scores(image_scores)
    img_labels = _as_binary(image_labels, "image_labels").ravel()
    maps = _as_stack(anomaly_maps, "anomaly_maps")
    gt = _as_binary(_as_stack(masks, "masks"), "masks")
    n_images = img_scores.size
    if img_labels.size != n_images or maps.shape[0] != n_images:
        raise ValueError(
            f"image_scores ({n_images}), image_labels ({img_labels.size}) and anomaly_maps "
            f"({maps.shape[0]}) must describe the same number of images"
        )
    if maps.shape != gt.shape:
        raise ValueError(
            f"anomaly_maps {tuple(maps.shape)} and masks {tuple(gt.shape)} differ in shape; "
            "resize the maps to the mask resolution before evaluation"
        )
    if np.any(gt.any(axis=(1, 2)) & ~img_labels):
        raise ValueError("an image labelled normal has anomalous pixels in its mask; labels and masks are misaligned")
    if has_mask is not None:
        keep = _as_binary(has_mask, "has_mask").ravel()
        if keep.size != n_images:
            raise ValueError(f"has_mask has {keep.size} entries for {n_images} images")
        if not keep.all():
            maps, gt = maps[keep], gt[keep]

    results = _ranking_metrics(_rank_binary(img_scores, img_labels), "image")

    # One sort of all pixels serves every pixel metric: its payload is the region id, which is
    # non-zero exactly on anomalous pixels, so it doubles as the binary label.
    region_ids, sizes = _label_regions(gt)
    pixel_scores = _as_scores(maps)
    if sizes.size == 1 or sizes[0] == 0 or np.isnan(pixel_scores).any():
        results.update(_ranking_metrics(None, "pixel"), pixel_aupro=_NAN)
    else:
        pixel_ranking = _rank(pixel_scores, region_ids.ravel())
        results.update(
            _ranking_metrics(pixel_ranking, "pixel"),
            pixel_aupro=_aupro_from_ranking(pixel_ranking, sizes, fpr_limit=0.3),
        )

    return {key: float(results[key]) for key in METRIC_KEYS}


# ------------------------------------------------------- curves at the masks' own resolution
#
# MVTec LOCO AD and MVTec AD 2 are scored at the resolution of their ground truth: a LOCO category
# is about half a billion pixel scores, too many to sort at once. These curves stream images
# through a fixed, sorted set of thresholds instead, keeping per threshold only counts: memory
# grows with thresholds x defect regions, never with pixels. At every threshold the counts are
# exact; between thresholds the curve is linear, so the area depends on how densely the thresholds
# cover the part of the curve that is integrated (:func:`curve_thresholds`; tests/test_metrics.py
# holds the areas within 1e-3 of the curve through every distinct score).


def curve_thresholds(sample_scores: ArrayLike, normal: ArrayLike, fpr_limit: float = 0.3,
                     dense: int = 8000, coarse: int = 2000, at_most: int = 2_000_000) -> np.ndarray:
    """Sorted thresholds for :class:`OverlapCurve`, from a sample of the scores (e.g. the anomaly
    maps at the network's resolution) and which of them are normal: ``dense`` normal-score
    quantiles at false-positive rates evenly spread over [0, ``fpr_limit``] (where the areas are
    taken), ``coarse`` quantiles over the rest, and ``coarse`` points evenly spaced from the lowest
    to the highest score. Quantiles come from every k-th normal score, at most ``at_most`` of them."""
    scores = _as_scores(sample_scores)
    negatives = scores[_as_binary(normal, "normal").ravel()]
    negatives = negatives[:: max(1, -(-negatives.size // at_most))]
    if negatives.size == 0 or not np.isfinite(scores).all():
        raise ValueError("curve_thresholds needs finite scores and at least one normal score")
    rates = np.concatenate((np.linspace(0.0, fpr_limit, dense), np.linspace(fpr_limit, 1.0, coarse)))
    quantiles = np.quantile(negatives.astype(np.float64), 1.0 - rates)
    spread = np.linspace(float(scores.min()), float(scores.max()), coarse)
    return np.unique(np.concatenate((quantiles, spread)))


class OverlapCurve:
    """Per-region overlap against false-positive rate, streamed image by image over fixed
    ``thresholds`` (sorted ascending; a pixel is positive when its score exceeds the threshold).

    Each region counts as found in proportion min(1, overlap / saturation): with saturation = the
    region's area this is PRO (regions: connected components of the masks), with MVTec LOCO AD's
    per-defect saturation it is sPRO (regions: the mask files). The false-positive rate is over
    every pixel outside the masks of the images added. Pixel AUROC and F1 come from the same counts
    (positive pixels: inside any mask).
    """

    def __init__(self, thresholds: ArrayLike):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or self.thresholds.size == 0 or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be a non-empty, strictly increasing 1-D array")
        bins = self.thresholds.size + 1
        self._boundaries = torch.from_numpy(self.thresholds)
        self._normal = np.zeros(bins, dtype=np.int64)  # pixels per bin (t[i-1], t[i]]
        self._anomalous = np.zeros(bins, dtype=np.int64)
        self._found: list[np.ndarray] = []  # per region: pixels above each threshold / saturation

    def bins(self, scores: ArrayLike) -> np.ndarray:
        """Each score's bin: bin i holds t[i-1] < s <= t[i], so a score exceeds threshold t[j]
        exactly when its bin is > j. Curves with the same thresholds can share one call
        (:meth:`add_bins`): it is the costly part of adding an image."""
        flat = _as_scores(scores)
        if not np.isfinite(flat).all():
            raise ValueError("scores contain NaN or infinity")
        # np.searchsorted(thresholds, flat, side="left"), in float64 as it compares; torch's runs
        # on every thread (2x faster on two cores for a 1600 x 1100 map).
        return torch.bucketize(torch.from_numpy(flat).double(), self._boundaries).numpy()

    def add(self, scores: ArrayLike, anomalous: ArrayLike, regions: Sequence[tuple[ArrayLike, float]] = ()) -> None:
        """One image: its ``scores`` (any shape), ``anomalous`` (bool, same shape: inside any
        mask) and its ``regions``, each (bool mask of the same shape, saturation in pixels > 0)."""
        self.add_bins(self.bins(scores), anomalous, regions)

    def add_bins(self, bins: np.ndarray, anomalous: ArrayLike,
                 regions: Sequence[tuple[ArrayLike, float]] = ()) -> None:
        """:meth:`add` for an image whose scores were already binned by :meth:`bins` (of a curve
        with the same thresholds)."""
        inside = _as_binary(anomalous, "anomalous").ravel()
        if inside.size != bins.size:
            raise ValueError(f"anomalous has {inside.size} pixels for {bins.size} scores")
        size = self.thresholds.size + 1
        self._normal += np.bincount(bins[~inside], minlength=size)
        self._anomalous += np.bincount(bins[inside], minlength=size)
        for region, saturation in regions:
            pixels = _as_binary(region, "region").ravel()
            if pixels.size != bins.size:
                raise ValueError(f"a region has {pixels.size} pixels for {bins.size} scores")
            if not saturation > 0:
                raise ValueError(f"a region's saturation must be > 0, not {saturation}")
            counts = np.bincount(bins[pixels], minlength=size)
            above = np.cumsum(counts[::-1])[::-1][1:]  # above[j]: pixels with score > t[j]
            self._found.append(np.minimum(above / float(saturation), 1.0))

    @property
    def regions(self) -> int:
        return len(self._found)

    def _rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, mean overlap, tpr) at every threshold, and at +inf first (all 0)."""
        normal_above = np.cumsum(self._normal[::-1])[::-1][1:]
        anomalous_above = np.cumsum(self._anomalous[::-1])[::-1][1:]
        n_normal, n_anomalous = int(self._normal.sum()), int(self._anomalous.sum())
        fpr = normal_above / max(n_normal, 1)
        tpr = anomalous_above / max(n_anomalous, 1)
        overlap = np.mean(self._found, axis=0) if self._found else np.zeros_like(fpr)
        # Thresholds descending: rates ascending from the point where nothing is positive.
        return (np.concatenate(([0.0], fpr[::-1])), np.concatenate(([0.0], overlap[::-1])),
                np.concatenate(([0.0], tpr[::-1])))

    def area(self, fpr_limit: float) -> float:
        """Area under mean overlap against FPR over [0, fpr_limit], divided by fpr_limit (the curve
        is cut at the limit by linear interpolation); nan without regions or normal pixels."""
        _check_fpr_limit(fpr_limit)
        if not self._found or self._normal.sum() == 0:
            return _NAN
        fpr, overlap, _ = self._rates()
        fpr, overlap = np.append(fpr, 1.0), np.append(overlap, overlap[-1])  # the lowest threshold may keep a few normal pixels out
        return _area_up_to(fpr, overlap, fpr_limit) / fpr_limit

    def auroc(self) -> float:
        """Pixel AUROC over the thresholds; nan without both kinds of pixels."""
        if self._normal.sum() == 0 or self._anomalous.sum() == 0:
            return _NAN
        fpr, _, tpr = self._rates()
        return float(np.trapezoid(np.append(tpr, 1.0), np.append(fpr, 1.0)))

    def f1_at(self, threshold: float) -> float:
        """Pixel F1 when a pixel is positive with score > ``threshold`` (a threshold of the curve)."""
        index = int(np.searchsorted(self.thresholds, threshold))
        if index == self.thresholds.size or self.thresholds[index] != threshold:
            raise ValueError(f"{threshold} is not one of the curve's thresholds")
        tp = int(self._anomalous[index + 1:].sum())
        fp = int(self._normal[index + 1:].sum())
        fn = int(self._anomalous.sum()) - tp
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else _NAN
