"""Content digests: of a state_dict's tensors (checkpoints, teacher fingerprints) and of files."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from utils.errors import UserError
from utils.io import write_json


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


class FileDigests:
    """sha256 of files, remembered in a small JSON file by path, size and modification time.

    A file read again unchanged (same size and ``st_mtime_ns``) costs a ``stat``; a new or changed
    one is read once. The store is written atomically by :meth:`save`; an unreadable store is
    ignored (the digests are computed again), and two processes sharing one lose at most entries.
    """

    def __init__(self, store: Path):
        self.store = Path(store)
        try:
            entries = json.loads(self.store.read_text())
        except (OSError, ValueError):
            entries = {}
        self._entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        self._changed = False

    def sha256(self, path: Path) -> str:
        """The sha256 (hex) of ``path``'s bytes."""
        path = Path(path)
        status = path.stat()
        key = os.path.realpath(path)
        known = self._entries.get(key)
        if isinstance(known, list) and known[:2] == [status.st_size, status.st_mtime_ns]:
            return known[2]
        digest = file_sha256(path)
        self._entries[key] = [status.st_size, status.st_mtime_ns, digest]
        self._changed = True
        return digest

    def save(self) -> None:
        """Write the store when a digest was computed; a store that cannot be written is skipped
        (it only saves time)."""
        if not self._changed:
            return
        try:
            write_json(self.store, self._entries)
        except UserError:
            return
        self._changed = False
