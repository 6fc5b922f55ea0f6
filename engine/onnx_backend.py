"""Scoring with a graph exported by export.py, through onnxruntime: no checkpoint, no torchvision weights.

:class:`OnnxScorer` reads the ``.onnx`` file and the JSON beside it (same stem) and stands in for
the PyTorch model where predict.py uses one: ``anomaly_map(images)`` on a batch of normalised
images [B, 3, S, S]. The JSON gives what a caller needs around it: the decision thresholds, the
input size S and the normalisation. The graph carries an export id that its JSON repeats, so a
JSON is never paired with another export's graph. Nothing from ``models/`` is imported here, so a
deployment needs only torch (for tensors), numpy and onnxruntime.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.thresholds import finite_or_none
from utils.errors import UserError

JSON_FORMAT = "memkd-onnx"
JSON_FORMAT_VERSION = 1
# The graph's output names, in the order export.py declares them.
OUTPUT_NAMES = ("maps", "scores")
# Key of the graph's metadata entry that holds its export id, which its JSON repeats as "export_id".
EXPORT_ID_KEY = "memkd_export_id"
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


def check_metadata(metadata: Any, path: Path) -> None:
    """UserError unless ``metadata`` is an export.py JSON of this format version with every field
    the scorer reads."""
    if not isinstance(metadata, dict) or metadata.get("format") != JSON_FORMAT:
        raise UserError(f"{path} is not the JSON of an export.py graph; export the run again with export.py")
    if metadata.get("format_version") != JSON_FORMAT_VERSION:
        raise UserError(f"{path} has format version {metadata.get('format_version')}, this code reads "
                        f"{JSON_FORMAT_VERSION}; export the run again with this code's export.py")
    missing = [key for key in REQUIRED_FIELDS if key not in metadata]
    entry = metadata.get("input")
    missing += [f"input.{key}" for key in REQUIRED_INPUT_FIELDS if not isinstance(entry, dict) or key not in entry]
    if missing or not isinstance(metadata["thresholds"], dict):
        raise UserError(f"{path} lacks {', '.join(missing) or 'a thresholds object'}; "
                        "export the run again with export.py")


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
        try:
            self._session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"onnxruntime cannot load {self.path} ({reason}); export the run again with export.py") from None
        if self._session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY) != metadata["export_id"]:
            raise UserError(f"{sidecar_path(self.path).name} is not the JSON of {self.path} (they come from different "
                            "exports); keep the two files of one export together, or export the run again")

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
