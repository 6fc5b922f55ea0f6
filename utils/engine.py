"""The one training and evaluation engine behind both scripts.

It never asks which method it runs: a model from :func:`models.build_model` offers
``trainable_parameters``, ``set_exemplars``, ``loss``, ``distillation_error`` and ``anomaly_map``,
and that is all the engine uses.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import AnomalyDataset, build_datasets
from models import MemKD, build_model, method_name
from models.anomaly_map import image_scores
from utils.checkpoint import (check_fits, config_differences, load_checkpoint, save_checkpoint,
                              teacher_fingerprint)
from utils.errors import UserError
from utils.io import remove_stale_temporaries, write_json
from utils.metrics import evaluate_all, threshold_from_normal_scores
from utils.thresholds import store_thresholds, thresholds_from
from utils.visualize import save_pictures

# Deployment threshold: this quantile of the anomaly scores of held-out normal images.
NORMAL_SCORE_QUANTILE = 0.99


def select_device(choice: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without one is a user error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def method_directory(config: dict[str, Any], method: str) -> Path:
    """``{output.dir}/{method name}/{dataset}``, e.g. results/memkd-st/mvtec: one folder per table."""
    return Path(config["output.dir"]) / method_name(method, config["memory.enabled"]).lower() / config["data.dataset"]


def run_directory(config: dict[str, Any], method: str, category: str) -> Path:
    """``{output.dir}/{method name}/{dataset}/{category}``, e.g. results/memkd-st/mvtec/bottle."""
    return method_directory(config, method) / category


def _autocast(config: dict[str, Any], device: torch.device) -> contextlib.AbstractContextManager:
    # bfloat16 keeps float32's range, so no loss scaling is needed; CPU runs stay in float32.
    if config["train.amp"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loader(dataset: Dataset, batch_size: int, config: dict[str, Any], device: torch.device,
            generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=config["data.num_workers"], pin_memory=device.type == "cuda")


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); set output.dir to a writable folder") from None


@dataclass
class TrainingState:
    """What training carries from epoch to epoch and writes into ``last.pt`` so it can resume."""

    epoch: int = 0
    best_error: float = math.inf
    best_epoch: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def choose_exemplars(num_train: int, count: int, seed: int) -> list[int]:
    """The fixed exemplar set: ``count`` train indices drawn once with the run's seed."""
    if count > num_train:
        raise UserError(f"memory.exemplars={count} but the training split has only {num_train} images; "
                        f"set memory.exemplars to at most {num_train}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_train, generator=generator)[:count].tolist())


def exemplar_files(dataset: AnomalyDataset, indices: list[int], root: str) -> list[str]:
    """The exemplar images' paths relative to ``root`` (data.root): which images, wherever the data lives."""
    names = []
    for i in indices:
        path = Path(dataset.samples[i].image)
        try:
            names.append(path.relative_to(Path(root).expanduser()).as_posix())
        except ValueError:
            names.append(path.as_posix())
    return names


def _check_same_exemplars(saved: dict[str, Any], path: Path, indices: list[int], files: list[str]) -> None:
    """Refuse to resume when ``last.pt`` was trained with another exemplar set than this run draws.

    The draw depends on the seed, memory.exemplars and the training split; the first two are in the
    config (checked by check_fits), so a difference means the training images changed under data.root.
    """
    if saved.get("exemplars") == indices and saved.get("exemplar_files", files) == files:
        return
    was = saved.get("exemplar_files", saved.get("exemplars"))
    raise UserError(f"checkpoint {path} was trained with exemplar images {was} but this run draws {files}: "
                    "the training images under data.root changed; restore them, or retrain with train.resume=false")


def _non_finite(model: MemKD) -> str | None:
    """The name of the first student weight or buffer holding nan/inf, or None when all are finite."""
    for name, tensor in model.student.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _diverged(what: str, epoch: int, step: int, finished: int, last_path: Path) -> UserError:
    """The error that stops a diverged run: what broke, where, which checkpoint survives, the fix."""
    kept = (f"{last_path} from epoch {finished} is kept unchanged" if finished else
            "no epoch finished, so no checkpoint was written")
    return UserError(f"training diverged: {what} at epoch {epoch}, step {step}; {kept}; lower train.lr and rerun "
                     "with train.resume=false, or check the training images")


def build_optimizer(parameters: list[torch.nn.Parameter], config: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (STPM recipe) or Adam (RD4AD recipe) as configured."""
    if config["train.optimizer"] == "sgd":
        return torch.optim.SGD(parameters, lr=config["train.lr"], momentum=config["train.momentum"],
                               weight_decay=config["train.weight_decay"])
    return torch.optim.Adam(parameters, lr=config["train.lr"], betas=tuple(config["train.betas"]),
                            weight_decay=config["train.weight_decay"])


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant learning rate (both papers) or cosine decay over the configured epochs."""
    if config["train.scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["train.epochs"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


@torch.no_grad()
def validation_error(model: MemKD, dataset: Dataset, config: dict[str, Any], device: torch.device) -> float:
    """Mean L_KD over held-out normal TRAIN images; the student is back in train mode afterwards."""
    model.eval()
    total, count = 0.0, 0
    with _autocast(config, device):
        for batch in _loader(dataset, config["eval.batch_size"], config, device):
            images = batch["image"].to(device, non_blocking=True)
            total += model.distillation_error(images).item() * len(images)
            count += len(images)
    model.train()
    return total / max(count, 1)


def _train_one_epoch(model: MemKD, optimizer: torch.optim.Optimizer, loader: DataLoader, config: dict[str, Any],
                     device: torch.device, epoch: int, state: TrainingState, last_path: Path) -> dict[str, float]:
    """One pass over the training images; the mean of every logged loss term over its steps."""
    sums: dict[str, float] = {}
    steps = 0
    for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{config['train.epochs']}", leave=False,
                                      disable=None), start=1):
        images = batch["image"].to(device, non_blocking=True)
        with _autocast(config, device):
            losses = model.loss(images)
        loss_value = losses["loss"].item()
        if not math.isfinite(loss_value):
            raise _diverged(f"the loss became {loss_value}", epoch, step, state.epoch, last_path)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
    return {name: total / steps for name, total in sums.items()}


def train(model: MemKD, method: str, splits: Any, config: dict[str, Any], run_dir: Path,
          device: torch.device, fingerprint: str) -> TrainingState:
    """Train the student, writing ``last.pt`` every epoch and ``best.pt`` when validation improves.

    Resumes from ``last.pt`` when ``train.resume`` is set and it fits this config and exemplar set:
    weights (memories included), optimiser, scheduler, best-so-far and history. No RNG state is
    saved because none is needed: the student's initialisation and the exemplar draw are seeded
    from train.seed, each epoch's shuffle from (seed, epoch), and nothing else in training is random
    (no dropout, no augmentation; DataLoader worker seeds feed no random transform). So a resumed
    run sees exactly the batches and computes exactly the numbers of an uninterrupted one on CPU.
    A non-finite loss, or weights that became non-finite, stop training with a UserError before
    anything is saved, so ``last.pt`` and ``best.pt`` always hold a finite model.
    """
    seed, epochs = config["train.seed"], config["train.epochs"]
    exemplars = choose_exemplars(len(splits.train), config["memory.exemplars"], seed) if model.has_memory else []
    exemplar_names = exemplar_files(splits.train, exemplars, config["data.root"])
    if exemplars:
        model.set_exemplars(torch.stack([splits.train[i]["image"] for i in exemplars]).to(device))
    optimizer = build_optimizer(model.trainable_parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    state = TrainingState()
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if config["train.resume"] and last_path.exists():
        saved = load_checkpoint(last_path)
        check_fits(saved, last_path, method, config, fingerprint)
        _check_same_exemplars(saved, last_path, exemplars, exemplar_names)
        model.student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainingState(saved["epoch"], saved["best_error"], saved["best_epoch"], saved["train_seconds"],
                              saved["history"])
        if state.epoch < epochs:
            tqdm.write(f"resuming from {last_path} after epoch {state.epoch}")

    model.train()
    for epoch in range(state.epoch + 1, epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        loader = _loader(splits.train, config["train.batch_size"], config, device, generator)
        record = {"epoch": epoch, **_train_one_epoch(model, optimizer, loader, config, device, epoch, state, last_path)}
        scheduler.step()
        if len(splits.val):
            record["val_kd"] = validation_error(model, splits.val, config, device)
        # The last step's update can make the weights non-finite with a still finite loss: check
        # them (and the validation error) before they reach a checkpoint.
        broken = _non_finite(model)
        if broken is not None or not math.isfinite(record.get("val_kd", 0.0)):
            what = f"student weight {broken} became non-finite" if broken else f"val_kd became {record['val_kd']}"
            raise _diverged(what, epoch, len(loader), state.epoch, last_path)
        # Without a validation slice the last epoch is the one we keep.
        error = record.get("val_kd", -epoch)
        state.seconds += time.perf_counter() - started
        state.history.append(record)
        state.epoch = epoch
        common = dict(method=method, config=config, student=model.student, fingerprint=fingerprint, epoch=epoch,
                      exemplars=exemplars, exemplar_files=exemplar_names)
        if error < state.best_error:
            state.best_error, state.best_epoch = error, epoch
            save_checkpoint(best_path, **common)
        save_checkpoint(last_path, **common, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        best_error=state.best_error, best_epoch=state.best_epoch, train_seconds=state.seconds,
                        history=state.history)
        tqdm.write("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    return state


@torch.no_grad()
def anomaly_maps(model: MemKD, dataset: Dataset, config: dict[str, Any], device: torch.device,
                 desc: str = "evaluate") -> dict[str, torch.Tensor]:
    """Anomaly maps [N, H, W] (CPU) for a dataset, computed in batches, with masks and labels."""
    model.eval()
    maps, masks, labels, has_mask = [], [], [], []
    with _autocast(config, device):
        for batch in tqdm(_loader(dataset, config["eval.batch_size"], config, device), desc=desc, leave=False, disable=None):
            maps.append(model.anomaly_map(batch["image"].to(device, non_blocking=True)).float().cpu())
            masks.append(batch["mask"][:, 0])
            labels.append(torch.as_tensor(batch["label"]))
            has_mask.append(torch.as_tensor(batch["has_mask"]))
    return {"maps": torch.cat(maps), "masks": torch.cat(masks), "labels": torch.cat(labels),
            "has_mask": torch.cat(has_mask)}


def evaluate(model: MemKD, splits: Any, config: dict[str, Any],
             device: torch.device) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """All metrics on the test split, plus the deployment threshold from validation normal images;
    and the test split's :func:`anomaly_maps`, for the pictures."""
    test = anomaly_maps(model, splits.test, config, device)
    metrics = evaluate_all(image_scores(test["maps"]), test["labels"], test["maps"], test["masks"], test["has_mask"])
    if len(splits.val):
        val_scores = image_scores(anomaly_maps(model, splits.val, config, device, desc="validation scores")["maps"])
        metrics["normal_threshold"] = threshold_from_normal_scores(val_scores, NORMAL_SCORE_QUANTILE)
    return metrics, test


def finished_results(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The stored results of a finished run with this config, if there is one (sweeps skip it)."""
    results_path = run_dir / "results.json"
    if not (results_path.is_file() and (run_dir / "best.pt").is_file()):
        return None
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError):
        return None
    if results.get("config") is None or config_differences(results["config"], config):
        return None
    return {**results, "results_path": str(results_path)}


def run_category(method: str, config: dict[str, Any], category: str) -> dict[str, Any]:
    """Train (unless phase=test), evaluate the best checkpoint, write and return results.json."""
    run_dir = run_directory(config, method, category)
    if config["phase"] == "train" and config["train.resume"]:
        done = finished_results(run_dir, config)
        if done is not None:
            tqdm.write(f"{category}: already finished with this config, reusing {run_dir / 'results.json'} "
                       "(train.resume=false retrains)")
            return done
    _ensure_writable(run_dir)
    remove_stale_temporaries(run_dir)  # left by a run killed mid-save; the files they were replacing are intact
    device = select_device(config["train.device"])
    splits = build_datasets(config["data.dataset"], config["data.root"], category, config["data.image_size"],
                            config["data.val_fraction"], config["train.seed"], config["data.download"])
    # Decode every image now, in this process: a file broken past its header is reported before any
    # training, as one line, and DataLoader workers inherit the decoded cache instead of re-decoding.
    for split in ((splits.train,) if config["phase"] == "train" else ()) + (splits.val, splits.test):
        split.preload()
    model = build_model(method, config).to(device)
    fingerprint = teacher_fingerprint(model.teacher)
    name = method_name(method, config["memory.enabled"])
    tqdm.write(f"{name} | {config['data.dataset']}/{category} | {len(splits.train)} train, {len(splits.val)} val, "
               f"{len(splits.test)} test images | device {device}")
    tqdm.write(f"teacher {config['model.backbone']}: {model.teacher_description}")

    state = TrainingState()
    if config["phase"] == "train":
        state = train(model, method, splits, config, run_dir, device, fingerprint)
    best_path = run_dir / "best.pt"
    best = load_checkpoint(best_path)
    check_fits(best, best_path, method, config, fingerprint)
    model.student.load_state_dict(best["student"])

    started = time.perf_counter()
    metrics, test = evaluate(model, splits, config, device)
    eval_seconds = time.perf_counter() - started
    thresholds = thresholds_from(metrics, test["maps"])
    store_thresholds(best_path, thresholds, best)  # best.pt alone is then deployable, by predict.py
    started = time.perf_counter()
    save_pictures(run_dir, splits.test, test, metrics, thresholds, config["eval.max_pictures"])
    picture_seconds = time.perf_counter() - started
    last_record = state.history[-1] if state.history else {}
    results = {
        "method": name, "script_method": method, "backbone": config["model.backbone"],
        "teacher_weights": model.teacher_description, "dataset": config["data.dataset"], "category": category,
        "memory_enabled": config["memory.enabled"], **metrics,
        "epochs": config["train.epochs"], "best_epoch": best["epoch"], "image_size": config["data.image_size"],
        "seed": config["train.seed"],
        # phase=test trains nothing, so it reports no training time rather than zero.
        "train_seconds": round(state.seconds, 2) if state.history else None, "eval_seconds": round(eval_seconds, 2),
        "picture_seconds": round(picture_seconds, 2),
        "recall_entropy": last_record.get("recall_entropy"), "exemplar_entropy": last_record.get("exemplar_entropy"),
        "device": str(device), "config": {k: v for k, v in config.items()},
    }
    write_json(run_dir / "results.json", results)
    if state.history:
        write_json(run_dir / "history.json", state.history)
    results["results_path"] = str(run_dir / "results.json")
    return results

