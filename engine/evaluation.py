"""Evaluation: anomaly maps of a trained model, every metric, the decision thresholds, the pictures.

It reads ``best.pt`` and never writes it: what evaluation decides goes to ``evaluation.json``
beside it (engine/thresholds.py), the pictures beside that. Scoring settings (``eval.*``) can
therefore change and a model be re-evaluated without retraining.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from models.memkd import MemKD
from models.anomaly_map import image_scores
from models.folding import folded_for_inference
from engine.checkpoint import check_fits, load_checkpoint, load_student
from datasets.build import DatasetSplits
from engine.config import RunSettings
from engine.model import map_settings
from engine.records import Run
from utils.device import autocast, make_loader, memory_format, to_device
from utils.errors import UserError
from utils.metrics import evaluate_all, threshold_from_normal_scores
from engine.thresholds import thresholds_from, write_evaluation
from engine.pictures import save_pictures
from engine.benchmark_metrics import ad2_metrics, full_resolution, loco_metrics, normal_pixel_threshold
from engine.map_files import save_map, write_submission_image
from datasets.images import image_size_of
from datasets.layouts import loco_saturation_rules
from datasets.samples import AnomalyDataset, Sample

# Deployment threshold: this quantile of the anomaly scores of held-out normal images.
NORMAL_SCORE_QUANTILE = 0.99


@torch.no_grad()
def anomaly_maps(model: MemKD, dataset: Dataset, settings: RunSettings, device: torch.device,
                 desc: str = "evaluate") -> dict[str, torch.Tensor]:
    """Anomaly maps [N, H, W] (CPU) for a dataset, computed in batches, with masks and labels."""
    model.eval()
    maps, masks, labels, has_mask = [], [], [], []
    channels_last = settings.train.channels_last
    loader = make_loader(dataset, settings.eval.batch_size, settings.data.num_workers, device)
    with autocast(settings.train.amp, device), folded_for_inference(model, memory_format(channels_last)):
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            maps.append(model.anomaly_map(to_device(batch["image"], device, channels_last)).float().cpu())
            masks.append(batch["mask"][:, 0])
            labels.append(torch.as_tensor(batch["label"]))
            has_mask.append(torch.as_tensor(batch["has_mask"]))
    return {"maps": torch.cat(maps), "masks": torch.cat(masks), "labels": torch.cat(labels),
            "has_mask": torch.cat(has_mask)}


def evaluate(model: MemKD, splits: DatasetSplits, run: Run) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """All metrics on the test split, plus the deployment threshold from validation normal images;
    and the test split's :func:`anomaly_maps`, for the pictures.

    Metrics are computed at the network's resolution, except for the benchmarks scored at their
    ground truth's (MVTec LOCO AD, MVTec AD 2: engine/benchmark_metrics.py), whose own metrics are
    added and whose pixel AUROC replaces the network-resolution one. With ``eval.save_maps`` every
    test map the metrics used is written (engine/map_files.py)."""
    settings, device = run.settings, run.device
    test = anomaly_maps(model, splits.test, settings, device)
    if not bool(torch.isfinite(test["maps"]).all()):  # metrics and thresholds of nan maps would be noise
        raise UserError(f"{run.folder / 'best.pt'} gives non-finite anomaly maps; retrain with train.resume=false")
    scores = image_scores(test["maps"])
    metrics = evaluate_all(scores, test["labels"], test["maps"], test["masks"], test["has_mask"])
    validation = None
    if len(splits.val):
        validation = anomaly_maps(model, splits.val, settings, device, desc="validation scores")
        metrics["normal_threshold"] = threshold_from_normal_scores(image_scores(validation["maps"]),
                                                                   NORMAL_SCORE_QUANTILE)
    sink = (lambda sample, values: save_map(run.folder, sample, values)) if settings.eval.save_maps else None
    samples = splits.test.samples
    if splits.scoring == "loco":
        rules = loco_saturation_rules(Path(settings.data.root).expanduser(), run.category)
        metrics.update(loco_metrics(samples, test["maps"], test["masks"], scores, rules, sink))
    elif splits.scoring == "ad2":
        val_maps = validation["maps"] if validation is not None else torch.empty(0, 0, 0)
        metrics["seg_threshold"] = normal_pixel_threshold(splits.val.samples, val_maps,
                                                          settings.eval.seg_threshold_sigmas)
        metrics.update(ad2_metrics(samples, test["maps"], test["masks"], metrics["seg_threshold"], sink))
    elif sink is not None:
        for sample, values in zip(samples, test["maps"]):
            sink(sample, values.numpy())
    return metrics, test


def write_submission(model: MemKD, splits: DatasetSplits, run: Run, threshold: float) -> Path:
    """MVTec AD 2's submission for this category into ``eval.submission`` (engine/map_files.py):
    the maps of every unlabelled test image at its own size, and their thresholded masks."""
    folder = Path(run.settings.eval.submission).expanduser()
    for split, images in splits.unlabelled.items():
        dataset = AnomalyDataset([Sample(image, 0) for image in images], run.settings.data.image_size)
        maps = anomaly_maps(model, dataset, run.settings, run.device, desc=split)["maps"] if images else []
        for image, anomaly_map in zip(images, maps):
            write_submission_image(folder, run.category, split, image,
                                   full_resolution(anomaly_map, image_size_of(image)), threshold)
    return folder


def evaluate_checkpoint(model: MemKD, splits: DatasetSplits, run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the run's ``best.pt`` with its ``eval.*`` settings: load it (checked against this
    method, training config, teacher and data), compute every metric, write ``evaluation.json``
    and the pictures. Returns ``(metrics with timings, the checkpoint)``."""
    settings = run.settings
    best_path = run.folder / "best.pt"
    best = load_checkpoint(best_path)
    check_fits(best, best_path, settings, model.teacher_fingerprint, run.data.accepted())
    load_student(model, best, best_path)
    model.map_settings = map_settings(settings)
    started = time.perf_counter()
    metrics, test = evaluate(model, splits, run)
    if settings.eval.submission is not None:
        tqdm.write(f"submission: {write_submission(model, splits, run, metrics['seg_threshold'])}")
    metrics["eval_seconds"] = round(time.perf_counter() - started, 2)
    thresholds = thresholds_from(metrics, test["maps"])
    write_evaluation(best_path, best, settings.scope("eval"), thresholds)
    started = time.perf_counter()
    save_pictures(run.folder, splits.test, test, metrics, thresholds, settings.eval.max_pictures)
    metrics["picture_seconds"] = round(time.perf_counter() - started, 2)
    return metrics, best
