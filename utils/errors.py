"""The one exception type that means "the user gave us something we cannot use"."""
from __future__ import annotations

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
