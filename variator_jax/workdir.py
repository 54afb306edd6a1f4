"""One run per workdir, and a record of what it was run with.

- `lock(workdir)`: an advisory `fcntl` lock on `WORKDIR/.lock`, held while a run trains.
  The kernel drops it when the process dies (SIGKILL included), so nothing is ever left to
  clean up; a second run on a busy workdir stops at once with one line naming the holder.
  (flock is per host: on a network filesystem shared by several hosts, only process 0 of a
  multi-host job takes it, and two jobs on two hosts are not excluded by it.)
  The lock yields a check, `still_ours()`: a workdir deleted (and perhaps recreated by a new
  run) while a run held it no longer has the lock file the run opened, and the run must not
  write its checkpoints or results into a directory that is now another run's.
- The run record: `WORKDIR/config.json` is the config the run is trained with, written only
  once a start is accepted. On resume, the fields that change the result (everything but
  logging, checkpointing, evaluation, the mesh and paths) are compared with it: a changed
  one is refused, unless named in `override`, in which case it is recorded in
  `WORKDIR/changes.jsonl` as a change at the resumed step.
- `WORKDIR/data.json`: a fingerprint of each data source (`integrity.source_fingerprint`),
  written with the record. A resume on a source whose files changed (a corpus edited in
  place) is refused naming the file, unless `accept_data_change` (`--accept_data_change`),
  and an accepted change is recorded in `changes.jsonl` as well.
- `WORKDIR/diverged.json`: written when training stops on a non-finite value; a rerun with
  the same result-changing config would diverge the same way, so it is refused with what to
  change.

Example:
  >>> with lock(workdir):
  ...     changes = check_record(workdir, config_dict, resume_step=10, override={"lr"})
  ...     write_record(workdir, config_json, changes, step=10)
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket

from variator_jax.fileio import atomic_write, flatten, write_text

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHANGES_FILE = "changes.jsonl"
DIVERGED_FILE = "diverged.json"
DATA_FILE = "data.json"  # Fingerprints of the data sources the run trains and evaluates on.

# Config fields that do not change what is trained (a resume may change them freely):
# reporting, checkpointing, evaluation, the device layout, how layers are laid out and
# rematerialised (a checkpoint resumes across `scan_layers`), which attention implementation
# computes the same softmax (`attention`: blocked on CPU, cuDNN on a GPU), and paths whose content is
# identified otherwise (the backbone by its fingerprint in run.json; the initial plugin is
# read only at step 0; a stage-0 config has its own workdir and record).
HARMLESS = ("log_every", "eval_every", "eval_batch_size", "checkpoint_every",
            "keep_checkpoints", "eval", "mesh", "backbone", "variant", "init_plugin",
            "backbone_stage", "data.data_dir", "divergence_factor", "scan_layers", "remat",
            "attention")


class WorkdirBusy(ValueError):
    """Another live process holds the workdir's lock."""


class WorkdirReplaced(ValueError):
    """The workdir a run holds was removed or replaced while it ran."""


class RecordMismatch(ValueError):
    """A resume with result-changing fields that differ from the run's config.json."""


class DataChanged(RecordMismatch):
    """A resume on a data source whose content changed since the run began."""


# -- The lock -----------------------------------------------------------------------------------
@contextlib.contextmanager
def lock(workdir: str):
    """Holds `WORKDIR/.lock` (creating the workdir) for the body, which gets `still_ours`:
    it raises `WorkdirReplaced` once the lock file is no longer the one held (the workdir was
    removed or recreated). Raises `WorkdirBusy` naming the holder's PID if another process
    holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = (f"PID {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
                   if holder else "another process")
            raise WorkdirBusy(f"workdir {workdir} is in use by {who}: one run per workdir; wait "
                              "for it to end, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        held = os.fstat(fd)

        def still_ours() -> None:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise WorkdirReplaced(
                    f"workdir {workdir} was removed or replaced while this run (PID "
                    f"{os.getpid()}) held it; nothing more is written there: run the command "
                    "again to start or resume in it")

        yield still_ours
    finally:
        os.close(fd)  # Closing drops the lock (and so does dying).


# -- The run record -----------------------------------------------------------------------------
def _harmless(field: str) -> bool:
    return any(field == h or field.startswith(h + ".") for h in HARMLESS)


def read_json(path: str):
    """The parsed file, or None if there is none; a one-line ValueError if unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); fix or remove it"
                         ) from None


def result_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{field: (old value, new value)} over the result-changing fields of two config dicts."""
    a, b = flatten(old), flatten(new)
    # A field only one side has is a field added (or dropped) by another version of this
    # code, not a change the user made: an upgrade must not block resuming.
    return {k: (a[k], b[k]) for k in sorted(set(a) & set(b))
            if not _harmless(k) and a[k] != b[k]}


def describe(changes: dict, limit: int = 3) -> str:
    parts = [f"{k} {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:limit]]
    return "; ".join(parts) + (" ..." if len(changes) > limit else "")


def check_record(workdir: str, config: dict, resume_step: int, override=()) -> dict:
    """Compares `config` (a JSON-able dict) with the run's `config.json` before a resume
    from `resume_step` (0: a fresh start, anything goes). -> the accepted changes.

    Raises `RecordMismatch` for a changed result-changing field not in `override`, and for a
    `total_steps` below the step the run has already reached. Writes nothing.
    """
    total = config.get("total_steps")
    if resume_step and isinstance(total, int) and total < resume_step:
        raise RecordMismatch(f"{workdir} is already at step {resume_step}; total_steps "
                             f"{total} would discard that: use another --workdir, or a "
                             f"total_steps >= {resume_step}")
    saved = read_json(os.path.join(workdir, CONFIG_FILE))
    if not resume_step or saved is None:
        return {}
    if not isinstance(saved, dict):
        raise ValueError(f"{os.path.join(workdir, CONFIG_FILE)} is not a JSON object; fix or "
                         "remove it")
    changes = result_changes(saved, config)
    refused = {k: v for k, v in changes.items() if k not in set(override)}
    if refused:
        names = ",".join(refused)
        raise RecordMismatch(
            f"{workdir} was trained to step {resume_step} with another config: "
            f"{describe(refused)}. Resuming with it would change the run mid-way: pass "
            f"--override={names} to accept and record that, or use another --workdir")
    unknown = sorted(set(override) - set(changes) - set(flatten(config)))
    if unknown:
        raise RecordMismatch(f"--override names {unknown[0]!r}, not a config field")
    return changes


def check_data(workdir: str, sources: dict, resume_step: int, accept: bool = False,
               override=()) -> dict:
    """Compares `sources` ({"data.train": fingerprint, ...}) with `WORKDIR/data.json` before a
    resume from `resume_step` -> the accepted changes ({"data.train content": (old, new)}).

    Raises `DataChanged` naming the file that changed and the flag that accepts it, unless
    `accept` or the source's field is in `override` (another source, changed knowingly).
    A workdir without the file (older runs) resumes as before. Writes nothing."""
    from variator_jax import integrity
    path = os.path.join(workdir, DATA_FILE)
    saved = read_json(path)
    if not resume_step or saved is None:
        return {}
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a JSON object; fix or remove it")
    changes = {}
    for field, now in sources.items():
        before = saved.get(field)
        what = integrity.source_change(before, now) if isinstance(before, dict) else None
        if what is None:
            continue
        if not accept and field not in set(override):
            raise DataChanged(
                f"{field}: {what} since this run began; it trained to step {resume_step} on "
                "the old data, and resuming would train on both: pass --accept_data_change "
                "to accept and record that, or use another --workdir")
        changes[f"{field} content"] = (before, now)
    return changes


def write_data(workdir: str, sources: dict) -> None:
    atomic_write(workdir, DATA_FILE, lambda tmp: write_text(tmp, json.dumps(sources, indent=2)
                                                            + "\n"))


def write_record(workdir: str, config_json: str, changes: dict, step: int) -> None:
    """Writes `config.json` (the accepted config) and appends each accepted change to
    `changes.jsonl` as a change at `step`."""
    if changes:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
            for field, (old, new) in changes.items():
                f.write(json.dumps({"step": step, "field": field, "from": old, "to": new,
                                    "time": when}) + "\n")
    atomic_write(workdir, CONFIG_FILE, lambda tmp: write_text(tmp, config_json))
    if os.path.exists(os.path.join(workdir, DIVERGED_FILE)):
        os.remove(os.path.join(workdir, DIVERGED_FILE))


def read_changes(workdir: str) -> list[dict]:
    path = os.path.join(workdir, CHANGES_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


# -- Divergence -------------------------------------------------------------------------------
def mark_diverged(workdir: str, config: dict, step: int, last_good: int | None,
                  what: str) -> None:
    record = {"step": step, "last_good": last_good, "what": what, "config": config}
    atomic_write(workdir, DIVERGED_FILE,
                 lambda tmp: write_text(tmp, json.dumps(record, indent=2) + "\n"))


def check_diverged(workdir: str, config: dict) -> None:
    """Refuses a rerun of a diverged run with an unchanged result-changing config (it would
    diverge again, the same way). `write_record` clears the mark once a start is accepted."""
    path = os.path.join(workdir, DIVERGED_FILE)
    record = read_json(path)
    if record is None:
        return
    if isinstance(record, dict) and isinstance(record.get("config"), dict) and not \
            result_changes(record["config"], config):
        good = record.get("last_good")
        start = f"resuming from step {good}" if good else "starting over"
        how = " and add --override=lr to resume from it" if good else ""
        raise RecordMismatch(
            f"this run diverged at step {record.get('step')} ({record.get('what')}) with this "
            f"very config; {start} would diverge again. Lower config.lr (now "
            f"{config.get('lr')!r}){how}, or change the data")
