"""Evaluation: what a plugin costs in quality and saves in compute, teacher and plugins side by side.

For the teacher (the backbone, no plugin) and each plugin, on the config's eval split:
  - quality: GLUE accuracy (MRPC: F1) from the verbalizer logits; SQuAD EM/F1 from greedy
    decoding; for the task-agnostic `pretrain` stage, the distillation errors and how often
    the student's span predictions (argmax tokens) agree with the teacher's;
  - analytic FLOPs per example of the path measured, and the saving over the teacher;
  - plugin parameters as a share of the backbone;
  - measured examples/s on this machine and the speedup over the teacher: the median over
    interleaved rounds with its interquartile range, checked against the FLOPs ceiling
    (variator_jax/timing.py).

Writes `WORKDIR/eval/results.json`, `results.md` (the table printed) and `speed_accuracy.png`.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from variator_jax import compressors
from variator_jax import experiment as experiment_lib
from variator_jax import flops as flops_lib
from variator_jax import objectives, sharding, timing, trainer
from variator_jax.errors import UserError, check_writable, user_errors
from variator_jax.fileio import atomic_write, write_text
from variator_jax.metrics import squad_em_f1
from variator_jax.model import forward, generate
from variator_jax.plugins import Plugin, PluginConfig, init_plugin, load_plugin, plugin_param_count
from variator_jax.reporting import say
from variator_jax.report import markdown_table
from variator_jax.run import RESULT_FILE


@dataclasses.dataclass
class Model:
    """One row of the comparison: the teacher (pcfg None) or a plugin on the same backbone."""
    name: str
    pcfg: PluginConfig | None
    params: Any = None  # Plugin tree (placed on the mesh), None for the teacher.

    @property
    def ratio(self) -> int:
        return self.pcfg.ratio if self.pcfg else 1

    @property
    def plugin(self):
        return None if self.pcfg is None else Plugin(self.pcfg, self.params)

    def scored(self, cfg, task, verbalizer, backbone):
        """-> (objective, params, frozen) for `objectives.eval_sums`: the teacher is the
        backbone on its own (`Finetune`'s view of it); a plugin distills it (`Distill`)."""
        objective = objectives.make(cfg, self.pcfg, "hidden", task.kind, verbalizer,
                                    dropout=False)
        return objective, (self.params if self.pcfg else backbone), objective.frozen(backbone)


def evaluate(config, workdir: str, plugin_dirs: list[str] | None = None) -> dict:
    """Evaluates the teacher and `plugin_dirs` (default: `config.eval.plugins`, else
    WORKDIR/plugin). Returns the results dict also written to WORKDIR/eval/results.json."""
    workdir = os.path.abspath(workdir)
    # The results must be writable before minutes of evaluating, not after (about 1 MB).
    check_writable(os.path.join(workdir, "eval"), need_bytes=1 << 20)
    backbone_dir = _backbone_dir(config, workdir)
    exp = experiment_lib.setup(config, backbone_dir)
    cfg, host_backbone, task, tokenizer = exp.cfg, exp.host_backbone, exp.task, exp.tokenizer
    mesh, rules = exp.mesh, exp.rules
    backbone = exp.place_backbone()
    models = [Model("teacher", None)] + [
        _load_model(d, cfg, host_backbone, mesh) for d in _plugin_dirs(config, workdir, plugin_dirs)]
    names = [m.name for m in models]
    for m in models:  # Two runs' plugins with one name (a/x/plugin, b/x/plugin): add k.
        if names.count(m.name) > 1 and m.pcfg is not None:
            m.name = f"{m.name} (k={m.ratio})"
    if not config.data.get("eval"):
        raise UserError("config.data.eval is empty: nothing to evaluate on")
    data = exp.eval_batches()
    verbalizer = (tuple(int(i) for i in task.verbalizer_ids(tokenizer))
                  if task.kind == "classification" else None)
    rows = []
    for model in models:
        say(f"evaluating {model.name} on {config.data.eval} ...")
        quality = _quality(cfg, model, backbone, data, mesh, rules, task, tokenizer, config,
                           verbalizer)
        rows.append(dict(name=model.name, ratio=model.ratio, **quality))
    times = _measure_speed(cfg, models, backbone, data, mesh, rules, task, config)
    backbone_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(host_backbone))
    for row, model, seconds in zip(rows, models, times):
        row.update(_costs(cfg, model, task, config, backbone_params))
        row["flops_saving"] = 1 - row["flops_per_example"] / rows[0]["flops_per_example"]
        row["examples_per_s"] = experiment_lib.eval_batch_size(config) / float(np.median(seconds))
        ceiling = rows[0]["flops_per_example"] / row["flops_per_example"]  # FLOPs allow no more.
        row.update(timing.speedup_stats(times[0], seconds, ceiling))
    results = {"task": task.name, "eval_data": config.data.eval, "backbone": backbone_dir,
               "quality_metric": _quality_metric(task), "machine": machine_description(),
               "max_input_length": config.max_input_length, "entries": rows}
    _write(workdir, results)
    return results


# -- Inputs -------------------------------------------------------------------------------------
def _backbone_dir(config, workdir: str) -> str:
    """`config.backbone`, or the backbone a `backbone_stage` made (the demo)."""
    if config.backbone:
        return config.backbone
    result = os.path.join(workdir, "backbone_stage", RESULT_FILE)
    if os.path.isfile(result):
        with open(result) as f:
            return json.load(f)["backbone_dir"]
    raise UserError("config.backbone is empty and WORKDIR/backbone_stage has no finished "
                    f"backbone ({result} missing): set --config.backbone=DIR or run train.py first")


def _plugin_dirs(config, workdir: str, given: list[str] | None) -> list[str]:
    if given is None:
        given = [d for d in config.eval.plugins.split(",") if d]
        if not given and config.stage != "finetune":  # A plugin run evaluates its own plugin.
            given = [os.path.join(workdir, "plugin")]
    for d in given:
        if compressor_spec(d) is None and not os.path.isdir(d):
            raise UserError(f"plugin directory {d} does not exist (train one with train.py, or "
                            "list existing ones with --config.eval.plugins=DIR1,DIR2)")
    return given


def compressor_spec(entry: str) -> PluginConfig | None:
    """'mean_pool:4' (a training-free compressor and its k, compressors.py) -> its config."""
    name, sep, k = entry.partition(":")
    if sep and name in compressors.TRAINING_FREE and k.isdigit():
        return PluginConfig(ratio=int(k), compressor=name)
    return None


def _load_model(directory: str, cfg, host_backbone, mesh) -> Model:
    """A plugin directory, or a training-free compressor named like 'tome:4'."""
    pcfg = compressor_spec(directory)
    if pcfg is not None:
        return Model(f"{pcfg.compressor} k={pcfg.ratio}", pcfg, init_plugin(None, cfg, pcfg))
    with user_errors(f"plugin {directory}"):
        pcfg, params = load_plugin(directory, cfg=cfg, backbone=host_backbone)
    params = jax.device_put(params, sharding.replicated(mesh))
    return Model(run_name(directory), pcfg, params)


def run_name(directory: str) -> str:
    """A plugin's row label: its run, `runs/t5-base-sst2-k4/plugin` -> 't5-base-sst2-k4'
    (the workdir's name), or the directory's own name when it is not called `plugin`."""
    path = os.path.normpath(os.path.abspath(directory))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "plugin" else name


# -- Quality --------------------------------------------------------------------------------------
def _quality_metric(task) -> str:
    if task.kind == "classification":
        return task.metrics[0]  # The declared headline (GLUE's for the GLUE tasks).
    return "f1" if task.kind == "generation" else "agreement"


def _quality(cfg, model, backbone, data, mesh, rules, task, tokenizer, config,
             verbalizer) -> dict:
    data = Progress(data, model.name, experiment_lib.eval_batch_size(config))
    if task.kind == "generation":
        out = _squad(cfg, model, backbone, data, mesh, rules, tokenizer, config)
    else:
        out = _distillation_and_task(model.scored(cfg, task, verbalizer, backbone), model,
                                     data, mesh, rules, task)
    out["quality"] = out[_quality_metric(task)]
    return out


def _distillation_and_task(scored, model, data, mesh, rules, task) -> dict:
    """Training's eval step: classification metrics, CE, distillation errors, agreement."""
    objective, params, frozen = scored
    step = jax.jit(functools.partial(trainer.eval_step, objective=objective))
    result = trainer.eval_pass(step, params, frozen, data, mesh, rules, task)
    if model.pcfg is None:  # The teacher agrees with itself; its metrics are its own.
        result["agreement"] = 1.0
    return result


def _squad(cfg, model, backbone, data, mesh, rules, tokenizer, config) -> dict:
    """Greedy answers (max_target_length tokens) scored by the official SQuAD v1.1 metric."""
    predictions, answers = [], []
    for local in data:
        batch = sharding.global_batch(mesh, local, rules)
        tokens = generate(cfg, backbone, batch["input_ids"], batch["attention_mask"],
                          config.max_target_length, model.plugin)
        tokens = multihost_utils.process_allgather(tokens, tiled=True)
        index = multihost_utils.process_allgather(batch["index"], tiled=True)
        for row, i in zip(np.asarray(tokens), np.asarray(index)):
            if i >= 0:
                predictions.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                answers.append(data.references[i])
    return squad_em_f1(predictions, answers)


PROGRESS_EVERY_S = 10.0  # Seconds between progress lines of a long evaluation.


class Progress:
    """`data` (eval batches) that, while iterated, prints every PROGRESS_EVERY_S seconds the
    examples done, their rate and the time left, and at the end how long the pass took.
    Other attributes (`num_examples`, `references`) are `data`'s."""

    def __init__(self, data, label: str, batch_size: int):
        self.data, self.label, self.batch_size = data, label, batch_size

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        total = int(getattr(self.data, "num_examples", 0) or 0)
        start = last = time.perf_counter()
        examples = 0
        for done, batch in enumerate(self.data, 1):
            yield batch
            examples = min(total, done * self.batch_size) if total else done * self.batch_size
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and examples < total:
                last, rate = now, examples / (now - start)
                eta = datetime.timedelta(seconds=round((total - examples) / rate))
                say(f"  {self.label}: {examples:,}/{total:,} examples, "
                    f"{rate:.1f} examples/s, ETA {eta}")
        say(f"  {self.label}: {examples:,} examples in {time.perf_counter() - start:.1f}s")


# -- Cost and speed -------------------------------------------------------------------------------
def _decoder_length(task, config) -> int:
    """Decoder positions the measured path computes: one for classification (the verbalizer
    position), the targets for span corruption, the answer tokens for generation."""
    return 1 if task.kind == "classification" else config.max_target_length


def _costs(cfg, model, task, config, backbone_params: int) -> dict:
    n, m = config.max_input_length, _decoder_length(task, config)
    # flops takes the PluginConfig itself (ratio and bottleneck); None is the teacher.
    saving = 1 - flops_lib.encoder_flops(cfg, n, model.pcfg)["total"] / flops_lib.encoder_flops(cfg, n)["total"]
    params = plugin_param_count(cfg, model.pcfg) if model.pcfg else 0
    return {"flops_per_example": flops_lib.forward_flops(cfg, n, m, model.pcfg),
            "encoder_flops_saving": saving,
            "plugin_params": params, "plugin_params_pct": 100.0 * params / backbone_params}


def _measure_speed(cfg, models, backbone, data, mesh, rules, task, config) -> np.ndarray:
    """Seconds per eval batch, [model, round], on the first eval batch: the models timed in
    interleaved rounds of `eval.speed_calls` calls each (variator_jax/timing.py)."""
    batch = sharding.global_batch(mesh, next(iter(data)), rules)
    m = _decoder_length(task, config)
    if task.kind == "generation":
        run = lambda model: generate(cfg, backbone, batch["input_ids"], batch["attention_mask"],
                                     m, model.plugin)
    else:
        run = lambda model: forward(cfg, backbone, batch["input_ids"], batch["attention_mask"],
                                    batch["decoder_input_ids"][:, :m],
                                    batch["decoder_attention_mask"][:, :m], model.plugin)["logits"]
    rounds = max(int(config.eval.speed_repeats), 1)
    calls = max(int(config.eval.get("speed_calls", 1)), 1)
    say(f"timing {len(models)} models: {rounds} interleaved rounds x {calls} calls ...")
    return timing.interleaved_times([functools.partial(run, model) for model in models],
                                    rounds, calls)


def cpu_model() -> str:
    """The host CPU's model name ('AMD EPYC 7B13'), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description() -> str:
    """'AMD EPYC 7B13, 2 cores, cpu (jax 0.10.2)': what the measured speeds were taken on."""
    model = cpu_model()
    device = jax.devices()[0]
    accel = "" if device.platform == "cpu" else f", {len(jax.devices())} x {device.device_kind}"
    return f"{model}, {os.cpu_count()} cores{accel}, {jax.default_backend()} (jax {jax.__version__})"


# -- Outputs --------------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    """The Markdown table a reader compares methods with, and a line on how speed was timed."""
    metric = results["quality_metric"]
    entries = results["entries"]
    teacher = entries[0]["quality"]
    rows = [[r["name"], r["ratio"], f"{r['quality']:.4f}",
             "" if r["ratio"] == 1 else f"{r['quality'] - teacher:+.4f}",
             f"{r['flops_per_example'] / 1e9:.3f}", f"{100 * r['flops_saving']:.1f} %",
             f"{100 * r['encoder_flops_saving']:.1f} %",
             f"{r['plugin_params']:,} ({r['plugin_params_pct']:.2f} %)",
             f"{r['examples_per_s']:.1f}", timing.format_speedup(r)] for r in entries]
    table = markdown_table(["model", "k", metric, "vs teacher", "GFLOPs/example", "FLOPs saved",
                            "encoder FLOPs saved", "plugin params (% of backbone)",
                            "examples/s", "speedup (IQR)"], rows, align="lrrrrrrrrr")
    lines = [f"{results['task']} on {results['eval_data']} (n = {results['max_input_length']}), "
             f"measured on {results['machine']}", "", table]
    lines += ["", f"Speedup: median over {entries[0]['speed_rounds']} interleaved rounds, with "
              "the interquartile range; the FLOPs ceiling is teacher / model GFLOPs."]
    if any(r.get("above_ceiling") for r in entries):
        lines.append("n/a: the measured speedup is above what the FLOPs allow by more than its "
                     "spread, so machine load, not the model, made it; run eval.py again on a "
                     "quieter machine or with more --config.eval.speed_repeats.")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Quality vs measured speedup (median, IQR error bars), points in order of FLOPs saved;
    each model's FLOPs ceiling as a tick, and speedups above it drawn hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    entries = sorted(results["entries"], key=lambda r: r["flops_saving"])
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
    lo, hi = min(x.min() - err[0].max(), ceilings.min()), max(x.max() + err[1].max(), ceilings.max())
    pad = 0.2 * max(hi - lo, 0.1)
    ax.set_xlim(lo - pad, hi + pad)
    ypad = 0.2 * max(float(y.max() - y.min()), 0.02)
    ax.set_ylim(y.min() - ypad, y.max() + ypad)
    middle = (lo + hi) / 2
    for r, xi, yi in zip(entries, x, y):
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
    table = format_table(results)
    say(table)
    if jax.process_index() != 0:
        return
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    atomic_write(out, "results.json", lambda tmp: write_text(tmp, json.dumps(results, indent=2) + "\n"))
    atomic_write(out, "results.md", lambda tmp: write_text(tmp, table + "\n"))
    plot(results, os.path.join(out, "speed_accuracy.png"))
    say(f"Results written to {out}/results.json, results.md, speed_accuracy.png")
