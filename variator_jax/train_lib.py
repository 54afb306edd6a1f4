"""Training's public entry: `train_and_evaluate(config, workdir)` and what callers import.

Three stages share one driver (docs/DESIGN.md §2), each an objective (objectives.py):
  - `finetune` (stage 0, `Finetune`): the whole backbone is trainable, task cross-entropy;
    the result is an HF-format backbone in `WORKDIR/backbone`.
  - `pretrain` (stage 1) and `adapt` (stage 2), `Distill`: the backbone is frozen, only the
    plugin is trained, by distillation from the same backbone without the plugin:
    loss = masked MSE(final encoder hidden) + masked MSE(final decoder hidden), plus the
    task cross-entropy for `loss="task+hidden"` (or only it, `loss="task"`). The result is a
    plugin directory `WORKDIR/plugin` (`save_plugin` format).

A config with an empty `backbone` and a `backbone_stage` sub-config first runs that stage
(a `finetune` config) in `WORKDIR/backbone_stage` and uses its output: this is how
`configs/demo.py` chains "pre-train a tiny T5" and "train a plugin on it". A finished stage
is recognised by its `result.json` and skipped.

Where the pieces live: experiment.py (config -> mesh, tokenizer, backbone, objective,
data), objectives.py (losses, eval sums, export), trainer.py (state, steps, loop,
checkpoints), progress.py (metrics.jsonl, TensorBoard, progress lines), errors.py.

Example (what `python train.py --config=configs/plugin.py:stage=pretrain` does):
  >>> config = variator_jax.configs.get_config("plugin", "stage=pretrain,ratio=4")
  >>> config.backbone = "/models/t5-base"
  >>> result = train_and_evaluate(config, "runs/t5-base-k4")
  >>> result["plugin_dir"], result["train"]["loss"], result["eval"]
"""
from __future__ import annotations

import contextlib
import json
import os

import jax
import ml_collections

from variator_jax import checkpoint as ckpt_lib
from variator_jax import integrity, trainer
from variator_jax import workdir as workdir_lib
from variator_jax.errors import (Interrupted, NonFiniteLoss, UserError, check_writable,
                                 user_errors)
from variator_jax.experiment import (STAGES, Experiment, check_config, prepare,
                                     runtime_fields)
from variator_jax.objectives import (LOSSES, Distill, Finetune, Objective, class_logits,
                                     eval_summary, masked_mse, task_ce)
from variator_jax.objectives import make as Setup  # The old name of an objective's maker.
from variator_jax.progress import METRICS_FILE, MetricWriter, progress_line, say
from variator_jax.trainer import (DIVERGED_DIR, RESULT_FILE, TrainState, create_state,
                                  eval_pass, make_eval_step, make_optimizer, make_train_step,
                                  lr_schedule)

__all__ = [
    "DIVERGED_DIR", "LOSSES", "METRICS_FILE", "RESULT_FILE", "STAGES", "Distill", "Experiment",
    "Finetune", "Interrupted", "MetricWriter", "NonFiniteLoss", "Objective", "Setup",
    "TrainState", "UserError", "check_config", "class_logits", "create_state", "eval_pass",
    "eval_summary", "loss_terms", "lr_schedule", "make_eval_step", "make_optimizer",
    "make_train_step", "masked_mse", "progress_line", "runtime_fields", "say", "task_ce",
    "train_and_evaluate", "train_step", "user_errors",
]


def train_step(state: TrainState, batch, frozen, *, setup: Objective, tx, schedule):
    """`trainer.train_step`, its objective passed as `setup` (the old keyword)."""
    return trainer.train_step(state, batch, frozen, objective=setup, tx=tx, schedule=schedule)


def loss_terms(setup: Objective, params, frozen, batch, dropout_rng, deterministic=False):
    """`setup.loss_terms(...)`: the loss term by term and the trained model's outputs."""
    return setup.loss_terms(params, frozen, batch, dropout_rng, deterministic)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       override=(), accept_data_change: bool = False) -> dict:
    """Trains as `config` says, in `workdir`; resumes from the latest checkpoint there.

    One run per workdir (a lock; a second one raises `UserError` naming the holder's PID).
    A resume whose result-changing fields (lr, schedule, batch, total_steps, data, ...)
    differ from the run's `config.json` is refused, unless each changed field is named in
    `override`; accepted changes go to `WORKDIR/changes.jsonl` with the step they start at.
    So is a resume on a data file that changed since the run began (its fingerprint is in
    `WORKDIR/data.json`), unless `accept_data_change`.

    Returns (and writes to `WORKDIR/result.json`): `stage`, `step`, `train` (the last logged
    training metrics), `eval` (final eval metrics, if `data.eval` is set), and `plugin_dir`
    (plugin stages) or `backbone_dir` (`finetune`). Raises `UserError` for bad input, and
    `Interrupted` after saving a checkpoint on SIGINT / SIGTERM.
    """
    workdir = os.path.abspath(workdir)
    check_writable(workdir)  # A read-only, full or file-blocked workdir: one line, now.
    config = _run_backbone_stage(config, workdir)
    exp = prepare(config, workdir)
    with user_errors(""):
        done = _finished_result(exp)
    if done is not None:
        say(f"{workdir}: already trained to step {done['step']}; nothing to do")
        return done
    exp.train_data, exp.eval_data = exp.train_batches(), exp.eval_batches()
    with _os_errors(), _locked(workdir) as still_ours:
        with user_errors(""):
            ckpt_lib.check_workdir(workdir, exp.identity)  # Again, now that no one else writes.
            done = _finished_result(exp)
            if done is not None:
                say(f"{workdir}: already trained to step {done['step']}; nothing to do")
                return done
            exp.record = json.loads(config.to_json_best_effort())
            workdir_lib.check_diverged(workdir, exp.record)
            resume_step = max(ckpt_lib.finished_steps(workdir), default=0)
            exp.changes = workdir_lib.check_record(workdir, exp.record, resume_step, override)
            exp.sources = {f"data.{name}": integrity.source_fingerprint(config.data[name])
                           for name in ("train", "eval") if config.data.get(name)}
            exp.changes.update(workdir_lib.check_data(workdir, exp.sources, resume_step,
                                                      accept_data_change, override))
        exp.still_ours = still_ours
        checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
        try:
            return trainer.train(exp, checkpointer)
        except NonFiniteLoss as e:
            if jax.process_index() == 0:
                workdir_lib.mark_diverged(workdir, exp.record, e.step, e.last_good, e.what)
            raise
        finally:
            checkpointer.close()


@contextlib.contextmanager
def _locked(workdir: str):
    """The workdir's lock, held by process 0 (one run per workdir, workdir.py); yields the
    check that the workdir is still the one locked (a no-op where this process holds no lock,
    and in a multi-process run, whose processes must all save together)."""
    with contextlib.ExitStack() as stack:
        still_ours = lambda: None
        if jax.process_index() == 0:
            with user_errors(""):  # WorkdirBusy: one line naming the holder.
                check = stack.enter_context(workdir_lib.lock(workdir))
            if jax.process_count() == 1:
                def still_ours():
                    with user_errors(""):  # WorkdirReplaced: one line too.
                        check()
        yield still_ours


@contextlib.contextmanager
def _os_errors():
    """A file that cannot be read or written (read-only, full disk, ...) -> one line naming
    it; the checkpoints saved before stay intact."""
    try:
        yield
    except UserError:
        raise
    except ckpt_lib.SaveError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise UserError(f"{where}{e.strerror or e}; the checkpoints saved so far are intact: "
                        "fix this and run the same command to resume") from None


def _run_backbone_stage(config, workdir: str):
    """Empty `backbone` + a `backbone_stage` config: run that stage first, use its output."""
    if config.backbone or config.stage == "finetune" or not config.get("backbone_stage"):
        return config
    check_config(config, backbone_pending=True)  # Fail now, not after stage 0 has trained.
    say(f"== backbone stage: {config.backbone_stage.stage} -> {workdir}/backbone_stage")
    result = train_and_evaluate(config.backbone_stage, os.path.join(workdir, "backbone_stage"))
    config = ml_collections.ConfigDict(config.to_dict())
    config.backbone = result["backbone_dir"]
    say(f"== {config.stage} stage on {config.backbone} -> {workdir}")
    return config


def _finished_result(exp: Experiment) -> dict | None:
    """The saved result of a run that already reached `total_steps` with its outputs."""
    path = os.path.join(exp.workdir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # Unreadable: train (resuming from the checkpoints) and write it anew.
    out = result.get("plugin_dir") or result.get("backbone_dir")
    if result.get("step") != exp.config.total_steps or not out or not os.path.isdir(out):
        return None
    # Finished, but with another config: its result is not this config's result.
    saved = workdir_lib.read_json(os.path.join(exp.workdir, workdir_lib.CONFIG_FILE))
    if isinstance(saved, dict):
        changes = workdir_lib.result_changes(
            saved, json.loads(exp.config.to_json_best_effort()))
        if changes:
            raise UserError(f"{exp.workdir} holds a run finished at step {result['step']} with "
                            f"another config: {workdir_lib.describe(changes)}; use another "
                            "--workdir (or extend this run: a larger total_steps and --override)")
    return result
