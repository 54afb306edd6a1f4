r"""Trains a Variator plugin (or fine-tunes a backbone): the driver and its command line.

`train_and_evaluate(config, workdir)` is the whole of training, as t5x's train.py: the
backbone stage first if the config asks for one, then the config made concrete
(experiment.py), the workdir locked and the start checked (run.py), and the loop
(trainer.py). Three stages share it (docs/DESIGN.md §2), each an objective (objectives.py):
  - `finetune` (stage 0, `Finetune`): the whole backbone is trainable, task cross-entropy;
    the result is an HF-format backbone in `WORKDIR/backbone`.
  - `pretrain` (stage 1) and `adapt` (stage 2), `Distill`: the backbone is frozen, only the
    plugin is trained, by distillation from the same backbone without the plugin:
    loss = masked MSE(final encoder hidden) + masked MSE(final decoder hidden), plus the
    task cross-entropy for `loss="task+hidden"` (or only it, `loss="task"`). The result is a
    plugin directory `WORKDIR/plugin` (`save_plugin` format).

A config with an empty `backbone` and a `backbone_stage` sub-config first runs that stage
(a `finetune` config) in `WORKDIR/backbone_stage` and uses its output: this is how
a config file can chain "fine-tune a T5" and "train a plugin on it" (tests/data/chained_config.py
is one). A finished stage
is recognised by its `result.json` and skipped.

Example (what `python train.py --config=configs/plugin.py:stage=pretrain` does):
  >>> config = variator_jax.configs.get_config("plugin", "stage=pretrain,ratio=4")
  >>> config.backbone = "/models/t5-base"
  >>> result = train_and_evaluate(config, "runs/t5-base-k4")
  >>> result["plugin_dir"], result["train"]["loss"], result["eval"]
"""
from __future__ import annotations

import contextlib
import logging as py_logging
import os

import ml_collections
from absl import flags
from ml_collections import config_flags

from variator_jax import cli

# The library is imported where it is used: importing this module loads neither NumPy nor
# JAX, so that `--help` and a bad flag answer at once, and `jax.distributed` is set up before
# anything touches the devices.

USAGE = r"""Trains a Variator plugin (or fine-tunes a backbone).

  variator-train --config=plugin:stage=pretrain --config.backbone=DIR --workdir=RUN
  python train.py --config=configs/plugin.py:stage=pretrain --config.backbone=DIR --workdir=RUN

--config is a config file or a packaged one (finetune, plugin), with presets after
':'; --config.FIELD=VALUE overrides any field; --show_config (or --help after --config=...)
prints every field, its value and what it means. Running the same command again resumes
from RUN's latest checkpoint; a changed result-defining field is refused unless named in
--override=lr,... . --dry_run only compiles the train step against abstract parameters and
reports per-device memory and compile time in RUN/fit.json (variator_jax/fit.py); no weights
needed. Multi-host: pass --coordinator_address, --num_processes and
--process_id to every process; on a TPU pod or under SLURM without them,
jax.distributed.initialize() finds them.
"""
FLAGS = flags.FLAGS


# ================================================================================================
# The driver
# ================================================================================================
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
    from variator_jax import trainer
    from variator_jax.errors import NonFiniteLoss, check_writable
    from variator_jax.experiment import prepare
    from variator_jax.run import Run
    workdir = os.path.abspath(workdir)
    check_writable(workdir)  # A read-only, full or file-blocked workdir: one line, now.
    config = _run_backbone_stage(config, workdir)
    exp = prepare(config, workdir)  # Checks the config and the workdir's identity.
    if (done := _already_done(workdir, config)) is not None:
        return done
    exp = exp.with_data()
    with _os_errors(), Run.open(workdir, config, exp.identity, override,
                                accept_data_change) as run:
        if (done := _already_done(workdir, config)) is not None:  # Now that no one else writes.
            return done
        # Handed over: with no reference left here, the trainer's dropping the host copy of
        # the backbone once it is on the devices gives its memory back.
        handed, exp = [exp], None
        try:
            return trainer.train(handed.pop(), run)
        except NonFiniteLoss as e:
            run.mark_diverged(e.step, e.last_good, e.what)
            raise


def _already_done(workdir: str, config) -> dict | None:
    """The result of a run in `workdir` finished with this config (run.py), said so."""
    from variator_jax.progress import say
    from variator_jax.run import finished_result
    done = finished_result(workdir, config)
    if done is not None:
        say(f"{workdir}: already trained to step {done['step']}; nothing to do")
    return done


def _run_backbone_stage(config, workdir: str):
    """Empty `backbone` + a `backbone_stage` config: run that stage first, use its output."""
    if config.backbone or config.stage == "finetune" or not config.get("backbone_stage"):
        return config
    from variator_jax.experiment import check_config
    from variator_jax.progress import say
    check_config(config, backbone_pending=True)  # Fail now, not after stage 0 has trained.
    say(f"== backbone stage: {config.backbone_stage.stage} -> {workdir}/backbone_stage")
    result = train_and_evaluate(config.backbone_stage, os.path.join(workdir, "backbone_stage"))
    config = ml_collections.ConfigDict(config.to_dict())
    config.backbone = result["backbone_dir"]
    say(f"== {config.stage} stage on {config.backbone} -> {workdir}")
    return config


@contextlib.contextmanager
def _os_errors():
    """A file that cannot be read or written (read-only, full disk, ...) -> one line naming
    it; the checkpoints saved before stay intact."""
    from variator_jax.checkpoint import SaveError
    from variator_jax.errors import UserError
    try:
        yield
    except UserError:
        raise
    except SaveError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise UserError(f"{where}{e.strerror or e}; the checkpoints saved so far are intact: "
                        "fix this and run the same command to resume") from None


# ================================================================================================
# The command line
# ================================================================================================
def _define_flags() -> None:
    """`variator-train`'s flags, defined when it runs (not on import: a program or test that
    imports this module and another entry point must not see its flags defined twice)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file or packaged config (finetune, plugin), presets "
        "after ':'.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
    flags.DEFINE_bool("show_config", False, "Print the resolved config's fields and exit.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    flags.DEFINE_bool("dry_run", False, "Compile the train step against abstract parameters, "
                      "print per-device memory and compile time, write WORKDIR/fit.json; train "
                      "nothing.")
    flags.DEFINE_list("override", [], "Config fields a resume may change (e.g. lr,total_steps); "
                      "each change is recorded in WORKDIR/changes.jsonl.")
    flags.DEFINE_bool("accept_data_change", False, "Resume although a data file changed since "
                      "the run began (recorded in WORKDIR/changes.jsonl); refused otherwise.")
    flags.mark_flags_as_required(["config"])


def _cluster_detected() -> bool:
    """A TPU pod slice or a multi-task SLURM job: jax.distributed can configure itself."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _init_distributed() -> None:
    import jax
    explicit = FLAGS.coordinator_address is not None
    if not explicit and not _cluster_detected():
        return  # One machine, one process: no distributed set-up at all.
    # CPU collectives across processes go through gloo (harmless on TPU/GPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    else:
        jax.distributed.initialize()


def main(argv):
    if not cli.start(argv, FLAGS):  # --show_config: printed, nothing to train.
        return
    # orbax logs each failed background save with its tracebacks (hundreds of lines for a
    # full disk); checkpoint.py reports every such failure as one line, so drop orbax's.
    py_logging.getLogger("absl").addFilter(
        lambda record: f"{os.sep}orbax{os.sep}" not in record.pathname)
    _init_distributed()  # Before anything touches the devices.
    if FLAGS.dry_run:
        from variator_jax import fit
        fit.dry_run(FLAGS.config, FLAGS.workdir)
        return
    # Errors, signals and Ctrl-C end in one line: the boundary around `run` (boundary.py).
    train_and_evaluate(FLAGS.config, FLAGS.workdir, override=FLAGS.override,
                       accept_data_change=FLAGS.accept_data_change)


def _interrupted() -> str:
    """The line for a Ctrl-C outside the training loop (inside it, the loop says where it
    stopped): loading, compiling, or a second Ctrl-C while the first one's checkpoint saved."""
    try:
        workdir = FLAGS.workdir
        from variator_jax.checkpoint import finished_steps
        steps = finished_steps(workdir) if workdir else []
    except Exception:  # Flags not parsed yet: nothing can have been saved.
        steps = []
    if steps:
        return (f"interrupted at step {steps[-1]} (the last checkpoint saved); rerun the same "
                "command to resume")
    return "interrupted before a step was trained; rerun the same command to start"


def run():
    """The `variator-train` console script."""
    _define_flags()
    cli.run_absl(main, USAGE, __name__, interrupted=_interrupted)


if __name__ == "__main__":
    run()
