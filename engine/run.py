"""One category's run, from data to ``results.json``: train (unless ``phase=test``), evaluate, record.

It never asks which method it runs: a model from :func:`engine.model.build_run_model` offers
``trainable_parameters``, ``set_exemplars``, ``loss``, ``distillation_error`` and ``anomaly_map``,
and that is all training (engine/training.py) and evaluation (engine/evaluation.py) use. The run
folder's layout and what makes a run finished are engine/records.py's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from datasets.build import DatasetSplits, build_datasets
from engine.checkpoint import FORMAT_VERSION, load_checkpoint
from engine.config import RunSettings
from engine.evaluation import evaluate_checkpoint
from engine.model import build_run_model
from engine.pictures import save_training_curves
from engine.records import DIGEST_STORE, RESULTS_FILE, Run, data_digests, finished_results, run_directory
from engine.training import TrainingState, train
from models.memkd import MemKD
from utils.device import select_device
from utils.digests import FileDigests
from utils.distributed import World, barrier, main_says
from utils.errors import UserError
from utils.io import broken_link, remove_stale_temporaries, write_json
from utils.locks import LOCK_NAME, RunLock


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # one per process: two sweeps may probe one folder at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        broken = next((message for p in (folder, *folder.parents) if (message := broken_link(p))), None)
        if broken:
            raise UserError(f"{broken}; create that folder, or set output.dir to another one") from None
        raise UserError(f"cannot write to {folder} ({e.strerror}); set output.dir to a writable folder") from None


def _training_facts(folder: Path, state: TrainingState) -> TrainingState:
    """The training record of this run: the one just trained, else the one ``last.pt`` holds
    (``phase=test`` trains nothing but must not erase what training measured)."""
    if state.history or not (folder / "last.pt").is_file():
        return state
    last = load_checkpoint(folder / "last.pt")
    return TrainingState(last.get("epoch", 0), last.get("best_error", 0.0), last.get("best_epoch", 0),
                         last.get("train_seconds", 0.0), list(last.get("history", [])))


def run_category(settings: RunSettings, category: str, world: World = World(),
                 skip_if_busy: bool = False) -> dict[str, Any] | None:
    """Train (unless phase=test), evaluate the best checkpoint, write and return results.json.

    Every check (data, teacher, checkpoints) runs before the run folder is created, so a run that
    fails them leaves nothing behind. The folder is then locked (utils/locks.py): when another
    live process holds it, this is a one-line error, or with ``skip_if_busy`` (sweeps) None.
    Under ``train.parallel=data`` every rank trains; rank 0 alone holds the folder, evaluates and
    writes, and the other ranks return None.
    """
    data, training = settings.data, settings.phase == "train"
    folder = run_directory(settings, category)
    device = select_device(settings.train.device)
    splits = build_datasets(data.dataset, data.root, category, data.image_size, data.val_fraction,
                            settings.train.seed, data.download)
    files = FileDigests(Path(settings.output.dir) / DIGEST_STORE)
    digests = data_digests(splits, data.root, files)
    data_parallel = world.size > 1 and settings.train.parallel == "data"
    writer = world.is_main or not data_parallel
    if training and settings.train.resume:
        done = finished_results(folder, settings, digests)
        if done is not None:
            if writer:
                files.save()
                tqdm.write(f"{category}: reusing the finished run {folder / RESULTS_FILE}: the same settings and "
                           f"the same data by content (it read data.root={done.get('data_root', '?')}); "
                           "train.resume=false retrains")
            return done
    # Decode every image now, in this process: a file broken past its header is reported before any
    # training, as one line, and DataLoader workers inherit the decoded cache instead of re-decoding.
    for split in ((splits.train,) if training else ()) + (splits.val, splits.test):
        split.preload()
    model = build_run_model(settings).to(device)
    if data_parallel and device.type == "cuda":
        # Batch statistics of the global batch, as one process would compute them (SyncBatchNorm
        # runs on GPUs only: on CPU each process normalises its own share, see README).
        model.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.student)
    if not training and not (folder / "best.pt").is_file():
        raise UserError(f"no checkpoint at {folder / 'best.pt'}; train first with phase=train")
    lock = RunLock(folder)
    created = not folder.exists()
    if writer:
        _ensure_writable(folder)
        files.save()
    held = lock.acquire() if writer else True
    if data_parallel:
        held = main_says(held, world)
    if not held:
        if skip_if_busy:
            tqdm.write(f"{category}: skipped, its run folder is in use by {lock.holder()}")
            return None
        raise UserError(f"run folder {folder} is in use by {lock.holder()}; wait for it to finish, "
                        "or set another output.dir")
    run = Run(settings, category, folder, device, digests, world if data_parallel else World())
    try:
        with lock:
            results = _run_locked(model, splits, run, writer, data_parallel)
    except BaseException:
        if created and writer:
            _remove_if_empty(folder)
        raise
    if data_parallel and writer:
        barrier()  # the other ranks wait for rank 0's evaluation in _run_locked
    return results


def _remove_if_empty(folder: Path) -> None:
    """Remove a run folder this run created when a failure left nothing in it but its lock, so a
    failed first run leaves nothing behind."""
    try:
        if {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass


def _run_locked(model: MemKD, splits: DatasetSplits, run: Run, writer: bool,
                data_parallel: bool) -> dict[str, Any] | None:
    """The part of :func:`run_category` done while holding the run folder: train, evaluate, record."""
    settings, folder, world = run.settings, run.folder, run.world
    data, training, category, device = settings.data, settings.phase == "train", run.category, run.device
    if training and settings.train.resume and not data_parallel:
        done = finished_results(folder, settings, run.data)  # finished while we waited for the lock
        if done is not None:
            return done
    if writer:
        remove_stale_temporaries(folder)  # left by a run killed mid-save; the files it replaced are intact
        # Said once the folder is ours: in a sweep, this line means this process runs the category.
        tqdm.write(f"{settings.method_name} | {data.dataset}/{category} | {len(splits.train)} train, "
                   f"{len(splits.val)} val, {len(splits.test)} test images | device {device}"
                   + (f" | {world.size} processes share each batch" if data_parallel else ""))
        tqdm.write(f"teacher {settings.model.backbone}: {model.teacher_description}")
    state = train(model, splits, run) if training else TrainingState()
    if not writer:
        barrier()  # rank 0 evaluates and writes
        return None
    return _evaluate_and_record(model, splits, run, state)


def _evaluate_and_record(model: MemKD, splits: DatasetSplits, run: Run, state: TrainingState) -> dict[str, Any]:
    """Evaluate best.pt, then write history.json (after training), curves.png and results.json."""
    settings = run.settings
    metrics, best = evaluate_checkpoint(model, splits, run)
    state = _training_facts(run.folder, state)
    last_record = state.history[-1] if state.history else {}
    results = {
        "format_version": FORMAT_VERSION, "method": settings.method_name, "script_method": settings.method,
        "backbone": settings.model.backbone, "teacher_weights": model.teacher_description,
        "teacher_fingerprint": model.teacher_fingerprint, "dataset": settings.data.dataset, "category": run.category,
        "data_root": settings.data.root, "data_digest": run.data.train, "test_digest": run.data.test,
        "student_digest": best["student_digest"], "memory_enabled": settings.memory.enabled, **metrics,
        "epochs": settings.train.epochs, "best_epoch": best["epoch"], "image_size": settings.data.image_size,
        "seed": settings.train.seed,
        "train_seconds": round(state.seconds, 2) if state.history else None,
        "recall_entropy": last_record.get("recall_entropy"), "exemplar_entropy": last_record.get("exemplar_entropy"),
        "device": str(run.device), "world_size": run.world.size,
        "config": settings.flat(),
    }
    # history.json first: a run killed between the two writes has no results.json, so it is not
    # taken for finished and the rerun writes both.
    # Training's own records, written when this run trained (or one of them is missing): evaluating
    # a complete last.pt again, on changed test data, leaves them as training wrote them.
    if settings.phase == "train" and (state.trained_now or not all(
            (run.folder / name).is_file() for name in ("history.json", "curves.png"))):
        write_json(run.folder / "history.json", state.history)
        save_training_curves(state.history, run.folder / "curves.png",
                             title=f"{settings.method_name} {settings.data.dataset}/{run.category}")
    write_json(run.folder / RESULTS_FILE, results)
    results["results_path"] = str(run.folder / RESULTS_FILE)
    return results
