"""Checkpoints: what they hold, how they are checked against the configured model, how they load.

A checkpoint is a plain dict of tensors and Python values, so ``torch.load(weights_only=True)``
reads it: format version, method, the resolved config, the student's weights (memories included)
with a digest of them, a fingerprint of the teacher's source weights, a digest of the training
images, and for ``last.pt`` the optimiser and scheduler state needed to resume. The teacher's
weights are not stored: they are fixed (pinned ImageNet weights, a local file, or a seeded random
init) and the fingerprint proves they match. Training writes checkpoints; nothing rewrites them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Mapping

import torch
from torch import Tensor, nn

from engine.config import RunSettings, config_differences
from utils.errors import UserError
from utils.digests import tensors_digest
from utils.io import save_torch

# 2: the teacher is exactly its source weights (format 1 had BatchNorm statistics moved by a
# channel probe), baselines follow STPM/RD4AD, evaluation settings and thresholds live outside.
FORMAT_VERSION = 2
_FORMAT_NEWS = {1: "it was trained against a teacher whose BatchNorm statistics had been perturbed, "
                   "with the old STPM/RD4AD recipes"}
REQUIRED_KEYS = ("method", "config", "epoch", "teacher_fingerprint", "data_digest", "student", "student_digest")


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes: any flipped bit changes it."""
    return tensors_digest(state)


def save_checkpoint(path: Path, *, settings: RunSettings, student: nn.Module, fingerprint: str,
                    data_digest: str, epoch: int, **extra: Any) -> Path:
    """Atomically write a checkpoint with the resolved config (``settings.flat()``); ``extra`` holds
    resume state."""
    weights = student.state_dict()
    state = {"format_version": FORMAT_VERSION, "method": settings.method, "config": settings.flat(), "epoch": epoch,
             "teacher_fingerprint": fingerprint, "data_digest": data_digest, "student": weights,
             "student_digest": weights_digest(weights), **extra}
    return save_torch(path, state)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only) and check it is whole.

    UserError if it is missing, unreadable, of another format, lacks a key, or its weights do not
    match their stored digest (flipped bytes) or hold nan/inf.
    """
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the best.pt inside a run folder, e.g. {path / 'best.pt'}")
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first with phase=train")
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is an ONNX export, not a checkpoint; predict.py scores it with backend=onnx "
                        f"model={path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of another program, ...
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                        "delete it and train again with train.resume=false") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        why = f" ({_FORMAT_NEWS[found]})" if found in _FORMAT_NEWS else ""
        raise UserError(f"checkpoint {path} has format version {found}, this code reads {FORMAT_VERSION}{why}; "
                        "retrain with train.resume=false")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    weights = state.get("student")
    if missing or not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        what = f"lacks '{missing[0]}'" if missing else "holds no student weights"
        raise UserError(f"checkpoint {path} {what}: it was not written by this code; retrain with train.resume=false")
    if weights_digest(weights) != state["student_digest"]:
        raise UserError(f"checkpoint {path} is damaged: its weights do not match their stored digest; "
                        "restore it from a copy or retrain with train.resume=false")
    broken = next((name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                  None)
    if broken is not None:
        raise UserError(f"checkpoint {path} holds non-finite weights ({broken}); it cannot score anything, "
                        "retrain with train.resume=false")
    return state


def checkpoint_facts(path: Path) -> dict[str, Any] | None:
    """A checkpoint's plain entries (epoch, digests, method, ...), read without loading its tensors
    into memory (memory-mapped); None when it is missing or unreadable. For bookkeeping only:
    :func:`load_checkpoint` is what checks a checkpoint before its weights are used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated, not a checkpoint: not a finished run's
        return None
    if not isinstance(state, dict):
        return None
    return {key: value for key, value in state.items() if isinstance(value, (str, int, float, bool))}


def check_fits(state: dict[str, Any], path: Path, settings: RunSettings, fingerprint: str,
               data_digests: Collection[str] | None = None) -> None:
    """Refuse a checkpoint that was not made by this method, training config, teacher and (when
    ``data_digests`` is given) training images, whose digest must be one of those, saying what
    differs. Evaluation and run keys may differ, and so may keys this run does not read (Adam's
    betas in an SGD run)."""
    if state["method"] != settings.method:
        raise UserError(f"checkpoint {path} is for method '{state['method']}', not '{settings.method}'; "
                        f"use the other script or another output.dir")
    differences = config_differences(state["config"], settings)
    if differences:
        more = f" and {len(differences) - 1} more" if len(differences) > 1 else ""
        raise UserError(f"checkpoint {path} was made with another config: {differences[0]}{more}; "
                        "use the same settings, another output.dir, or train.resume=false to retrain")
    if state["teacher_fingerprint"] != fingerprint:
        raise UserError(f"checkpoint {path} was trained against other teacher weights; "
                        "use the same model.pretrained/model.teacher_weights as in training")
    if data_digests is not None and state["data_digest"] not in data_digests:
        raise UserError(f"checkpoint {path} was trained on other images than those now under data.root; "
                        "point data.root at the training data, use another output.dir, or train.resume=false")


def load_student(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's student weights into ``model.student``; UserError when they do not fit."""
    try:
        model.student.load_state_dict(state["student"])
    except RuntimeError as e:  # missing/unexpected keys, size mismatch
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"checkpoint {path} does not fit the configured student ({detail[:160]}); "
                        "use the config it was trained with, or retrain") from None
