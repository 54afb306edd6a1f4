r"""Trains a Variator plugin (or fine-tunes a backbone): a thin entry point over train_lib.

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
import logging as py_logging
import os

from absl import flags
from ml_collections import config_flags

from variator_jax import cli

config_flags.DEFINE_config_file(
    "config", None, "Config file or packaged config (finetune, plugin), presets after ':'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_bool("show_config", False, "Print the resolved config's fields and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("dry_run", False, "Compile the train step against abstract parameters, print "
                  "per-device memory and compile time, write WORKDIR/fit.json; train nothing.")
flags.DEFINE_list("override", [], "Config fields a resume may change (e.g. lr,total_steps); "
                  "each change is recorded in WORKDIR/changes.jsonl.")
flags.DEFINE_bool("accept_data_change", False, "Resume although a data file changed since the "
                  "run began (recorded in WORKDIR/changes.jsonl); refused otherwise.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


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
    _init_distributed()
    from variator_jax import train_lib  # After distributed init: it may touch devices.
    if FLAGS.dry_run:
        from variator_jax import fit
        fit.dry_run(FLAGS.config, FLAGS.workdir)
        return
    # Errors, signals and Ctrl-C end in one line: the boundary around `run` (boundary.py).
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir, override=FLAGS.override,
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
    cli.run_absl(main, __doc__, __name__, interrupted=_interrupted)


if __name__ == "__main__":
    run()
