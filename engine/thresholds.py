"""What evaluation decides about a trained model, kept beside its ``best.pt`` so it can be deployed.

Training writes ``best.pt`` and never touches it again. Each evaluation writes
``evaluation.json`` beside it: the evaluation settings it used (``eval.combine``, ``eval.sigma``,
whether it saved the maps; for MVTec AD 2 the segmentation rule and the submission folder),
the digest of the weights it evaluated (so it can never be paired with another ``best.pt``) and
the decision thresholds (score units, higher = more anomalous, ``score >= threshold`` means
anomalous). ``best.pt`` and ``evaluation.json`` together are all ``predict.py`` needs.

* ``normal_threshold``: the 0.99 quantile of the image scores of held-out normal TRAIN images.
  It needs no test labels, so it is the one to deploy (None when data.val_fraction=0).
* ``image_f1_threshold``: the image score maximising F1 on the test set, the literature's choice
  for reporting (None when the test set lacks normal or anomalous images).
* ``pixel_f1_threshold``: the same at pixel level; predicted masks are drawn with it.
* ``map_low``: the lowest anomaly-map value on the test set, the bottom of the heatmap colour
  scale, so that heatmaps of new images are coloured like those of the test set.
* ``seg_threshold`` (MVTec AD 2 only, else None): the pixel threshold of ``pixel_segf1`` and of
  the submission's binary maps, the validation images' pixel mean plus
  ``eval.seg_threshold_sigmas`` standard deviations; the rule is in the record's scoring settings.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.errors import UserError
from utils.io import write_json

if TYPE_CHECKING:
    import torch

THRESHOLD_KEYS: tuple[str, ...] = ("normal_threshold", "image_f1_threshold", "pixel_f1_threshold", "map_low",
                                   "seg_threshold")
# predict.py's threshold=... choices and the key each one reads.
IMAGE_THRESHOLD_CHOICES: dict[str, str] = {"normal": "normal_threshold", "f1": "image_f1_threshold"}


def finite_or_none(value: Any) -> float | None:
    """A stored threshold as a float, or None where it is undefined (nan, inf, null, missing)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def thresholds_from(metrics: dict[str, Any], maps: torch.Tensor) -> dict[str, float | None]:
    """The ``thresholds`` dict of a checkpoint from evaluation ``metrics`` and the test anomaly maps.

    Undefined thresholds (nan metrics, no validation slice) are stored as None.
    """
    found = {key: finite_or_none(metrics.get(key)) for key in THRESHOLD_KEYS if key != "map_low"}
    found["map_low"] = finite_or_none(float(maps.min())) if maps.numel() else None
    return found


EVALUATION_FILE = "evaluation.json"
EVALUATION_FORMAT = 1


def evaluation_path(checkpoint: Path) -> Path:
    """Where the evaluation of ``checkpoint`` (a best.pt) is kept: beside it."""
    return checkpoint.with_name(EVALUATION_FILE)


def write_evaluation(checkpoint: Path, state: dict[str, Any], scoring: dict[str, Any],
                     thresholds: dict[str, float | None]) -> Path:
    """Write ``evaluation.json`` beside ``checkpoint`` for its loaded ``state``; the checkpoint is untouched."""
    record = {"format_version": EVALUATION_FORMAT, "checkpoint": checkpoint.name,
              "student_digest": state["student_digest"], "scoring": dict(scoring), "thresholds": dict(thresholds)}
    return write_json(evaluation_path(checkpoint), record)


def read_evaluation(checkpoint: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """``(scoring settings, thresholds)`` of the evaluation beside ``checkpoint``.

    UserError when there is none, it is unreadable, or it was made for other weights.
    """
    path = evaluation_path(checkpoint)
    never = (f"{checkpoint} was never evaluated (no {EVALUATION_FILE} of it beside it); give the best.pt of a "
             "finished run, or evaluate it with phase=test")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(never) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); evaluate again with phase=test") from None
    if isinstance(record, dict) and record.get("checkpoint") != checkpoint.name:
        raise UserError(never)
    if (not isinstance(record, dict) or record.get("format_version") != EVALUATION_FORMAT
            or not isinstance(record.get("scoring"), dict) or not isinstance(record.get("thresholds"), dict)):
        raise UserError(f"{path} is not an evaluation record of this code; evaluate again with phase=test")
    if record.get("student_digest") != state.get("student_digest"):
        raise UserError(f"{path} belongs to other weights than {checkpoint}; evaluate again with phase=test")
    thresholds = record["thresholds"]
    return dict(record["scoring"]), {key: finite_or_none(thresholds.get(key)) for key in THRESHOLD_KEYS}


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
