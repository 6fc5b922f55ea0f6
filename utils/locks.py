"""File locks: a run folder belongs to one process at a time, and so does a dataset download.

A lock is an advisory ``flock`` on a lock file: the kernel drops it when its holder exits,
however it dies, so a lock left by a killed process never blocks the rerun. The file holds who
took it (host, pid, time), for the message a second process gets. POSIX only: where ``fcntl``
does not exist (Windows), nothing is locked. On network file systems ``flock`` may not reach
other machines: give each machine its own ``output.dir`` there, or rely on one sweep per folder.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"  # a run folder's lock file


class FileLock:
    """Hold the lock of the file ``path`` from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; without ``wait``, False at once when another live process holds it."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, in words, as its holder wrote it."""
        try:
            who = json.loads(self.path.read_text())
            return f"process {who['pid']} on {who['host']} (since {who['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        """Let go (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock(FileLock):
    """The lock of a run folder: ``<folder>/.lock``."""

    def __init__(self, folder: Path):
        super().__init__(Path(folder) / LOCK_NAME)
