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
from engine.checkpoint import FORMAT_VERSION, checkpoint_facts
from engine.config import RunSettings, config_differences
from engine.thresholds import EVALUATION_FILE
from utils.digests import FileDigests
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
    data: DataDigests
    world: World = World()


DIGEST_STORE = ".file_digests.json"  # in output.dir: each data file's sha256 by path, size and mtime


@dataclass(frozen=True)
class DataDigests:
    """What a run reads, by content: ``train`` covers the training and validation images (what the
    model learned from; checkpoints keep it), ``test`` the test images, their labels and masks
    (what the metrics were computed on). Each is a sha256 over every file's name below
    ``data.root``, its role and the sha256 of its bytes. ``train_by_names`` is what checkpoints of
    earlier versions recorded instead (names and sizes only), so that they still resume and score."""

    train: str
    test: str
    train_by_names: str = ""

    def accepted(self) -> tuple[str, ...]:
        """The stored training digests a checkpoint may carry to fit this data."""
        return tuple(d for d in (self.train, self.train_by_names) if d)


def name_below(path: Path, root: str | Path) -> str:
    """``path`` relative to ``root`` (data.root) in POSIX form, or whole when it lies elsewhere: which
    file it is, wherever the data lives."""
    try:
        return Path(path).relative_to(Path(root).expanduser()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def data_digests(splits: DatasetSplits, root: str, files: FileDigests) -> DataDigests:
    """The :class:`DataDigests` of ``splits``; ``files`` remembers each file's sha256, so an
    unchanged dataset costs one ``stat`` per file after its first run."""
    def name(path: Path) -> str:
        return name_below(path, root)

    def digest(parts: dict[str, Any]) -> str:
        total = hashlib.sha256()
        for split, dataset in parts.items():
            for sample in dataset.samples:
                mask = (",".join(f"{name(m)}={files.sha256(m)}" for m in sample.masks) + f":{int(sample.mask_nonzero)}"
                        if sample.mask is not None else "-")
                total.update(f"{split}|{name(sample.image)}={files.sha256(sample.image)}|{sample.label}|"
                             f"{sample.defect}|{mask}\n".encode())
        return total.hexdigest()[:16]

    return DataDigests(digest({"train": splits.train, "val": splits.val}), digest({"test": splits.test}),
                       _names_and_sizes(splits, root))


def _names_and_sizes(splits: DatasetSplits, root: str) -> str:
    """The training digest of earlier versions: the train and validation images' names and sizes."""
    digest = hashlib.sha256()
    for split in (splits.train, splits.val):
        for sample in split.samples:
            digest.update(f"{name_below(sample.image, root)}\0{Path(sample.image).stat().st_size}\n".encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def finished_results(folder: Path, settings: RunSettings, data: DataDigests | None = None) -> dict[str, Any] | None:
    """The stored results of a finished run with these settings (and, when given, this data), if
    there is one: every output present, the same training and evaluation settings, the same
    training and test data by content, and results that belong to the current ``best.pt``."""
    if not all((folder / name).is_file() for name in RUN_OUTPUTS):
        return None
    try:
        results = json.loads((folder / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    saved = results.get("config") if isinstance(results, dict) else None
    if (not isinstance(saved, dict) or results.get("format_version") != FORMAT_VERSION
            or config_differences(saved, settings, "train") or config_differences(saved, settings, "eval")
            or (data is not None and (results.get("data_digest"), results.get("test_digest")) != (data.train, data.test))):
        return None
    # Written by this best.pt, and after training finished: a retrain (train.resume=false) killed
    # part-way leaves the previous run's records beside a new best.pt and an unfinished last.pt.
    best, last = checkpoint_facts(folder / "best.pt"), checkpoint_facts(folder / "last.pt")
    try:
        evaluated = json.loads((folder / EVALUATION_FILE).read_text()).get("student_digest")
    except (OSError, ValueError, AttributeError):
        return None
    if (best is None or last is None or last.get("epoch") != settings.train.epochs
            or not results.get("student_digest") == evaluated == best.get("student_digest")):
        return None
    return {**results, "results_path": str(folder / RESULTS_FILE)}
