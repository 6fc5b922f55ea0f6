"""The one exception type that means "the user gave us something we cannot use"."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

# How torch's DataLoader re-raises an exception from a worker process: it builds a new one of the
# same type whose message is this header, then the worker's whole traceback.
_WORKER_HEADER = "Caught UserError in DataLoader worker"


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, paths).

    The scripts print it as a single line, ``error: <message>``, and exit with code 2.
    The message must say what is wrong and how to fix it, in one sentence or two.

    When a DataLoader worker raised it (e.g. an image that turns out to be truncated only when
    decoded), torch re-creates it in the main process with the worker's traceback as message;
    the original one-line message is recovered here, and the traceback kept as a note so that
    ``--debug`` still shows where in the worker it happened.
    """

    def __init__(self, message: str = "") -> None:
        text = str(message)
        original = _worker_message(text)
        super().__init__(text if original is None else original)
        if original is not None:
            self.add_note(text)


def _worker_message(text: str) -> str | None:
    """The original message inside a DataLoader worker's re-raised text, or None if it is not one."""
    if not text.startswith(_WORKER_HEADER):
        return None
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    lines = text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(marker):
            return " ".join([lines[i][len(marker):], *(line.strip() for line in lines[i + 1:])])
    return None


def run_command(argv: Sequence[str], usage: str, work: Callable[[list[str]], str | None],
                interrupted: str = "interrupted: rerun the same command to continue") -> int:
    """Run a command-line program and return its exit code, the one way every script ends.

    ``-h``/``--help`` prints ``usage``. Otherwise ``work`` gets the arguments without ``--debug``
    and returns its closing line (printed) or None. A UserError becomes ``error: <message>`` on
    stderr and exit code 2 (with ``--debug`` it is re-raised, for the traceback); Ctrl-C prints
    ``interrupted`` and gives 130.
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(usage)
        return 0
    try:
        closing = work([a for a in argv if a != "--debug"])
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    if closing:
        print(closing)
    return 0
