"""Run records: the run-folder layout, what one run carries, and what makes a run finished.

The layout is said here once: ``{output.dir}/{method name}/{dataset}/{category}/`` holding
:data:`RUN_OUTPUTS`. Training writes ``best.pt``, ``last.pt``, ``history.json`` (engine/training.py,
engine/checkpoint.py), evaluation writes ``evaluation.json`` and pictures (engine/evaluation.py),
and engine/run.py writes ``results.json`` last.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasets.build import DatasetSplits
from engine.checkpoint import FORMAT_VERSION
from engine.config import RunSettings, config_differences
from utils.distributed import World

# Files a finished run holds; a run missing any of them is not finished, whatever else it has.
RUN_OUTPUTS = ("best.pt", "last.pt", "history.json", "evaluation.json", "results.json")
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.json"  # a sweep's table, in its method folder


def method_directory(settings: RunSettings) -> Path:
    """``{output.dir}/{method name}/{dataset}``, e.g. results/memkd-st/mvtec: one folder per table."""
    return Path(settings.output.dir) / settings.method_name.lower() / settings.data.dataset


def run_directory(settings: RunSettings, category: str) -> Path:
    """``{output.dir}/{method name}/{dataset}/{category}``, e.g. results/memkd-st/mvtec/bottle."""
    return method_directory(settings) / category


@dataclass(frozen=True)
class Run:
    """One category's run as training and evaluation see it: its settings, where it is kept, the
    device it runs on, what it was trained on, and the processes that share its batches
    (``train.parallel=data`` under torchrun; one process otherwise)."""

    settings: RunSettings
    category: str
    folder: Path
    device: torch.device
    data_digest: str
    world: World = World()


def training_data_digest(splits: DatasetSplits, root: str) -> str:
    """What the model was trained on: sha256 of the train and validation images' paths below
    ``data.root`` and their sizes, so results are never reused for other data."""
    base = Path(root).expanduser()
    digest = hashlib.sha256()
    for split in (splits.train, splits.val):
        for sample in split.samples:
            path = Path(sample.image)
            try:
                name = path.relative_to(base).as_posix()
            except ValueError:
                name = path.as_posix()
            digest.update(f"{name}\0{path.stat().st_size}\n".encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def finished_results(folder: Path, settings: RunSettings, data_digest: str | None = None) -> dict[str, Any] | None:
    """The stored results of a finished run with these settings (and, when given, these training
    images), if there is one: every output present, same training and evaluation settings."""
    if not all((folder / name).is_file() for name in RUN_OUTPUTS):
        return None
    try:
        results = json.loads((folder / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    saved = results.get("config") if isinstance(results, dict) else None
    if (not isinstance(saved, dict) or results.get("format_version") != FORMAT_VERSION
            or config_differences(saved, settings, "train") or config_differences(saved, settings, "eval")
            or (data_digest is not None and results.get("data_digest") != data_digest)):
        return None
    return {**results, "results_path": str(folder / RESULTS_FILE)}
