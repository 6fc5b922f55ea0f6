"""The one engine behind both scripts: one category's run, from data to ``results.json``.

It never asks which method it runs: a model from :func:`models.build_model` offers
``trainable_parameters``, ``set_exemplars``, ``loss``, ``distillation_error`` and ``anomaly_map``,
and that is all training (engine/training.py) and evaluation (engine/evaluation.py) use. This
module keeps the run records: the run folder, what identifies a finished run, ``results.json``
and ``history.json``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from datasets.build import DatasetSplits, build_datasets
from models.registry import method_name
from models.build import build_model
from engine.checkpoint import FORMAT_VERSION, config_differences, load_checkpoint
from engine.config import keys_in_scope
from utils.device import select_device
from utils.distributed import World, barrier, main_says
from utils.errors import UserError
from engine.evaluation import evaluate_checkpoint
from utils.io import remove_stale_temporaries, write_json
from engine.plots import save_training_curves
from utils.runlock import RunLock
from engine.training import TrainingState, train

# Files a finished run holds; a run missing any of them is not finished, whatever else it has.
RUN_OUTPUTS = ("best.pt", "last.pt", "history.json", "evaluation.json", "results.json")


def method_directory(config: dict[str, Any], method: str) -> Path:
    """``{output.dir}/{method name}/{dataset}``, e.g. results/memkd-st/mvtec: one folder per table."""
    return Path(config["output.dir"]) / method_name(method, config["memory.enabled"]).lower() / config["data.dataset"]


def run_directory(config: dict[str, Any], method: str, category: str) -> Path:
    """``{output.dir}/{method name}/{dataset}/{category}``, e.g. results/memkd-st/mvtec/bottle."""
    return method_directory(config, method) / category


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


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); set output.dir to a writable folder") from None


def finished_results(run_dir: Path, config: dict[str, Any], data_digest: str | None = None) -> dict[str, Any] | None:
    """The stored results of a finished run with this config (and, when given, these training
    images), if there is one: every output present, same training and evaluation settings."""
    if not all((run_dir / name).is_file() for name in RUN_OUTPUTS):
        return None
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    saved = results.get("config") if isinstance(results, dict) else None
    if (not isinstance(saved, dict) or results.get("format_version") != FORMAT_VERSION
            or config_differences(saved, config)
            or any(saved.get(k) != config[k] for k in keys_in_scope("eval"))
            or (data_digest is not None and results.get("data_digest") != data_digest)):
        return None
    return {**results, "results_path": str(run_dir / "results.json")}


def _training_facts(run_dir: Path, state: TrainingState) -> TrainingState:
    """The training record of this run: the one just trained, else the one ``last.pt`` holds
    (``phase=test`` trains nothing but must not erase what training measured)."""
    if state.history or not (run_dir / "last.pt").is_file():
        return state
    last = load_checkpoint(run_dir / "last.pt")
    return TrainingState(last.get("epoch", 0), last.get("best_error", 0.0), last.get("best_epoch", 0),
                         last.get("train_seconds", 0.0), list(last.get("history", [])))


def run_category(method: str, config: dict[str, Any], category: str, world: World = World(),
                 skip_if_busy: bool = False) -> dict[str, Any] | None:
    """Train (unless phase=test), evaluate the best checkpoint, write and return results.json.

    Every check (data, teacher, checkpoints) runs before the run folder is created, so a run that
    fails them leaves nothing behind. The folder is then locked (utils/runlock.py): when another
    live process holds it, this is a one-line error, or with ``skip_if_busy`` (sweeps) None.
    Under ``train.parallel=data`` every rank trains; rank 0 alone holds the folder, evaluates and
    writes, and the other ranks return None.
    """
    run_dir = run_directory(config, method, category)
    device = select_device(config["train.device"])
    splits = build_datasets(config["data.dataset"], config["data.root"], category, config["data.image_size"],
                            config["data.val_fraction"], config["train.seed"], config["data.download"])
    data_digest = training_data_digest(splits, config["data.root"])
    if config["phase"] == "train" and config["train.resume"]:
        done = finished_results(run_dir, config, data_digest)
        if done is not None:
            if world.is_main or config["train.parallel"] != "data":
                tqdm.write(f"{category}: already finished with this config and data, reusing "
                           f"{run_dir / 'results.json'} (train.resume=false retrains)")
            return done
    # Decode every image now, in this process: a file broken past its header is reported before any
    # training, as one line, and DataLoader workers inherit the decoded cache instead of re-decoding.
    for split in ((splits.train,) if config["phase"] == "train" else ()) + (splits.val, splits.test):
        split.preload()
    model = build_model(method, config).to(device)
    data_parallel = world.size > 1 and config["train.parallel"] == "data"
    writer = world.is_main or not data_parallel
    if data_parallel and device.type == "cuda":
        # Batch statistics of the global batch, as one process would compute them (SyncBatchNorm
        # runs on GPUs only: on CPU each process normalises its own share, see README).
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
    name = method_name(method, config["memory.enabled"])
    if config["phase"] == "test" and not (run_dir / "best.pt").is_file():
        raise UserError(f"no checkpoint at {run_dir / 'best.pt'}; train first with phase=train")
    lock = RunLock(run_dir)
    if writer:
        _ensure_writable(run_dir)
    held = lock.acquire() if writer else True
    if data_parallel:
        held = main_says(held, world)
    if not held:
        if skip_if_busy:
            tqdm.write(f"{category}: skipped, its run folder is in use by {lock.holder()}")
            return None
        raise UserError(f"run folder {run_dir} is in use by {lock.holder()}; wait for it to finish, "
                        "or set another output.dir")
    with lock:
        if config["phase"] == "train" and config["train.resume"] and not data_parallel:
            done = finished_results(run_dir, config, data_digest)  # finished while we waited for the lock
            if done is not None:
                return done
        if writer:
            remove_stale_temporaries(run_dir)  # left by a run killed mid-save; the files it replaced are intact
            # Said once the folder is ours: in a sweep, this line means this process runs the category.
            tqdm.write(f"{name} | {config['data.dataset']}/{category} | {len(splits.train)} train, "
                       f"{len(splits.val)} val, {len(splits.test)} test images | device {device}"
                       + (f" | {world.size} processes share each batch" if data_parallel else ""))
            tqdm.write(f"teacher {config['model.backbone']}: {model.teacher_description}")
        state = TrainingState()
        if config["phase"] == "train":
            state = train(model, method, splits, config, run_dir, device, data_digest,
                          world if data_parallel else World())
        if not writer:
            barrier()  # rank 0 evaluates and writes
            return None
        results = _evaluate_and_record(model, method, name, splits, config, run_dir, device, data_digest, state,
                                       world, category)
    if data_parallel:
        barrier()
    return results


def _evaluate_and_record(model: Any, method: str, name: str, splits: DatasetSplits, config: dict[str, Any],
                         run_dir: Path, device: Any, data_digest: str, state: TrainingState, world: World,
                         category: str) -> dict[str, Any]:
    """Evaluate best.pt, then write history.json (after training), curves.png and results.json."""
    metrics, best = evaluate_checkpoint(model, method, splits, config, run_dir, device, data_digest)
    state = _training_facts(run_dir, state)
    last_record = state.history[-1] if state.history else {}
    results = {
        "format_version": FORMAT_VERSION, "method": name, "script_method": method, "backbone": config["model.backbone"],
        "teacher_weights": model.teacher_description, "teacher_fingerprint": model.teacher_fingerprint,
        "dataset": config["data.dataset"], "category": category, "data_digest": data_digest,
        "memory_enabled": config["memory.enabled"], **metrics,
        "epochs": config["train.epochs"], "best_epoch": best["epoch"], "image_size": config["data.image_size"],
        "seed": config["train.seed"],
        "train_seconds": round(state.seconds, 2) if state.history else None,
        "recall_entropy": last_record.get("recall_entropy"), "exemplar_entropy": last_record.get("exemplar_entropy"),
        "device": str(device), "world_size": world.size if config["train.parallel"] == "data" else 1,
        "config": dict(config),
    }
    # history.json first: a run killed between the two writes has no results.json, so it is not
    # taken for finished and the rerun writes both.
    if config["phase"] == "train":
        write_json(run_dir / "history.json", state.history)
        save_training_curves(state.history, run_dir / "curves.png", title=f"{name} {config['data.dataset']}/{category}")
    write_json(run_dir / "results.json", results)
    results["results_path"] = str(run_dir / "results.json")
    return results


__all__ = ["RUN_OUTPUTS", "finished_results", "method_directory", "run_category", "run_directory",
           "select_device", "training_data_digest"]
