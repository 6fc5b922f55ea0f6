"""Checkpoints: what they hold, how they are checked against the configured model, how they load.

A checkpoint is a plain dict of tensors and Python values, so ``torch.load(weights_only=True)``
reads it: format version, method, the resolved config, the student's weights (memories included),
a fingerprint of the teacher it was trained against, and for ``last.pt`` the optimiser and
scheduler state needed to resume. The teacher's weights are not stored: they are fixed (pinned
ImageNet weights, a local file, or a seeded random init) and the fingerprint proves they match.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.errors import UserError
from utils.io import save_torch

FORMAT_VERSION = 1
# Keys that only say where or how fast to run; every other key changes what a run computes.
RUN_KEYS = ("phase", "data.root", "data.num_workers", "data.download", "train.device", "train.resume",
            "eval.batch_size", "eval.max_pictures", "output.dir")


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short hash of the teacher's weights and buffers: equal iff the teachers compute the same."""
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: Path, *, method: str, config: dict[str, Any], student: nn.Module, fingerprint: str,
                    epoch: int, **extra: Any) -> Path:
    """Atomically write a checkpoint; ``extra`` holds resume state or evaluation thresholds."""
    state = {"format_version": FORMAT_VERSION, "method": method, "config": dict(config), "epoch": epoch,
             "teacher_fingerprint": fingerprint, "student": student.state_dict(), **extra}
    return save_torch(path, state)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only); UserError if it is missing, corrupt or of another format."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first with phase=train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of another program, ...
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                        "delete it and train again with train.resume=false") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise UserError(f"checkpoint {path} has format version {found}, this code reads {FORMAT_VERSION}; "
                        "retrain with train.resume=false")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for each key (other than RUN_KEYS) that differs."""
    keys = [k for k in current if k not in RUN_KEYS]
    return [f"{k}={saved.get(k)!r} (checkpoint) vs {current[k]!r} (now)" for k in keys if saved.get(k) != current[k]]


def check_fits(state: dict[str, Any], path: Path, method: str, config: dict[str, Any], fingerprint: str) -> None:
    """Refuse a checkpoint that was not made by this method, config and teacher, saying what differs."""
    if state["method"] != method:
        raise UserError(f"checkpoint {path} is for method '{state['method']}', not '{method}'; "
                        f"use the other script or another output.dir")
    differences = config_differences(state["config"], config)
    if differences:
        more = f" and {len(differences) - 1} more" if len(differences) > 1 else ""
        raise UserError(f"checkpoint {path} was made with another config: {differences[0]}{more}; "
                        "use the same settings, another output.dir, or train.resume=false to retrain")
    if state["teacher_fingerprint"] != fingerprint:
        raise UserError(f"checkpoint {path} was trained against other teacher weights; "
                        "use the same model.pretrained/model.teacher_weights as in training")
