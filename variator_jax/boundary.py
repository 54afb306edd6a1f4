"""The one error boundary of every command: whatever a user does, one clear line or a result.

Every entry point (`variator-train`, `variator-eval`, `python -m variator_jax.convert`,
`python -m variator_jax.flops`, the benchmarks' mains) runs inside `guard`, which turns

  - `KeyboardInterrupt` (Ctrl-C)  -> the entry point's `interrupted()` line, exit 130;
  - `errors.Interrupted` (a signal the trainer caught and saved for) -> its line, 128 + signal;
  - `BrokenPipeError` (`variator-train --help | head -1`) -> a quiet exit, 141 as for SIGPIPE;
  - `OSError` (read-only, full disk, permissions, a file-size limit) -> one line naming the
    path and what to do;
  - bad input (`UserError`, `ValueError`, ...) -> its one-line message, exit 1;
  - anything else (a bug) -> one line naming the exception and how to see the traceback,

all on stderr as `error: ...` (interruptions without the prefix). A traceback reaches the
user only when asked for: `--debug` on any command line, or `VARIATOR_DEBUG=1`
(`VARIATOR_TRACEBACK=1`, the older name, too).

Example:
  >>> if __name__ == "__main__":
  ...     boundary.guard(main, interrupted=lambda: "interrupted; rerun the same command")
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from variator_jax.errors import CheckpointError, Interrupted, UserError, describe_os_error

DEBUG_ENV = "VARIATOR_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C.
EXIT_PIPE = 128 + signal.SIGPIPE  # 141, what `yes | head -1` reports for `yes`.



def debug_requested() -> bool:
    """A traceback was asked for (`--debug` taken by `guard`, or the environment)."""
    return bool(os.environ.get(DEBUG_ENV) or os.environ.get("VARIATOR_TRACEBACK"))


def _take_debug_flag() -> None:
    """Removes `--debug` from sys.argv (no parser knows it) and records it in the
    environment, so that child processes show their tracebacks too."""
    if DEBUG_FLAG in sys.argv[1:]:
        sys.argv[:] = [a for a in sys.argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"


def first_line(e: BaseException) -> str:
    """The informative line of an exception: absl and ml_collections wrap the cause in
    tracebacks and repr()s, whose last non-empty line is the message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def describe(e: BaseException) -> str:
    """The one line a user sees for `e` (without the `error: ` prefix)."""
    if isinstance(e, (UserError, CheckpointError)):
        return str(e)
    # SaveError & co. have no strerror: their text is the line.
    if isinstance(e, OSError) and e.strerror:
        return describe_os_error(e)
    if isinstance(e, (OSError, ValueError, KeyError, LookupError)):
        return first_line(e)
    return (f"internal error ({type(e).__name__}: {first_line(e)}); rerun with {DEBUG_FLAG} "
            f"(or {DEBUG_ENV}=1) for the traceback, and report it")


def say_error(line: str, prefix: str = "error: ") -> None:
    """Prints one line to stderr (whitespace collapsed), ignoring a closed stderr."""
    try:
        print(prefix + " ".join(str(line).split()), file=sys.stderr, flush=True)
    except OSError:
        pass


def _quiet_pipe() -> None:
    """stdout's reader has gone: point stdout at /dev/null, so that the interpreter's last
    flush at exit does not fail again (the Python docs' recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _WithoutClosedLoopNoise:
    """`sys.stderr` without the tracebacks of "RuntimeError: Event loop is closed".

    When a checkpoint save fails (a full disk), tensorstore's writes still in flight finish
    into the asyncio loop orbax has closed, and its C++ callbacks print each failure with
    `PyErr_Print`-style output on their own threads (past `sys.excepthook`), while the
    real error goes on as one line. Each thread's traceback block is held until its last
    line: dropped if it is that error, written out whole otherwise; other lines pass at once.
    """

    _NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        import threading
        self._stream, self._lock = stream, threading.Lock()
        self._partial: dict[int, str] = {}  # Per thread: the line being written.
        self._held: dict[int, list[str]] = {}  # Per thread: the traceback being written.

    def write(self, text: str) -> int:
        import threading
        me = threading.get_ident()
        with self._lock:
            pending = self._partial.pop(me, "") + text
            *lines, rest = pending.split("\n")
            for line in lines:
                self._line(me, line + "\n")
            if rest:
                self._partial[me] = rest
        return len(text)

    def _line(self, me: int, line: str) -> None:
        held = self._held.get(me)
        if held is None and line.startswith("Traceback (most recent call last):"):
            self._held[me] = [line]
        elif held is not None and line[:1] in (" ", "\t"):
            held.append(line)
        elif held is not None:
            del self._held[me]
            if line.strip() != self._NOISE:
                self._stream.write("".join(held) + line)
        else:
            self._stream.write(line)

    def flush(self) -> None:
        import threading
        with self._lock:
            me = threading.get_ident()
            if me not in self._held and me in self._partial:
                self._stream.write(self._partial.pop(me))
            self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's.
        return getattr(self._stream, name)


def _print_background_error(exc: BaseException, where: str) -> None:
    """An exception no caller can catch (a thread's, a library callback's) as one line."""
    say_error(f"{where}: {type(exc).__name__}: {first_line(exc)} (--debug for the traceback)",
              prefix="warning: ")


def _quiet_background_errors() -> None:
    """Tracebacks from outside the main flow, too, only when asked for (`debug_requested`):
    threads report through `threading.excepthook`, a library's callback through
    `sys.excepthook` (which nothing else reaches inside `guard`); each becomes one line."""
    import threading
    if debug_requested():
        return
    if not isinstance(sys.stderr, _WithoutClosedLoopNoise):
        sys.stderr = _WithoutClosedLoopNoise(sys.stderr)
    sys.excepthook = lambda kind, exc, tb: _print_background_error(exc, "in a callback")
    threading.excepthook = lambda args: _print_background_error(
        args.exc_value, f"in thread {getattr(args.thread, 'name', '?')}")


def guard(fn: Callable, *args, interrupted: Callable[[], str] | None = None):
    """`fn(*args)` inside the boundary (module docstring); returns what it returns.

    `interrupted()` gives the line for a Ctrl-C: where the work stopped and how to go on
    (say "interrupted at step 40; rerun the same command to resume")."""
    _take_debug_flag()
    _quiet_background_errors()
    try:
        result = fn(*args)
        sys.stdout.flush()  # A reader that went away shows here, not at interpreter exit.
        return result
    except SystemExit:
        raise
    except BrokenPipeError:
        _quiet_pipe()
        sys.exit(EXIT_PIPE)
    except KeyboardInterrupt:
        if debug_requested():
            raise
        say_error(interrupted() if interrupted else
                  "interrupted; nothing more was done: rerun the same command", prefix="")
        sys.exit(EXIT_INTERRUPTED)
    except Interrupted as e:  # The trainer saved a checkpoint first: not an error.
        say_error(str(e), prefix="")
        sys.exit(128 + e.signum)
    except Exception as e:
        if debug_requested():
            raise
        say_error(describe(e))
        sys.exit(1)
