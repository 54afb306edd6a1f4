r"""Evaluates the teacher and its plugins: quality, FLOPs saved, plugin size, measured speed.

  python eval.py --config=configs/plugin.py:stage=adapt,task=sst2 --workdir=RUN \
      [--config.eval.plugins=RUN_K2/plugin,RUN_K4/plugin,RUN_K8/plugin]

Reads the backbone and eval data from the config (as train.py does) and, by default, the
plugin in RUN/plugin. Prints a Markdown table and writes RUN/eval/results.json, results.md
and speed_accuracy.png.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "The training config of the run.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory; results go to WORKDIR/eval.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    from variator_jax import evaluate, host
    host.keep_freed_memory()  # On CPU; before any JAX computation (variator_jax/host.py).
    try:
        evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    except evaluate.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
