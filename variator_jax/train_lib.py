"""Training: train state, losses, `train_step` / `eval_step`, and `train_and_evaluate`.

Three stages share one driver (docs/DESIGN.md §2):
  - `finetune` (stage 0): the whole backbone is trainable, task cross-entropy; the result
    is an HF-format backbone in `WORKDIR/backbone`.
  - `pretrain` (stage 1) and `adapt` (stage 2): the backbone is frozen, only the plugin is
    trained, by distillation from the same backbone without the plugin (docs/DESIGN.md §2):
    loss = masked MSE(final encoder hidden) + masked MSE(final decoder hidden), plus the
    task cross-entropy for `loss="task+hidden"` (or only it, `loss="task"`). The result is a
    plugin directory `WORKDIR/plugin` (`save_plugin` format).

A config with an empty `backbone` and a `backbone_stage` sub-config first runs that stage
(a `finetune` config) in `WORKDIR/backbone_stage` and uses its output: this is how
`configs/demo.py` chains "pre-train a tiny T5" and "train a plugin on it". A finished stage
is recognised by its `result.json` and skipped.

Example (what `python train.py --config=configs/plugin.py:stage=pretrain` does):
  >>> config = variator_jax.configs.get_config("plugin", "stage=pretrain,ratio=4")
  >>> config.backbone = "/models/t5-base"
  >>> result = train_and_evaluate(config, "runs/t5-base-k4")
  >>> result["plugin_dir"], result["train"]["loss"], result["eval"]
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from variator_jax import checkpoint as ckpt_lib
from variator_jax import data as data_lib
from variator_jax import host, integrity, pipeline, plugin_file, sharding
from variator_jax import workdir as workdir_lib
from variator_jax.convert import CheckpointError, load_hf_t5, save_hf_t5
from variator_jax.fileio import atomic_write, write_text
from variator_jax.metrics import glue_metric
from variator_jax.model import apply_forward as forward  # Un-jitted: steps jit as a whole.
from variator_jax.plugins import (Plugin, PluginConfig, backbone_identity, fingerprint_of,
                                  init_plugin, load_plugin, plugin_param_count, save_plugin)
from variator_jax.plugins import logical_axes as plugin_logical_axes
from variator_jax.t5 import T5Config, init_t5, logical_axes

STAGES = ("finetune", "pretrain", "adapt")
LOSSES = ("hidden", "task", "task+hidden")
RESULT_FILE = "result.json"
DIVERGED_DIR = "checkpoints_diverged"  # Checkpoints whose state gave the first bad loss.
METRICS_FILE = "metrics.jsonl"


class UserError(Exception):
    """A problem with the user's input (config, paths, data, workdir); `train.py` prints its
    one-line message and exits non-zero, without a traceback."""


class NonFiniteLoss(UserError):
    """Training diverged; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int = 0, last_good: int | None = None,
                 what: str = ""):
        super().__init__(message)
        self.step, self.last_good, self.what = step, last_good, what


class Interrupted(UserError):
    """SIGINT or SIGTERM: a checkpoint was saved, the same command resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# Exceptions that, raised while reading the user's config, files and data, mean bad input.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                 PermissionError, CheckpointError, KeyError)


@contextlib.contextmanager
def user_errors(what: str):
    """Turns bad-input exceptions raised inside into a one-line `UserError` ("WHAT: msg")."""
    try:
        yield
    except UserError:
        raise
    except _INPUT_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}: {msg}" if what else msg) from None


_user_errors = user_errors  # (Old name, used by evaluate.py.)


# ================================================================================================
# Train state and optimizer
# ================================================================================================
@flax.struct.dataclass
class TrainState:
    """Everything a step updates and a checkpoint holds.

    `params` is the plugin tree (plugin stages) or the backbone tree (`finetune`); the frozen
    backbone of the plugin stages is not in here, it is an argument of the step.
    `rng` is raw key data (uint32 [2]) so that checkpoints hold plain arrays.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def lr_schedule(lr: float, warmup_steps: int, total_steps: int) -> Callable:
    """Linear warm-up to `lr` over `warmup_steps` (the first step already at lr/warmup, as
    BMTrain's scheduler in the released code), then linear decay to 0 at `total_steps`."""
    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = (count + 1.0) / max(warmup_steps, 1)
        decay = (total_steps - count) / max(total_steps - warmup_steps, 1)
        return lr * jnp.clip(jnp.minimum(warm, decay), 0.0, 1.0)
    return schedule


def make_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (decoupled weight decay) after global-norm clipping; -> (tx, schedule)."""
    schedule = lr_schedule(config.lr, config.warmup_steps, config.total_steps)
    clip = optax.clip_by_global_norm(config.clip_grad) if config.clip_grad > 0 else optax.identity()
    return optax.chain(clip, optax.adamw(schedule, weight_decay=config.weight_decay)), schedule


def create_state(params, rng, tx) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(rng))


# ================================================================================================
# Losses and steps
# ================================================================================================
@dataclasses.dataclass(frozen=True)
class Setup:
    """What a step computes; static (hashable), so it is baked into the compiled step.

    pcfg: the plugin's config; None for full fine-tuning of the backbone.
    loss: "hidden", "task" or "task+hidden" (plugin stages; `finetune` is always "task").
    kind: the task's kind, "pretrain" | "classification" | "generation".
    verbalizer: classification only, the label tokens whose logits at the first decoder
      position are the class scores.
    dropout: the student (or the fine-tuned backbone) runs with the backbone's dropout; the
      teacher never does.
    """
    cfg: T5Config
    pcfg: PluginConfig | None
    loss: str
    kind: str
    verbalizer: tuple[int, ...] | None = None
    dropout: bool = True


def masked_mse(student, teacher, mask):
    """Mean squared error over real positions and features: [batch, len, d], mask [batch, len]."""
    w = mask.astype(jnp.float32)[..., None]
    se = jnp.sum(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)) * w)
    return se / (jnp.maximum(jnp.sum(w), 1.0) * student.shape[-1])


def class_logits(setup: Setup, logits):
    """[batch, m, vocab] -> [batch, num_labels]: verbalizer logits at the first position."""
    return logits[:, 0, jnp.asarray(setup.verbalizer)]


def task_ce(setup: Setup, logits, batch, weight=None):
    """Cross-entropy: over the label words for classification, else over every real target
    token (span corruption targets, answers). -> (sum, count) for exact weighted means."""
    if setup.kind == "classification":
        ce = optax.softmax_cross_entropy_with_integer_labels(class_logits(setup, logits),
                                                             batch["label"])
        w = jnp.ones_like(ce) if weight is None else weight
        return jnp.sum(ce * w), jnp.sum(w)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["decoder_attention_mask"].astype(jnp.float32)
    if weight is not None:
        w = w * weight[:, None]
    return jnp.sum(ce * w), jnp.sum(w)


def _inputs(batch):
    return (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
            batch["decoder_attention_mask"])


def loss_terms(setup: Setup, params, backbone, batch, dropout_rng, deterministic=False):
    """The loss, term by term (their sum is minimised), and the student's outputs.

    Plugin stages: `params` is the plugin, `backbone` is frozen (stop_gradient: no backbone
    weight gradients are ever formed); the teacher is the same backbone without the plugin.
    `finetune`: `params` is the backbone, `backbone` is unused.
    """
    drop = dict(deterministic=deterministic or not setup.dropout, dropout_rng=dropout_rng)
    cfg = setup.cfg
    if setup.pcfg is None:
        out = forward(cfg, params, *_inputs(batch), **drop)
        ce_sum, ce_n = task_ce(setup, out["logits"], batch)
        return {"task_ce": ce_sum / jnp.maximum(ce_n, 1.0)}, out
    backbone = jax.lax.stop_gradient(backbone)
    student = forward(cfg, backbone, *_inputs(batch), plugin=Plugin(setup.pcfg, params), **drop)
    terms = {}
    if "hidden" in setup.loss:
        teacher = jax.lax.stop_gradient(forward(cfg, backbone, *_inputs(batch)))
        terms["enc_mse"] = masked_mse(student["encoder_hidden"], teacher["encoder_hidden"],
                                      batch["attention_mask"])
        terms["dec_mse"] = masked_mse(student["decoder_hidden"], teacher["decoder_hidden"],
                                      batch["decoder_attention_mask"])
    if "task" in setup.loss:
        ce_sum, ce_n = task_ce(setup, student["logits"], batch)
        terms["task_ce"] = ce_sum / jnp.maximum(ce_n, 1.0)
    return terms, student


def train_step(state: TrainState, batch, backbone, *, setup: Setup, tx, schedule):
    """One optimizer step. -> (new state, metrics: loss, each term, lr, grad_norm, tokens).

    Pure; `make_train_step` jits it with explicit shardings and donates `state`. The dropout
    key is `fold_in(state.rng, step)`, so a resumed run draws the same masks.
    """
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        terms, _ = loss_terms(setup, params, backbone, batch, dropout_rng)
        return sum(terms.values()), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = (jnp.sum(batch["attention_mask"]) + jnp.sum(batch["decoder_attention_mask"]))
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step), tokens=tokens.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, backbone, *, setup: Setup):
    """Sums over one eval batch (rows with `weight` 0 are padding and count for nothing),
    plus per-example class predictions for classification. Divide sums on the host."""
    w = batch["weight"].astype(jnp.float32)
    masked = dict(batch, attention_mask=batch["attention_mask"] * (w[:, None] > 0),
                  decoder_attention_mask=batch["decoder_attention_mask"] * (w[:, None] > 0))
    out = {"count": jnp.sum(w)}
    if setup.pcfg is None:
        student = forward(setup.cfg, params, *_inputs(masked))
        teacher = None
    else:
        student = forward(setup.cfg, backbone, *_inputs(masked), plugin=Plugin(setup.pcfg, params))
        teacher = forward(setup.cfg, backbone, *_inputs(masked))
        for name, mask in (("enc", masked["attention_mask"]),
                           ("dec", masked["decoder_attention_mask"])):
            n = jnp.sum(mask) * setup.cfg.d_model
            mse = masked_mse(student[f"{name}oder_hidden"], teacher[f"{name}oder_hidden"], mask)
            out[f"{name}_se"], out[f"{name}_n"] = mse * jnp.maximum(n, 1.0), n
    out["ce_sum"], out["ce_n"] = task_ce(setup, student["logits"], masked, w)
    if teacher is not None:
        out["teacher_ce_sum"], _ = task_ce(setup, teacher["logits"], masked, w)
        if setup.kind != "classification":  # How often the student predicts the teacher's token.
            same = jnp.argmax(student["logits"], -1) == jnp.argmax(teacher["logits"], -1)
            out["agree_sum"] = jnp.sum(same * masked["decoder_attention_mask"])
    if setup.kind == "classification":
        out["pred"] = jnp.argmax(class_logits(setup, student["logits"]), -1)
        if teacher is not None:
            out["teacher_pred"] = jnp.argmax(class_logits(setup, teacher["logits"]), -1)
        out["label"], out["weight"] = batch["label"], w
    return out


def _on_mesh(fn, mesh, rules):
    """`fn` traced with activations constrained by `rules` on `mesh` (the residual stream,
    CPU attention blocks per device; see `sharding.activation_sharding`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def make_train_step(setup: Setup, tx, schedule, mesh, state_shardings, backbone_shardings,
                    rules=sharding.DEFAULT_RULES):
    """`train_step` under `jax.jit`: state and backbone placed by their shardings, the batch
    over `data`, metrics replicated; the old state's buffers are donated to the new one."""
    batch_sharding = sharding.batch_sharding(mesh, rules)  # A prefix for every batch array.
    step = functools.partial(train_step, setup=setup, tx=tx, schedule=schedule)
    return jax.jit(_on_mesh(step, mesh, rules),
                   in_shardings=(state_shardings, batch_sharding, backbone_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def make_eval_step(setup: Setup, mesh, params_shardings, backbone_shardings,
                   rules=sharding.DEFAULT_RULES):
    return jax.jit(_on_mesh(functools.partial(eval_step, setup=setup), mesh, rules),
                   in_shardings=(params_shardings, sharding.batch_sharding(mesh, rules),
                                 backbone_shardings),
                   out_shardings=sharding.replicated(mesh))


# ================================================================================================
# What the user sees: metrics.jsonl, TensorBoard, progress lines
# ================================================================================================
def say(msg: str) -> None:
    """A line for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


class MetricWriter:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars
    under `WORKDIR/tensorboard`, from process 0 only.

    Events go through tensorboard's own record writer onto a plain file: clu's
    `SummaryWriter` (and tensorboard's `EventFileWriter`) import TensorFlow when it is
    installed, ten seconds per start on a small CPU machine, for a few scalars.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self._enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._events = None
        if not self._enabled:
            return
        self._truncate(resume_step)
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        logdir = os.path.join(workdir, "tensorboard")
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._events = RecordWriter(open(os.path.join(logdir, name), "wb"))
        self._events.write(Event(wall_time=time.time(), file_version="brain.Event:2")
                           .SerializeToString())

    def _truncate(self, resume_step: int) -> None:
        """A run resumed from step s repeats the steps after s: drop their old lines."""
        if not os.path.isfile(self._path):
            return
        kept = [ln for ln, parsed in _read_jsonl(self._path)
                if parsed is not None and parsed.get("step", 0) <= resume_step]
        with open(self._path, "w") as f:
            f.writelines(kept)

    def last(self) -> dict[str, float]:
        """The last training line written (what a resumed-at-the-end run reports)."""
        if not os.path.isfile(self._path):
            return {}
        lines = [parsed for _, parsed in _read_jsonl(self._path) if parsed is not None]
        train = [ln for ln in lines if "loss" in ln]
        return {k: v for k, v in train[-1].items() if k != "step"} if train else {}

    def lowest_loss(self) -> float | None:
        """The lowest training loss logged so far (a resumed run's yardstick for spikes)."""
        if not os.path.isfile(self._path):
            return None
        losses = [p["loss"] for _, p in _read_jsonl(self._path)
                  if p is not None and isinstance(p.get("loss"), (int, float))]
        return min(losses) if losses else None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
                    + "\n")
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                 for k, v in scalars.items()])
        self._events.write(Event(wall_time=time.time(), step=int(step), summary=summary)
                           .SerializeToString())
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _read_jsonl(path: str) -> list[tuple[str, dict | None]]:
    """(line, parsed object or None) for each non-blank line; a line cut short by a crash or
    a full disk parses to None (and is then dropped, not fatal)."""
    out = []
    with open(path) as f:
        for ln in f:
            if not ln.strip():
                continue
            try:
                parsed = json.loads(ln)
            except ValueError:
                parsed = None
            out.append((ln if ln.endswith("\n") else ln + "\n",
                        parsed if isinstance(parsed, dict) else None))
    return out


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """e.g. `step  40/100  loss 1.23e-02 (enc_mse 1.0e-02 dec_mse 2.3e-03)  lr 9.8e-04 ...`"""
    terms = " ".join(f"{k} {scalars[k]:.3e}" for k in ("enc_mse", "dec_mse", "task_ce")
                     if k in scalars)
    width = len(str(total))
    eta = (total - step) / scalars["steps_per_sec"] if scalars.get("steps_per_sec") else 0.0
    return (f"step {step:>{width}}/{total}  loss {scalars['loss']:.4e} ({terms})  "
            f"lr {scalars['lr']:.2e}  grad_norm {scalars['grad_norm']:.3g}  "
            f"{scalars.get('steps_per_sec', 0):.2f} steps/s  "
            f"{scalars.get('tokens_per_sec', 0) / 1e3:.1f}k tokens/s  "
            f"ETA {_format_duration(eta)}")


def parameter_overview(cfg: T5Config, pcfg: PluginConfig | None, backbone_count: int) -> str:
    if pcfg is None:
        return f"Parameters: backbone {backbone_count:,} (trainable, full fine-tuning)"
    n = plugin_param_count(cfg, pcfg)
    return (f"Parameters: backbone {backbone_count:,} (frozen) | plugin k={pcfg.ratio} "
            f"r={pcfg.bottleneck}: {n:,} (trainable, {100 * n / backbone_count:.2f} % of the "
            f"backbone) over {cfg.num_layers} encoder layers")


# ================================================================================================
# The driver
# ================================================================================================
@dataclasses.dataclass
class _Run:
    """What `train_and_evaluate` builds before it trains (nothing here has touched disk)."""
    config: Any
    workdir: str
    mesh: Any
    rules: tuple
    tokenizer: Any
    cfg: T5Config
    pcfg: PluginConfig | None
    setup: Setup
    host_backbone: Any  # numpy tree from disk, or None (random init, `finetune` only).
    backbone_id: dict  # Name, sizes and fingerprint, recorded with the plugin.
    identity: dict  # What must match to resume in this workdir (run.json).
    record: dict | None = None  # The config as JSON (config.json), once accepted.
    changes: dict = dataclasses.field(default_factory=dict)  # Overridden fields, accepted.
    train_data: Any = None
    eval_data: Any = None
    eval_step: Any = None  # Compiled on first use.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       override=()) -> dict:
    """Trains as `config` says, in `workdir`; resumes from the latest checkpoint there.

    One run per workdir (a lock; a second one raises `UserError` naming the holder's PID).
    A resume whose result-changing fields (lr, schedule, batch, total_steps, data, ...)
    differ from the run's `config.json` is refused, unless each changed field is named in
    `override`; accepted changes go to `WORKDIR/changes.jsonl` with the step they start at.

    Returns (and writes to `WORKDIR/result.json`): `stage`, `step`, `train` (the last logged
    training metrics), `eval` (final eval metrics, if `data.eval` is set), and `plugin_dir`
    (plugin stages) or `backbone_dir` (`finetune`). Raises `UserError` for bad input, and
    `Interrupted` after saving a checkpoint on SIGINT / SIGTERM.
    """
    workdir = os.path.abspath(workdir)
    config = _run_backbone_stage(config, workdir)
    run = _prepare(config, workdir)
    with user_errors(""):
        done = _finished_result(run)
    if done is not None:
        say(f"{workdir}: already trained to step {done['step']}; nothing to do")
        return done
    _prepare_data(run)
    with _os_errors(), _locked(workdir):
        with user_errors(""):
            ckpt_lib.check_workdir(workdir, run.identity)  # Again, now that no one else writes.
            done = _finished_result(run)
            if done is not None:
                say(f"{workdir}: already trained to step {done['step']}; nothing to do")
                return done
            run.record = json.loads(config.to_json_best_effort())
            workdir_lib.check_diverged(workdir, run.record)
            run.changes = workdir_lib.check_record(
                workdir, run.record, max(ckpt_lib.finished_steps(workdir), default=0),
                override)
            ckpt_lib.claim_workdir(workdir, run.identity)
        checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
        try:
            return _train(run, checkpointer)
        except NonFiniteLoss as e:
            if jax.process_index() == 0:
                workdir_lib.mark_diverged(workdir, run.record, e.step, e.last_good, e.what)
            raise
        finally:
            checkpointer.close()


@contextlib.contextmanager
def _locked(workdir: str):
    """The workdir's lock, held by process 0 (one run per workdir, workdir.py)."""
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            with user_errors(""):  # WorkdirBusy: one line naming the holder.
                stack.enter_context(workdir_lib.lock(workdir))
        yield


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


def _accept(run: _Run, step: int) -> None:
    """The start is accepted (checkpoint restored or fresh state made): only now is the run
    record written. Extending a finished run keeps its old output and result aside."""
    if jax.process_index() != 0:
        return
    workdir_lib.write_record(run.workdir, json.dumps(run.record, indent=2) + "\n",
                             run.changes, step)
    if not 0 < step < run.config.total_steps:
        return
    try:  # The step the outputs are from (a corrupt final checkpoint may resume earlier).
        finished = int(workdir_lib.read_json(os.path.join(run.workdir, RESULT_FILE))["step"])
    except (ValueError, TypeError, KeyError):
        finished = step
    for name in ("plugin", "backbone", RESULT_FILE):
        path = os.path.join(run.workdir, name)
        if os.path.exists(path):
            stem, ext = os.path.splitext(name)
            kept = os.path.join(run.workdir, f"{stem}_step{finished}{ext}")
            os.replace(path, kept)
            say(f"Extending the run finished at step {finished}: its {name} is kept as {kept}")


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


# -- Checking the input, before anything is written --------------------------------------------
def check_config(config, backbone_pending: bool = False) -> None:
    """Raises UserError naming the first bad field. `backbone_pending`: an empty `backbone`
    is fine, a `backbone_stage` will make it."""
    if config.stage not in STAGES:
        raise UserError(f"config.stage {config.stage!r} is not one of {', '.join(STAGES)}")
    with user_errors("config.task"):
        data_lib.get_task(config.task)
    if config.stage != "finetune":
        if config.get("loss", "hidden") not in LOSSES:
            raise UserError(f"config.loss {config.loss!r} is not one of {', '.join(LOSSES)}")
        if not isinstance(config.plugin.ratio, int) or config.plugin.ratio < 1:
            raise UserError(f"config.plugin.ratio must be an integer >= 1, got "
                            f"{config.plugin.ratio!r}")
        if not config.backbone and not backbone_pending:
            raise UserError("config.backbone is empty: set --config.backbone=DIR, an HF T5 "
                            "directory (config.json + model.safetensors)")
    for name in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "max_input_length", "max_target_length"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise UserError(f"config.{name} must be a positive integer, got {config[name]!r}")
    for name in ("lr", "warmup_steps", "weight_decay", "clip_grad"):
        # Finite in float32, where the optimizer computes: 1e39 is inf there.
        if not plugin_file.is_finite_number(config[name]) or config[name] < 0:
            raise UserError(f"config.{name} must be a finite number >= 0, got {config[name]!r}")
    for name in ("train", "eval"):
        spec = config.data.get(name)
        if spec or name == "train":
            with user_errors(f"config.data.{name}"):
                data_lib.parse_source(spec)
    if config.backbone and not os.path.isdir(config.backbone):
        raise UserError(f"config.backbone: {config.backbone}: no such directory (expected an HF "
                        "T5 directory: config.json + model.safetensors)")


def _prepare(config, workdir: str) -> _Run:
    check_config(config)
    with user_errors("mesh"):
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
        rules = tuple(tuple(r) for r in config.mesh.get("rules", sharding.DEFAULT_RULES))
        if config.mesh.get("fsdp", False):
            rules = sharding.with_fsdp(rules)
        sharding.mesh_spec(("batch",), rules)  # Validates the rules.
    blocks = mesh.shape["data"]
    for name in ("batch_size", "eval_batch_size"):
        if config.get(name) and config[name] % blocks:
            raise UserError(f"config.{name} {config[name]} is not divisible by the mesh's "
                            f"data axis ({blocks} devices)")
    with user_errors("tokenizer"):
        tokenizer = data_lib.load_tokenizer(config.get("tokenizer") or None,
                                            config.backbone or None)
    cfg, host_backbone, backbone_id = _load_backbone(config, tokenizer)
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the backbone's "
                        f"vocab_size {cfg.vocab_size}")
    task = data_lib.get_task(config.task)
    pcfg = None
    if config.stage != "finetune":
        with user_errors("config.plugin"):
            pcfg = PluginConfig(ratio=config.plugin.ratio, bottleneck=config.plugin.bottleneck,
                                mask_aware=config.plugin.mask_aware)
    loss = "task" if pcfg is None else config.loss
    verbalizer = None
    if task.kind == "classification":
        with user_errors(f"task {task.name}"):
            verbalizer = tuple(int(i) for i in task.verbalizer_ids(tokenizer))
    setup = Setup(cfg, pcfg, loss, task.kind, verbalizer, bool(config.get("dropout", True)))
    # The backbone's path is left out: a moved directory is still the same backbone.
    identity = {"stage": config.stage, "task": task.name,
                "backbone": {k: v for k, v in backbone_id.items() if k != "name"}}
    if pcfg is not None:
        identity["plugin"] = dict(ratio=pcfg.ratio, bottleneck=pcfg.bottleneck,
                                  mask_aware=pcfg.mask_aware)
    with user_errors(""):
        saved = (ckpt_lib.read_identity(workdir) or {}).get("backbone")
        if isinstance(saved, dict) and "fingerprint_version" not in saved and host_backbone \
                is not None and "fingerprint_version" in identity["backbone"]:
            # A workdir from before fingerprint version 2: compare the way it was recorded.
            identity["backbone"] = dict(identity["backbone"],
                                        fingerprint=fingerprint_of(saved, host_backbone))
            del identity["backbone"]["fingerprint_version"]
        ckpt_lib.check_workdir(workdir, identity)
    return _Run(config, workdir, mesh, rules, tokenizer, cfg, pcfg, setup, host_backbone,
                backbone_id, identity)


def runtime_fields(config) -> dict:
    """How the model runs (T5Config's runtime fields) as the config says: compute dtype,
    scanned layers, rematerialisation, and the CPU attention block budget of this process."""
    return dict(dtype=config.get("dtype", "float32"), scan_layers=config.get("scan_layers", True),
                remat=config.get("remat", "none"), attention_block_bytes=host.attention_block_bytes())


def _load_backbone(config, tokenizer):
    """-> (T5Config, numpy tree or None for a random init, identity dict)."""
    runtime = runtime_fields(config)
    with user_errors("config"):
        T5Config(**runtime)  # A bad remat name fails here, in one line.
    if config.backbone:
        with user_errors(f"backbone {config.backbone}"):
            cfg, tree = load_hf_t5(config.backbone, **runtime)
        _check_variant(cfg, config.get("variant"), config.backbone)
        return cfg, tree, backbone_identity(cfg, tree)
    if not config.get("variant"):  # Only `finetune` gets here (check_config).
        raise UserError("config.backbone is empty and config.variant is not set: give an HF T5 "
                        "directory, or a variant (e.g. t5-small) to train from a random init")
    overrides = (config.get("model_overrides") or ml_collections.ConfigDict()).to_dict()
    overrides.setdefault("vocab_size", len(tokenizer))
    with user_errors("config.variant"):
        cfg = T5Config.variant(config.variant, **runtime, **overrides)
    return cfg, None, {"name": f"random {config.variant}", "seed": config.seed,
                       "d_model": cfg.d_model, "num_layers": cfg.num_layers,
                       "vocab_size": cfg.vocab_size}


def _check_variant(cfg: T5Config, variant: str | None, path: str) -> None:
    """A `size=`/`variant` in the config must match the directory's config.json."""
    if not variant:
        return
    with user_errors("config.variant"):
        want = T5Config.variant(variant)
    for field in ("d_model", "num_layers", "num_heads", "d_ff", "feed_forward_proj"):
        if getattr(cfg, field) != getattr(want, field):
            raise UserError(f"backbone {path} is not a {variant}: {field} is "
                            f"{getattr(cfg, field)}, a {variant} has {getattr(want, field)}")


def _prepare_data(run: _Run) -> None:
    config = run.config
    index, count = sharding.data_shard(run.mesh, run.rules)
    lengths = dict(max_input_length=config.max_input_length,
                   max_target_length=config.max_target_length)
    with user_errors(f"data.train {config.data.train}"):
        run.train_data = data_lib.train_batches(
            config.data.train, config.task, run.tokenizer, global_batch_size=config.batch_size,
            seed=config.seed, data_dir=config.data.get("data_dir") or None,
            split=config.data.get("train_split") or None, process_index=index,
            process_count=count, workers=config.data.get("workers") or 0, **lengths)
    if config.data.get("eval"):
        eval_batch = config.get("eval_batch_size") or config.batch_size
        with user_errors(f"data.eval {config.data.eval}"):
            run.eval_data = data_lib.eval_batches(
                config.data.eval, config.task, run.tokenizer, global_batch_size=eval_batch,
                seed=config.seed, data_dir=config.data.get("data_dir") or None,
                split=config.data.get("eval_split") or None, process_index=index,
                process_count=count, **lengths)


def _finished_result(run: _Run) -> dict | None:
    """The saved result of a run that already reached `total_steps` with its outputs."""
    path = os.path.join(run.workdir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # Unreadable: train (resuming from the checkpoints) and write it anew.
    out = result.get("plugin_dir") or result.get("backbone_dir")
    if result.get("step") != run.config.total_steps or not out or not os.path.isdir(out):
        return None
    # Finished, but with another config: its result is not this config's result.
    saved = workdir_lib.read_json(os.path.join(run.workdir, workdir_lib.CONFIG_FILE))
    if isinstance(saved, dict):
        changes = workdir_lib.result_changes(
            saved, json.loads(run.config.to_json_best_effort()))
        if changes:
            raise UserError(f"{run.workdir} holds a run finished at step {result['step']} with "
                            f"another config: {workdir_lib.describe(changes)}; use another "
                            "--workdir (or extend this run: a larger total_steps and --override)")
    return result


# -- Placing the backbone and the state on the mesh ----------------------------------------------
def _backbone_shardings(run: _Run):
    shapes = jax.eval_shape(functools.partial(init_t5, cfg=run.cfg), jax.random.key(0))
    return sharding.tree_shardings(run.mesh, logical_axes(run.cfg), shapes, run.rules), shapes


def _state_shardings(run: _Run, abstract_state: TrainState, tx, param_shardings):
    """Optimizer moments follow their parameters' shardings; scalars are replicated."""
    repl = sharding.replicated(run.mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
                                transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=param_shardings, opt_state=opt, rng=repl)


def _initial_state(run: _Run, tx, finetune_from=None):
    """-> (abstract state with shardings, state shardings, function making the fresh state).

    Nothing is materialised here: the fresh state is built inside a jit whose
    `out_shardings` place it (big_vision), and only if no checkpoint is restored instead.
    Loaded trees (`finetune_from`, the backbone to fine-tune; an `init_plugin`) enter that
    jit as arguments, never as captured constants, and are donated to the state.
    """
    config, cfg = run.config, run.cfg
    param_key, state_key = jax.random.split(jax.random.key(config.seed))
    loaded = None  # Parameters that come from disk rather than from an initialiser.
    if run.pcfg is None:  # finetune: the backbone is the trainable tree.
        param_shardings, _ = _backbone_shardings(run)
        loaded = finetune_from
        init = lambda: init_t5(param_key, cfg)
    else:
        shapes = jax.eval_shape(init_plugin, param_key, cfg, run.pcfg)
        # Replicated by the default rules; sharded with the backbone under FSDP.
        param_shardings = sharding.tree_shardings(run.mesh, plugin_logical_axes(shapes), shapes,
                                                  run.rules)
        init = lambda: init_plugin(param_key, cfg, run.pcfg)
        if config.get("init_plugin"):
            loaded = _load_init_plugin(run, param_shardings)

    def make(params):
        return create_state(init() if params is None else params, state_key, tx)

    abstract = jax.eval_shape(make, loaded)
    shardings = _state_shardings(run, abstract, tx, param_shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    in_sh = (None if loaded is None else param_shardings,)
    donate = () if loaded is None else (0,)
    return abstract, shardings, lambda: jax.jit(make, in_shardings=in_sh, out_shardings=shardings,
                                                donate_argnums=donate)(loaded)


def _load_init_plugin(run: _Run, param_shardings):
    """Adaptation starts from the pre-trained plugin (docs/DESIGN.md §2, step 2)."""
    path = run.config.init_plugin
    with user_errors(f"init_plugin {path}"):
        pcfg, host_plugin = load_plugin(path, cfg=run.cfg)
    if pcfg != run.pcfg:
        raise UserError(f"init_plugin {path} has ratio={pcfg.ratio}, bottleneck="
                        f"{pcfg.bottleneck}, mask_aware={pcfg.mask_aware}; the config asks "
                        f"for ratio={run.pcfg.ratio}, bottleneck={run.pcfg.bottleneck}, "
                        f"mask_aware={run.pcfg.mask_aware}")
    return sharding.put_global(jax.tree.map(np.asarray, host_plugin), param_shardings)


def _to_host(tree):
    """Global arrays (any sharding, any process count) -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# -- The loop -----------------------------------------------------------------------------------
def _train(run: _Run, checkpointer: ckpt_lib.Checkpointer) -> dict:
    config = run.config
    tx, schedule = make_optimizer(config)
    backbone_shardings, backbone_shapes = _backbone_shardings(run)
    backbone_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(backbone_shapes))
    say(parameter_overview(run.cfg, run.pcfg, backbone_count))
    say(f"Mesh: {dict(run.mesh.shape)} over {run.mesh.size} device(s) "
        f"({jax.devices()[0].platform}), {jax.process_count()} process(es)")

    start = checkpointer.latest_step() or 0
    backbone = None  # On the devices: the frozen backbone, or the one fine-tuning starts from.
    if run.host_backbone is not None and (run.pcfg is not None or not start):
        backbone = sharding.put_global(run.host_backbone, backbone_shardings)
    run.host_backbone = None  # Host memory back (an 11B model is 44 GB of float32).
    frozen = None if run.pcfg is None else backbone
    abstract, state_shardings, make_state = _initial_state(
        run, tx, backbone if run.pcfg is None else None)
    if start:
        with user_errors(""):  # A corrupt newest checkpoint falls back to the one before.
            start, state, data_state = checkpointer.restore_latest(abstract, say)
            run.train_data.set_state(data_state)
        say(f"Resumed from {checkpointer.directory}/{start}")
    else:
        state = make_state()
    _accept(run, start)
    del backbone  # Fine-tuning: donated into the state; plugin stages keep it as `frozen`.
    step_fn = make_train_step(run.setup, tx, schedule, run.mesh, state_shardings,
                              None if frozen is None else backbone_shardings, run.rules)
    writer = MetricWriter(run.workdir, resume_step=start)
    try:
        state, last = _loop(run, state, frozen, step_fn, checkpointer, writer, start)
        result = _finish(run, state, frozen, last or writer.last(), writer)
    finally:
        writer.close()
    return result


def _loop(run: _Run, state, frozen, step_fn, checkpointer, writer, start: int):
    config = run.config
    total = config.total_steps
    last_good = start or None
    pending, logged = [], {}
    compiled, t0 = None, time.time()
    # The lowest loss so far: a loss `divergence_factor` times above it is a divergence.
    # (Not across a change of config: another loss or data has another scale.)
    best = [writer.lowest_loss() if jax.process_index() == 0 and start and not run.changes
            else None]
    if jax.process_count() > 1:  # Only process 0 reads metrics.jsonl.
        best = [float(multihost_utils.broadcast_one_to_all(
            np.float64(np.nan if best[0] is None else best[0])))]
        best = [None if math.isnan(best[0]) else best[0]]
    check = functools.partial(_check_finite, best=best,
                              factor=float(config.get("divergence_factor", 1e3)))
    with _StopRequests() as stop:
        for step in range(start, total):
            with user_errors(f"data.train {config.data.train}"):  # A bad record stops the run.
                local = next(run.train_data)
            batch = sharding.global_batch(run.mesh, local, run.rules)
            if compiled is None:  # Compile ahead, so the first window's speed is the step's.
                tic = time.time()
                compiled = step_fn.lower(state, batch, frozen).compile()
                say(f"Compiled the train step in {time.time() - tic:.1f}s; training steps "
                    f"{start + 1}..{total}")
                t0, since = time.time(), step
            state, metrics = compiled(state, batch, frozen)
            pending.append(metrics)
            done = step + 1
            checkpointer.check_for_errors()  # A failed background save stops training now.
            if done % config.log_every == 0 or done == total:
                window = jax.device_get(pending)
                check(window, done, last_good, checkpointer)
                logged = _mean(window)
                elapsed = max(time.time() - t0, 1e-9)
                logged["steps_per_sec"] = (done - since) / elapsed
                logged["tokens_per_sec"] = logged.pop("tokens") * (done - since) / elapsed
                writer.write(done, logged)
                say(progress_line(done, total, logged))
                pending, t0, since = [], time.time(), done
            signum = stop.requested(done % config.log_every == 0)
            if done % config.checkpoint_every == 0 or done == total or signum:
                check(jax.device_get([metrics]), done, last_good, checkpointer)
                _check_state(state, done, last_good, checkpointer)
                checkpointer.save(done, state, pipeline.gather_state(run.train_data.get_state()))
                last_good = done
            if signum and done < total:
                checkpointer.wait()
                raise Interrupted(f"interrupted at step {done}; run the same command to "
                                  "resume", signum)
            if config.get("eval_every") and done % config.eval_every == 0 and done < total:
                _evaluate(run, state.params, frozen, writer, done)
    return state, logged


class _StopRequests:
    """SIGINT / SIGTERM while training: remembered, and acted on at the end of the step (a
    checkpoint, then `Interrupted`). A second signal of the same kind acts at once, as usual.
    Multi-host: each host may get the signal at another step, so hosts agree (an all-gather)
    at log steps only."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self._got, self._old = 0, {}
        try:
            for sig in self._SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            self._old = {}
        return self

    def _handle(self, signum, frame):
        del frame
        self._got = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # The next one kills.

    def requested(self, sync_point: bool) -> int:
        """The signal number to stop for (0: none), the same on every process."""
        if jax.process_count() == 1:
            return self._got
        if not sync_point:
            return 0
        return int(np.max(multihost_utils.process_allgather(np.int32(self._got))))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _mean(metrics: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}


def _diverged(what: str, step: int, last_good: int | None, checkpointer,
              first_bad: int | None = None) -> NonFiniteLoss:
    """The error to raise; a checkpoint whose state gave the first non-finite loss (step
    `first_bad`) is not good after all: it is set aside, and the one before is the last good."""
    checkpointer.wait()
    if last_good and first_bad is not None and last_good >= first_bad - 1:
        aside = checkpointer.set_aside(last_good, DIVERGED_DIR)
        say(f"checkpoint {last_good} gave a non-finite loss at the next step: moved to {aside}")
        last_good = max(checkpointer.all_steps(), default=None)
    keep = (f"the last good checkpoint is step {last_good} in {checkpointer.directory}: "
            f"lower config.lr and rerun with --override=lr to resume from it"
            if last_good else "no checkpoint was saved: lower config.lr and rerun")
    return NonFiniteLoss(f"{what}: training diverged and stopped at step {step}; {keep} "
                         "(or check the data)", step, last_good, what)


def _check_finite(window: list[dict], step: int, last_good: int | None, checkpointer,
                  best: list, factor: float) -> None:
    """`window`: the metrics of steps step-len(window)+1 .. step (loss and grad_norm are
    computed from the state before each step's update). Diverged: a non-finite loss or
    gradient norm, or a loss `factor` times the lowest so far (`best[0]`, updated here): a
    state blown up to 1e9 is finite, and training on from it only looks like training."""
    for i, scalars in enumerate(window):
        first_bad = step - len(window) + 1 + i
        bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(scalars[k]))]
        if bad:
            raise _diverged(f"{bad[0]} is {float(scalars[bad[0]])} at step {first_bad}",
                            step, last_good, checkpointer, first_bad)
        loss = float(scalars["loss"])
        if factor > 0 and best[0] is not None and loss > factor * max(best[0], 1e-8):
            raise _diverged(f"the loss jumped to {loss:.3g} at step {first_bad}, "
                            f"{loss / max(best[0], 1e-8):.3g} times the lowest so far "
                            f"({best[0]:.3g})", step, last_good, checkpointer, first_bad)
        best[0] = loss if best[0] is None else min(best[0], loss)


def _check_state(state, step: int, last_good: int | None, checkpointer) -> None:
    """The state about to be saved (after the step's update) must be one training can go
    on from: finite, parameters of finite float32 norm. Else it is not saved."""
    if not (integrity.tree_is_finite(state.params)
            and integrity.tree_is_finite(state.opt_state, bounded=False)):
        raise _diverged(f"the parameters after step {step} are not finite (or overflow "
                        "float32)", step, last_good, checkpointer)


def _evaluate(run: _Run, params, frozen, writer, step: int) -> dict[str, float]:
    """One pass over `data.eval`: distillation errors, cross-entropy, and for classification
    the task metric of the student (and of the teacher, with a plugin)."""
    if run.eval_data is None:
        return {}
    if run.eval_step is None:
        param_sh = jax.tree.map(lambda x: x.sharding, params)
        frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
        run.eval_step = make_eval_step(run.setup, run.mesh, param_sh, frozen_sh, run.rules)
    result = eval_pass(run.eval_step, params, frozen, run.eval_data, run.mesh, run.rules,
                       run.config.task)
    writer.write(step, {f"eval/{k}": v for k, v in result.items()})
    say(f"eval at step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


def eval_pass(step_fn, params, frozen, data, mesh, rules, task: str) -> dict[str, float]:
    """`step_fn` (an `eval_step`) over every batch of `data`, summarised by `eval_summary`."""
    sums, preds = {}, {}
    for local in data:
        out = jax.device_get(step_fn(params, sharding.global_batch(mesh, local, rules), frozen))
        for k, v in out.items():
            if np.ndim(v):
                preds.setdefault(k, []).append(np.asarray(v))
            else:
                sums[k] = sums.get(k, 0.0) + float(v)
    return eval_summary(task, sums, {k: np.concatenate(v) for k, v in preds.items()})


def eval_summary(task: str, sums: dict, preds: dict) -> dict[str, float]:
    """`eval_step` outputs summed over batches (`sums`) and concatenated (`preds`) -> means:
    enc_mse, dec_mse (plugins), ce, teacher_ce, and for classification the GLUE metrics of
    the student (and `teacher_*`, and student/teacher `agreement`, with a plugin; for other
    tasks `agreement` is the share of target positions where their argmax tokens agree)."""
    out = {}
    for name in ("enc", "dec"):
        if f"{name}_se" in sums:
            out[f"{name}_mse"] = sums[f"{name}_se"] / max(sums[f"{name}_n"], 1.0)
    out["ce"] = sums["ce_sum"] / max(sums["ce_n"], 1.0)
    if "teacher_ce_sum" in sums:
        out["teacher_ce"] = sums["teacher_ce_sum"] / max(sums["ce_n"], 1.0)
    if "agree_sum" in sums:  # Span corruption / generation: token-level agreement.
        out["agreement"] = sums["agree_sum"] / max(sums["ce_n"], 1.0)
    if "pred" in preds:
        real = preds["weight"] > 0
        out.update(glue_metric(task, preds["pred"][real], preds["label"][real]))
        if "teacher_pred" in preds:
            teacher = glue_metric(task, preds["teacher_pred"][real], preds["label"][real])
            out.update({f"teacher_{k}": v for k, v in teacher.items()})
            out["agreement"] = float(np.mean(preds["pred"][real] == preds["teacher_pred"][real]))
    return out


def _finish(run: _Run, state, frozen, last: dict, writer) -> dict:
    """Final eval, then the stage's output: a plugin dir or an HF backbone dir."""
    config, workdir = run.config, run.workdir
    step = int(jax.device_get(state.step))
    evaluated = _evaluate(run, state.params, frozen, writer, step)
    params = _to_host(state.params)
    result = {"stage": config.stage, "step": step, "workdir": workdir,
              "train": last, "eval": evaluated}
    if run.pcfg is not None:
        result["plugin_dir"] = os.path.join(workdir, "plugin")
        if jax.process_index() == 0:
            save_plugin(result["plugin_dir"], run.pcfg, params, backbone_id=run.backbone_id)
        say(f"Plugin written to {result['plugin_dir']}")
    else:
        result["backbone_dir"] = os.path.join(workdir, "backbone")
        if jax.process_index() == 0:
            cfg = run.cfg.replace(dtype="float32")
            save_hf_t5(result["backbone_dir"], cfg, params, tokenizer=run.tokenizer)
        say(f"Backbone written to {result['backbone_dir']} (HF format)")
    if jax.process_index() == 0:  # Last: its presence means "this stage is done".
        atomic_write(workdir, RESULT_FILE,
                     lambda tmp: write_text(tmp, json.dumps(result, indent=2) + "\n"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("variator_jax:finished")
    return result
