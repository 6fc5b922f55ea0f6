"""Anomaly maps as files: the maps the metrics used (``eval.save_maps``) and MVTec AD 2's submission.

``maps/<defect type>/<image name>.tiff`` in the run folder holds, for every test image, the float32
map its metrics were computed from (at the network's resolution for MVTec AD and the other
layouts, at the ground truth's resolution for MVTec LOCO AD and MVTec AD 2), so that anyone can
recompute the metrics with another tool.

An MVTec AD 2 submission (``eval.submission=<folder>``) is the layout the benchmark's evaluation
server accepts: for every image of test_private and test_private_mixed,
``anomaly_images/<category>/<split>/<image name>.tiff`` (float16, the image's height and width)
and ``anomaly_images_thresholded/<category>/<split>/<image name>.png`` (uint8, 255 where the map
exceeds the segmentation threshold, else 0).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from datasets.samples import Sample
from utils.io import atomic_write

MAPS_FOLDER = "maps"
SUBMISSION_MAPS, SUBMISSION_MASKS = "anomaly_images", "anomaly_images_thresholded"


def write_tiff(path: Path, values: np.ndarray) -> Path:
    """``values`` as a single-page TIFF at ``path`` (in their own dtype), atomically."""
    encoded = io.BytesIO()
    tifffile.imwrite(encoded, values)
    return atomic_write(path, lambda f: f.write(encoded.getvalue()))


def saved_map_path(run_folder: Path, sample: Sample) -> Path:
    """Where ``eval.save_maps`` puts the map of a test ``sample``."""
    return run_folder / MAPS_FOLDER / sample.defect / f"{sample.image.stem}.tiff"


def save_map(run_folder: Path, sample: Sample, scores: np.ndarray) -> Path:
    """Write a test image's map, as float32, where :func:`saved_map_path` says."""
    return write_tiff(saved_map_path(run_folder, sample), np.ascontiguousarray(scores, dtype=np.float32))


def write_submission_image(folder: Path, category: str, split: str, image: Path, scores: np.ndarray,
                           threshold: float) -> None:
    """One private image's two submission files (see the module docstring); ``scores`` at its size."""
    write_tiff(folder / SUBMISSION_MAPS / category / split / f"{image.stem}.tiff", scores.astype(np.float16))
    binary = Image.fromarray(np.where(scores > threshold, 255, 0).astype(np.uint8), mode="L")
    atomic_write(folder / SUBMISSION_MASKS / category / split / f"{image.stem}.png", lambda f: binary.save(f, "PNG"))
