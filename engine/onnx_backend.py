"""Scoring with a graph exported by export.py, through onnxruntime: no checkpoint, no torchvision weights.

:class:`OnnxScorer` reads the ``.onnx`` file and the JSON beside it (same stem) and stands in for
the PyTorch model where predict.py uses one: ``anomaly_map(images)`` on a batch of normalised
images [B, 3, S, S]. The JSON gives what a caller needs around it: the decision thresholds, the
input size S and the normalisation. The graph carries an export id that its JSON repeats, so a
JSON is never paired with another export's graph. Nothing from ``models/`` is imported here, so a
deployment needs only torch (for tensors), numpy and onnxruntime.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import METHODS, valid_image_size
from engine.thresholds import THRESHOLD_KEYS, finite_or_none
from utils.errors import UserError

JSON_FORMAT = "memkd-onnx"
# 2: the graph records a digest of what in the JSON decides (thresholds, input, method), so an
# edited JSON is refused instead of trusted.
JSON_FORMAT_VERSION = 2
# The graph's output names, in the order export.py declares them.
OUTPUT_NAMES = ("maps", "scores")
# Key of the graph's metadata entry that holds its export id, which its JSON repeats as "export_id".
EXPORT_ID_KEY = "memkd_export_id"
# Key of the graph's metadata entry that holds decision_digest() of its JSON.
DECISION_DIGEST_KEY = "memkd_decision_digest"
# Fields the scorer reads; export.py writes these and more (versions, parity figures, the config).
REQUIRED_FIELDS = ("format", "format_version", "export_id", "name", "method", "input", "thresholds")
REQUIRED_INPUT_FIELDS = ("name", "image_size", "mean", "std")


def sidecar_path(onnx_path: Path) -> Path:
    """Where the JSON of an exported graph lies: beside it, same stem, ``.json``."""
    return onnx_path.with_suffix(".json")


def read_metadata(onnx_path: Path) -> dict[str, Any]:
    """The JSON export.py wrote beside ``onnx_path``; UserError when it is missing, unreadable or of
    another format."""
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise UserError(f"no {path.name} beside {onnx_path}; export the run again with export.py "
                        "(it writes both files)")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); export the run again with export.py") from None
    check_metadata(metadata, path)
    return metadata


def decision_digest(metadata: dict[str, Any]) -> str:
    """sha256 of the JSON's fields that decide how images are scored and judged (those the scorer
    reads); export.py stores it in the graph, and the scorer refuses a JSON that no longer matches."""
    decisive = {key: metadata.get(key) for key in REQUIRED_FIELDS}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_metadata(metadata: Any, path: Path) -> None:
    """UserError unless ``metadata`` is an export.py JSON of this format version with every field
    the scorer reads, each of the right kind."""
    if not isinstance(metadata, dict) or metadata.get("format") != JSON_FORMAT:
        raise UserError(f"{path} is not the JSON of an export.py graph; export the run again with export.py")
    if metadata.get("format_version") != JSON_FORMAT_VERSION:
        raise UserError(f"{path} has format version {metadata.get('format_version')}, this code reads "
                        f"{JSON_FORMAT_VERSION}; export the run again with this code's export.py")
    missing = [key for key in REQUIRED_FIELDS if key not in metadata]
    entry = metadata.get("input")
    missing += [f"input.{key}" for key in REQUIRED_INPUT_FIELDS if not isinstance(entry, dict) or key not in entry]
    if not missing:
        missing += [f"thresholds.{key}" for key in THRESHOLD_KEYS
                    if not isinstance(metadata["thresholds"], dict) or key not in metadata["thresholds"]]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; export the run again with export.py")
    wrong = [field for field, fits in (
        ("input.name", isinstance(entry["name"], str)),
        ("input.image_size", isinstance(entry["image_size"], int) and not isinstance(entry["image_size"], bool)
         and valid_image_size(entry["image_size"])),
        ("input.mean", isinstance(entry["mean"], list) and len(entry["mean"]) == 3 and all(map(_is_number, entry["mean"]))),
        ("input.std", isinstance(entry["std"], list) and len(entry["std"]) == 3
         and all(_is_number(v) and v > 0 for v in entry["std"])),
        ("method", metadata["method"] in METHODS),
        ("thresholds", all(v is None or _is_number(v) for v in metadata["thresholds"].values())),
    ) if not fits]
    if wrong:
        raise UserError(f"{path} holds an unusable {wrong[0]}; export the run again with export.py")


class OnnxScorer:
    """An exported graph and its JSON, scoring on the CPU with onnxruntime.

    ``metadata`` may be given instead of read from the JSON (export.py checks a graph before its
    JSON is written). ``threads`` defaults to torch's thread count, so one setting
    (``OMP_NUM_THREADS``, ``torch.set_num_threads``) governs both backends.

    Attributes: ``thresholds`` (as evaluation stored them, None where undefined), ``image_size``
    (side S of the input), ``mean`` and ``std`` (the per-channel normalisation of RGB in [0, 1]),
    ``method`` ("st" or "rd"), ``name`` (e.g. "MemKD-ST") and the whole ``metadata``.
    """

    def __init__(self, model_path: Path, metadata: dict[str, Any] | None = None, threads: int | None = None):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise UserError(f"no ONNX model at {self.path}; write one with export.py checkpoint=RUN/best.pt")
        if metadata is None:
            metadata = read_metadata(self.path)
        else:
            check_metadata(metadata, sidecar_path(self.path))
        self.metadata = metadata
        entry = metadata["input"]
        self.input_name: str = entry["name"]
        self.image_size = int(entry["image_size"])
        self.mean: tuple[float, ...] = tuple(float(v) for v in entry["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in entry["std"])
        self.method: str = metadata["method"]
        self.name: str = metadata["name"]
        self.thresholds: dict[str, float | None] = {k: finite_or_none(v) for k, v in metadata["thresholds"].items()}
        try:
            import onnxruntime
        except ImportError:
            raise UserError("scoring an ONNX model needs onnxruntime; install it with: pip install onnxruntime") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise to a user
        if hasattr(onnxruntime, "disable_telemetry_events"):
            onnxruntime.disable_telemetry_events()  # no usage records written under the home folder
        try:
            self._session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"onnxruntime cannot load {self.path} ({reason}); export the run again with export.py") from None
        recorded = self._session.get_modelmeta().custom_metadata_map
        if recorded.get(EXPORT_ID_KEY) != metadata["export_id"]:
            raise UserError(f"{sidecar_path(self.path).name} is not the JSON of {self.path} (they come from different "
                            "exports); keep the two files of one export together, or export the run again")
        if recorded.get(DECISION_DIGEST_KEY) != decision_digest(metadata):
            raise UserError(f"{sidecar_path(self.path)} was changed after export (its thresholds, input or method no "
                            "longer match what the graph recorded); export the run again with export.py")

    def score(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps [B, S, S], scores [B])`` of a batch of normalised images [B, 3, S, S], on the CPU.

        ValueError when the batch is not of that shape (S = ``image_size``).
        """
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
            raise ValueError(f"images must be [B, {', '.join(map(str, expected))}] with B >= 1, "
                             f"got {list(images.shape)}")
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        maps, scores = self._session.run(list(OUTPUT_NAMES), {self.input_name: array})
        return torch.from_numpy(maps), torch.from_numpy(scores)

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly maps [B, S, S] of normalised images [B, 3, S, S], as the exported model computes them."""
        return self.score(images)[0]
