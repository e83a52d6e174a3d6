"""The base of every error a user can fix by changing a setting, a file or the environment.

The CLI prints a `RetraceError` as one line (what went wrong, where, what to do) and exits non-zero;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class RetraceError(Exception):
    """A failure the message explains; raise a subclass named for where it comes from."""


class MissingPackage(RetraceError, ImportError):
    """An optional package is not installed; the message names the install command."""


class DataError(RetraceError, ValueError):
    """A data file or folder cannot be used as it is (a dataset folder the trainer cannot train
    on, an eval prompt file that cannot be read); the message names it and what to do."""
