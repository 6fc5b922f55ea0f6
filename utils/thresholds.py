"""Decision thresholds of a trained model, stored inside its ``best.pt`` so it can be deployed.

After evaluation ``best.pt`` gains a ``thresholds`` dict (score units, higher = more anomalous,
``score >= threshold`` means anomalous):

* ``normal_threshold``: the 0.99 quantile of the image scores of held-out normal TRAIN images.
  It needs no test labels, so it is the one to deploy (None when data.val_fraction=0).
* ``image_f1_threshold``: the image score maximising F1 on the test set, the literature's choice
  for reporting (nan when the test set lacks normal or anomalous images).
* ``pixel_f1_threshold``: the same at pixel level; predicted masks are drawn with it.
* ``map_low``: the lowest anomaly-map value on the test set, the bottom of the heatmap colour
  scale, so that heatmaps of new images are coloured like those of the test set.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.io import save_torch

THRESHOLD_KEYS: tuple[str, ...] = ("normal_threshold", "image_f1_threshold", "pixel_f1_threshold", "map_low")
# predict.py's threshold=... choices and the key each one reads.
IMAGE_THRESHOLD_CHOICES: dict[str, str] = {"normal": "normal_threshold", "f1": "image_f1_threshold"}


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def thresholds_from(metrics: dict[str, Any], maps: torch.Tensor) -> dict[str, float | None]:
    """The ``thresholds`` dict of a checkpoint from evaluation ``metrics`` and the test anomaly maps.

    Undefined thresholds (nan metrics, no validation slice) are stored as None.
    """
    found = {key: _finite_or_none(metrics.get(key)) for key in THRESHOLD_KEYS if key != "map_low"}
    found["map_low"] = _finite_or_none(float(maps.min())) if maps.numel() else None
    return found


def store_thresholds(best_path: Path, thresholds: dict[str, float | None],
                     state: dict[str, Any] | None = None) -> None:
    """Rewrite ``best_path`` atomically with ``thresholds`` added; everything else is kept as saved.

    ``state`` is the checkpoint as already loaded from ``best_path``, to save reading it again.
    """
    state = dict(load_checkpoint(best_path) if state is None else state)
    state["thresholds"] = dict(thresholds)
    save_torch(best_path, state)


def stored_thresholds(state: dict[str, Any], path: Path) -> dict[str, float | None]:
    """The ``thresholds`` of a loaded checkpoint; UserError when it was never evaluated."""
    thresholds = state.get("thresholds")
    if not isinstance(thresholds, dict):
        raise UserError(f"checkpoint {path} holds no thresholds (it was never evaluated); give a best.pt "
                        "of a finished run, or evaluate it with phase=test")
    return {key: _finite_or_none(thresholds.get(key)) for key in THRESHOLD_KEYS}


def image_threshold(thresholds: dict[str, float | None], choice: str, path: Path) -> float:
    """The image threshold for ``choice`` ("normal" or "f1"); UserError when it is undefined."""
    if choice not in IMAGE_THRESHOLD_CHOICES:
        raise UserError(f"threshold={choice} is not a choice; use threshold=normal (from normal training images) "
                        "or threshold=f1 (F1-max on the test set)")
    value = thresholds[IMAGE_THRESHOLD_CHOICES[choice]]
    if value is None:
        other = "f1" if choice == "normal" else "normal"
        why = "no validation images (data.val_fraction=0)" if choice == "normal" else "a test set without both classes"
        raise UserError(f"checkpoint {path} has no {choice} threshold (trained with {why}); use threshold={other}")
    return value


def mask_threshold(thresholds: dict[str, float | None], image_threshold_value: float) -> float:
    """The pixel threshold for predicted masks: pixel F1-max, else the image threshold in use.

    The fallback is consistent with the decision: the image score is the map's maximum, so an
    image is anomalous exactly when its mask at the image threshold is not empty.
    """
    pixel = thresholds.get("pixel_f1_threshold")
    return pixel if pixel is not None else image_threshold_value
