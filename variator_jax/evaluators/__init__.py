"""Evaluator plug-ins: quality, cost and speed, each built from the config and the task.

`config.eval.evaluators` names them, comma-separated, in the order their metrics appear;
empty means the task's default: `classification,cost,speed` (`generation,cost,speed` for a
generation task such as SQuAD). evaluate.py runs them over the teacher and each plugin:

  >>> built = evaluators.build(config, setting)   # [Classification, Cost, Speed]
  >>> [e.run(models) for e in built]             # per evaluator, one dict per model
"""
from __future__ import annotations

import difflib

from variator_jax.errors import UserError
from variator_jax.evaluators.classification import Classification
from variator_jax.evaluators.common import Evaluator, Model, Setting
from variator_jax.evaluators.cost import Cost
from variator_jax.evaluators.generation import Generation
from variator_jax.evaluators.speed import Speed

__all__ = ["EVALUATORS", "Evaluator", "Model", "Setting", "build", "chosen", "default"]

EVALUATORS: dict[str, type[Evaluator]] = {
    cls.name: cls for cls in (Classification, Generation, Cost, Speed)}


def chosen(config) -> list[str]:
    """The names in `config.eval.evaluators`, checked ([]: the task's default). An unknown
    name is a one-line error naming it, and the closest known one."""
    picked = [n.strip() for n in config.eval.get("evaluators", "").split(",") if n.strip()]
    for name in picked:
        if name not in EVALUATORS:
            close = difflib.get_close_matches(name, EVALUATORS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"config.eval.evaluators: unknown evaluator {name!r}; {hint}"
                            f"known: {', '.join(sorted(EVALUATORS))}")
    if len(set(picked)) < len(picked):
        raise UserError(f"config.eval.evaluators: {','.join(picked)} names one twice")
    return picked


def default(task) -> list[str]:
    """What evaluation measured before evaluators were chosen: quality, cost, speed."""
    return ["generation" if task.kind == "generation" else "classification", "cost", "speed"]


def build(config, setting: Setting) -> list[Evaluator]:
    """The evaluators `config` chooses (else `default`), built for `setting`."""
    return [EVALUATORS[name](setting) for name in chosen(config) or default(setting.task)]
