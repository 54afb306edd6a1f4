"""Checkpoints: save/restore with shardings, and surviving SIGKILL (the workdir's identity:
test_run.py)."""
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import test_utils as tu
from variator_jax import checkpoint, sharding


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
    diverged = [m["step"] for m, r in zip(our_lines, ref_lines, strict=True) if m != {
        **r, "steps_per_sec": m["steps_per_sec"], "tokens_per_sec": m["tokens_per_sec"]}]
    why = f"killed at {killed_at}, {resumed}, metrics first differ at steps {diverged[:3]}"
    a = tu.read_plugin(os.path.join(unbroken, "plugin"))
    b = tu.read_plugin(os.path.join(killed, "plugin"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}; {why}")
    assert not diverged, why


def _interrupted_copy(workdir: str, copy: str, step: int) -> str:
    """A copy of a finished run's workdir as it was when interrupted right after `step`'s
    checkpoint: the later checkpoints and the outputs are removed."""
    import shutil
    shutil.copytree(workdir, copy)
    root = os.path.join(copy, "checkpoints")
    for name in os.listdir(root):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(root, name))
    for name in ("plugin", "backbone", "result.json"):
        path = os.path.join(copy, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return copy


def _rewrite_pre_scan(workdir: str, step: int) -> None:
    """Rewrites checkpoint `step` as the code before scanned layers wrote it: the plugin
    params and both Adam moments as `{block_i: layer}`, not stacked (1-device run)."""
    import shutil

    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    with open(os.path.join(path, "data", "metadata")) as f:
        data = json.load(f)

    def per_layer(t):
        return {f"block_{i}": jax.tree.map(lambda x, i=i: np.asarray(x)[i], t)
                for i in range(len(jax.tree.leaves(t)[0]))}
    state["params"] = per_layer(state["params"])
    adam = state["opt_state"][1][0]
    adam["mu"], adam["nu"] = per_layer(adam["mu"]), per_layer(adam["nu"])
    assert set(state["params"]) == {"block_0", "block_1"}
    shutil.rmtree(path)
    ckpt = checkpoint.Checkpointer(workdir, keep=2)
    ckpt.save(step, state, data)
    ckpt.close()


def test_a_pre_scan_checkpoint_resumes_into_scanned_layers(hf_dir, tmp_path, capsys):
    """A checkpoint from before layers were scanned (per-layer plugin params, unrolled
    model) resumes with scan_layers on, and with it off, to the uninterrupted run's plugin."""
    from variator_jax import train

    def config(scan):
        return tu.tiny_plugin_config(hf_dir, total_steps=8, checkpoint_every=4, lr=1e-2,
                                     scan_layers=scan)
    ref = str(tmp_path / "unbroken")
    train.train_and_evaluate(config(False), ref)
    expected = tu.read_plugin(os.path.join(ref, "plugin"))
    for scan in (False, True):
        old = _interrupted_copy(ref, str(tmp_path / f"pre_scan_{scan}"), step=4)
        _rewrite_pre_scan(old, 4)
        capsys.readouterr()
        result = train.train_and_evaluate(config(scan), old)
        assert f"Resumed from {old}/checkpoints/4" in capsys.readouterr().out
        assert result["step"] == 8
        got = tu.read_plugin(result["plugin_dir"])
        assert got.keys() == expected.keys()
        for key in expected:
            if scan:  # Steps 5-8 ran scanned: another fusion of the same float32 arithmetic.
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7,
                                           err_msg=key)
            else:  # The same program from the same state: bit for bit.
                np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_finetune_resumes_across_scan_layers(hf_dir, tmp_path, capsys):
    """Stage 0 (the backbone is the trained tree): a checkpoint of unrolled layers resumes
    scanned, and one of scanned layers resumes unrolled, to the uninterrupted run's weights."""
    from safetensors.numpy import load_file

    from variator_jax import train

    def config(scan):
        c = tu.load_config("finetune", "task=pretrain")
        tiny = {k: v for k, v in tu.TINY_OVERRIDES.items() if not k.startswith("plugin.")}
        # Without dropout: scanned layers draw their masks from per-layer splits of one
        # key, unrolled ones from their own names, so the masks differ between layouts.
        tu.override(c, {**tiny, **tu.TINY_CORPUS, "total_steps": 8, "checkpoint_every": 4,
                        "scan_layers": scan, "dropout": False})
        c.backbone = hf_dir
        return c

    for scan in (False, True):
        ref = str(tmp_path / f"unbroken_{scan}")
        train.train_and_evaluate(config(scan), ref)
        other = _interrupted_copy(ref, str(tmp_path / f"switched_{scan}"), step=4)
        capsys.readouterr()
        result = train.train_and_evaluate(config(not scan), other)
        assert f"Resumed from {other}/checkpoints/4" in capsys.readouterr().out
        assert result["step"] == 8
        expected = load_file(os.path.join(ref, "backbone", "model.safetensors"))
        got = load_file(os.path.join(result["backbone_dir"], "model.safetensors"))
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7,
                                       err_msg=key)


def test_relayout_moves_layers_between_scanned_unrolled_and_pre_scan_trees():
    from variator_jax import stacking
    from variator_jax.plugins import PluginConfig, init_plugin
    from variator_jax.t5 import init_t5
    cfg = tu.tiny_t5()
    scanned = jax.device_get(init_t5(jax.random.key(0), cfg))
    unrolled_like = jax.eval_shape(lambda: init_t5(jax.random.key(0), cfg.replace(
        scan_layers=False)))
    unrolled = stacking.relayout(scanned, unrolled_like, np.stack)
    assert jax.tree.structure(unrolled) == jax.tree.structure(unrolled_like)

    def wo(block):
        return block["layer_1"]["DenseReluDense"]["wo"]["kernel"]
    np.testing.assert_array_equal(wo(unrolled["encoder"]["block_1"]),
                                  wo(scanned["encoder"]["layers"])[1])
    back = stacking.relayout(unrolled, scanned, np.stack)
    jax.tree.map(np.testing.assert_array_equal, back, scanned)
    # The layout before scanning (HF's): the bias inside block 0's self-attention.
    per_layer = stacking.to_per_layer(scanned)
    jax.tree.map(np.testing.assert_array_equal,
                 stacking.relayout(per_layer, scanned, np.stack), scanned)
    # A plugin from before scanning: {block_i: layer} -> leaves stacked [layers, ...].
    plugin = jax.device_get(init_plugin(jax.random.key(1), cfg, PluginConfig(4)))
    old = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], plugin)
           for i in range(cfg.num_layers)}
    jax.tree.map(np.testing.assert_array_equal, stacking.relayout(old, plugin, np.stack),
                 plugin)
    with pytest.raises(ValueError, match="encoder has .*'final_layer_norm'.*not a layer layout"):
        stacking.relayout({**scanned, "encoder": {"final_layer_norm": {}}}, scanned, np.stack)
