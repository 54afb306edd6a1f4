"""Measured speed: examples/s of each model and its speedup over the teacher, with its spread.

The models run on the first eval batch in interleaved rounds (timing.py), so that a change
of machine load touches them all alike; the speedup is the median over rounds with its
interquartile range, checked against the FLOPs ceiling (teacher / model FLOPs).
"""
from __future__ import annotations

import functools
import os
import platform

import jax
import numpy as np

from variator_jax import sharding, timing
from variator_jax.evaluators.common import Evaluator, decoder_length
from variator_jax.evaluators.cost import flops_per_example
from variator_jax.experiment import eval_batch_size
from variator_jax.model import forward, generate
from variator_jax.progress import say


class Speed(Evaluator):
    """`examples_per_s`, and `speedup` with its quartiles, range, rounds and FLOPs ceiling
    (`timing.speedup_stats`); the teacher (models[0]) is the reference."""
    name = "speed"

    def run(self, models):
        s = self.setting
        times = self._times(models)
        teacher_flops = flops_per_example(s, models[0])
        rows = []
        for model, seconds in zip(models, times, strict=True):
            row = {"examples_per_s": eval_batch_size(s.config) / float(np.median(seconds))}
            ceiling = teacher_flops / flops_per_example(s, model)  # FLOPs allow no more.
            row.update(timing.speedup_stats(times[0], seconds, ceiling))
            rows.append(row)
        return rows

    def _times(self, models) -> np.ndarray:
        """Seconds per eval batch, [model, round]: the models timed in interleaved rounds of
        `eval.speed_calls` calls each, `eval.speed_repeats` rounds."""
        s = self.setting
        batch = sharding.global_batch(s.mesh, next(iter(s.data)), s.rules)
        m = decoder_length(s.task, s.config)
        if s.task.kind == "generation":
            def run(model):
                return generate(s.cfg, s.backbone, batch["input_ids"], batch["attention_mask"],
                                m, model.plugin)
        else:
            def run(model):
                return forward(s.cfg, s.backbone, batch["input_ids"], batch["attention_mask"],
                               batch["decoder_input_ids"][:, :m],
                               batch["decoder_attention_mask"][:, :m], model.plugin)["logits"]
        rounds = max(int(s.config.eval.speed_repeats), 1)
        calls = max(int(s.config.eval.get("speed_calls", 1)), 1)
        say(f"timing {len(models)} models: {rounds} interleaved rounds x {calls} calls ...")
        return timing.interleaved_times([functools.partial(run, model) for model in models],
                                        rounds, calls)


def cpu_model() -> str:
    """The host CPU's model name ('AMD EPYC 7B13'), or the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_description() -> str:
    """'AMD EPYC 7B13, 2 cores, cpu (jax 0.10.2)': what the measured speeds were taken on."""
    device = jax.devices()[0]
    accel = "" if device.platform == "cpu" else f", {len(jax.devices())} x {device.device_kind}"
    return (f"{cpu_model()}, {os.cpu_count()} cores{accel}, {jax.default_backend()} "
            f"(jax {jax.__version__})")
