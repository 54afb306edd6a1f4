"""The run's workdir (run.py): its identity, the lock, what a start writes and when, the result.

In process and without training: a `Run` over a config dict, a text file as its data."""
import json
import os
import shutil

import ml_collections
import pytest

from variator_jax import errors
from variator_jax import run as run_lib
from variator_jax.run import Run

IDENTITY = {"stage": "pretrain", "task": "pretrain", "plugin": {"ratio": 4, "bottleneck": 64},
            "backbone": {"d_model": 32, "fingerprint": "abc"}}


def _config(tmp_path, **fields):
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text("one document\n\nanother one\n")
    return ml_collections.ConfigDict(dict(
        {"total_steps": 4, "lr": 1e-3, "log_every": 2, "keep_checkpoints": 1,
         "data": {"train": f"text:{data}", "eval": ""}}, **fields))


def test_workdir_identity_is_checked_before_anything_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    run_lib.check_identity(workdir, IDENTITY)  # Fresh: fine, and still nothing there.
    assert not os.path.exists(workdir)
    with Run.open(workdir, _config(tmp_path), IDENTITY) as run:
        run.accept(0)
    run_lib.check_identity(workdir, json.loads(json.dumps(IDENTITY)))  # Same run: fine.
    other = dict(IDENTITY, plugin={"ratio": 2, "bottleneck": 64})
    with pytest.raises(errors.WorkdirMismatch, match=r"plugin.ratio=4 \(this config: 2\)"):
        run_lib.check_identity(workdir, other)
    with pytest.raises(errors.WorkdirMismatch, match=r"plugin.ratio=4 \(this config: 2\)"):
        with Run.open(workdir, _config(tmp_path), other):
            pass
    with open(os.path.join(workdir, run_lib.RUN_FILE)) as f:
        assert json.load(f) == IDENTITY  # Unchanged by the refused checks.


def test_checkpoints_without_a_run_file_are_refused(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "10")
    with pytest.raises(errors.WorkdirMismatch, match="no run.json"):
        run_lib.check_identity(str(tmp_path), IDENTITY)


def test_a_start_writes_nothing_until_accepted_and_a_busy_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    with Run.open(workdir, _config(tmp_path), IDENTITY) as run:
        assert sorted(os.listdir(workdir)) == [".lock", "checkpoints"]  # Nothing recorded.
        with pytest.raises(errors.WorkdirBusy, match=f"in use by PID {os.getpid()} "):
            with Run.open(workdir, _config(tmp_path), IDENTITY):
                pass
        run.accept(0)
        names = {"run.json", "config.json", "data.json"}
        assert names <= set(os.listdir(workdir))
        assert json.load(open(os.path.join(workdir, "config.json")))["lr"] == 1e-3
        data = json.load(open(os.path.join(workdir, "data.json")))
        assert data["data.train"]["files"][0]["size"] == 26
    with Run.open(workdir, _config(tmp_path), IDENTITY):  # The lock was let go.
        pass


def test_the_result_is_written_last_and_only_into_the_workdir_still_held(tmp_path):
    workdir = str(tmp_path / "run")
    config = _config(tmp_path)
    result = {"stage": "pretrain", "step": 4, "plugin_dir": os.path.join(workdir, "plugin")}
    with Run.open(workdir, config, IDENTITY) as run:
        run.accept(0)
        os.makedirs(result["plugin_dir"])
        assert run_lib.finished_result(workdir, config) is None  # Outputs, no result: not done.
        run.finish(result)
    assert run_lib.finished_result(workdir, config) == result
    with pytest.raises(errors.UserError, match=r"finished at step 4 with another config: "
                                               r"lr 0.001 -> 0.002"):
        run_lib.finished_result(workdir, _config(tmp_path, lr=2e-3))

    replaced = str(tmp_path / "replaced")
    with Run.open(replaced, config, IDENTITY) as run:
        run.accept(0)
        shutil.rmtree(replaced)
        os.makedirs(replaced)  # Another run's directory now.
        with pytest.raises(errors.WorkdirReplaced, match="removed or replaced"):
            run.finish(result)
    assert os.listdir(replaced) == []


def test_a_diverged_run_is_refused_with_the_same_config_and_cleared_by_a_new_start(tmp_path):
    workdir = str(tmp_path / "run")
    with Run.open(workdir, _config(tmp_path), IDENTITY) as run:
        run.accept(0)
        run.mark_diverged(step=3, last_good=None, what="loss is nan at step 3")
    with pytest.raises(errors.RecordMismatch, match=r"diverged at step 3 .* Lower config.lr"):
        with Run.open(workdir, _config(tmp_path), IDENTITY):
            pass
    with Run.open(workdir, _config(tmp_path, lr=1e-4), IDENTITY) as run:
        assert os.path.exists(os.path.join(workdir, run_lib.DIVERGED_FILE))  # Not accepted yet.
        run.accept(0)
    assert not os.path.exists(os.path.join(workdir, run_lib.DIVERGED_FILE))


def test_a_resume_with_a_changed_field_is_refused_unless_overridden_and_then_recorded(tmp_path):
    workdir = str(tmp_path / "run")
    with Run.open(workdir, _config(tmp_path), IDENTITY) as run:
        run.accept(0)
    os.makedirs(os.path.join(workdir, "checkpoints", "2"))  # A checkpoint at step 2.
    open(os.path.join(workdir, "checkpoints", "2", "_CHECKPOINT_METADATA"), "w").close()
    with pytest.raises(errors.RecordMismatch, match=r"lr 0.001 -> 0.002.*--override=lr"):
        with Run.open(workdir, _config(tmp_path, lr=2e-3), IDENTITY):
            pass
    with Run.open(workdir, _config(tmp_path, lr=2e-3), IDENTITY, override=["lr"]) as run:
        assert run.changes == {"lr": (1e-3, 2e-3)}
        run.accept(2)
    assert [(c["step"], c["field"]) for c in run_lib.read_changes(workdir)] == [(2, "lr")]
