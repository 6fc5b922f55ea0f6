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

Speed: all ranking metrics need the scores sorted once. ``np.argsort`` on ~10M pixels is slow, so
float32 scores are packed into the high 32 bits of a uint64 key whose low 32 bits carry a small
integer payload (the label, or the ground-truth region id), and the keys are sorted with
``np.sort``: several times faster, and the payload comes out already in score order.
"""

from __future__ import annotations

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
    the last element of the j-th group of tied scores; ``thresholds[j]`` is that group's score.
    """

    codes: np.ndarray  # unsigned ints, one per element, descending score order (may be a view)
    ends: np.ndarray  # int64, one per distinct score, increasing
    thresholds: np.ndarray  # float64, one per distinct score, decreasing


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
        sorted_scores = scores[order]
        ends = _group_ends(sorted_scores)
        return _Ranking(codes=codes[order], ends=ends, thresholds=sorted_scores[ends])

    key = scores + np.float32(0.0)  # a fresh copy, in which + 0.0 turns -0.0 into +0.0: they tie
    _flip_float32_order(key.view(np.int32))
    packed = key.view(np.uint32).astype(np.uint64)
    del key
    packed <<= np.uint64(32)
    packed |= codes
    packed.sort()
    # Read both halves through views instead of copying them out (saves two 10M-element passes).
    halves = packed.view(np.uint32).reshape(-1, 2)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    sorted_key, sorted_codes = halves[:, high], halves[:, low]
    ends = _group_ends(sorted_key)
    threshold_bits = sorted_key[ends].view(np.int32)  # a copy: the fancy index made one
    _flip_float32_order(threshold_bits)
    thresholds = threshold_bits.view(np.float32).astype(np.float64)
    return _Ranking(codes=sorted_codes, ends=ends, thresholds=thresholds)


def _binary_counts(ranking: _Ranking) -> tuple[np.ndarray, np.ndarray]:
    """``(tps, fps)``: for each distinct threshold (descending), the number of positives
    (non-zero code) and of negatives (code 0) whose score is ``>=`` the threshold."""
    tps = np.cumsum(ranking.codes != 0, dtype=np.int64)[ranking.ends]
    fps = ranking.ends + 1 - tps
    return tps, fps


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


def _increments(counts: np.ndarray) -> np.ndarray:
    """``counts[j] - counts[j - 1]``, with ``counts[-1]`` taken as 0 (np.diff with prepend=0,
    without its concatenated copy)."""
    out = np.empty_like(counts)
    out[0] = counts[0]
    np.subtract(counts[1:], counts[:-1], out=out[1:])
    return out


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    # Trapezoid over the ROC points (0, 0), (fps_j, tps_j): a group of tied scores is one diagonal
    # step, sklearn's convention. 2 * area * n_pos * n_neg = sum_j (fps_j - fps_{j-1}) *
    # (tps_j + tps_{j-1}), summed in int64, so the result is exact up to the final division.
    tp_sums = tps.copy()
    tp_sums[1:] += tps[:-1]
    twice_area = int(np.dot(_increments(fps), tp_sums))
    return twice_area / (2 * n_pos * n_neg)


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    # sum_j (R_j - R_{j-1}) * P_j with R_j = tps_j / n_pos and P_j = tps_j / (tps_j + fps_j).
    precision = tps / (tps + fps)
    return float(np.dot(_increments(tps), precision)) / int(tps[-1])


def _f1_from_counts(tps: np.ndarray, fps: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    # F1 = 2TP / (2TP + FP + FN) = 2 * tps / (tps + fps + n_pos), since FN = n_pos - TP.
    denominator = tps + fps
    denominator += tps[-1]
    half_f1 = tps / denominator
    best = int(np.argmax(half_f1))  # first maximum = the highest threshold reaching it
    return 2.0 * float(half_f1[best]), float(thresholds[best])


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


def _aupro_from_ranking(ranking: _Ranking, fps: np.ndarray, sizes: np.ndarray, fpr_limit: float) -> float:
    """AUPRO from a pixel ranking whose codes are region ids (see ``_label_regions``) and the
    false-positive counts ``fps`` at its thresholds."""
    n_regions = sizes.size - 1
    n_normal = int(sizes[0])
    # Only the curve up to fpr_limit matters: keep every point with fps <= fpr_limit * n_normal + 1
    # (the + 1 pixel absorbs float rounding in fps / n_normal) and the first point after them.
    stop = min(int(np.searchsorted(fps, fpr_limit * n_normal + 1, side="right")) + 1, fps.size)
    ends = ranking.ends[:stop]
    fpr = fps[:stop] / n_normal
    # Region k's detected fraction enters PRO divided by n_regions, so each of its pixels carries
    # weight 1 / (n_regions * size_k): PRO at a threshold is the summed weight above it.
    weights = np.zeros(n_regions + 1, dtype=np.float64)
    weights[1:] = 1.0 / (n_regions * sizes[1:])
    pro = weights[ranking.codes[: ends[-1] + 1]]
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
    return _auroc_from_counts(*_binary_counts(ranking))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, ``sum_j (R_j - R_{j-1}) * P_j`` over distinct thresholds, descending.

    Equal to ``sklearn.metrics.average_precision_score`` (step-wise, no interpolation). Returns
    nan when only one class is present or a score is NaN.
    """
    ranking = _rank_binary(scores, labels)
    if ranking is None:
        return _NAN
    return _ap_from_counts(*_binary_counts(ranking))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """The best F1 over all thresholds, and the threshold achieving it.

    Every distinct score value ``t`` is tried with the prediction ``score >= t``; the threshold
    returned is such a score value (the highest one when several reach the best F1). Returns
    ``(nan, nan)`` when only one class is present or a score is NaN.
    """
    ranking = _rank_binary(scores, labels)
    if ranking is None:
        return _NAN, _NAN
    return _f1_from_counts(*_binary_counts(ranking), ranking.thresholds)


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit``.

    The curve is computed over the whole set at once, as in the MVTec AD reference code:

    * regions are the connected components of the ground-truth masks, 8-connectivity
      (``scipy.ndimage.label`` with a 3x3 ones structure), taken over all images together;
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
    ranking = _rank(scores, region_ids.ravel())
    _, fps = _binary_counts(ranking)
    return _aupro_from_ranking(ranking, fps, sizes, fpr_limit)


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

    results: dict[str, float] = {}

    image_ranking = _rank_binary(img_scores, img_labels)
    if image_ranking is None:
        results.update(image_auroc=_NAN, image_ap=_NAN, image_f1_max=_NAN, image_f1_threshold=_NAN)
    else:
        tps, fps = _binary_counts(image_ranking)
        f1, threshold = _f1_from_counts(tps, fps, image_ranking.thresholds)
        results.update(
            image_auroc=_auroc_from_counts(tps, fps),
            image_ap=_ap_from_counts(tps, fps),
            image_f1_max=f1,
            image_f1_threshold=threshold,
        )

    # One sort of all pixels serves every pixel metric: its payload is the region id, which is
    # non-zero exactly on anomalous pixels, so the binary counts come from the same ranking.
    region_ids, sizes = _label_regions(gt)
    pixel_scores = _as_scores(maps)
    n_normal, n_regions = int(sizes[0]), sizes.size - 1
    if n_regions == 0 or n_normal == 0 or np.isnan(pixel_scores).any():
        results.update(pixel_auroc=_NAN, pixel_aupro=_NAN, pixel_ap=_NAN, pixel_f1_max=_NAN, pixel_f1_threshold=_NAN)
    else:
        pixel_ranking = _rank(pixel_scores, region_ids.ravel())
        tps, fps = _binary_counts(pixel_ranking)
        f1, threshold = _f1_from_counts(tps, fps, pixel_ranking.thresholds)
        results.update(
            pixel_auroc=_auroc_from_counts(tps, fps),
            pixel_aupro=_aupro_from_ranking(pixel_ranking, fps, sizes, 0.3),
            pixel_ap=_ap_from_counts(tps, fps),
            pixel_f1_max=f1,
            pixel_f1_threshold=threshold,
        )

    return {key: float(results[key]) for key in METRIC_KEYS}
