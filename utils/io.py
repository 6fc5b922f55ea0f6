"""Atomic file writes: a crash mid-save leaves the previous file intact, never a torn one."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from utils.errors import UserError

TEMPORARY_SUFFIX = ".tmp"
# The mode open() would give a new file: 0o666 less the process umask (read once, at import).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
# tempfile.mkstemp's names: our prefix ".<name>.", 8 random characters, the suffix.
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync, then rename.

    ``os.replace`` is atomic on POSIX and Windows, so readers see the old file or the new one.
    If anything fails (or the write is interrupted) the temporary file is removed and the previous
    ``path``, if any, is left untouched; an OSError (disk full, no permission) becomes a UserError,
    also when ``write`` reports it as another exception (``torch.save`` raises a RuntimeError
    while handling the OSError of the file it writes to).
    A process killed outright (SIGKILL, power loss) can leave the temporary file behind, named
    ``.<name>.<random>.tmp``: :func:`remove_stale_temporaries` clears those.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes owner-only files; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = None if isinstance(e, UserError) else _os_error_in(e)
        if cause is not None:
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"{path.name} was not written"
            raise UserError(f"cannot write {path} ({cause.strerror or cause}); {kept}; free disk space or set "
                            "output.dir to a writable folder") from e
        raise
    _fsync_dir(path.parent)
    return path


def _os_error_in(error: BaseException) -> OSError | None:
    """``error`` itself if it is an OSError, else the first OSError it was raised from or while handling.

    Interruptions (KeyboardInterrupt, SystemExit) are never converted: they are not the user's input.
    """
    if not isinstance(error, Exception):
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def broken_link(path: str | Path) -> str | None:
    """``"<path> is a broken link (to <target>)"`` when ``path`` is a symbolic link whose target does
    not exist, else None: the start of the message every caller completes with its own fix."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken link (to {os.readlink(path)})"
    return None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes that were killed mid-way in ``folder``; return them.

    Only files named like :func:`atomic_write`'s temporaries (``.<name>.<random>.tmp``) are touched.
    Call it only where no other process is writing into ``folder`` at the same time.
    """
    removed = []
    for candidate in Path(folder).glob(f".*{TEMPORARY_SUFFIX}"):
        if _TEMPORARY_NAME.fullmatch(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (NaN written as null, which every reader accepts)."""
    text = json.dumps(_nan_to_none(data), indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_torch(path: str | Path, obj: Any) -> Path:
    """Atomically ``torch.save`` ``obj``."""
    import torch  # here, so that the JSON and text writers load no torch (predict.py --help)

    return atomic_write(path, lambda f: torch.save(obj, f))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
