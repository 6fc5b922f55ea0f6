"""Tests for utils.metrics against independent references.

Ranking metrics are checked against scikit-learn; AUPRO against a slow, plainly written reference
(below) and against crafted maps whose answer is known by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from utils.metrics import (
    METRIC_KEYS,
    aupro,
    auroc,
    average_precision,
    evaluate_all,
    f1_max,
    threshold_from_normal_scores,
)

SEEDS = [0, 1, 2, 3]


# --------------------------------------------------------------------------- data and references


def binary_data(seed: int, kind: str, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Scores correlated with random labels. ``kind`` picks dtype and tie structure:

    float32 / float64: continuous, no ties; float32_ties / float64_ties: few distinct values;
    int: integer scores (many ties); signed_zero: -0.0 and +0.0 among few values.
    """
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    raw = rng.normal(size=n) + 1.2 * labels
    scores = {
        "float32": raw.astype(np.float32),
        "float64": raw,  # not float32-representable: takes the argsort path
        "float32_ties": np.round(raw * 4).astype(np.float32) / np.float32(4),
        "float64_ties": np.round(raw * 10) / 10,
        "int": np.round(raw * 3).astype(np.int64),
        "signed_zero": np.where(rng.random(n) < 0.5, -1.0, 1.0) * np.round(raw).clip(-1, 1),
    }[kind]
    return scores, labels


KINDS = ["float32", "float64", "float32_ties", "float64_ties", "int", "signed_zero"]


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Slow AUPRO: one pass over the maps per threshold, every distinct map value a threshold."""
    regions = []  # (image index, bool mask of one region)
    for i, mask in enumerate(masks):
        labeled, n_regions = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labeled == k) for k in range(1, n_regions + 1)]
    normal = masks == 0

    curve = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = predicted[normal].mean()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        curve.append((fpr, pro))

    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_maps(seed: int, n: int = 4, size: int = 24, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Small maps with blob masks (some images normal) and scores correlated with the masks."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 1.5, 1.5)) > 0.35
    masks[0] = False  # at least one normal image
    maps = 0.6 * masks + rng.standard_normal(masks.shape) * 0.5
    if ties:
        maps = np.round(maps * 4) / 4
    return maps.astype(np.float32), masks


def blank_case(size: int = 20, seed: int = 0) -> np.ndarray:
    """Normal-pixel scores uniform in [0, 1): above -1 ("never detected"), below 2 ("detected first")."""
    return np.random.default_rng(seed).random((1, size, size)).astype(np.float32)


# --------------------------------------------------------------------------- ranking metrics vs sklearn


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_auroc_matches_sklearn(seed: int, kind: str) -> None:
    scores, labels = binary_data(seed, kind)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_average_precision_matches_sklearn(seed: int, kind: str) -> None:
    scores, labels = binary_data(seed, kind)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_f1_max_matches_sklearn_and_threshold_achieves_it(seed: int, kind: str) -> None:
    scores, labels = binary_data(seed, kind)
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)
    # The threshold is a score value, and predicting score >= threshold reaches the best F1 ...
    assert np.any(scores == threshold)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)
    # ... and it is the highest such value.
    higher = np.unique(scores[scores > threshold])
    if higher.size:
        assert f1_score(labels, scores >= higher[0]) < best - 1e-12


def test_f1_max_returns_the_highest_of_tied_best_thresholds() -> None:
    # Descending: P N P N N P. F1 = 2TP / (TP + FP + 3) is 2/3 at both t = 4 (TP 2, FP 1) and
    # t = 1 (TP 3, FP 3), and lower everywhere else.
    scores = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    labels = np.array([1, 0, 1, 0, 0, 1])
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(2 / 3, abs=1e-15)
    assert threshold == 4.0


def test_ranking_metrics_on_a_larger_tied_set() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(300_000) < 0.02
    scores = (np.round(rng.random(300_000) * 500 + 40 * labels) / 500).astype(np.float32)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels)[0] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


def test_signed_zeros_tie() -> None:
    # -0.0 == +0.0, so these two form one tied group: AUROC 0.5, not 1.0 or 0.0.
    for dtype in (np.float32, np.float64):
        scores = np.array([-0.0, 0.0], dtype=dtype)
        assert auroc(scores, np.array([0, 1])) == 0.5
        assert auroc(scores, np.array([1, 0])) == 0.5


def test_infinite_and_negative_scores_rank_correctly() -> None:
    scores = np.array([-np.inf, -3.5, -1.0, -0.5, 0.0, 0.25, 2.0, np.inf], dtype=np.float32)
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 1])
    finite = np.nan_to_num(scores.astype(np.float64), posinf=1e30, neginf=-1e30)  # same order
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, finite), abs=1e-15)
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(sklearn_f1_max(finite, labels), abs=1e-15)
    assert threshold in scores.tolist()


def test_perfect_and_inverted_ranking() -> None:
    scores = np.array([0.1, 0.2, 0.7, 0.9])
    labels = np.array([0, 0, 1, 1])
    assert auroc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    assert average_precision(scores, labels) == 1.0
    assert f1_max(scores, labels) == (1.0, 0.7)


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aupro_matches_slow_reference(seed: int, ties: bool, fpr_limit: float, dtype: type) -> None:
    maps, masks = random_maps(seed, ties=ties)
    if dtype is np.float64:  # values float32 cannot hold, ties kept: exercises the argsort path
        maps = maps.astype(np.float64) + 0.1
    assert masks.any() and not masks.all()
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_perfect_map_is_one() -> None:
    _, masks = random_maps(5)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(5)
    separated = np.where(masks, 1 + rng.random(masks.shape), rng.random(masks.shape))
    assert aupro(separated, masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero() -> None:
    _, masks = random_maps(6)
    assert aupro(1.0 - masks.astype(np.float32), masks) == 0.0


def test_aupro_one_region_found_one_never_gives_half() -> None:
    maps = blank_case()
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 2:5, 2:5] = True  # region A: detected before any false positive
    maps[0, 2:5, 2:5] = 2.0
    masks[0, 10:15, 10:15] = True  # region B: scores below every normal pixel
    maps[0, 10:15, 10:15] = -1.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert reference_aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_averages_regions_not_pixels() -> None:
    maps = blank_case()
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0:10, 0:10] = True  # 100-pixel region, found first
    maps[0, 0:10, 0:10] = 2.0
    masks[0, 15:17, 15:17] = True  # 4-pixel region, never found
    maps[0, 15:17, 15:17] = -1.0
    # Per region: mean(1, 0) = 0.5. Pixel recall would give 100 / 104 = 0.96.
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_averages_regions_not_images() -> None:
    maps = np.concatenate([blank_case(seed=1), blank_case(seed=2)])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 2:5, 2:5] = True  # image 0, region A: found
    maps[0, 2:5, 2:5] = 2.0
    masks[0, 10:12, 10:12] = True  # image 0, region B: never found
    maps[0, 10:12, 10:12] = -1.0
    masks[1, 5:9, 5:9] = True  # image 1, region C: found
    maps[1, 5:9, 5:9] = 2.0
    # Over all regions: (1 + 0 + 1) / 3. Averaging per image first would give (0.5 + 1) / 2 = 0.75.
    assert aupro(maps, masks) == pytest.approx(2 / 3, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    maps = blank_case()
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 2:5, 2:5] = True  # 9 pixels, found
    maps[0, 2:5, 2:5] = 2.0
    masks[0, 5:7, 5:7] = True  # 4 pixels touching the first block only at a corner, never found
    maps[0, 5:7, 5:7] = -1.0
    # One 8-connected region of 13 pixels, 9 of them found; 4-connectivity would give 0.5.
    assert aupro(maps, masks) == pytest.approx(9 / 13, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.25, 0.05])
def test_aupro_interpolates_at_the_limit(fpr_limit: float) -> None:
    # 10 normal and 10 anomalous pixels tied in pairs: the curve is the diagonal PRO = FPR, and
    # its normalised area up to L is L / 2, also when L falls between two curve points.
    maps = np.repeat(np.arange(10, dtype=np.float32), 2).reshape(1, 4, 5)
    masks = np.zeros((1, 4, 5), dtype=bool)
    masks[0].flat[::2] = True  # pixels 0, 2, ..., 18: every anomalous pixel is 8-connected to the next
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] == 1
    assert aupro(maps, masks, fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


def test_aupro_accepts_channel_axis_and_rejects_bad_input() -> None:
    maps, masks = random_maps(3)
    assert aupro(maps[:, None], masks[:, None]) == aupro(maps, masks)
    with pytest.raises(ValueError):
        aupro(maps, masks[:, :-1])
    with pytest.raises(ValueError):
        aupro(maps, masks.astype(np.uint8) * 255)  # 0/255 masks must be binarised by the caller
    with pytest.raises(ValueError):
        aupro(maps, masks, fpr_limit=0.0)


# --------------------------------------------------------------------------- undefined metrics: nan


@pytest.mark.parametrize("labels", [np.zeros(20, dtype=int), np.ones(20, dtype=int), np.zeros(0, dtype=int)])
def test_one_class_gives_nan(labels: np.ndarray) -> None:
    scores = np.linspace(0, 1, labels.size)
    assert math.isnan(auroc(scores, labels))
    assert math.isnan(average_precision(scores, labels))
    assert all(math.isnan(v) for v in f1_max(scores, labels))


def test_nan_score_gives_nan() -> None:
    scores = np.array([0.1, np.nan, 0.3, 0.9], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    assert math.isnan(auroc(scores, labels))
    assert math.isnan(average_precision(scores, labels))
    maps, masks = random_maps(0)
    maps[1, 3, 3] = np.nan
    assert math.isnan(aupro(maps, masks))


def test_aupro_without_regions_or_without_normal_pixels_is_nan() -> None:
    maps, masks = random_maps(0)
    assert math.isnan(aupro(maps, np.zeros_like(masks)))
    assert math.isnan(aupro(maps, np.ones_like(masks)))


def test_ranking_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        auroc(np.zeros(3), np.array([0, 1]))
    with pytest.raises(ValueError):
        auroc(np.zeros(3), np.array([0, 1, 2]))


# --------------------------------------------------------------------------- evaluate_all


def small_test_set(seed: int = 0) -> dict[str, np.ndarray]:
    """8 images of 24x24: 4 normal, 4 anomalous with masks, image score = map maximum."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((8, 24, 24), dtype=bool)
    for i in range(4, 8):
        y, x = rng.integers(2, 16, size=2)
        masks[i, y : y + rng.integers(2, 7), x : x + rng.integers(2, 7)] = True
    maps = (0.8 * masks + 0.4 * rng.standard_normal(masks.shape)).astype(np.float32)
    return {
        "image_scores": maps.reshape(8, -1).max(axis=1),
        "image_labels": masks.any(axis=(1, 2)).astype(np.int64),
        "anomaly_maps": maps,
        "masks": masks,
    }


def test_evaluate_all_equals_the_individual_metrics() -> None:
    data = small_test_set()
    result = evaluate_all(**data)
    assert list(result) == list(METRIC_KEYS)
    assert all(type(v) is float for v in result.values())
    scores, labels = data["image_scores"], data["image_labels"]
    pixels, pixel_labels = data["anomaly_maps"], data["masks"]
    expected = {
        "image_auroc": auroc(scores, labels),
        "pixel_auroc": auroc(pixels, pixel_labels),
        "pixel_aupro": aupro(pixels, pixel_labels),
        "image_f1_max": f1_max(scores, labels)[0],
        "image_f1_threshold": f1_max(scores, labels)[1],
        "pixel_f1_max": f1_max(pixels, pixel_labels)[0],
        "pixel_f1_threshold": f1_max(pixels, pixel_labels)[1],
        "image_ap": average_precision(scores, labels),
        "pixel_ap": average_precision(pixels, pixel_labels),
    }
    assert result == pytest.approx(expected, abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(pixel_labels.ravel(), pixels.ravel()), abs=1e-12)
    assert result["pixel_aupro"] == pytest.approx(reference_aupro(pixels, pixel_labels), abs=1e-9)
    for key in METRIC_KEYS:
        if not key.endswith("threshold"):
            assert 0.0 <= result[key] <= 1.0


def test_evaluate_all_has_mask_excludes_images_from_pixel_metrics_only() -> None:
    data = small_test_set(1)
    # Image 7 becomes an anomalous image without ground truth: an empty mask and a hot map, which
    # would count as false positives if it were not excluded.
    data["masks"][7] = False
    data["anomaly_maps"][7] += 3.0
    data["image_scores"][7] += 3.0
    has_mask = np.array([True] * 7 + [False])

    result = evaluate_all(**data, has_mask=has_mask)
    kept = {
        "image_scores": data["image_scores"],
        "image_labels": data["image_labels"],
        "anomaly_maps": data["anomaly_maps"][:7],
        "masks": data["masks"][:7],
    }
    subset = evaluate_all(kept["image_scores"][:7], kept["image_labels"][:7], kept["anomaly_maps"], kept["masks"])
    for key in METRIC_KEYS:
        if key.startswith("pixel_"):
            assert result[key] == subset[key], key
    assert result["image_auroc"] == auroc(data["image_scores"], data["image_labels"])
    assert result["image_ap"] == average_precision(data["image_scores"], data["image_labels"])

    # The scenario is sensitive: keeping image 7 changes the pixel metrics.
    unfiltered = evaluate_all(**data)
    assert unfiltered["pixel_auroc"] < result["pixel_auroc"] - 1e-3
    assert unfiltered["pixel_aupro"] < result["pixel_aupro"] - 1e-3


def test_evaluate_all_returns_nan_for_undefined_metrics() -> None:
    data = small_test_set()
    normal_only = {key: value[:4] for key, value in data.items()}
    result = evaluate_all(**normal_only)
    assert list(result) == list(METRIC_KEYS)
    assert all(math.isnan(v) for v in result.values())

    anomalous_only = {key: value[4:] for key, value in data.items()}
    result = evaluate_all(**anomalous_only)
    assert all(math.isnan(result[k]) for k in METRIC_KEYS if k.startswith("image_"))
    assert all(0.0 <= result[k] for k in METRIC_KEYS if k.startswith("pixel_"))


def test_evaluate_all_rejects_inconsistent_input() -> None:
    data = small_test_set()
    with pytest.raises(ValueError):
        evaluate_all(**{**data, "image_scores": data["image_scores"][:-1]})
    with pytest.raises(ValueError):
        evaluate_all(**{**data, "masks": data["masks"][:, ::2, ::2]})
    with pytest.raises(ValueError):  # an image labelled normal whose mask has anomalous pixels
        evaluate_all(**{**data, "image_labels": np.zeros(8, dtype=int)})
    with pytest.raises(ValueError):
        evaluate_all(**data, has_mask=np.ones(7, dtype=bool))


def to_torch(data: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {
        "image_scores": torch.from_numpy(data["image_scores"]).to(device),
        "image_labels": torch.from_numpy(data["image_labels"]).to(device),  # int64
        "anomaly_maps": torch.from_numpy(data["anomaly_maps"]).unsqueeze(1).to(device),  # [N, 1, H, W]
        "masks": torch.from_numpy(data["masks"].astype(np.uint8)).to(device),
    }


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_torch_and_numpy_inputs_give_identical_results(device: str) -> None:
    data = small_test_set(2)
    has_mask = np.ones(8, dtype=bool)
    has_mask[5] = False
    expected = evaluate_all(**data, has_mask=has_mask)
    result = evaluate_all(**to_torch(data, device), has_mask=torch.from_numpy(has_mask).to(device))
    assert result == expected

    tensors = to_torch(data, device)
    assert auroc(tensors["anomaly_maps"], tensors["masks"]) == auroc(data["anomaly_maps"], data["masks"])
    image_f1 = f1_max(data["image_scores"], data["image_labels"])
    assert f1_max(tensors["image_scores"], tensors["image_labels"]) == image_f1
    assert aupro(tensors["anomaly_maps"], tensors["masks"]) == aupro(data["anomaly_maps"], data["masks"])


def test_half_precision_tensors_are_accepted() -> None:
    data = small_test_set(3)
    maps = torch.from_numpy(data["anomaly_maps"]).half()
    assert auroc(maps, data["masks"]) == auroc(maps.float().numpy(), data["masks"])
    assert aupro(maps.bfloat16(), data["masks"]) == aupro(maps.bfloat16().float().numpy(), data["masks"])


# --------------------------------------------------------------------------- deployment threshold


def test_threshold_from_normal_scores() -> None:
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = threshold_from_normal_scores(scores, 0.99)
    assert threshold == np.quantile(scores, 0.99)
    assert np.mean(scores >= threshold) == pytest.approx(0.01, abs=0.002)
    assert threshold_from_normal_scores(torch.from_numpy(scores), 0.5) == np.median(scores)
    for bad_scores, quantile in [(np.array([]), 0.99), (np.array([0.1, np.nan]), 0.99), (scores, 1.5)]:
        with pytest.raises(ValueError):
            threshold_from_normal_scores(bad_scores, quantile)
