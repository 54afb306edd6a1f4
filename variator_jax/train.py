r"""Trains a Variator plugin (or fine-tunes a backbone): a thin entry point over train_lib.

  variator-train --config=plugin:stage=pretrain --config.backbone=DIR --workdir=RUN
  python train.py --config=configs/plugin.py:stage=pretrain --config.backbone=DIR --workdir=RUN
  python -m variator_jax.train --config=demo --workdir=demo_workdir

--config is a config file or a packaged one (demo, finetune, plugin), with presets after
':'; --config.FIELD=VALUE overrides any field; --show_config (or --help after --config=...)
prints every field, its value and what it means. Running the same command again resumes
from RUN's latest checkpoint. Multi-host: pass --coordinator_address, --num_processes and
--process_id to every process; on a TPU pod or under SLURM without them,
jax.distributed.initialize() finds them.
"""
import os

from absl import flags
from ml_collections import config_flags

from variator_jax import cli

config_flags.DEFINE_config_file(
    "config", None, "Config file or packaged config (demo, finetune, plugin), presets after ':'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_bool("show_config", False, "Print the resolved config's fields and exit.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
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
    _init_distributed()
    from variator_jax import train_lib  # After distributed init: it may touch devices.
    with cli.one_line_errors():
        train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
    """The `variator-train` console script."""
    cli.run_absl(main, __doc__, __name__)


if __name__ == "__main__":
    run()
