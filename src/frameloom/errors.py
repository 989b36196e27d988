"""The one exception type the command line turns into a single clear line (and exit status 2)."""


class FrameloomError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where possible, how to fix it."""


class NotImplementedYet(FrameloomError):
    """A command of the contract that a later issue fills in."""
