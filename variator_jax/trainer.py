"""The trainer: train state, optimizer, the compiled steps, and the loop with its checkpoints.

The loop holds one objective (objectives.py) and never asks which stage it runs: it trains
`objective`'s trainable tree with `frozen` beside it, evaluates with `objective.eval_sums`,
and saves with `objective.export`. Checkpoints hold the `TrainState` (its tree is the
format of every workdir: step, params, opt_state, rng) and the data stream's state.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from variator_jax import checkpoint as ckpt_lib
from variator_jax import integrity, pipeline, sharding
from variator_jax.errors import Interrupted, NonFiniteLoss, check_writable, user_errors
from variator_jax.evaluators.classification import eval_pass
from variator_jax.experiment import Experiment
from variator_jax.objectives import Objective
from variator_jax.progress import MetricWriter, progress_line, say
from variator_jax.run import Run

DIVERGED_DIR = "checkpoints_diverged"  # Checkpoints whose state gave the first bad loss.


# ================================================================================================
# Train state and optimizer
# ================================================================================================
@flax.struct.dataclass
class TrainState:
    """Everything a step updates and a checkpoint holds.

    `params` is the objective's trainable tree (the plugin, or the backbone when it is
    fine-tuned); a frozen tree is not in here, it is an argument of the step.
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
    """Step 0: `params` with fresh optimizer moments; `rng` seeds dropout."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(rng))


# ================================================================================================
# Steps
# ================================================================================================
def train_step(state: TrainState, batch, frozen, *, objective: Objective, tx, schedule):
    """One optimizer step. -> (new state, metrics: loss, each term, lr, grad_norm, tokens).

    Pure; `make_train_step` jits it with explicit shardings and donates `state`. The dropout
    key is `fold_in(state.rng, step)`, so a resumed run draws the same masks.
    """
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
        terms, _ = objective.loss_terms(params, frozen, batch, dropout_rng)
        return sum(terms.values()), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = (jnp.sum(batch["attention_mask"]) + jnp.sum(batch["decoder_attention_mask"]))
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step), tokens=tokens.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, frozen, *, objective: Objective):
    """`objective.eval_sums` of one batch; divide the sums on the host (`eval_pass`)."""
    return objective.eval_sums(params, frozen, batch)


def _on_mesh(fn, mesh, rules):
    """`fn` traced with activations constrained by `rules` on `mesh` (the residual stream,
    CPU attention blocks per device; see `sharding.activation_sharding`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding.activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def make_train_step(objective: Objective, tx, schedule, mesh, state_shardings,
                    frozen_shardings, rules=sharding.DEFAULT_RULES):
    """`train_step` under `jax.jit`: state and frozen tree placed by their shardings, the
    batch over `data`, metrics replicated; the old state's buffers are donated to the new one."""
    batch_sharding = sharding.batch_sharding(mesh, rules)  # A prefix for every batch array.
    step = functools.partial(train_step, objective=objective, tx=tx, schedule=schedule)
    return jax.jit(_on_mesh(step, mesh, rules),
                   in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def make_eval_step(objective: Objective, mesh, params_shardings, frozen_shardings,
                   rules=sharding.DEFAULT_RULES):
    """`eval_step` under `jax.jit`, the batch over `data`, the sums replicated."""
    return jax.jit(_on_mesh(functools.partial(eval_step, objective=objective), mesh, rules),
                   in_shardings=(params_shardings, sharding.batch_sharding(mesh, rules),
                                 frozen_shardings),
                   out_shardings=sharding.replicated(mesh))


# ================================================================================================
# The state on the mesh
# ================================================================================================
def trainable_shardings(exp: Experiment):
    """-> (the trainable tree's shardings, its ShapeDtypeStructs)."""
    param_key, _ = jax.random.split(jax.random.key(exp.config.seed))
    shapes = jax.eval_shape(exp.objective.init, param_key)
    axes = exp.objective.logical_axes(shapes)
    return sharding.tree_shardings(exp.mesh, axes, shapes, exp.rules), shapes


def _state_shardings(exp: Experiment, abstract_state: TrainState, tx, param_shardings):
    """Optimizer moments follow their parameters' shardings; scalars are replicated."""
    repl = sharding.replicated(exp.mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
                                transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=param_shardings, opt_state=opt, rng=repl)


def initial_state(exp: Experiment, tx, loaded=None):
    """-> (abstract state with shardings, state shardings, function making the fresh state).

    Nothing is materialised here: the fresh state is built inside a jit whose
    `out_shardings` place it (big_vision), and only if no checkpoint is restored instead.
    `loaded`: the trainable tree from disk, placed (the backbone to fine-tune, an
    `init_plugin`); it enters that jit as an argument, never as a captured constant, and
    is donated to the state. None: `objective.init`.
    """
    param_key, state_key = jax.random.split(jax.random.key(exp.config.seed))
    param_shardings, _ = trainable_shardings(exp)

    def make(params):
        params = exp.objective.init(param_key) if params is None else params
        return create_state(params, state_key, tx)

    abstract = jax.eval_shape(make, loaded)
    shardings = _state_shardings(exp, abstract, tx, param_shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    in_sh = (None if loaded is None else param_shardings,)
    donate = () if loaded is None else (0,)
    return abstract, shardings, lambda: jax.jit(make, in_shardings=in_sh, out_shardings=shardings,
                                                donate_argnums=donate)(loaded)


def _to_host(tree):
    """Global arrays (any sharding, any process count) -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


# ================================================================================================
# The loop
# ================================================================================================
def train(exp: Experiment, run: Run) -> dict:
    """Trains `exp.objective` from `run`'s latest checkpoint (or a fresh state) to
    `total_steps`, evaluating on the way; exports the result and writes `result.json`.

    `exp` is handed over: once its backbone is on the devices, the host copy is dropped
    (an 11B model is 44 GB of float32), so the caller should keep no reference to it."""
    config, objective, checkpointer = exp.config, exp.objective, run.checkpointer
    tx, schedule = make_optimizer(config)
    backbone_shardings, backbone_shapes = exp.backbone_shardings()
    backbone_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(backbone_shapes))
    say(objective.parameter_overview(backbone_count))
    say(f"Mesh: {dict(exp.mesh.shape)} over {exp.mesh.size} device(s) "
        f"({jax.devices()[0].platform}), {jax.process_count()} process(es)")

    start = checkpointer.latest_step() or 0
    _say_uncommitted(checkpointer, start)
    # On the devices: the tree each step reads (the teacher), and the trainable tree a fresh
    # run starts from (the backbone to fine-tune; resuming, the checkpoint has it).
    host_frozen = objective.frozen(exp.host_backbone)
    host_start = None if start else objective.start(exp.host_backbone)
    exp = dataclasses.replace(exp, host_backbone=None)  # Host memory back, once placed.
    frozen = None if host_frozen is None else sharding.put_global(host_frozen,
                                                                  backbone_shardings)
    loaded = None if host_start is None else sharding.put_global(
        host_start, trainable_shardings(exp)[0])
    del host_frozen, host_start
    abstract, state_shardings, make_state = initial_state(exp, tx, loaded)
    # Room for a checkpoint being written and the exported output, roughly, before training.
    check_writable(exp.workdir, need_bytes=2 * sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)))
    del loaded  # Donated into the fresh state.
    if start:
        with user_errors(""):  # A corrupt newest checkpoint falls back to the one before.
            start, state, data_state = checkpointer.restore_latest(abstract, say)
        with user_errors(f"data.train {exp.config.data.train}"):  # Names the data.
            exp.train_data.set_state(data_state)
        say(f"Resumed from {checkpointer.directory}/{start}")
    else:
        state = make_state()
    run.accept(start)  # Only now: a refused start leaves the workdir as it was.
    frozen_shardings = None if frozen is None else backbone_shardings
    step_fn = make_train_step(objective, tx, schedule, exp.mesh, state_shardings,
                              frozen_shardings, exp.rules)
    if exp.eval_data is not None:  # jit is lazy: compiled at the first evaluation.
        exp = dataclasses.replace(exp, eval_step=make_eval_step(
            objective, exp.mesh, state_shardings.params, frozen_shardings, exp.rules))
    writer = MetricWriter(exp.workdir, resume_step=start)
    try:
        state, last = _loop(exp, run, state, frozen, step_fn, writer, start)
        try:
            # Success means committed: the outputs only once the final checkpoint is on disk,
            # so that a run killed now resumes from it, not from an older one.
            checkpointer.wait()
        except KeyboardInterrupt:  # A second Ctrl-C: the last checkpoint may be unsaved.
            raise _interrupted(config.total_steps, exp.workdir) from None
        result = _finish(exp, run, state, frozen, last or writer.last(), writer)
    finally:
        writer.close()
    return result


def _say_uncommitted(checkpointer: ckpt_lib.Checkpointer, start: int) -> None:
    """A newer step whose save never completed is not resumed from: say so, not silently."""
    newer = [s for s in checkpointer.uncommitted if s > start]
    if newer:
        where = f"resuming from step {start}" if start else "starting from step 0"
        say(f"checkpoint {newer[-1]} in {checkpointer.directory} was never committed (the run "
            f"stopped while saving it) and is discarded; {where}")


def _loop(exp: Experiment, run: Run, state, frozen, step_fn, writer, start: int):
    """Steps `start`..`total_steps`: logs, checks for divergence, saves, evaluates.
    -> (the final state, the last logged metrics)."""
    config, checkpointer = exp.config, run.checkpointer
    total = config.total_steps
    last_good = start or None
    pending, logged = [], {}
    compiled, t0 = None, time.time()
    # The lowest logged (window-mean) loss so far: a window mean `divergence_factor` times
    # above it is a divergence.
    # (Not across a change of config: another loss or data has another scale.)
    best = [writer.lowest_loss() if jax.process_index() == 0 and start and not run.changes
            else None]
    if jax.process_count() > 1:  # Only process 0 reads metrics.jsonl.
        best = [float(multihost_utils.broadcast_one_to_all(
            np.float64(np.nan if best[0] is None else best[0])))]
        best = [None if math.isnan(best[0]) else best[0]]
    check = functools.partial(_check_finite, best=best,
                              factor=float(config.get("divergence_factor", 1e3)))
    trained = start  # The last step trained, for the line a Ctrl-C gets.
    try:
        with _StopRequests() as stop:
            for step in range(start, total):
                with user_errors(f"data.train {config.data.train}"):  # A bad record stops.
                    local = next(exp.train_data)
                batch = sharding.global_batch(exp.mesh, local, exp.rules)
                if compiled is None:  # Compile ahead: the first window's speed is the step's.
                    tic = time.time()
                    compiled = step_fn.lower(state, batch, frozen).compile()
                    say(f"Compiled the train step in {time.time() - tic:.1f}s; training steps "
                        f"{start + 1}..{total}")
                    t0, since = time.time(), step
                state, metrics = compiled(state, batch, frozen)
                pending.append(metrics)
                done = step + 1
                checkpointer.check_for_errors()  # A failed background save stops training.
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
                    check(jax.device_get([metrics]), done, last_good, checkpointer, update=False)
                    _check_state(state, done, last_good, checkpointer)
                    run.still_ours()  # Never into a workdir that is now another run's.
                    data_state = pipeline.gather_state(exp.train_data.get_state())
                    checkpointer.save(done, state, data_state)
                    last_good = done
                if signum and done < total:
                    checkpointer.wait()
                    raise Interrupted(f"interrupted at step {done}; rerun the same command to "
                                      "resume", signum)
                if config.get("eval_every") and done % config.eval_every == 0 and done < total:
                    _evaluate(exp, state.params, frozen, writer, done)
                trained = done
    except KeyboardInterrupt:  # A second Ctrl-C: the first one's checkpoint may be unsaved.
        raise _interrupted(trained, exp.workdir) from None
    return state, logged


def _interrupted(step: int, workdir: str) -> Interrupted:
    """A Ctrl-C that stopped the loop at once: says which checkpoint a rerun resumes from."""
    saved = max(ckpt_lib.finished_steps(workdir), default=0)
    resume = "resume" if saved == step else (
        f"resume from step {saved}, the last checkpoint saved" if saved
        else "start over: no checkpoint was saved")
    return Interrupted(f"interrupted at step {step}; rerun the same command to {resume}",
                       signal.SIGINT)


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
                  best: list, factor: float, update: bool = True) -> None:
    """`window`: the metrics of steps step-len(window)+1 .. step (loss and grad_norm are
    computed from the state before each step's update). Diverged: a non-finite loss or
    gradient norm, or a window whose mean loss is `factor` times the lowest window mean so
    far (`best[0]`, at first the window's first loss; updated here unless `update` is
    False): a state blown up to 1e9 is finite, and training on from it only looks like
    training. Means, not single steps: a run that fits its training data reaches per-step
    losses near 0 (3e-4 in the quality miniature's fine-tuning), and one hard batch after
    that is not a divergence."""
    for i, scalars in enumerate(window):
        first_bad = step - len(window) + 1 + i
        bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(scalars[k]))]
        if bad:
            raise _diverged(f"{bad[0]} is {float(scalars[bad[0]])} at step {first_bad}",
                            step, last_good, checkpointer, first_bad)
    losses = [float(scalars["loss"]) for scalars in window]
    mean = sum(losses) / len(losses)
    if best[0] is None and update:  # The first window's yardstick: the state it started from.
        best[0] = losses[0]
    limit = None if best[0] is None else factor * max(best[0], 1e-8)
    if factor > 0 and limit is not None and mean > limit:
        i = next((i for i, x in enumerate(losses) if x > limit), int(np.argmax(losses)))
        first = step - len(window) + 1
        span = f"step {step}" if len(window) == 1 else f"steps {first}..{step}"
        raise _diverged(f"the loss jumped to {mean:.3g} (mean of {span}), "
                        f"{mean / max(best[0], 1e-8):.3g} times the lowest mean so far "
                        f"({best[0]:.3g})", step, last_good, checkpointer, first + i)
    if update:  # best[0] is set: the first window's first loss at the latest.
        best[0] = min(best[0], mean)


def _check_state(state, step: int, last_good: int | None, checkpointer) -> None:
    """The state about to be saved (after the step's update) must be one training can go
    on from: finite, parameters of finite float32 norm. Else it is not saved."""
    if not (integrity.tree_is_finite(state.params)
            and integrity.tree_is_finite(state.opt_state, bounded=False)):
        raise _diverged(f"the parameters after step {step} are not finite (or overflow "
                        "float32)", step, last_good, checkpointer)


def _evaluate(exp: Experiment, params, frozen, writer, step: int) -> dict[str, float]:
    """One pass over `data.eval` by the classification evaluator's `eval_pass`, with the
    step compiled for the trained state's shardings: `objective.eval_sums`, summarised."""
    if exp.eval_data is None:
        return {}
    result = eval_pass(exp.eval_step, params, frozen, exp.eval_data, exp.mesh, exp.rules,
                       exp.config.task)
    writer.write(step, {f"eval/{k}": v for k, v in result.items()})
    say(f"eval at step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


def _finish(exp: Experiment, run: Run, state, frozen, last: dict, writer) -> dict:
    """Final eval, then the objective's export (a plugin dir or an HF backbone dir)."""
    config, workdir, objective = exp.config, exp.workdir, exp.objective
    step = int(jax.device_get(state.step))
    evaluated = _evaluate(exp, state.params, frozen, writer, step)
    params = _to_host(state.params)
    result = {"stage": config.stage, "step": step, "workdir": workdir,
              "train": last, "eval": evaluated}
    result[f"{objective.output}_dir"] = os.path.join(workdir, objective.output)
    if exp.data_report:  # Split sizes and their overlap (0: checked before training).
        result["data"] = exp.data_report
    if jax.process_index() == 0:
        run.still_ours()
        say(objective.export(result[f"{objective.output}_dir"], params,
                             tokenizer=exp.tokenizer, backbone_id=exp.backbone_id))
    run.finish(result)  # Last: its presence means "this stage is done".
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("variator_jax:finished")
    return result
