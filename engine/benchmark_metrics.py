"""The metrics MVTec LOCO AD and MVTec AD 2 report, at the resolution of their ground truth.

Both benchmarks score full-resolution maps against full-resolution masks, so each test map,
computed at the network's resolution, is resized (bilinear) to its image's mask size, one image at
a time, and streamed through curves that keep counts per threshold (utils.metrics.OverlapCurve):
memory does not grow with the benchmark's pixels.

- MVTec LOCO AD, to the definitions of MVTec's LOCO evaluation code: ``image_auroc_logical`` and
  ``image_auroc_structural`` (each anomaly type's images against all good test images) and their
  mean ``image_auroc``; AU-sPRO up to FPR 0.05 and 0.3 over the logical images with all good
  images and over the structural images with all good images, divided by the limit, each mask
  file one defect whose saturation comes from ``defects_config.json``; ``pixel_spro_05`` and
  ``pixel_spro_30`` are the means of the two; and pixel AUROC over every test image.
- MVTec AD 2 (test_public): pixel AUROC, ``pixel_aupro_05`` (regions: the 8-connected components
  of each mask, FPR over all anomaly-free pixels) and ``pixel_segf1``, the pixel F1 of the map
  thresholded at ``seg_threshold``, which comes from the validation images only: their pixel
  scores' mean plus ``eval.seg_threshold_sigmas`` standard deviations.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from datasets.images import image_size_of, load_mask_at_own_size, load_mask_values
from datasets.layouts import LOCO_ANOMALY_TYPES, SaturationRule
from datasets.samples import Sample
from utils.errors import UserError
from utils.metrics import OverlapCurve, auroc, curve_thresholds

# Called with each test sample and its map at the ground truth's resolution (e.g. to save it).
MapSink = Callable[[Sample, np.ndarray], None]

LOCO_KINDS = dict(zip(("logical", "structural"), LOCO_ANOMALY_TYPES, strict=True))
SPRO_LIMITS = {"05": 0.05, "30": 0.3}
AD2_PRO_LIMIT = 0.05


def truth_size(sample: Sample) -> tuple[int, int]:
    """(height, width) the sample is scored at: its masks', or its image's for a good image."""
    return image_size_of(sample.mask if sample.mask is not None else sample.image)


def full_resolution(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An [h, w] map resized bilinearly to ``size`` (height, width), as float32."""
    return F.interpolate(anomaly_map[None, None].float(), size=size, mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def full_resolution_maps(samples: Sequence[Sample], maps: torch.Tensor) -> Iterator[tuple[Sample, np.ndarray]]:
    """``(sample, its map at its ground truth's size)`` for every sample, one at a time."""
    for sample, anomaly_map in zip(samples, maps):
        yield sample, full_resolution(anomaly_map, truth_size(sample))


def _thresholds(maps: torch.Tensor, masks: torch.Tensor, extra: Sequence[float] = ()) -> np.ndarray:
    """The curves' thresholds, from the maps at the network's resolution (see curve_thresholds)."""
    sample = curve_thresholds(maps.numpy().ravel(), (masks == 0).numpy().ravel(), fpr_limit=max(SPRO_LIMITS.values()))
    return np.unique(np.concatenate((sample, np.asarray(extra, dtype=np.float64))))


def _loco_defects(sample: Sample, size: tuple[int, int],
                  rules: dict[int, SaturationRule]) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """(pixels inside any mask, [(one mask file's pixels, its saturation)]) of a LOCO test image."""
    anomalous = np.zeros(size, dtype=bool)
    regions = []
    for path in sample.masks:
        values = load_mask_values(path)
        if values.shape != size:
            raise UserError(f"mask {path} is {values.shape[1]}x{values.shape[0]} but the first mask of its image is "
                            f"{size[1]}x{size[0]}; restore the category's ground truth from the archive")
        region = values > 0
        painted = np.unique(values[region])
        if painted.size != 1 or int(painted[0]) not in rules:
            raise UserError(f"mask {path} is painted with pixel value(s) {painted.tolist()}, but its category's "
                            f"defects_config.json knows {sorted(rules)}; restore the mask or the config from the archive")
        regions.append((region, rules[int(painted[0])].saturation(int(region.sum()))))
        anomalous |= region
    return anomalous, regions


def loco_metrics(samples: Sequence[Sample], maps: torch.Tensor, masks: torch.Tensor, image_scores: torch.Tensor,
                 rules: dict[int, SaturationRule], sink: MapSink | None = None) -> dict[str, float]:
    """MVTec LOCO AD's metrics of one category's test set (see the module docstring)."""
    thresholds = _thresholds(maps, masks)
    curves = {kind: OverlapCurve(thresholds) for kind in LOCO_KINDS}
    every_image = OverlapCurve(thresholds)
    kind_of = {folder: kind for kind, folder in LOCO_KINDS.items()}
    for sample, scores in full_resolution_maps(samples, maps):
        if sink is not None:
            sink(sample, scores)
        if sample.label == 0:
            anomalous, regions, targets = np.zeros(scores.shape, dtype=bool), [], list(curves.values())
        else:
            anomalous, regions = _loco_defects(sample, scores.shape, rules)
            targets = [curves[kind_of[sample.defect]]]
        bins = every_image.bins(scores)  # the same thresholds in every curve: bin once
        for curve in targets:
            curve.add_bins(bins, anomalous, regions)
        every_image.add_bins(bins, anomalous)
    labels = np.array([s.label for s in samples])
    good = labels == 0
    results: dict[str, float] = {}
    for kind, folder in LOCO_KINDS.items():
        chosen = good | np.array([s.defect == folder for s in samples])
        results[f"image_auroc_{kind}"] = auroc(image_scores.numpy()[chosen], labels[chosen])
    results["image_auroc"] = float(np.mean([results[f"image_auroc_{kind}"] for kind in LOCO_KINDS]))
    for name, limit in SPRO_LIMITS.items():
        for kind, curve in curves.items():
            results[f"pixel_spro_{name}_{kind}"] = curve.area(limit)
        results[f"pixel_spro_{name}"] = float(np.mean([results[f"pixel_spro_{name}_{kind}"] for kind in LOCO_KINDS]))
    results["pixel_auroc"] = every_image.auroc()
    return results


def normal_pixel_threshold(samples: Sequence[Sample], maps: torch.Tensor, sigmas: float) -> float:
    """Mean + ``sigmas`` standard deviations of the pixel scores of ``maps`` (normal images) at
    their images' resolution: MVTec AD 2's suggested baseline threshold, from validation only."""
    total = total_sq = count = 0.0
    for _, scores in full_resolution_maps(samples, maps):
        values = scores.astype(np.float64)
        total += values.sum()
        total_sq += np.square(values).sum()
        count += values.size
    if not count:
        raise UserError("MVTec AD 2's segmentation threshold needs validation images; the category's "
                        "validation/good folder is empty")
    mean = total / count
    return float(mean + sigmas * np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def ad2_metrics(samples: Sequence[Sample], maps: torch.Tensor, masks: torch.Tensor, seg_threshold: float,
                sink: MapSink | None = None) -> dict[str, float]:
    """MVTec AD 2's pixel metrics of test_public (see the module docstring)."""
    curve = OverlapCurve(_thresholds(maps, masks, [seg_threshold]))
    eight_connected = np.ones((3, 3), dtype=bool)
    for sample, scores in full_resolution_maps(samples, maps):
        if sink is not None:
            sink(sample, scores)
        anomalous = (load_mask_at_own_size(sample.mask, sample.mask_nonzero) if sample.mask is not None
                     else np.zeros(scores.shape, dtype=bool))
        if anomalous.shape != scores.shape:
            raise UserError(f"mask {sample.mask} is not the size of its image {sample.image}; restore it from the archive")
        labels, count = ndimage.label(anomalous, structure=eight_connected)
        regions = [(labels == k, float((labels == k).sum())) for k in range(1, count + 1)]
        curve.add(scores, anomalous, regions)
    return {"pixel_auroc": curve.auroc(), "pixel_aupro_05": curve.area(AD2_PRO_LIMIT),
            "pixel_segf1": curve.f1_at(seg_threshold)}
