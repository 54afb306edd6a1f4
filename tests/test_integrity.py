"""Runs that cannot silently go wrong (issue 15): one test per numbered item, each one the
issue's reproduction, each failing on the code before the fix."""
import errno
import json
import os
import signal
import time
import warnings

import jax
import numpy as np
import pytest
import safetensors.numpy

import test_utils as tu
import variator_jax as vj
from variator_jax import checkpoint, errors, integrity, progress, sharding, train, trainer
from variator_jax import run as run_lib
from variator_jax.plugins import _legacy_fingerprint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tu.make_hf_dir(str(tmp_path_factory.mktemp("tiny_t5")))


def _run(hf_dir, workdir, override=(), **overrides):
    return train.train_and_evaluate(tu.tiny_plugin_config(hf_dir, **overrides), str(workdir),
                                        override=override)


def _saved_params(workdir, step):
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


# -- 1. The last good checkpoint is good ------------------------------------------------------
def test_1_divergence_keeps_only_good_checkpoints_and_says_what_to_change(hf_dir, tmp_path):
    workdir = str(tmp_path / "lr1e9")
    common = dict(warmup_steps=0, log_every=2, checkpoint_every=2, keep_checkpoints=20)
    _run(hf_dir, workdir, lr=1e-2, total_steps=8, **common)
    sane_loss = tu.read_metrics(workdir)[-1]["loss"]
    # Extended with an absurd lr: it diverges; what is kept must be good.
    with pytest.raises(errors.NonFiniteLoss) as err:
        _run(hf_dir, workdir, override=["lr", "total_steps"], lr=1e9, total_steps=30, **common)
    message = str(err.value)
    saved = checkpoint.finished_steps(workdir)
    assert saved and saved[-1] >= 8
    for step in saved:  # Every checkpoint kept is one training can go on from.
        leaves = jax.tree.leaves(_saved_params(workdir, step))
        assert all(np.isfinite(np.sum(np.square(np.asarray(x, np.float32)))) for x in leaves), step
    assert f"the last good checkpoint is step {saved[-1]}" in message, (saved, message)
    assert "lower config.lr and rerun with --override=lr" in message

    # The same command again would diverge the same way: refused, with what to change.
    with pytest.raises(errors.UserError, match=r"diverged at step \d+ .* --override=lr"):
        _run(hf_dir, workdir, override=["lr", "total_steps"], lr=1e9, total_steps=30, **common)
    # A sane lr (accepted explicitly) resumes from the last good checkpoint and trains on.
    result = _run(hf_dir, workdir, override=["lr"], lr=1e-2, total_steps=30, **common)
    assert result["step"] == 30 and result["train"]["loss"] < 10 * sane_loss, result["train"]
    assert not os.path.exists(os.path.join(workdir, run_lib.DIVERGED_FILE))
    changes = [(c["step"], c["field"], c["to"]) for c in run_lib.read_changes(workdir)]
    assert changes[-1] == (saved[-1], "lr", 1e-2), changes


def test_1_one_hard_batch_after_the_data_is_fitted_is_not_a_divergence():
    """The quality miniature's fine-tuning stopped as "diverged" at step 1075: its per-step
    loss had reached 3.4e-4 and one batch scored 0.345. Spikes are judged on window means."""
    from variator_jax import trainer

    class NoCheckpoints:
        def wait(self):
            pass
    best = [None]

    def check(step, *losses):
        window = [{"loss": x, "grad_norm": 1.0} for x in losses]
        trainer._check_finite(window, step, None, NoCheckpoints(), best, factor=1e3)
    check(4, 0.02, 0.01, 0.0003, 0.005)
    check(8, 0.0004, 0.345, 0.001, 0.002)  # 1,000x the lowest step, 10x the lowest mean.
    assert best[0] == pytest.approx(0.0353 / 4)
    with pytest.raises(errors.NonFiniteLoss, match=r"jumped to 1e\+04 \(mean of steps 9..12\)"
                       r", 1.13e\+06 times the lowest mean"):
        check(12, 1e4, 1e4, 1e4, 1e4)


def test_1_non_finite_hyper_parameters_are_refused_before_anything_is_written(hf_dir, tmp_path):
    for field, value in (("lr", 1e39), ("lr", float("inf")), ("weight_decay", float("nan"))):
        with pytest.raises(errors.UserError, match=f"config.{field} must be a finite number"):
            _run(hf_dir, tmp_path / "w", **{field: value})
    assert not os.path.exists(tmp_path / "w")


# -- 2. The backbone identity covers every weight ---------------------------------------------
def _perturbed(backbone, seed=1, scale=1e-3):
    """Noise on every FFN and attention-q weight; layer norms and embeddings untouched."""
    rng = np.random.default_rng(seed)

    def noisy(path, x):
        name = jax.tree_util.keystr(path)
        if "DenseReluDense" in name or "['q']" in name:
            return np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
        return np.asarray(x)
    return jax.tree_util.tree_map_with_path(noisy, backbone)


def test_2_fingerprint_sees_every_weight_and_old_plugin_files_still_load(tmp_path):
    cfg = tu.tiny_t5(scan_layers=False)  # Per-layer keys, to change one weight of one layer.
    backbone = jax.device_get(vj.init_t5(jax.random.key(0), cfg))
    other = _perturbed(backbone)
    assert _legacy_fingerprint(other) == _legacy_fingerprint(backbone)  # The old blind spot.
    assert vj.backbone_fingerprint(other) != vj.backbone_fingerprint(backbone)
    one = jax.tree.map(np.array, backbone)  # A single weight changed by one ulp.
    w = one["decoder"]["block_1"]["layer_2"]["DenseReluDense"]["wo"]["kernel"]
    w[3, 5] = np.nextafter(w[3, 5], np.float32(1))
    assert vj.backbone_fingerprint(one) != vj.backbone_fingerprint(backbone)

    pcfg = vj.PluginConfig(ratio=2, bottleneck=8)
    plugin = vj.init_plugin(jax.random.key(1), cfg, pcfg)
    vj.save_plugin(tmp_path / "new", pcfg, plugin, vj.backbone_identity(cfg, backbone))
    with pytest.warns(UserWarning, match="fingerprints differ"):
        vj.load_plugin(tmp_path / "new", cfg=cfg, backbone=other)
    # A plugin file written before this change: legacy fingerprint, no version field.
    vj.save_plugin(tmp_path / "old", pcfg, plugin)
    path = tmp_path / "old" / "plugin_config.json"
    config = json.loads(path.read_text())
    config["backbone"] = {"name": "tiny", "d_model": 32, "num_layers": 2,
                          "fingerprint": _legacy_fingerprint(backbone)}
    path.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Same backbone: no spurious warning.
        vj.load_plugin(tmp_path / "old", cfg=cfg, backbone=backbone)
    with pytest.warns(UserWarning, match="fingerprints differ"):
        vj.load_plugin(tmp_path / "old", cfg=cfg, backbone=vj.init_t5(jax.random.key(5), cfg))


def test_2_resuming_on_another_backbone_is_refused(hf_dir, tmp_path):
    workdir = str(tmp_path / "run")
    _run(hf_dir, workdir, total_steps=4)
    cfg, backbone = vj.load_hf_t5(hf_dir)
    noisy_dir = str(tmp_path / "noisy")
    vj.save_hf_t5(noisy_dir, cfg, _perturbed(backbone))  # Same config.json.
    with open(os.path.join(hf_dir, "config.json")) as a, \
            open(os.path.join(noisy_dir, "config.json")) as b:
        assert json.load(a) == json.load(b)
    with pytest.raises(errors.UserError, match="backbone.fingerprint"):
        _run(noisy_dir, workdir, override=["total_steps"], total_steps=8)
    # A workdir recorded with the legacy fingerprint still resumes on its own backbone.
    run_json = os.path.join(workdir, run_lib.RUN_FILE)
    identity = json.load(open(run_json))
    identity["backbone"] = {"d_model": 32, "num_layers": 2,
                            "fingerprint": _legacy_fingerprint(backbone)}
    with open(run_json, "w") as f:
        json.dump(identity, f)
    assert _run(hf_dir, workdir, override=["total_steps"], total_steps=8)["step"] == 8


# -- 3. One run per workdir ---------------------------------------------------------------------
def test_3_a_busy_workdir_is_refused_at_once_naming_the_holder(hf_dir, tmp_path):
    workdir = str(tmp_path / "busy")
    with run_lib.lock(workdir):
        tic = time.time()
        with pytest.raises(errors.UserError, match=f"in use by PID {os.getpid()} "):
            _run(hf_dir, workdir)
        assert time.time() - tic < 30
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    # A holder that dies (SIGKILL) leaves no stale lock behind.
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); "
        "from variator_jax import run as w\n"
        "with w.lock(sys.argv[2]):\n print('locked', flush=True); time.sleep(600)"),
        tu.REPO, workdir], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(errors.WorkdirBusy, match=f"PID {holder.pid} "):
        with run_lib.lock(workdir):
            pass
    holder.kill()
    holder.wait()
    with run_lib.lock(workdir):
        pass


def test_3_a_workdir_replaced_under_a_run_gets_nothing_more_from_it(hf_dir, tmp_path, monkeypatch):
    """The run's workdir is deleted and recreated (a new run's) between two checkpoints: the
    old run stops with one line at its next save and writes nothing into the new directory."""
    import shutil
    workdir = str(tmp_path / "replaced")
    with run_lib.lock(workdir) as still_ours:
        still_ours()  # The same lock file: fine.
    with run_lib.lock(workdir) as still_ours:
        shutil.rmtree(workdir)
        with pytest.raises(errors.WorkdirReplaced, match="removed or replaced"):
            still_ours()
        os.makedirs(workdir)
        with open(os.path.join(workdir, run_lib.LOCK_FILE), "w"):
            pass  # A new run's lock file: another file at the same path.
        with pytest.raises(errors.WorkdirReplaced):
            still_ours()
    shutil.rmtree(workdir)

    check_state = trainer._check_state
    calls = []

    def replace_after_first_save(state, done, last_good, checkpointer):
        calls.append(done)
        if len(calls) == 2:  # After step 4's checkpoint is written, before step 8's.
            checkpointer.wait()
            shutil.rmtree(workdir)
            os.makedirs(workdir)
            with open(os.path.join(workdir, "theirs.txt"), "w") as f:
                f.write("another run")
        return check_state(state, done, last_good, checkpointer)

    monkeypatch.setattr(trainer, "_check_state", replace_after_first_save)
    with pytest.raises(errors.UserError, match=f"workdir {workdir} was removed or replaced"):
        _run(hf_dir, workdir, total_steps=12)
    assert calls == [4, 8]
    assert sorted(os.listdir(workdir)) == ["theirs.txt"]  # Nothing of the old run's.


def test_3_two_train_py_started_together_one_trains_one_stops(hf_dir, tmp_path):
    workdir = str(tmp_path / "both")
    args = (["--config=configs/plugin.py:stage=pretrain", f"--config.backbone={hf_dir}",
             f"--workdir={workdir}"]
            + tu.cli_flags({**tu.TINY_OVERRIDES, **tu.TINY_CORPUS, "total_steps": 16}))
    procs = [tu.train_py(args), tu.train_py(args)]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = [(p, err) for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 1][0]
    winner = [p for p in procs if p.returncode == 0][0]
    lines = [ln for ln in loser[1].splitlines() if ln.strip()]
    assert len(lines) == 1 and f"is in use by PID {winner.pid}" in lines[0], loser[1]
    assert [m["step"] for m in tu.read_metrics(workdir)] == [4, 8, 12, 16]


# -- 4. What a rerun may change -------------------------------------------------------------------
def test_4_run_record_refuses_records_and_extends(hf_dir, tmp_path):
    workdir = str(tmp_path / "rec")
    first = _run(hf_dir, workdir, total_steps=4)
    config_json = open(os.path.join(workdir, "config.json")).read()
    old_plugin = tu.read_plugin(first["plugin_dir"])

    with pytest.raises(errors.UserError, match=r"finished at step 4 with another config: "
                                                  r"batch_size 8 -> 16"):
        _run(hf_dir, workdir, total_steps=4, batch_size=16)  # Not "nothing to do".
    with pytest.raises(errors.UserError, match=r"batch_size 8 -> 16.*--override=batch_size,"
                                                  r"total_steps"):
        _run(hf_dir, workdir, total_steps=8, batch_size=16)
    with pytest.raises(errors.UserError, match="already at step 4; total_steps 2"):
        _run(hf_dir, workdir, override=["total_steps"], total_steps=2)
    with pytest.raises(errors.UserError, match=r"total_steps 4 -> 8.*--override=total_steps"):
        _run(hf_dir, workdir, total_steps=8)
    assert open(os.path.join(workdir, "config.json")).read() == config_json  # Untouched.

    # A crash left half a line in metrics.jsonl: it must not block the resume.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 0.0')
    result = _run(hf_dir, workdir, override=["total_steps", "lr"], total_steps=8, lr=5e-4)
    assert result["step"] == 8
    assert [m["step"] for m in tu.read_metrics(workdir)] == [4, 8]
    changes = run_lib.read_changes(workdir)
    assert {(c["step"], c["field"], c["from"], c["to"]) for c in changes} == {
        (4, "total_steps", 4, 8), (4, "lr", 1e-3, 5e-4)}
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert (saved["total_steps"], saved["lr"]) == (8, 5e-4)
    kept = tu.read_plugin(os.path.join(workdir, "plugin_step4"))  # The old final plugin.
    for key in old_plugin:
        np.testing.assert_array_equal(kept[key], old_plugin[key])
    assert json.load(open(os.path.join(workdir, "result_step4.json")))["step"] == 4


# -- 5. Plugin files, both sides --------------------------------------------------------------
def _plugin_dir(tmp_path, name, edit_tensors=None, edit_config=None):
    cfg = tu.tiny_t5()
    pcfg = vj.PluginConfig(ratio=2, bottleneck=8)
    directory = tmp_path / name
    vj.save_plugin(directory, pcfg, vj.init_plugin(jax.random.key(0), cfg, pcfg))
    tensors = safetensors.numpy.load_file(str(directory / "plugin.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
        safetensors.numpy.save_file(tensors, str(directory / "plugin.safetensors"))
    if edit_config:
        config = json.loads((directory / "plugin_config.json").read_text())
        edit_config(config)
        (directory / "plugin_config.json").write_text(json.dumps(config))
    return directory


KEY = "encoder.block.1.plugin.decompress.wi.weight"


def _set(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


BAD_PLUGINS = {
    "nan": (dict(edit_tensors=_set(KEY, lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7,
                                                            np.nan, x).astype(np.float32))),
            f"{KEY} holds 1 non-finite value"),
    "inf": (dict(edit_tensors=_set("encoder.block.0.plugin.compress.bias",
                                   lambda x: np.full_like(x, np.inf))),
            "encoder.block.0.plugin.compress.bias holds 2 non-finite"),
    "int32": (dict(edit_tensors=_set(KEY, lambda x: np.round(x).astype(np.int32))),
              f"{KEY} has dtype I32, expected F32"),
    "mask_aware_string": (dict(edit_config=lambda c: c.update(mask_aware="false")),
                          r"field 'mask_aware' must be true or false, got \"false\" \(a string\)"),
    "ratio_float": (dict(edit_config=lambda c: c.update(ratio=2.0)),
                    r"field 'ratio' must be a positive integer, got 2.0"),
    "empty_config": (dict(edit_config=lambda c: (c.clear())), "lacks field"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_5_bad_plugin_files_are_refused_by_jax_and_torch_naming_the_key(tmp_path, case):
    import transformers

    from variator_jax import torch_plugin
    edits, message = BAD_PLUGINS[case]
    directory = _plugin_dir(tmp_path, case, **edits)
    with pytest.raises(ValueError, match=message) as err:
        vj.load_plugin(directory)
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
    cfg = tu.tiny_t5()
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf()))
    with pytest.raises(ValueError, match=message):
        torch_plugin.attach_plugin(model, directory)
    assert torch_plugin.attached_plugin_config(model) is None


def test_5_attach_plugin_on_a_truncated_file_is_one_line_with_the_path(tmp_path):
    import transformers

    from variator_jax import torch_plugin
    directory = _plugin_dir(tmp_path, "cut")
    path = directory / "plugin.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    cfg = tu.tiny_t5()
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf()))
    with pytest.raises(ValueError, match="cannot read safetensors file") as err:
        torch_plugin.attach_plugin(model, directory)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# -- 6. Checkpoint corruption -------------------------------------------------------------------
def _two_checkpoints(tmp_path):
    mesh = sharding.make_mesh(1, 1)

    def state(scale):
        return {"w": jax.device_put(np.arange(4096.0, dtype=np.float32) * scale,
                                    sharding.replicated(mesh))}
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    for step in (1, 2):
        ckpt.save(step, state(step), {"batch_index": step})
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state(0))
    return abstract


def _data_files(step_dir):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
                  if f != integrity.MANIFEST_FILE and os.path.getsize(os.path.join(r, f)) > 1000)


@pytest.mark.parametrize("damage", ["bit", "truncate", "truncate_no_manifest"])
def test_6_a_corrupt_newest_checkpoint_is_named_kept_aside_and_the_previous_restored(
        tmp_path, damage):
    abstract = _two_checkpoints(tmp_path)
    step_dir = os.path.join(tmp_path, "checkpoints", "2")
    assert integrity.has_manifest(step_dir)
    victim = _data_files(step_dir)[0]
    data = bytearray(open(victim, "rb").read())
    if damage == "bit":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:len(data) // 3]
    if damage == "truncate_no_manifest":
        os.remove(os.path.join(step_dir, integrity.MANIFEST_FILE))
    open(victim, "wb").write(bytes(data))

    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    if damage == "bit":
        with pytest.raises(checkpoint.RestoreError, match="does not match its checksum"):
            ckpt.restore(2, abstract)
    said = []
    step, state, data_state = ckpt.restore_latest(abstract, said.append)
    ckpt.close()
    assert (step, data_state) == (1, {"batch_index": 1})
    np.testing.assert_array_equal(state["w"], np.arange(4096.0))
    assert len(said) == 1 and "checkpoints/2 cannot be restored" in said[0], said
    assert "falling back to step 1" in said[0] and "<bound method" not in said[0], said
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints_corrupt", "2"))  # Kept, not lost.
    assert checkpoint.finished_steps(str(tmp_path)) == [1]


# -- 7. One clear line --------------------------------------------------------------------------
def test_7_unwritable_metrics_and_full_disk_are_one_line_and_lose_nothing(hf_dir, tmp_path,
                                                                          monkeypatch):
    def refuse(self, step, scalars):
        raise PermissionError(errno.EACCES, "Permission denied", self._path)
    with monkeypatch.context() as m:
        m.setattr(progress.MetricWriter, "write", refuse)
        with pytest.raises(errors.UserError, match="metrics.jsonl: Permission denied") as err:
            _run(hf_dir, tmp_path / "ro")
    assert "\n" not in str(err.value)

    real = integrity.write_manifest
    calls = []

    def full(directory):  # The second checkpoint's write fails: disk full.
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", directory)
        return real(directory)
    monkeypatch.setattr(integrity, "write_manifest", full)
    workdir = str(tmp_path / "full")
    with pytest.raises(errors.UserError, match=r"cannot save .*No space left on device.* "
                                                  "run the same command to resume") as err:
        _run(hf_dir, workdir, total_steps=40, checkpoint_every=4, log_every=1)
    assert "\n" not in str(err.value)
    # Training stopped at the next save, not ten steps later; the first checkpoint is whole.
    assert tu.read_metrics(workdir)[-1]["step"] <= 12
    assert integrity.verify_manifest(os.path.join(workdir, "checkpoints", "4")) is None


def test_7_bad_backbone_config_and_pickled_bin_are_one_line(tmp_path):
    for name, content, message in (
            ("list", [1, 2], "a JSON object is expected, got a JSON list"),
            ("str", {"d_model": "64"}, r'd_model must be an integer, got "64" \(str\)')):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message) as err:
            vj.load_hf_t5(tmp_path / name)
        assert "\n" not in str(err.value)
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    os.makedirs(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(tu.tiny_t5().to_hf()))
    torch.save({"shared.weight": torch.zeros(2), "x": Evil()},
               str(tmp_path / "bin" / "pytorch_model.bin"))
    with pytest.raises(vj.CheckpointError, match=r"refused: it holds pickled Python objects.*"
                                                 r"posix.system.*safetensors") as err:
        vj.load_hf_t5(tmp_path / "bin")
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


def test_7_sigint_and_sigterm_save_a_checkpoint_and_say_how_to_resume(hf_dir, tmp_path):
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # Both at once: two processes, one wait.
        workdir = str(tmp_path / sig.name)
        args = (["--config=configs/plugin.py:stage=pretrain", f"--config.backbone={hf_dir}",
                 f"--workdir={workdir}"]
                + tu.cli_flags({**tu.TINY_OVERRIDES, **tu.TINY_CORPUS, "total_steps": 100000,
                                "checkpoint_every": 100000, "log_every": 1}))
        procs[sig] = (tu.train_py(args), workdir)
    for sig, (proc, _) in procs.items():
        for line in proc.stdout:  # Training is under way.
            if line.startswith("step "):
                break
        proc.send_signal(sig)
    for sig, (proc, workdir) in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 128 + sig, (sig, err)
        assert len(lines) == 1 and lines[0].startswith("interrupted at step "), (sig, err)
        step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
        assert lines[0].endswith("run the same command to resume")
        assert checkpoint.finished_steps(workdir) == [step]
        assert integrity.verify_manifest(os.path.join(workdir, "checkpoints", str(step))) is None
        assert tu.read_metrics(workdir)[-1]["step"] == step


def test_a_resume_may_change_the_attention_implementation_not_the_dtype():
    old = {"attention": "auto", "lr": 1e-3, "dtype": "float32"}
    new = {"attention": "cudnn", "lr": 1e-3, "dtype": "bfloat16"}
    assert run_lib.result_changes(old, new) == {"dtype": ("float32", "bfloat16")}
