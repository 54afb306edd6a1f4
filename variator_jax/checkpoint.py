"""Checkpoints of a training run: orbax `CheckpointManager` under `WORKDIR/checkpoints`.

A checkpoint holds what a resumed run needs to continue exactly as an unbroken one
(docs/DESIGN.md §5): the train state (trainable parameters, optimizer state, step, RNG) and the
data position (a small JSON dict). The frozen backbone is never saved: it is referenced by
its identity in `WORKDIR/run.json`, which also pins the plugin's shape (run.py owns that
file, and makes the run's Checkpointer).

orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact (and the temporary one is removed on
the next start). Once a save has completed, a manifest of its files' SHA-256
(`integrity.write_manifest`) is written into it; `restore_latest` checks it first, and a
corrupt newest checkpoint is named, moved to `WORKDIR/checkpoints_corrupt/` (kept, not
deleted) and the previous one restored instead.

Example:
  >>> ckpt = Checkpointer(workdir, keep=3)
  >>> ckpt.save(100, state, data_iterator.get_state())
  >>> state, data_state = ckpt.restore(ckpt.latest_step(), abstract_state)
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from variator_jax import integrity, sharding, stacking
from variator_jax.fileio import get_path, set_path

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
_UNCOMMITTED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class RestoreError(ValueError):
    """A checkpoint exists but cannot be read back."""


def finished_steps(workdir: str) -> list[int]:
    """Steps of the checkpoints orbax has committed in `workdir` (no orbax manager needed)."""
    root = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(s) for s in os.listdir(root) if s.isdigit()
                  and os.path.exists(os.path.join(root, s, "_CHECKPOINT_METADATA")))


def uncommitted_steps(workdir: str) -> list[int]:
    """Steps whose save was begun and never committed (orbax's `N.orbax-checkpoint-tmp*`)."""
    root = os.path.join(workdir, CHECKPOINT_DIR)
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted({int(m.group(1)) for m in map(_UNCOMMITTED.match, names) if m})


@contextlib.contextmanager
def _absl_quiet():
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


# -- Checkpoints ------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores (train state, data state) pairs under `workdir/checkpoints`.

    `save` returns once the checkpoint is committed (orbax writes in a background thread;
    waiting for it makes a failed save stop the run at its step). All processes must call
    every method.
    """

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        # Steps a run stopped while saving: orbax removes their temporary directories when
        # the manager opens, and a resume from an older step must say why.
        self.uncommitted = uncommitted_steps(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                               cleanup_tmp_directories=True)
        with _absl_quiet():  # A corrupt step's metadata is reported by `restore`.
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        with _absl_quiet():
            return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        # orbax's save waits for the previous one anyway: wait here, so that its manifest
        # (and any error of its background write) comes first.
        self.wait()
        # Save a private copy: the train step donates `state`, and on CPU orbax's "copy to
        # host" can be a view of the very buffer the next step overwrites while the save is
        # still being written in the background.
        state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        # Quiet: orbax warns when the wait above was long, which `wait` has already done.
        with _save_errors(self.directory, step), _absl_quiet():
            self._manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
            # Wait for the write: a save that fails (a full disk, a file-size limit) stops
            # the run at its own step, not steps later when the background write gives up,
            # and no step runs ahead of the last checkpoint. Costs the write's time.
            self._manager.wait_until_finished()
        self._write_manifests()

    def check_for_errors(self) -> None:
        """Raises `SaveError` if a background save has failed (a full disk, say), so that
        training stops at once instead of running on without checkpoints."""
        with _save_errors(self.directory, None):
            self._manager.check_for_errors()

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_manifests(self) -> None:
        """A manifest in every finished checkpoint that lacks one (process 0)."""
        if jax.process_index() != 0:
            return
        for step in self._manager.all_steps():
            path = self._step_dir(step)
            if os.path.isdir(path) and not integrity.has_manifest(path):
                with _save_errors(self.directory, step):
                    integrity.write_manifest(path)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`abstract_state`: the state's tree of `jax.ShapeDtypeStruct`s with shardings; the
        restored arrays come back with exactly those shardings."""
        where = self._step_dir(step)
        problem = integrity.verify_manifest(where)
        if problem:
            raise RestoreError(f"checkpoint {where} cannot be restored: {problem} (corrupt); "
                               "delete that directory to resume from an earlier checkpoint, or "
                               "use another --workdir")
        try:
            with _absl_quiet():  # orbax logs each failure itself; we report it once, below.
                saved = _saved_tree(os.path.join(where, "state"))
                relayout = saved is not None and set(_named_leaves(saved)) != set(
                    _named_leaves(abstract_state))
                # Another layer layout (the other `scan_layers`, or from before layers were
                # scanned): read it as it was saved, on the host, then convert (stacking.py).
                target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved) \
                    if relayout else abstract_state
                restored = self._manager.restore(int(step), args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            state = _relayout(restored.state, abstract_state) if relayout else restored.state
        except Exception as e:  # orbax, tensorstore and json each raise their own types.
            raise RestoreError(
                f"checkpoint {where} cannot be restored ({_clean(e)}); "
                "delete that directory to resume from an earlier checkpoint, or use another "
                "--workdir") from None
        if not isinstance(restored.data, dict):
            raise RestoreError(f"checkpoint {where} has no data position; delete it or use "
                               "another --workdir")
        return state, restored.data

    def restore_latest(self, abstract_state: Any, say: Callable[[str], None] = print
                       ) -> tuple[int, Any, dict] | None:
        """Restores the newest checkpoint that passes its checks -> (step, state, data
        state), or None if there is none. A newer one that fails is named (`say`) and moved
        to `WORKDIR/checkpoints_corrupt/STEP`; if no earlier one is left, its RestoreError
        is raised instead and it stays where it is."""
        steps = sorted(self._manager.all_steps())
        while steps:
            step = steps.pop()
            try:
                return (step,) + self.restore(step, abstract_state)
            except RestoreError as e:
                if not steps:
                    raise
                aside = self.set_aside(step, CORRUPT_DIR)
                detail = str(e).split(" cannot be restored", 1)[-1].split("; delete", 1)[0]
                say(f"checkpoint {self._step_dir(step)} cannot be restored{detail}; moved to "
                    f"{aside}; falling back to step {steps[-1]}")
        return None

    def set_aside(self, step: int, folder: str) -> str:
        """Moves checkpoint `step` out of orbax's sight, to `WORKDIR/FOLDER/STEP` (kept for
        inspection, never deleted) -> that path. All processes call it."""
        aside = os.path.join(os.path.dirname(self.directory), folder, str(step))
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):
                shutil.rmtree(aside)
            os.replace(self._step_dir(step), aside)
        _sync("variator_jax:set_aside")
        self._manager.reload()
        return aside

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        with _save_errors(self.directory, None):
            self._manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _saved_tree(path: str):
    """The saved state's tree of orbax `ArrayMetadata` (shape, dtype), or None if unreadable
    (the restore itself then reports why)."""
    try:
        return ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    except Exception:  # A missing or corrupt metadata file: left to the restore to report.
        return None


def _key_name(k):
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey.
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _named_leaves(tree) -> dict:
    """{(key names...): leaf}: a train state, its orbax metadata and a restored tree name
    their leaves alike (a dataclass field, a dict key, a tuple or list index)."""
    return {tuple(map(_key_name, path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(named: dict) -> dict:
    out = {}
    for path, leaf in named.items():
        set_path(out, path, leaf)
    return out


def _relayout(saved, abstract_state):
    """A state restored in another layer layout (numpy leaves) -> `abstract_state`'s tree,
    layout and shardings."""
    wanted = _named_leaves(abstract_state)
    tree = stacking.relayout(_nested(_named_leaves(saved)), _nested(wanted), np.stack)
    leaves = []
    for path, like in wanted.items():
        leaf = get_path(tree, path)
        if np.shape(leaf) != tuple(like.shape):
            raise ValueError(f"{'/'.join(map(str, path))} has shape {np.shape(leaf)}, this run "
                             f"expects {tuple(like.shape)}")
        leaves.append(np.asarray(leaf, like.dtype))
    treedef = jax.tree.structure(abstract_state)
    return sharding.put_global(jax.tree.unflatten(treedef, leaves),
                               jax.tree.map(lambda a: a.sharding, abstract_state))


class SaveError(OSError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


def _clean(e: BaseException) -> str:
    """The innermost reason of an error (orbax wraps tensorstore's), first line only, without
    the object reprs orbax appends, at most 300 characters."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"\s*See full TensorStore details.*|<bound method.*|<[^<>]*>", "", text)
    return f"{type(e).__name__}: {text[:300]}"


def _errno_text(e: BaseException) -> str:
    """The OS error behind `e`, if any (orbax wraps them; tensorstore quotes them)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"No space left on device|Permission denied|Read-only file system|"
                      r"Disk quota exceeded|File too large", str(e))
    return match.group(0) if match else _clean(e)


@contextlib.contextmanager
def _save_errors(directory: str, step: int | None):
    try:
        yield
    except SaveError:
        raise
    except Exception as e:  # orbax's background errors come back with its own types.
        what = f"checkpoint {step}" if step is not None else "a checkpoint"
        raise SaveError(f"cannot save {what} in {directory}: {_errno_text(e)}; the checkpoints "
                        "saved before are intact: fix this and run the same command to "
                        "resume") from None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
