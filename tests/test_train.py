"""Losses, the train step, and `train_and_evaluate` end to end on tiny models."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_utils as tu
from variator_jax import (
    cli,
    errors,
    experiment,
    load_hf_t5,
    load_plugin,
    objectives,
    train,
    trainer,
)
from variator_jax.plugins import PluginConfig, init_plugin
from variator_jax.t5 import init_t5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tu.make_hf_dir(str(tmp_path_factory.mktemp("tiny_t5")))


# -- Pieces ---------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_zero():
    sched = trainer.lr_schedule(1e-3, warmup_steps=4, total_steps=12)
    lrs = [float(sched(i)) for i in range(12)]
    np.testing.assert_allclose(lrs[:5], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lrs[11], 1e-3 / 8, rtol=1e-6)  # Last step: one eighth left.
    assert float(sched(12)) == 0.0
    assert float(trainer.lr_schedule(1e-3, 0, 10)(0)) == pytest.approx(1e-3)


def test_masked_mse_counts_real_positions_only():
    s = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    t = jnp.array([[[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])
    mask = jnp.array([[1, 1, 0]])
    # Squared errors at real positions: 1 + 0 + 0 + 16 = 17 over 2 positions x 2 features.
    assert float(objectives.masked_mse(s, t, mask)) == pytest.approx(17 / 4)


def test_task_ce_reads_verbalizer_logits_at_the_first_position():
    setup = objectives.make(tu.tiny_t5(), None, "task", "classification", verbalizer=(7, 3))
    logits = jnp.zeros((2, 3, 10)).at[0, 0, 7].set(5.0).at[1, 0, 3].set(5.0).at[1, 1, 7].set(50.0)
    batch = {"label": jnp.array([0, 1])}
    np.testing.assert_array_equal(objectives.class_logits(setup, logits), [[5, 0], [0, 5]])
    ce, n = objectives.task_ce(setup, logits, batch)
    assert float(n) == 2 and float(ce) == pytest.approx(2 * np.log1p(np.exp(-5.0)), rel=1e-5)


def test_unlabelled_rows_count_for_the_hidden_loss_only():
    """A row with label -1 (target EOS alone) adds to the hidden-state MSE over its real
    positions and nothing to the task cross-entropy: restated with numpy from the outputs."""
    from variator_jax.model import forward
    cfg = tu.tiny_t5()
    backbone = init_t5(jax.random.key(0), cfg)
    pcfg = PluginConfig(2, bottleneck=8)
    plugin = init_plugin(jax.random.key(1), cfg, pcfg)
    plugin = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), plugin)
    setup = objectives.make(cfg, pcfg, "task+hidden", "classification", verbalizer=(7, 3),
                            dropout=False)
    batch = {k: jnp.asarray(v) for k, v in tu.fake_batch(3, 16, 4).items()}
    batch["labels"] = batch["labels"].at[1].set(jnp.array([1, 0, 0, 0]))  # Unlabelled: EOS.
    batch["decoder_attention_mask"] = (batch["labels"] != 0).astype(jnp.int32)
    batch["decoder_input_ids"] = jnp.pad(batch["labels"][:, :-1], ((0, 0), (1, 0)))
    batch["label"] = jnp.array([0, -1, 1])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
              batch["decoder_attention_mask"])
    terms, student, teacher = jax.jit(lambda p, b: (
        setup.loss_terms(p, b, batch, None, True)[0],
        forward(cfg, b, *inputs, plugin=(pcfg, p)), forward(cfg, b, *inputs)))(plugin, backbone)
    logits = np.asarray(student["logits"][:, 0][:, [7, 3]], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(terms["task_ce"]), -(logp[0, 0] + logp[2, 1]) / 2, rtol=1e-5)
    mask = np.asarray(batch["decoder_attention_mask"], bool)
    assert mask[1].tolist() == [True, False, False, False]
    diff = np.asarray(student["decoder_hidden"] - teacher["decoder_hidden"], np.float64)[mask]
    np.testing.assert_allclose(float(terms["dec_mse"]), np.mean(diff ** 2), rtol=1e-5)


def test_bfloat16_backbone_stored_once_gives_the_loss_of_casting_per_step():
    """--config.dtype=bfloat16: the frozen backbone is placed once in bf16 (Distill.frozen),
    the plugin and its gradients stay float32, and the loss is the one a step casting the
    float32 backbone on every call gives, within bf16's tolerance."""
    cfg = tu.tiny_t5(dtype="bfloat16")
    backbone = init_t5(jax.random.key(0), cfg)
    pcfg = PluginConfig(2, bottleneck=8)
    plugin = init_plugin(jax.random.key(1), cfg, pcfg)
    plugin = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), plugin)
    setup = objectives.make(cfg, pcfg, "hidden", "pretrain", dropout=False)
    stored = setup.frozen(backbone)
    kernels = [x.dtype for p, x in jax.tree_util.tree_leaves_with_path(stored)
               if "kernel" in jax.tree_util.keystr(p)]
    assert set(kernels) == {jnp.dtype(jnp.bfloat16)}
    batch = {k: jnp.asarray(v) for k, v in tu.fake_batch(3, 16, 4).items()}
    loss = jax.jit(jax.value_and_grad(lambda p, b: sum(
        setup.loss_terms(p, b, batch, None, True)[0].values())))
    (per_step, _), (once, grads) = loss(plugin, backbone), loss(plugin, stored)
    assert float(per_step) > 0 and abs(float(once) - float(per_step)) <= 1e-2 * float(per_step)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_train_step_fits_the_teacher_and_leaves_the_backbone_alone():
    cfg = tu.tiny_t5()
    backbone = init_t5(jax.random.key(0), cfg)
    pcfg = PluginConfig(4, bottleneck=8)
    setup = objectives.make(cfg, pcfg, "hidden", "pretrain", dropout=False)
    config = tu.load_config("plugin")
    config.lr, config.warmup_steps, config.total_steps = 1e-2, 0, 30
    tx, schedule = trainer.make_optimizer(config)
    state = trainer.create_state(init_plugin(jax.random.key(1), cfg, pcfg), jax.random.key(2), tx)
    batch = {k: jnp.asarray(v) for k, v in tu.fake_batch(4, 32, 8).items()}
    step = jax.jit(lambda s, b, bb: trainer.train_step(s, b, bb, objective=setup, tx=tx,
                                                          schedule=schedule))
    before = jax.tree.map(np.array, backbone)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, backbone)
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "enc_mse", "dec_mse", "grad_norm", "lr", "tokens"}
    assert float(metrics["loss"]) == pytest.approx(float(metrics["enc_mse"] + metrics["dec_mse"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.5 * losses[0], losses  # Distillation on one batch converges.
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, backbone))
    # The backbone is behind stop_gradient: no signal reaches it even if asked for.
    grads = jax.grad(lambda bb: sum(setup.loss_terms(state.params, bb, batch,
                                                         None, True)[0].values()))(backbone)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0


# -- End to end -----------------------------------------------------------------------------------
def _first_last_loss(workdir):
    lines = [m for m in tu.read_metrics(workdir) if "loss" in m]
    return lines[0]["loss"], lines[-1]["loss"]


def test_chained_stages_then_adapt_on_sst2(tmp_path):
    """Stage 0 (tiny T5 from scratch) -> stage 1 (plugin pre-training) chained in one config
    file (tests/data/chained_config.py), shrunk; a rerun skips both; stage 2 adapts the
    plugin to a mock SST-2."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    chained = cli.load_config(os.path.join(tu.REPO, "tests", "data", "chained_config.py"))
    small = dict(batch_size=8, eval_batch_size=8, max_input_length=32, max_target_length=8,
                 log_every=4, checkpoint_every=8, warmup_steps=2)
    tu.override(chained, dict(small, total_steps=12, lr=1e-2, **{"plugin.bottleneck": 8}))
    tu.override(chained.backbone_stage, dict(small, total_steps=8))
    chained.backbone_stage.model_overrides.update(d_model=32, d_kv=16, num_heads=2, d_ff=64)
    for c in (chained, chained.backbone_stage):
        c.data.train_split, c.data.eval_split = "train[:10%]", "train[95%:]"
    workdir = str(tmp_path / "chained")
    result = train.train_and_evaluate(chained, workdir)

    backbone_dir = os.path.join(workdir, "backbone_stage", "backbone")
    cfg, backbone = load_hf_t5(backbone_dir)  # An HF directory, with the tokenizer beside it.
    assert cfg.d_model == 32 and cfg.vocab_size == tu.BYTE_VOCAB
    assert os.path.isfile(os.path.join(backbone_dir, "tokenizer_config.json"))
    stage0_first, stage0_last = _first_last_loss(os.path.join(workdir, "backbone_stage"))
    assert stage0_last < stage0_first
    assert result["plugin_dir"] == os.path.join(workdir, "plugin")
    pcfg, plugin = load_plugin(result["plugin_dir"], cfg=cfg, backbone=backbone)
    assert pcfg.ratio == 4 and result["step"] == 12
    first, last = _first_last_loss(workdir)
    assert last < first, (first, last)
    assert {"enc_mse", "dec_mse", "ce", "teacher_ce"} <= set(result["eval"])
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    tic = time.time()  # Same command again: both stages are recognised as done.
    assert train.train_and_evaluate(chained, workdir)["plugin_dir"] == result["plugin_dir"]
    assert time.time() - tic < 20

    adapt = tu.tiny_plugin_config(backbone_dir, "stage=adapt,task=sst2", loss="task+hidden",
                                  init_plugin=result["plugin_dir"], total_steps=12, lr=1e-2)
    # tfds's mock data repeats one set of rows in every split, and training refuses to
    # evaluate on its own training texts: the eval rows are a file of other sentences.
    eval_rows = tmp_path / "sst2-eval.jsonl"
    eval_rows.write_text("".join(json.dumps({"sentence": f"an eval sentence {i}", "label": i % 2})
                                 + "\n" for i in range(8)))
    adapt.data.eval, adapt.data.eval_split = f"jsonl:{eval_rows}", "all"
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        adapted = train.train_and_evaluate(adapt, str(tmp_path / "sst2"))
    first, last = _first_last_loss(str(tmp_path / "sst2"))
    assert last < first, (first, last)
    lines = tu.read_metrics(str(tmp_path / "sst2"))
    assert {"enc_mse", "dec_mse", "task_ce", "lr", "grad_norm", "steps_per_sec",
            "tokens_per_sec"} <= set(lines[0])
    ev = adapted["eval"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and 0.0 <= ev["agreement"] <= 1.0
    assert "teacher_accuracy" in ev


def _adam_history(workdir: str, steps) -> list[dict[str, list[np.ndarray]]]:
    """After each of `steps`: the plugin's leaves and AdamW's moments `mu`, `nu` (float64),
    read from the run's checkpoints."""
    import orbax.checkpoint as ocp

    def leaves(tree):
        return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    out = []
    for step in steps:
        state = ocp.StandardCheckpointer().restore(
            os.path.join(workdir, "checkpoints", str(step), "state"))
        adam = state["opt_state"][1][0]  # chain(clip, adamw): scale_by_adam's state first.
        out.append({"params": leaves(state["params"]), "mu": leaves(adam["mu"]),
                    "nu": leaves(adam["nu"])})
    return out


def test_one_device_and_a_4x2_mesh_train_the_same_plugin(hf_dir, tmp_path):
    """8 AdamW steps on 1 device and on a 4 x 2 mesh. Summation order differs between them,
    and AdamW turns a gradient's rounding into a weight's error *relative to that
    gradient's size*: a step moves a weight by lr * m / (sqrt(v) + eps), so a gradient error
    d moves it by about lr * d / (sqrt(v) + eps). A tensor's small gradients sum terms much
    larger than themselves and carry their rounding: measured, one weight's first gradient
    was 5.52e-9 on one device and 5.50e-9 on eight (loss and gradient norm agreed to 2e-7),
    which put it 3.5e-6 apart after one step at lr 5e-3. So the test compares:
      - every step's loss (the forward pass), rtol 2e-6;
      - step 1's gradient, before the optimizer (AdamW's first moment, 0.1 g), within
        RHO = 1e-5 of each tensor's largest gradient (measured: 8.3e-7);
      - each final weight within what that same gradient tolerance becomes through AdamW:
        sum over steps of lr_t * RHO * G_t / (sqrt(v_hat_t) + eps), G_t the tensor's largest
        sqrt(v_hat_t). A weight with a large gradient gets ~5e-7 (the old test: 2e-6 for all).
    """
    runs = []
    for data, model in ((1, 1), (4, 2)):
        config = tu.tiny_plugin_config(hf_dir, lr=1e-2, mesh__data=data, mesh__model=model,
                                       total_steps=8, log_every=1, checkpoint_every=1,
                                       keep_checkpoints=8)
        workdir = str(tmp_path / f"mesh{data}x{model}")
        train.train_and_evaluate(config, workdir)
        runs.append((tu.read_metrics(workdir), _adam_history(workdir, range(1, 9))))
    (metrics1, adam1), (metrics8, adam8) = runs
    np.testing.assert_allclose([m["loss"] for m in metrics8], [m["loss"] for m in metrics1],
                               rtol=2e-6)
    rho, eps, b2 = 1e-5, 1e-8, 0.999  # eps, b2: optax.adamw's defaults.
    for g1, g8 in zip(adam1[0]["mu"], adam8[0]["mu"], strict=True):
        assert np.abs(g8 - g1).max() <= rho * np.abs(g1).max()
    lrs = [m["lr"] for m in metrics1]
    for i, (w1, w8) in enumerate(zip(adam1[-1]["params"], adam8[-1]["params"], strict=True)):
        tol = 0.0
        for t, (a1, a8) in enumerate(zip(adam1, adam8, strict=True), 1):
            v1, v8 = (np.sqrt(a["nu"][i] / (1 - b2 ** t)) for a in (a1, a8))
            tol = tol + lrs[t - 1] * rho * v1.max() / (np.minimum(v1, v8) + eps)
        np.testing.assert_array_less(np.abs(w8 - w1), tol)
        assert np.abs(w1 - adam1[0]["params"][i]).max() > 1e-3  # Trained, not untouched.


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(hf_dir, tmp_path):
    """lr 1e30: the loss of step 1 is finite, but the parameters after it are not usable
    (their squared norm overflows float32): no checkpoint may call itself good."""
    config = tu.tiny_plugin_config(hf_dir, lr=1e30, warmup_steps=0, log_every=1,
                                   checkpoint_every=1, keep_checkpoints=5)
    workdir = str(tmp_path / "nan")
    with pytest.raises(errors.NonFiniteLoss, match="no checkpoint was saved") as err:
        train.train_and_evaluate(config, workdir)
    assert "parameters after step 1 are not finite" in str(err.value)
    assert not [s for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert not os.path.exists(os.path.join(workdir, "plugin"))


def test_a_workdir_of_another_run_is_refused_untouched(hf_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tu.tiny_plugin_config(hf_dir, total_steps=4), workdir)

    def snapshot():
        return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)),
                                     os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(workdir) for f in files}

    before = snapshot()
    with pytest.raises(errors.UserError, match="plugin.ratio=4 .this config: 2."):
        train.train_and_evaluate(tu.tiny_plugin_config(hf_dir, total_steps=8,
                                                           plugin__ratio=2), workdir)
    other = tu.make_hf_dir(str(tmp_path / "other_t5"), seed=1)
    with pytest.raises(errors.UserError, match="backbone.fingerprint"):
        train.train_and_evaluate(tu.tiny_plugin_config(other, total_steps=8), workdir)
    assert snapshot() == before


def test_cli_bad_input_is_one_line_without_traceback(hf_dir, tmp_path):
    """Each item-7 error through `train.py`: exit code 1 or 2, one line on stderr."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    # A workdir with a checkpoint at step 4, then corrupted.
    broken = str(tmp_path / "broken")
    train.train_and_evaluate(tu.tiny_plugin_config(hf_dir, total_steps=4), broken)
    for root, _, files in os.walk(os.path.join(broken, "checkpoints", "4")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"not a checkpoint")
    base = (["--config=configs/plugin.py:stage=pretrain"]
            + tu.cli_flags({**tu.TINY_OVERRIDES, **tu.TINY_CORPUS}))
    ok_backbone = f"--config.backbone={hf_dir}"
    cases = {
        "no such directory": [f"--config.backbone={tmp_path}/missing"],
        "ratio must be an integer >= 1": [ok_backbone, "--config.plugin.ratio=0"],
        "empty corpus": [ok_backbone, f"--config.data.train=text:{empty}"],
        "unknown data source scheme 'ftp'": [ok_backbone, "--config.data.train=ftp:x"],
        "unknown task 'nope'": [ok_backbone, "--config.task=nope"],
        "cannot be restored": [ok_backbone, "--config.total_steps=8", "--override=total_steps",
                               f"--workdir={broken}"],
        "no config field 'nope'": [ok_backbone, "--config.nope=1"],
    }
    procs = {}
    for i, (expected, args) in enumerate(cases.items()):
        workdir = [] if any(a.startswith("--workdir") for a in args) else [
            f"--workdir={tmp_path}/w{i}"]
        procs[expected] = tu.train_py(base + args + workdir)
    for expected, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode in (1, 2), (expected, err)
        assert "Traceback" not in err and len(lines) == 1, (expected, err)
        assert lines[0].startswith("error: ") and expected in lines[0], (expected, lines)


def test_finetune_state_shards_backbone_and_adam_moments_alike(hf_dir, tmp_path):
    """Stage 0 on a 4 x 2 mesh: every weight and its AdamW moments share one layout."""
    config = tu.load_config("finetune", "task=pretrain")
    tiny = {k: v for k, v in tu.TINY_OVERRIDES.items() if not k.startswith("plugin.")}
    tu.override(config, {**tiny, **tu.TINY_CORPUS, "mesh.data": 4, "mesh.model": 2})
    config.backbone = hf_dir
    run = experiment.prepare(config, str(tmp_path / "ft"))
    tx, _ = trainer.make_optimizer(config)
    shardings, _ = run.backbone_shardings()
    from variator_jax import sharding as sh
    backbone = sh.put_global(run.host_backbone, shardings)
    abstract, state_sh, make = trainer.initial_state(run, tx, backbone)
    state = make()
    path = ("encoder", "layers", "layer_1", "DenseReluDense", "wi_0", "kernel")  # [layers, ...]
    adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's first part is scale_by_adam.

    def get(tree):
        for p in path:
            tree = tree[p]
        return tree

    from jax.sharding import PartitionSpec as P
    assert get(state.params).sharding.spec == P(None, None, "model")
    assert get(adam.mu).sharding.spec == get(adam.nu).sharding.spec == P(None, None, "model")
    assert state.step.sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(get(state.params)), get(run.host_backbone))
    assert not os.path.exists(str(tmp_path / "ft"))  # Preparing writes nothing.


REQUIRED_FIELDS = ("backbone", "tokenizer", "stage", "data.train", "data.eval", "data.data_dir",
                   "plugin.ratio", "plugin.bottleneck", "plugin.mask_aware", "batch_size",
                   "total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "seed",
                   "lr", "warmup_steps", "weight_decay", "clip_grad", "max_input_length",
                   "max_target_length", "mesh.data", "mesh.model")


@pytest.mark.parametrize("name,arg", [("plugin", "stage=pretrain"),
                                      ("plugin", "stage=adapt,task=mnli,size=base,ratio=8"),
                                      ("finetune", "task=squad,size=flan-t5-small")])
def test_configs_have_the_issue_fields_and_a_comment_on_each(name, arg):
    c = tu.load_config(name, arg)
    for field in REQUIRED_FIELDS:
        if field.startswith("plugin.") and name == "finetune":
            continue
        target = c
        for part in field.split("."):
            assert part in target, f"{name}: no field {field}"
            target = target[part]
    with open(os.path.join(tu.REPO, "variator_jax", "configs", f"{name}.py")) as f:
        assignments = [ln for ln in f if ln.lstrip().startswith("c.") and " = " in ln]
    assert assignments and all("#" in ln for ln in assignments), name
    if arg and "adapt" in arg:  # Presets: released settings per stage and task (docs/DESIGN.md §2).
        assert (c.lr, c.batch_size, c.max_input_length, c.plugin.ratio) == (1e-5, 32, 256, 8)
        assert c.variant == "t5-base" and c.data.train == "tfds:glue/mnli:train"
    if arg == "stage=pretrain":
        assert (c.lr, c.batch_size, c.total_steps, c.warmup_steps, c.weight_decay, c.clip_grad,
                c.max_input_length, c.max_target_length) == (1e-3, 64, 60_000, 50, 1e-5, 10.0,
                                                             224, 32)


def test_a_size_preset_must_match_the_backbone_directory(hf_dir, tmp_path):
    config = tu.tiny_plugin_config(hf_dir, "stage=pretrain,size=small")
    with pytest.raises(errors.UserError, match="is not a t5-small: d_model is 32"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")
