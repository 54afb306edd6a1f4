r"""Evaluates the teacher and its plugins: quality, FLOPs saved, plugin size, measured speed.

  variator-eval --config=plugin:stage=adapt,task=sst2 --workdir=RUN \
      [--config.eval.plugins=RUN_K2/plugin,RUN_K4/plugin,RUN_K8/plugin]
  python eval.py --config=configs/demo.py --workdir=demo_workdir

Reads the backbone and eval data from the config (as train.py does) and, by default, the
plugin in RUN/plugin. Prints a Markdown table and writes RUN/eval/results.json, results.md
and speed_accuracy.png. --show_config (or --help after --config=...) prints the config's
fields.
"""
from absl import flags
from ml_collections import config_flags

from variator_jax import cli

config_flags.DEFINE_config_file(
    "config", None, "The run's training config (file or packaged name), presets after ':'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory; results go to WORKDIR/eval.")
flags.DEFINE_bool("show_config", False, "Print the resolved config's fields and exit.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if not cli.start(argv, FLAGS):  # --show_config: printed, nothing to evaluate.
        return
    from variator_jax import evaluate
    evaluate.evaluate(FLAGS.config, FLAGS.workdir)  # Errors: one line (boundary.py).


def run():
    """The `variator-eval` console script."""
    cli.run_absl(main, __doc__, __name__, interrupted=lambda: (
        "interrupted before the results were written; rerun the same command to evaluate"))


if __name__ == "__main__":
    run()
