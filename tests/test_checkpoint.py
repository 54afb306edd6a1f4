"""Checkpoints: the workdir's identity, save/restore with shardings, and surviving SIGKILL."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import test_utils as tu
from variator_jax import checkpoint, sharding

IDENTITY = {"stage": "pretrain", "task": "pretrain", "plugin": {"ratio": 4, "bottleneck": 64},
            "backbone": {"d_model": 32, "fingerprint": "abc"}}


def test_workdir_identity_is_checked_before_anything_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    checkpoint.check_workdir(workdir, IDENTITY)  # Fresh: fine, and still nothing there.
    assert not os.path.exists(workdir)
    checkpoint.claim_workdir(workdir, IDENTITY)
    checkpoint.check_workdir(workdir, json.loads(json.dumps(IDENTITY)))  # Same run: fine.
    other = dict(IDENTITY, plugin={"ratio": 2, "bottleneck": 64})
    with pytest.raises(checkpoint.WorkdirMismatch, match=r"plugin.ratio=4 \(this config: 2\)"):
        checkpoint.check_workdir(workdir, other)
    with open(os.path.join(workdir, checkpoint.RUN_FILE)) as f:
        assert json.load(f) == IDENTITY  # Unchanged by the refused check.


def test_checkpoints_without_a_run_file_are_refused(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "10")
    with pytest.raises(checkpoint.WorkdirMismatch, match="no run.json"):
        checkpoint.check_workdir(str(tmp_path), IDENTITY)


def _state(mesh, scale):
    """A small sharded tree standing in for a train state."""
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4) * scale, NamedSharding(mesh, P("data")))
    return {"params": {"w": w}, "step": jax.device_put(jnp.int32(scale),
                                                       sharding.replicated(mesh))}


def test_save_restore_keeps_values_shardings_and_the_last_n(tmp_path):
    mesh = sharding.make_mesh(4, 2)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(mesh, step), {"batch_index": step})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert sorted(os.listdir(ckpt.directory)) == ["2", "3"]
    target = _state(mesh, 0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            target)
    state, data = ckpt.restore(3, abstract)
    ckpt.close()
    assert data == {"batch_index": 3}
    np.testing.assert_array_equal(state["params"]["w"], np.arange(32.0).reshape(8, 4) * 3)
    assert state["params"]["w"].sharding == target["params"]["w"].sharding
    assert int(state["step"]) == 3


def test_a_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    mesh = sharding.make_mesh(1, 1)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(5, _state(mesh, 1), {"batch_index": 5})
    ckpt.close()
    for root, _, files in os.walk(os.path.join(tmp_path, "checkpoints", "5", "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\0garbage")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _state(mesh, 0))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    with pytest.raises(checkpoint.RestoreError, match="checkpoints/5 cannot be restored") as err:
        ckpt.restore(5, abstract)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tu.make_hf_dir(str(tmp_path_factory.mktemp("tiny_t5")))


def _finalised_steps(workdir):
    """Steps whose checkpoint orbax has committed (temporary directories have suffixes)."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(s) for s in os.listdir(root) if s.isdigit()
                  and os.path.exists(os.path.join(root, s, "_CHECKPOINT_METADATA")))


def test_sigkill_then_rerun_ends_bitwise_like_an_unbroken_run(hf_dir, tmp_path):
    """Dropout on, so the resumed run must also draw the same dropout masks."""
    args = (["--config=configs/plugin.py:stage=pretrain", f"--config.backbone={hf_dir}"]
            + tu.cli_flags({**tu.TINY_OVERRIDES, **tu.TINY_CORPUS, "total_steps": 200,
                            "checkpoint_every": 10, "log_every": 10, "lr": 1e-2,
                            "dropout": True}))
    unbroken, killed = str(tmp_path / "unbroken"), str(tmp_path / "killed")
    ref = tu.train_py(args + [f"--workdir={unbroken}"])
    victim = tu.train_py(args + [f"--workdir={killed}"])
    deadline = time.time() + 300
    while not [s for s in _finalised_steps(killed) if s >= 30]:
        assert victim.poll() is None, victim.communicate()
        assert time.time() < deadline, "no checkpoint at step 30 in time"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert not os.path.exists(os.path.join(killed, "plugin")), "killed after it finished"
    killed_at = _finalised_steps(killed)[-1]
    assert killed_at < 200

    rerun = tu.train_py(args + [f"--workdir={killed}"])
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    resumed = [ln for ln in out.splitlines() if ln.startswith("Resumed from")]
    assert resumed, out
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    ref_lines, our_lines = tu.read_metrics(unbroken), tu.read_metrics(killed)
    # The metrics of the repeated steps were replaced, not appended: one line per step.
    assert [m["step"] for m in our_lines] == list(range(10, 201, 10))
    diverged = [m["step"] for m, r in zip(our_lines, ref_lines) if m != {
        **r, "steps_per_sec": m["steps_per_sec"], "tokens_per_sec": m["tokens_per_sec"]}]
    why = f"killed at {killed_at}, {resumed}, metrics first differ at steps {diverged[:3]}"
    a = tu.read_plugin(os.path.join(unbroken, "plugin"))
    b = tu.read_plugin(os.path.join(killed, "plugin"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}; {why}")
    assert not diverged, why
