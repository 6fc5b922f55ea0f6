"""sPRO and PRO curves streamed at the masks' resolution (MVTec LOCO AD, MVTec AD 2), against a
direct computation from their definitions on small hand-made maps."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from utils.metrics import OverlapCurve, curve_thresholds


def direct_area(maps, anomalous, regions, fpr_limit):
    """The definition, threshold by threshold: at every distinct score t (and above all of them) a
    pixel is positive when its score exceeds t; FPR over every pixel outside the masks; each region
    scores min(1, overlap / saturation); the mean over regions against FPR, cut at the limit by
    linear interpolation, its trapezoid area divided by the limit."""
    scores = np.concatenate([m.ravel() for m in maps])
    normal = ~np.concatenate([a.ravel() for a in anomalous])
    points = [(0.0, 0.0)]
    for t in np.unique(scores)[::-1]:
        fpr = np.sum(scores[normal] > t) / normal.sum()
        found = [min(1.0, np.sum(maps[i][mask] > t) / saturation) for i, mask, saturation in regions]
        points.append((fpr, float(np.mean(found))))
    points.append((1.0, 1.0 if all(s <= m.sum() for _, m, s in regions) else points[-1][1]))
    fpr, overlap = np.array(points).T
    keep = fpr <= fpr_limit
    xs, ys = list(fpr[keep]), list(overlap[keep])
    beyond = np.argmax(fpr > fpr_limit)
    w = (fpr_limit - fpr[beyond - 1]) / (fpr[beyond] - fpr[beyond - 1])
    xs.append(fpr_limit)
    ys.append(overlap[beyond - 1] + w * (overlap[beyond] - overlap[beyond - 1]))
    return np.trapezoid(ys, xs) / fpr_limit


def loco_like_case(seed=0, shape=(24, 31)):
    """Four images: two good; one with two defects (a relative and an absolute saturation); one
    with a missing object, whose mask marks where the object should be and which the map misses."""
    rng = np.random.default_rng(seed)
    maps = [rng.normal(0, 1, shape) for _ in range(4)]
    anomalous = [np.zeros(shape, bool) for _ in range(4)]
    regions = []
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    first[2:9, 3:12], second[14:20, 18:29] = True, True
    maps[2][first] += 2.0
    maps[2][second] += 0.8
    anomalous[2] = first | second
    regions += [(2, first, float(int(0.5 * first.sum()))), (2, second, float(min(40, second.sum())))]
    missing = np.zeros(shape, bool)
    missing[5:15, 5:25] = True  # scores unchanged there: the object is absent, the map sees nothing
    anomalous[3] = missing
    regions.append((3, missing, float(int(1.0 * missing.sum()))))
    return maps, anomalous, regions


def streamed(maps, anomalous, regions, thresholds):
    curve = OverlapCurve(thresholds)
    for i, (scores, inside) in enumerate(zip(maps, anomalous)):
        curve.add(scores, inside, [(mask, saturation) for j, mask, saturation in regions if j == i])
    return curve


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3])
def test_at_every_distinct_score_the_streamed_area_is_the_definition(fpr_limit):
    maps, anomalous, regions = loco_like_case()
    every = np.unique(np.concatenate([m.ravel() for m in maps]))
    curve = streamed(maps, anomalous, regions, np.concatenate(([every[0] - 1.0], every)))
    assert curve.regions == 3
    assert curve.area(fpr_limit) == pytest.approx(direct_area(maps, anomalous, regions, fpr_limit), abs=1e-12)


def test_saturation_caps_credit_and_a_missed_region_gets_none():
    shape = (10, 10)
    scores = np.zeros(shape)
    region = np.zeros(shape, bool)
    region[:4, :5] = True  # 20 pixels
    scores[:2, :5] = 1.0  # 10 of them above every threshold below 1
    curve = OverlapCurve(np.array([-1.0, 0.5, 2.0]))
    curve.add(scores, region, [(region, 10.0)])
    assert curve._rates()[1][-2] == 1.0  # at t=0.5: 10 of 20 pixels, saturation 10: full credit
    missed = OverlapCurve(np.array([-1.0, 0.5, 2.0]))
    missed.add(np.zeros(shape), region, [(region, 10.0)])
    assert missed._rates()[1][-2] == 0.0


def test_pro_is_the_overlap_with_saturation_at_the_area_and_auroc_matches_sklearn():
    rng = np.random.default_rng(3)
    maps = [ndimage.gaussian_filter(rng.normal(0, 1, (30, 40)), 2) for _ in range(5)]
    masks = [m > 0.25 for m in maps[:3]] + [np.zeros((30, 40), bool)] * 2
    maps = [m + rng.normal(0, 0.1, m.shape) for m in maps]
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected components
        regions += [(i, labels == k, float((labels == k).sum())) for k in range(1, count + 1)]
    every = np.unique(np.concatenate([m.ravel() for m in maps]))
    curve = streamed(maps, masks, regions, np.concatenate(([every[0] - 1.0], every)))
    assert curve.area(0.05) == pytest.approx(direct_area(maps, masks, regions, 0.05), abs=1e-12)
    labels = np.concatenate([m.ravel() for m in masks])
    assert curve.auroc() == pytest.approx(roc_auc_score(labels, np.concatenate([m.ravel() for m in maps])), abs=1e-12)


def test_a_threshold_grid_from_a_sample_stays_within_1e_3_of_the_exact_curve():
    """What evaluation does at full resolution: thresholds from the maps at the network's
    resolution, curves over maps upsampled to the masks' size; against the curve through every
    distinct score of the full-resolution maps."""
    rng = np.random.default_rng(7)
    small = [ndimage.gaussian_filter(rng.normal(0, 1, (32, 32)), 1.5) for _ in range(12)]
    full = [ndimage.zoom(m, (5, 7), order=1) for m in small]  # 160 x 224 each
    anomalous = [m > 0.45 for m in full[:6]] + [np.zeros_like(full[0], bool)] * 6
    regions = [(i, mask, float(min(300, mask.sum()))) for i, mask in enumerate(anomalous[:6]) if mask.any()]
    full = [m + rng.normal(0, 0.05, m.shape) for m in full]
    small_normal = [ndimage.zoom(a.astype(float), (32 / 160, 32 / 224), order=0) < 0.5 for a in anomalous]
    grid = curve_thresholds(np.concatenate([m.ravel() for m in small]), np.concatenate([n.ravel() for n in small_normal]))
    every = np.unique(np.concatenate([m.ravel() for m in full]))
    exact = streamed(full, anomalous, regions, np.concatenate(([every[0] - 1.0], every)))
    gridded = streamed(full, anomalous, regions, grid)
    assert every.size > 10 * grid.size  # the grid is far coarser than the scores
    for limit in (0.05, 0.3):
        assert abs(gridded.area(limit) - exact.area(limit)) < 1e-3
    assert abs(gridded.auroc() - exact.auroc()) < 1e-3


def test_f1_at_a_threshold_counts_pixels_above_it():
    scores = np.array([[0.1, 0.6], [0.9, 0.4]])
    inside = np.array([[False, True], [True, True]])
    curve = OverlapCurve(np.array([0.2, 0.5]))
    curve.add(scores, inside)
    # above 0.5: 0.6 and 0.9, both inside; 0.4 inside is missed: tp 2, fp 0, fn 1
    assert curve.f1_at(0.5) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    with pytest.raises(ValueError, match="not one of"):
        curve.f1_at(0.3)
