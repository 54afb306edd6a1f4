"""The objective's eval metrics: task accuracy (or F1), cross-entropy, and distillation errors.

For a plugin (a `Distill` objective): the task metrics of the student and of the teacher
(`teacher_*`), the hidden-state errors `enc_mse` / `dec_mse`, and how often the two agree
(the predicted class, or for pre-training the argmax token of each target position). For the
teacher (a `Finetune` view of the backbone): its own task metrics and CE. Training's
periodic evaluation (trainer.py) runs `eval_pass` with its own compiled step.
"""
from __future__ import annotations

import jax
import numpy as np

from variator_jax import objectives, sharding
from variator_jax.evaluators.common import Evaluator, Model, one_pass


def eval_pass(step_fn, params, frozen, data, mesh, rules, task) -> dict[str, float]:
    """`step_fn(params, batch, frozen)` (an `objective.eval_sums`, jitted) over every batch of
    `data`, summarised by `objectives.eval_summary` (`task`: a data.Task or a task name)."""
    sums, preds = {}, {}
    for local in data:
        out = jax.device_get(step_fn(params, sharding.global_batch(mesh, local, rules), frozen))
        for k, v in out.items():
            if np.ndim(v):
                preds.setdefault(k, []).append(np.asarray(v))
            else:
                sums[k] = sums.get(k, 0.0) + float(v)
    return objectives.eval_summary(task, sums, {k: np.concatenate(v) for k, v in preds.items()})


class Classification(Evaluator):
    """Each model scored by the objective that would train it, without dropout: the teacher
    by the backbone's own task loss, a plugin by distillation from the teacher."""
    name = "classification"

    def score(self, model: Model) -> dict[str, float]:
        s = self.setting
        objective = objectives.make(s.cfg, model.pcfg, "hidden", s.task.kind, s.verbalizer,
                                    dropout=False)
        params = model.params if model.pcfg else s.backbone
        step = jax.jit(lambda p, batch, frozen: objective.eval_sums(p, frozen, batch))
        result = eval_pass(step, params, objective.frozen(s.backbone), one_pass(s, model),
                           s.mesh, s.rules, s.task)
        if model.pcfg is None:  # The teacher agrees with itself; its metrics are its own.
            result["agreement"] = 1.0
        return result
