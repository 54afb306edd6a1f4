"""The errors a user sees as one line: bad input, a workdir that refuses a run, divergence.

`UserError` is bad input (config, paths, data); the workdir's refusals (run.py) are
`UserError`s too, and so are divergence and interruption."""
from __future__ import annotations

import contextlib

from variator_jax import boundary, fileio
from variator_jax.convert import CheckpointError


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
        raise UserError(boundary.describe_os_error(e)) from None
