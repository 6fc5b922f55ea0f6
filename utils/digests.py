"""Content digests: of a state_dict's tensors (checkpoints, teacher fingerprints) and of a file."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor


def tensors_digest(state: Mapping[str, Tensor], skip: Callable[[str], bool] = lambda name: False) -> str:
    """sha256 (hex) of a state_dict's names, dtypes, shapes and bytes, in name order, leaving out the
    names ``skip`` selects: any flipped bit of a kept tensor changes it."""
    digest = hashlib.sha256()
    for name in sorted(k for k in state if not skip(k)):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
