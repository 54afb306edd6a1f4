r"""Evaluates the teacher and its plugins: quality, FLOPs saved, plugin size, measured speed.

  variator-eval --config=plugin:stage=adapt,task=sst2 --workdir=RUN \
      [--config.eval.plugins=RUN_K2/plugin,RUN_K4/plugin,RUN_K8/plugin]
  python eval.py --config=configs/plugin.py:stage=adapt,task=stdlib_docs --workdir=RUN

Reads the backbone and eval data from the config (as train.py does) and, by default, the
plugin in RUN/plugin. Runs the evaluators --config.eval.evaluators names (default: the task's
quality, then cost, then speed; variator_jax/evaluators/) over the teacher and each plugin.
Prints a Markdown table and writes RUN/eval/results.json, results.md and, when quality and
speed were both measured, speed_accuracy.png. --show_config (or --help after --config=...)
prints the config's fields.
"""
# This module is the command too: importing it loads neither NumPy nor JAX, so that `--help`
# and a bad flag answer at once; the driver imports them where it runs.
from __future__ import annotations

import json
import os

from variator_jax import cli
from variator_jax.fileio import atomic_write, write_json, write_text
from variator_jax.report import markdown_table

PLOT_FILE = "speed_accuracy.png"


def evaluate(config, workdir: str, plugin_dirs: list[str] | None = None) -> dict:
    """Evaluates the teacher and `plugin_dirs` (default: `config.eval.plugins`, else
    WORKDIR/plugin) with the evaluators the config chooses. Returns the results dict also
    written to WORKDIR/eval/results.json: one entry per model, the teacher first."""
    from variator_jax import evaluators
    from variator_jax import experiment as experiment_lib
    from variator_jax.errors import UserError, check_writable
    from variator_jax.evaluators.common import quality_metric
    from variator_jax.evaluators.speed import machine_description
    evaluators.chosen(config)  # A misspelt evaluator fails now, not after loading the models.
    if not config.data.get("eval"):  # So does a config with nothing to evaluate on.
        raise UserError("config.data.eval is empty: nothing to evaluate on")
    workdir = os.path.abspath(workdir)
    # The results must be writable before minutes of evaluating, not after (about 1 MB).
    check_writable(os.path.join(workdir, "eval"), need_bytes=1 << 20)
    backbone_dir = _backbone_dir(config, workdir)
    exp = experiment_lib.setup(config, backbone_dir)
    backbone = exp.place_backbone()
    models = _models(config, workdir, plugin_dirs, exp)
    task = exp.task
    rows = [dict(name=m.name, ratio=m.ratio) for m in models]
    metric = quality_metric(task)
    for evaluator in evaluators.build(config, _setting(config, exp, backbone)):
        for row, metrics in zip(rows, evaluator.run(models), strict=True):
            row.update(metrics)
            if metric in row:  # The headline, right after the evaluator that measured it.
                row.setdefault("quality", row[metric])
    results = {"task": task.name, "eval_data": config.data.eval, "backbone": backbone_dir,
               "quality_metric": metric, "machine": machine_description(),
               "max_input_length": config.max_input_length, "entries": rows}
    _write(workdir, results)
    return results


def _setting(config, exp, backbone):
    """What the evaluators are built from: `exp`'s task, tokenizer and mesh, the placed
    `backbone`, one pass of `data.eval` per iteration."""
    import jax
    import numpy as np

    from variator_jax.evaluators import Setting
    task = exp.task
    verbalizer = (tuple(int(i) for i in task.verbalizer_ids(exp.tokenizer))
                  if task.kind == "classification" else None)
    return Setting(config=config, cfg=exp.cfg, task=task, tokenizer=exp.tokenizer,
                   backbone=backbone, data=exp.eval_batches(), mesh=exp.mesh, rules=exp.rules,
                   verbalizer=verbalizer,
                   backbone_params=sum(int(np.size(x)) for x in jax.tree.leaves(exp.host_backbone)))


# -- The models ---------------------------------------------------------------------------------
def _backbone_dir(config, workdir: str) -> str:
    """`config.backbone`, or the backbone a `backbone_stage` made (a chained config)."""
    from variator_jax.errors import UserError
    from variator_jax.run import RESULT_FILE
    if config.backbone:
        return config.backbone
    result = os.path.join(workdir, "backbone_stage", RESULT_FILE)
    if os.path.isfile(result):
        with open(result) as f:
            return json.load(f)["backbone_dir"]
    raise UserError("config.backbone is empty and WORKDIR/backbone_stage has no finished "
                    f"backbone ({result} missing): set --config.backbone=DIR or run train.py first")


def _models(config, workdir: str, given: list[str] | None, exp) -> list:
    """The teacher, then a `Model` per plugin directory or training-free compressor."""
    from variator_jax.evaluators import Model
    models = [Model("teacher", None)] + [
        _load_model(d, exp) for d in _plugin_dirs(config, workdir, given)]
    names = [m.name for m in models]
    for m in models:  # Two runs' plugins with one name (a/x/plugin, b/x/plugin): add k.
        if names.count(m.name) > 1 and m.pcfg is not None:
            m.name = f"{m.name} (k={m.ratio})"
    return models


def _plugin_dirs(config, workdir: str, given: list[str] | None) -> list[str]:
    from variator_jax.errors import UserError
    if given is None:
        given = [d for d in config.eval.plugins.split(",") if d]
        if not given and config.stage != "finetune":  # A plugin run evaluates its own plugin.
            given = [os.path.join(workdir, "plugin")]
    for d in given:
        if compressor_spec(d) is None and not os.path.isdir(d):
            raise UserError(f"plugin directory {d} does not exist (train one with train.py, or "
                            "list existing ones with --config.eval.plugins=DIR1,DIR2)")
    return given


def compressor_spec(entry: str):
    """'mean_pool:4' (a training-free compressor and its k, compressors.py) -> its
    PluginConfig; None for anything else (a plugin directory)."""
    from variator_jax import compressors
    from variator_jax.plugins import PluginConfig
    name, sep, k = entry.partition(":")
    if sep and name in compressors.TRAINING_FREE and k.isdigit():
        return PluginConfig(ratio=int(k), compressor=name)
    return None


def _load_model(directory: str, exp):
    """A plugin directory, or a training-free compressor named like 'tome:4'."""
    import jax

    from variator_jax import sharding
    from variator_jax.errors import user_errors
    from variator_jax.evaluators import Model
    from variator_jax.plugins import init_plugin, load_plugin
    pcfg = compressor_spec(directory)
    if pcfg is not None:
        return Model(f"{pcfg.compressor} k={pcfg.ratio}", pcfg, init_plugin(None, exp.cfg, pcfg))
    with user_errors(f"plugin {directory}"):
        pcfg, params = load_plugin(directory, cfg=exp.cfg, backbone=exp.host_backbone)
    params = jax.device_put(params, sharding.replicated(exp.mesh))
    return Model(run_name(directory), pcfg, params)


def run_name(directory: str) -> str:
    """A plugin's row label: its run, `runs/t5-base-sst2-k4/plugin` -> 't5-base-sst2-k4'
    (the workdir's name), or the directory's own name when it is not called `plugin`."""
    path = os.path.normpath(os.path.abspath(directory))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "plugin" else name


# -- Outputs --------------------------------------------------------------------------------------
def _measured(results: dict, key: str) -> bool:
    """Whether every entry has `key`: the evaluator that gives it ran."""
    return all(key in r for r in results["entries"])


def format_table(results: dict) -> str:
    """The Markdown table a reader compares methods with (a column group per evaluator
    that ran: quality, cost, speed), and a line on how speed was timed."""
    from variator_jax import timing
    entries = results["entries"]
    columns = [("model", "l", lambda r: r["name"]), ("k", "r", lambda r: r["ratio"])]
    if _measured(results, "quality"):
        teacher = entries[0]["quality"]
        columns += [
            (results["quality_metric"], "r", lambda r: f"{r['quality']:.4f}"),
            ("vs teacher", "r",
             lambda r: "" if r["ratio"] == 1 else f"{r['quality'] - teacher:+.4f}")]
    if _measured(results, "flops_per_example"):
        columns += [
            ("GFLOPs/example", "r", lambda r: f"{r['flops_per_example'] / 1e9:.3f}"),
            ("FLOPs saved", "r", lambda r: f"{100 * r['flops_saving']:.1f} %"),
            ("encoder FLOPs saved", "r", lambda r: f"{100 * r['encoder_flops_saving']:.1f} %"),
            ("plugin params (% of backbone)", "r",
             lambda r: f"{r['plugin_params']:,} ({r['plugin_params_pct']:.2f} %)")]
    speed = _measured(results, "speedup")
    if speed:
        columns += [("examples/s", "r", lambda r: f"{r['examples_per_s']:.1f}"),
                    ("speedup (IQR)", "r", timing.format_speedup)]
    table = markdown_table([c[0] for c in columns],
                           [[cell(r) for _, _, cell in columns] for r in entries],
                           align="".join(c[1] for c in columns))
    lines = [f"{results['task']} on {results['eval_data']} (n = {results['max_input_length']}), "
             f"measured on {results['machine']}", "", table]
    if speed:
        lines += ["", f"Speedup: median over {entries[0]['speed_rounds']} interleaved rounds, "
                  "with the interquartile range; the FLOPs ceiling is teacher / model GFLOPs."]
    if any(r.get("above_ceiling") for r in entries):
        lines.append("n/a: the measured speedup is above what the FLOPs allow by more than its "
                     "spread, so machine load, not the model, made it; run eval.py again on a "
                     "quieter machine or with more --config.eval.speed_repeats.")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Quality vs measured speedup (median, IQR error bars), points in order of FLOPs saved
    (of their ceilings, which the speed evaluator gives without the cost one);
    each model's FLOPs ceiling as a tick, and speedups above it drawn hollow."""
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    entries = sorted(results["entries"], key=lambda r: r["speedup_ceiling"])
    x = np.array([r["speedup"] for r in entries])
    y = np.array([r["quality"] for r in entries])
    err = np.array([[r["speedup"] - r["speedup_q25"], r["speedup_q75"] - r["speedup"]]
                    for r in entries]).T
    bad = np.array([bool(r.get("above_ceiling")) for r in entries])
    ax.plot(x[~bad], y[~bad], "-", color="C0", alpha=0.5)
    ax.errorbar(x[~bad], y[~bad], xerr=err[:, ~bad], fmt="o", color="C0", capsize=3,
                label="measured (median, IQR)")
    if bad.any():
        ax.errorbar(x[bad], y[bad], xerr=err[:, bad], fmt="o", mfc="none", color="0.5",
                    capsize=3, label="above the FLOPs ceiling (noise)")
    ceilings = np.array([r["speedup_ceiling"] for r in entries])
    ax.plot(ceilings, y, "|", color="C1", markersize=14, label="FLOPs ceiling")
    # Limits first, with room for the labels, so that every label lands inside the frame.
    lo = min(x.min() - err[0].max(), ceilings.min())
    hi = max(x.max() + err[1].max(), ceilings.max())
    pad = 0.2 * max(hi - lo, 0.1)
    ax.set_xlim(lo - pad, hi + pad)
    ypad = 0.2 * max(float(y.max() - y.min()), 0.02)
    ax.set_ylim(y.min() - ypad, y.max() + ypad)
    middle = (lo + hi) / 2
    for r, xi, yi in zip(entries, x, y, strict=True):
        left = xi <= middle  # Labels point inwards: right of left points, left of right ones.
        text = r["name"] if r["ratio"] == 1 else f"{r['name']}, k={r['ratio']}"
        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(8 if left else -8, 6),
                    ha="left" if left else "right", fontsize=8)
    ax.set_xlabel("measured speedup over the teacher (x)")
    ax.set_ylabel(results["quality_metric"])
    ax.set_title(f"Variator on {results['task']}: quality vs speed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def _write(workdir: str, results: dict) -> None:
    """The table printed; results.json, results.md and the plot (when quality and speed were
    both measured; an older run's plot is removed otherwise) written by process 0."""
    import jax

    from variator_jax.progress import say
    table = format_table(results)
    say(table)
    if jax.process_index() != 0:
        return
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    write_json(out, "results.json", results)
    atomic_write(out, "results.md", lambda tmp: write_text(tmp, table + "\n"))
    written = ["results.json", "results.md"]
    if _measured(results, "quality") and _measured(results, "speedup"):
        plot(results, os.path.join(out, PLOT_FILE))
        written.append(PLOT_FILE)
    elif os.path.exists(os.path.join(out, PLOT_FILE)):  # Not this run's: it would mislead.
        os.remove(os.path.join(out, PLOT_FILE))
    say(f"Results written to {out}/{', '.join(written)}")


# -- The command ----------------------------------------------------------------------------------
def _define_flags():
    """The command's flags, defined when it runs rather than on import: train.py defines the
    same names, and a process (a test, a notebook) may import both modules."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(
        "config", None, "The run's training config (file or packaged name), presets after ':'.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "The run's directory; results go to WORKDIR/eval.")
    flags.DEFINE_bool("show_config", False, "Print the resolved config's fields and exit.")
    flags.mark_flags_as_required(["config"])


def main(argv):
    from absl import flags
    flag_values = flags.FLAGS
    if not cli.start(argv, flag_values):  # --show_config: printed, nothing to evaluate.
        return
    evaluate(flag_values.config, flag_values.workdir)  # Errors: one line (boundary.py).


def run():
    """The `variator-eval` console script (and `python eval.py`, `python -m
    variator_jax.evaluate`)."""
    _define_flags()
    cli.run_absl(main, __doc__, __name__, interrupted=lambda: (
        "interrupted before the results were written; rerun the same command to evaluate"))


if __name__ == "__main__":
    run()
