"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, paths).

    The scripts print it as a single line, ``error: <message>``, and exit with code 2.
    The message must say what is wrong and how to fix it, in one sentence or two.
    """
