"""Training: fit the student on normal images, resume an interrupted run, write its checkpoints.

Everything here writes only ``last.pt`` and ``best.pt`` (and nothing once training has finished);
evaluation (engine/evaluation.py) and run records (engine/run.py) never write them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.build import DatasetSplits
from datasets.samples import AnomalyDataset
from models.memkd import MemKD
from engine.checkpoint import check_fits, load_checkpoint, load_student, save_checkpoint
from engine.config import RunSettings, TrainSection
from utils.device import autocast, make_loader, to_device, tune_for
from utils.distributed import all_finite, average_gradients, broadcast_buffers
from utils.errors import UserError
from engine.feature_cache import IndexedDataset, TeacherFeatureCache
from engine.records import Run, name_below


@dataclass
class TrainingState:
    """What training carries from epoch to epoch and writes into ``last.pt`` so it can resume."""

    epoch: int = 0
    best_error: float = math.inf
    best_epoch: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    trained_now: int = 0  # epochs trained by this process (not saved): 0 when last.pt was already complete


def choose_exemplars(num_train: int, count: int, seed: int) -> list[int]:
    """The fixed exemplar set: ``count`` train indices drawn once with the run's seed."""
    if count > num_train:
        raise UserError(f"memory.exemplars={count} but the training split has only {num_train} images; "
                        f"set memory.exemplars to at most {num_train}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_train, generator=generator)[:count].tolist())


def exemplar_files(dataset: AnomalyDataset, indices: list[int], root: str) -> list[str]:
    """The exemplar images' paths relative to ``root`` (data.root): which images, wherever the data lives."""
    return [name_below(dataset.samples[i].image, root) for i in indices]


def _check_same_exemplars(saved: dict, path: Path, indices: list[int], files: list[str]) -> None:
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


def _load_optimizer(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    saved: dict, path: Path) -> None:
    """Restore the optimiser and schedule of an unfinished ``last.pt``. One written before a
    memory's keys and values became one parameter holds a state per tensor, which cannot continue."""
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError:
        raise UserError(f"checkpoint {path} holds an optimiser state for other parameters (written by a version "
                        "that kept a memory's keys and values apart); finish it with that version, or retrain with "
                        "train.resume=false") from None
    scheduler.load_state_dict(saved["scheduler"])


def build_optimizer(parameters: list[torch.nn.Parameter], train: TrainSection) -> torch.optim.Optimizer:
    """SGD (STPM recipe) or Adam (RD4AD recipe) as configured."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.Adam(parameters, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant learning rate (both papers) or cosine decay over the configured epochs."""
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


LossFunction = Callable[[torch.Tensor, "list[torch.Tensor] | None"], dict[str, torch.Tensor]]


def loss_function(model: MemKD, train: TrainSection, device: torch.device) -> LossFunction:
    """``model.loss``, or as ``train.compile`` asks, traced with its backward for static shapes:
    each batch shape is traced once, so the last, smaller batch of an epoch gets its own traced
    step and trains on exactly its images, as without compiling. ``step`` generates fused kernels
    (TorchInductor); ``cudagraphs`` records each shape's kernels once and replays them as one CUDA
    graph, with no launch per operator; there are no CUDA graphs off CUDA, so there it is ``off``."""
    if train.compile == "off" or (train.compile == "cudagraphs" and device.type != "cuda"):
        return model.loss
    if train.compile == "cudagraphs":  # traced, not code-generated: ready in seconds
        return torch.compile(model.loss, backend="cudagraphs", dynamic=False)
    return torch.compile(model.loss, dynamic=False)


def begin_step(train: TrainSection, device: torch.device) -> None:
    """Tell the CUDA graphs a new training step begins: the last step's outputs may be overwritten."""
    if train.compile == "cudagraphs" and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


@torch.no_grad()
def validation_error(model: MemKD, dataset: Dataset, settings: RunSettings, device: torch.device) -> float:
    """Mean L_KD over held-out normal TRAIN images; the student is back in train mode afterwards."""
    model.eval()
    total, count = 0.0, 0
    with autocast(settings.train.amp, device):
        for batch in make_loader(dataset, settings.eval.batch_size, settings.data.num_workers, device):
            images = to_device(batch["image"], device, settings.train.channels_last)
            total += model.distillation_error(images).item() * len(images)
            count += len(images)
    model.train()
    return total / max(count, 1)


def _train_one_epoch(model: MemKD, losses_of: LossFunction, optimizer: torch.optim.Optimizer, loader: DataLoader,
                     run: Run, epoch: int, state: TrainingState,
                     cache: TeacherFeatureCache | None = None) -> dict[str, float]:
    """One pass over the training images (batches of IndexedDataset items); the mean of every
    logged loss term over its steps. ``losses_of`` is ``model.loss`` or its compiled form
    (:func:`loss_function`). Teacher features come from ``cache`` when there is one.

    In a data-parallel world each rank sees its share of every batch and the gradients are
    averaged before the step, so every rank takes the same step (utils/distributed.py).
    """
    train = run.settings.train
    names: list[str] = []
    sums: torch.Tensor | None = None  # every term's running sum, read once per epoch: no sync per term
    steps = 0
    for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{train.epochs}", leave=False, disable=None),
                                 start=1):
        images = to_device(batch["image"], run.device, train.channels_last)
        begin_step(train, run.device)
        with autocast(train.amp, run.device):
            teacher = cache.lookup(batch["index"], images, model.teacher_features) if cache else None
            losses = losses_of(images, teacher)
        loss_value = losses["loss"].item()
        if not all_finite(loss_value, run.world):  # every rank stops together, never one left waiting
            raise _diverged(f"the loss became {loss_value}", epoch, step, state.epoch, run.folder / "last.pt")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        average_gradients(model.trainable_parameters(), run.world)
        optimizer.step()
        names = list(losses)
        terms = torch.stack([value.detach().float() for value in losses.values()])
        sums = terms if sums is None else sums + terms
        steps += 1
    return {name: total / steps for name, total in zip(names, sums.tolist())}


def train(model: MemKD, splits: DatasetSplits, run: Run) -> TrainingState:
    """Train the student, writing ``last.pt`` every epoch and ``best.pt`` when validation improves.

    The batches are shared with the processes of ``run.world`` (data-parallel training; one process
    otherwise).
    Resumes from ``last.pt`` when ``train.resume`` is set and it fits this config, teacher, training
    images (``run.data``) and exemplar set:
    weights (memories included), optimiser, scheduler, best-so-far and history. No RNG state is
    saved because none is needed: the student's initialisation and the exemplar draw are seeded
    from train.seed, each epoch's shuffle from (seed, epoch), and nothing else in training is random
    (no dropout, no augmentation; DataLoader worker seeds feed no random transform). So a resumed
    run sees exactly the batches and computes exactly the numbers of an uninterrupted one on CPU.
    A non-finite loss, or weights that became non-finite, stop training with a UserError before
    anything is saved, so ``last.pt`` and ``best.pt`` always hold a finite model.
    """
    settings, device, world = run.settings, run.device, run.world
    train = settings.train
    seed, epochs = train.seed, train.epochs
    tune_for(device)

    def on_device(images: torch.Tensor) -> torch.Tensor:
        return to_device(images, device, train.channels_last)

    exemplars = choose_exemplars(len(splits.train), settings.memory.exemplars, seed) if model.has_memory else []
    exemplar_names = exemplar_files(splits.train, exemplars, settings.data.root)
    if exemplars:
        model.set_exemplars(on_device(torch.stack([splits.train[i]["image"] for i in exemplars])))
    optimizer = build_optimizer(model.trainable_parameters(), train)
    scheduler = build_scheduler(optimizer, train)
    state = TrainingState()
    last_path, best_path = run.folder / "last.pt", run.folder / "best.pt"
    if train.resume and last_path.exists():
        saved = load_checkpoint(last_path)
        check_fits(saved, last_path, settings, model.teacher_fingerprint, run.data.accepted())
        _check_same_exemplars(saved, last_path, exemplars, exemplar_names)
        load_student(model, saved, last_path)
        state = TrainingState(saved["epoch"], saved["best_error"], saved["best_epoch"], saved["train_seconds"],
                              saved["history"])
        if state.epoch < epochs:  # a finished last.pt has nothing left to train: its optimiser is not needed
            _load_optimizer(optimizer, scheduler, saved, last_path)
            tqdm.write(f"resuming from {last_path} after epoch {state.epoch}")

    cache = None
    if state.epoch < epochs:  # filled once per process: a resumed run fills it again
        started = time.perf_counter()
        cache = TeacherFeatureCache.fill(model.teacher_features, splits.train, model.teacher.channels,
                                         settings.data.image_size, train, settings.data.num_workers, device, on_device)
        state.seconds += time.perf_counter() - started
        if cache is not None and world.is_main:
            tqdm.write(cache.describe())
    model.train()
    losses_of = loss_function(model, train, device)
    for epoch in range(state.epoch + 1, epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        # Indexed items tell the cache which images a batch holds; same length and generator, so
        # exactly the batches of the plain dataset.
        loader = make_loader(IndexedDataset(splits.train), train.batch_size, settings.data.num_workers, device,
                             generator, world)
        record = {"epoch": epoch, **_train_one_epoch(model, losses_of, optimizer, loader, run, epoch, state, cache),
                  **model.memory_entropies()}
        broadcast_buffers(model.student, world)  # rank 0's BatchNorm statistics, so all ranks validate alike
        scheduler.step()
        if len(splits.val):
            record["val_kd"] = validation_error(model, splits.val, settings, device)
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
        state.trained_now += 1
        common = dict(settings=settings, student=model.student, fingerprint=model.teacher_fingerprint,
                      data_digest=run.data.train, epoch=epoch,
                      exemplars=exemplars, exemplar_files=exemplar_names)
        improved = error < state.best_error
        if improved:
            state.best_error, state.best_epoch = error, epoch
        if not world.is_main:  # the ranks of a data-parallel world hold the same model; rank 0 writes it
            continue
        if improved:
            save_checkpoint(best_path, **common)
        save_checkpoint(last_path, **common, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        best_error=state.best_error, best_epoch=state.best_epoch, train_seconds=state.seconds,
                        history=state.history)
        tqdm.write("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    return state
