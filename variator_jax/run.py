"""A training run's workdir, owned by one object: `Run`.

What a run keeps in `WORKDIR`, and who writes it (everything here, but the checkpoints' and
outputs' contents):
- `.lock`: an advisory `fcntl` lock held while a run trains (`lock`). The kernel drops it
  when the process dies (SIGKILL included), so nothing is left to clean up; a second run on
  a busy workdir stops at once with one line naming the holder. flock is per host: on a
  filesystem shared by several hosts only process 0 of a job takes it. The lock yields
  `still_ours()`: a workdir deleted (and perhaps recreated by a new run) while a run held it
  no longer has the lock file the run opened, and the run must not write into it any more.
- `run.json`: the run's identity (stage, task, plugin shape, backbone fingerprint). A
  workdir holding another run is refused before anything in it is touched (`check_identity`).
- `config.json`: the config the run trains with. On resume the fields that change the result
  (all but `HARMLESS`) are compared with it: a changed one is refused unless named in
  `override`, and then recorded in `changes.jsonl` as a change at the resumed step.
- `data.json`: a fingerprint of each data source (`integrity.source_fingerprint`). A resume
  on edited data is refused naming the file, unless `accept_data_change`; an accepted change
  goes to `changes.jsonl` too.
- `diverged.json`: written when training stops on a non-finite value; a rerun with the same
  result-changing config would diverge the same way, so it is refused with what to change.
- `result.json`: written last, once the outputs are exported: its presence means "done".
- `checkpoints/`: the `checkpoint.Checkpointer` (orbax, with manifests), made by the Run.

Nothing is written until a start is accepted (`Run.accept`): a refused start leaves the
workdir as it was.

Example:
  >>> done = finished_result(workdir, config)        # a finished run: its result, or None
  >>> with Run.open(workdir, config, identity, override={"lr"}) as run:  # locked, checked
  ...     run.accept(step)                            # run.json, config.json, data.json
  ...     run.still_ours(); run.checkpointer.save(step, state, data_state)
  ...     run.finish(result)                          # result.json, last
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable

import jax

from variator_jax import integrity
from variator_jax.checkpoint import CHECKPOINT_DIR, Checkpointer, finished_steps
from variator_jax.errors import (
    DataChanged,
    RecordMismatch,
    UserError,
    WorkdirBusy,
    WorkdirMismatch,
    WorkdirReplaced,
    user_errors,
)
from variator_jax.fileio import atomic_write, flatten, write_json, write_text
from variator_jax.progress import say

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
CHANGES_FILE = "changes.jsonl"
DIVERGED_FILE = "diverged.json"
DATA_FILE = "data.json"
RESULT_FILE = "result.json"
OUTPUTS = ("plugin", "backbone")  # An objective's export, `WORKDIR/OUTPUT`.

# Config fields that do not change what is trained (a resume may change them freely):
# progress reports, checkpointing, evaluation, the device layout, how layers are laid out and
# rematerialised (a checkpoint resumes across `scan_layers`), which attention implementation
# computes the same softmax (`attention`: blocked on CPU, cuDNN on a GPU), and paths whose
# content is identified otherwise (the backbone by its fingerprint in run.json; the initial
# plugin is read only at step 0; a stage-0 config has its own workdir and record).
HARMLESS = ("log_every", "eval_every", "eval_batch_size", "checkpoint_every",
            "keep_checkpoints", "eval", "mesh", "backbone", "variant", "init_plugin",
            "backbone_stage", "data.data_dir", "divergence_factor", "scan_layers", "remat",
            "attention")


# ================================================================================================
# The run, one object
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class Run:
    """A workdir locked for one training run, its start checked (`Run.open`).

    `identity`: what `run.json` holds; `record`: the config as JSON (`config.json`);
    `changes`: the accepted changes of a resume ({field: (old, new)}); `sources`: the data
    fingerprints (`data.json`); `checkpointer`: the run's orbax checkpoints.
    All processes hold a Run; only process 0 writes its files.
    """
    workdir: str
    identity: dict
    record: dict
    changes: dict
    sources: dict
    checkpointer: Checkpointer
    still_ours: Callable[[], None]  # Raises WorkdirReplaced once the workdir is another's.

    @classmethod
    @contextlib.contextmanager
    def open(cls, workdir: str, config, identity: dict, override=(),
             accept_data_change: bool = False):
        """Locks `workdir` (process 0) and checks, before anything is written, that a start
        there is sound: the same run (`identity`), not a rerun of a diverged one, a resume
        whose result-changing fields and data are unchanged or accepted (`override`,
        `accept_data_change`). Yields the Run; closes its checkpointer on the way out.

        Raises `WorkdirBusy`, `WorkdirMismatch`, `RecordMismatch` or `DataChanged` (each a
        one-line `UserError`)."""
        workdir = os.path.abspath(workdir)
        with _process_lock(workdir) as still_ours:
            with user_errors(""):  # An unreadable record or data file: one line too.
                check_identity(workdir, identity)  # Again, now that no one else writes.
                record = json.loads(config.to_json_best_effort())
                check_diverged(workdir, record)
                resume_step = max(finished_steps(workdir), default=0)
                changes = check_record(workdir, record, resume_step, override)
                sources = {f"data.{name}": integrity.source_fingerprint(config.data[name])
                           for name in ("train", "eval") if config.data.get(name)}
                changes.update(check_data(workdir, sources, resume_step, accept_data_change,
                                          override))
            checkpointer = Checkpointer(workdir, config.keep_checkpoints)
            try:
                yield cls(workdir, identity, record, changes, sources, checkpointer,
                          still_ours)
            finally:
                checkpointer.close()

    def accept(self, step: int) -> None:
        """The start from `step` is accepted (a checkpoint restored, or a fresh state made):
        only now are `run.json`, `config.json` (+ `changes.jsonl`) and `data.json` written,
        so that a refused start leaves no trace. Extending a finished run keeps its outputs
        and result aside, as `plugin_stepN`, `result_stepN.json`."""
        if jax.process_index() != 0:
            return
        if read_identity(self.workdir) is None:
            write_json(self.workdir, RUN_FILE, self.identity)
        write_record(self.workdir, json.dumps(self.record, indent=2) + "\n", self.changes, step)
        write_data(self.workdir, self.sources)
        if 0 < step < self.record["total_steps"]:
            _keep_outputs_aside(self.workdir, step)

    def finish(self, result: dict) -> None:
        """Writes `result.json` (process 0), after the outputs: it means "this run is done"."""
        if jax.process_index() == 0:
            self.still_ours()
            write_json(self.workdir, RESULT_FILE, result)

    def mark_diverged(self, step: int, last_good: int | None, what: str) -> None:
        """Writes `diverged.json` (process 0): a rerun with this very config is refused."""
        if jax.process_index() == 0:
            mark_diverged(self.workdir, self.record, step, last_good, what)


@contextlib.contextmanager
def _process_lock(workdir: str):
    """The workdir's lock, held by process 0; yields the check that the workdir is still the
    one locked (a no-op where this process holds no lock, and in a multi-process run, whose
    processes must all save together)."""
    if jax.process_index() != 0:
        yield lambda: None
        return
    with lock(workdir) as still_ours:
        yield still_ours if jax.process_count() == 1 else (lambda: None)


def _keep_outputs_aside(workdir: str, step: int) -> None:
    """A finished run extended from `step`: its outputs and result are renamed, not lost."""
    try:  # The step the outputs are from (a corrupt final checkpoint may resume earlier).
        finished = int(read_json(os.path.join(workdir, RESULT_FILE))["step"])
    except (ValueError, TypeError, KeyError):
        finished = step
    for name in (*OUTPUTS, RESULT_FILE):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            stem, ext = os.path.splitext(name)
            kept = os.path.join(workdir, f"{stem}_step{finished}{ext}")
            os.replace(path, kept)
            say(f"Extending the run finished at step {finished}: its {name} is kept as {kept}")


def finished_result(workdir: str, config) -> dict | None:
    """The saved result of a run in `workdir` that already reached `config.total_steps` with
    its outputs, else None. Raises `UserError` if it finished with another config (its
    result is not this config's result)."""
    try:
        result = read_object(os.path.join(workdir, RESULT_FILE))
    except ValueError:
        return None  # Unreadable: train (resuming from the checkpoints) and write it anew.
    if result is None:
        return None
    out = result.get("plugin_dir") or result.get("backbone_dir")
    if result.get("step") != config.total_steps or not out or not os.path.isdir(out):
        return None
    with user_errors(""):
        saved = read_json(os.path.join(workdir, CONFIG_FILE))
    if isinstance(saved, dict):
        changes = result_changes(saved, json.loads(config.to_json_best_effort()))
        if changes:
            raise UserError(f"{workdir} holds a run finished at step {result['step']} with "
                            f"another config: {describe(changes)}; use another --workdir (or "
                            "extend this run: a larger total_steps and --override)")
    return result


# ================================================================================================
# The lock
# ================================================================================================
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


# ================================================================================================
# The identity (run.json)
# ================================================================================================
def read_identity(workdir: str) -> dict | None:
    """`run.json`, or None if there is none; `WorkdirMismatch` if it is unreadable."""
    # An object: its fields are compared one by one (check_identity).
    return read_object(os.path.join(workdir, RUN_FILE), WorkdirMismatch,
                       "this workdir's run cannot be identified, use another --workdir")


def check_identity(workdir: str, identity: dict) -> None:
    """Raises `WorkdirMismatch` if `workdir` holds a run with another identity (a JSON-able
    dict: stage, task, plugin shape, backbone fingerprint, ...). Writes nothing."""
    saved = read_identity(workdir)
    if saved is None:
        ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
        if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
            raise WorkdirMismatch(f"{workdir} has checkpoints but no {RUN_FILE}: not a run "
                                  "this trainer can resume; use another --workdir")
        return
    mine, theirs = flatten(json.loads(json.dumps(identity))), flatten(saved)
    diffs = [f"{k}={theirs.get(k)!r} (this config: {mine.get(k)!r})"
             for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diffs:
        raise WorkdirMismatch(f"{workdir} holds another run: {'; '.join(diffs[:3])}"
                              f"{' ...' if len(diffs) > 3 else ''}. Use another --workdir, or "
                              "delete this one to start over")


# ================================================================================================
# The config record (config.json, changes.jsonl) and the data (data.json)
# ================================================================================================
def _harmless(field: str) -> bool:
    return any(field == h or field.startswith(h + ".") for h in HARMLESS)


def read_json(path: str, error: type[ValueError] = ValueError,
              advice: str = "fix or remove it"):
    """The parsed file, or None if there is none; a one-line `error` if unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable ({type(e).__name__}: {e}); {advice}") from None


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


def read_object(path: str, error: type[ValueError] = ValueError,
                advice: str = "fix or remove it") -> dict | None:
    """`read_json` of a file that must hold a JSON object."""
    saved = read_json(path, error, advice)
    if saved is not None and not isinstance(saved, dict):
        raise error(f"{path}: not a JSON object (a {type(saved).__name__}); {advice}")
    return saved


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
    if not resume_step:
        return {}
    saved = read_object(os.path.join(workdir, CONFIG_FILE))
    if saved is None:
        return {}
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
    saved = read_object(os.path.join(workdir, DATA_FILE)) if resume_step else None
    if saved is None:
        return {}
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
    write_json(workdir, DATA_FILE, sources)


def write_record(workdir: str, config_json: str, changes: dict, step: int) -> None:
    """Writes `config.json` (the accepted config) and appends each accepted change to
    `changes.jsonl` as a change at `step`; clears a divergence mark (a start was accepted)."""
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


# ================================================================================================
# Divergence (diverged.json)
# ================================================================================================
def mark_diverged(workdir: str, config: dict, step: int, last_good: int | None,
                  what: str) -> None:
    record = {"step": step, "last_good": last_good, "what": what, "config": config}
    write_json(workdir, DIVERGED_FILE, record)


def check_diverged(workdir: str, config: dict) -> None:
    """Refuses a rerun of a diverged run with an unchanged result-changing config (it would
    diverge again, the same way). `write_record` clears the mark once a start is accepted."""
    record = read_json(os.path.join(workdir, DIVERGED_FILE))
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
