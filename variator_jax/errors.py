"""The errors a user sees as one line: bad input, a workdir that refuses a run, divergence.

`UserError` is bad input (config, paths, data); the workdir's refusals (run.py) are
`UserError`s too, and so are divergence and interruption. `CheckpointError`: a checkpoint
that cannot be read; `describe_os_error`: the one line an OS error becomes. Imports nothing
of the package but fileio, so that every module may import it."""
from __future__ import annotations

import contextlib
import errno

from variator_jax import fileio


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a T5 (the message names the file and the problem)."""


class UserError(Exception):
    """A problem with the user's input (config, paths, data, workdir); `train.py` prints its
    one-line message and exits non-zero, without a traceback."""


class WorkdirBusy(UserError):
    """Another live process holds the workdir's lock."""


class WorkdirReplaced(UserError):
    """The workdir a run holds was removed or replaced while it ran."""


class WorkdirMismatch(UserError):
    """The workdir holds a different run (another ratio, backbone, stage or task), or one
    whose `run.json` cannot be read."""


class RecordMismatch(UserError):
    """A resume with result-changing fields that differ from the run's config.json."""


class DataChanged(RecordMismatch):
    """A resume on a data source whose content changed since the run began."""


class NonFiniteLoss(UserError):
    """Training diverged; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int = 0, last_good: int | None = None,
                 what: str = ""):
        super().__init__(message)
        self.step, self.last_good, self.what = step, last_good, what


class Interrupted(UserError):
    """SIGINT or SIGTERM: a checkpoint was saved, the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# Exceptions that, raised while reading the user's config, files and data, mean bad input.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError, CheckpointError, KeyError)


@contextlib.contextmanager
def user_errors(what: str):
    """Turns bad-input exceptions raised inside into a one-line `UserError` ("WHAT: msg")."""
    try:
        yield
    except UserError:
        raise
    except _INPUT_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: {msg}" if what else msg) from None


def check_writable(path: str, need_bytes: int = 0) -> None:
    """`fileio.check_writable` as a one-line `UserError` naming the path ("PATH: Read-only
    file system; use a writable directory"): checked before training or evaluating, so that
    a read-only or full disk stops the command at once, not after the work is done."""
    try:
        fileio.check_writable(path, need_bytes)
    except OSError as e:
        raise UserError(describe_os_error(e)) from None


# What to do about an OS error, by errno: the path, the OS's words and this make the line.
_OS_HINTS = {
    errno.ENOSPC: "free some space, or use another directory",
    errno.EDQUOT: "free some space, or use another directory",
    errno.EFBIG: "a file-size limit (ulimit -f) stopped the write",
    errno.EROFS: "use a writable directory",
    errno.EACCES: "use a path you may read and write",
    errno.EPERM: "use a path you may read and write",
}


def describe_os_error(e: OSError) -> str:
    """`PATH: strerror; what to do` (one line); the path is the one the OS named."""
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{where} -> {e.filename2}"
    text = f"{where}: {e.strerror}" if where else e.strerror
    hint = _OS_HINTS.get(e.errno)
    return f"{text}; {hint}" if hint else text
