"""Every error the engine raises on purpose, in one place.

Each message says what is wrong and what to change; the ``ijepa-fast`` command prints it as one
line (no traceback) and exits with status 2 (1 for ``MachineError``, 3 for ``TrainingStopped``).
Library users can catch ``IJEPAFastError`` for all of them.
"""
from __future__ import annotations


class IJEPAFastError(Exception):
    """Base of the errors below."""


class ConfigError(IJEPAFastError, ValueError):
    """A bad configuration key or value; the message names the key."""


class CheckpointError(IJEPAFastError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file that cannot be read at all (empty, torn, not a checkpoint, unsafe)."""


class DataError(IJEPAFastError, RuntimeError):
    """A data source that cannot be used (missing, empty, unreadable); the message says which."""


class RunFolderError(IJEPAFastError, OSError):
    """A run folder that cannot be written, or has no room for a checkpoint; the message says which."""


class TrainingStopped(IJEPAFastError, RuntimeError):
    """The run stopped on purpose (a non-finite loss or gradient); the last good checkpoint is intact."""


class RunFolderBusy(RunFolderError):
    """Another process holds the run folder's lock; the message names it."""


class MachineError(IJEPAFastError, OSError):
    """A failure of the machine rather than of the input (a full disk, an I/O error); exit status 1."""
