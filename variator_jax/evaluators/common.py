"""What every evaluator shares: the models compared, the setting evaluators are built from.

As big_vision's `evaluators/common.py`: an evaluator is built once from the config and the
task (`Setting`) and then scores models; the driver (evaluate.py) merges the metrics of the
evaluators the config names into one row per model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from variator_jax.plugins import Plugin, PluginConfig


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
    def plugin(self) -> Plugin | None:
        return None if self.pcfg is None else Plugin(self.pcfg, self.params)


@dataclasses.dataclass
class Setting:
    """What evaluators are built from: the run's config and task, the backbone on the mesh,
    and one pass of eval batches per iteration of `data`."""
    config: Any  # The run's ml_collections config (eval.*, lengths, batch sizes).
    cfg: Any  # The backbone's T5Config.
    task: Any  # data.Task: its kind picks the default evaluators, its metrics the headline.
    tokenizer: Any
    backbone: Any  # The backbone tree, placed on `mesh` (the teacher, and every plugin's base).
    data: Any  # data.EvalBatches of config.data.eval.
    mesh: Any
    rules: Any  # Logical axis rules (sharding.py).
    verbalizer: tuple[int, ...] | None  # Classification: the label tokens' ids.
    backbone_params: int  # Parameters of the backbone (plugin size is a share of it).


class Evaluator:
    """Built from a `Setting`; `run(models)` scores the models (the teacher first).

    Metrics are per model so that evaluators that compare (speedup over the teacher, models
    timed in interleaved rounds) and evaluators that do not share one interface: the
    latter implement `score`, the former override `run`."""
    name: ClassVar[str]  # What `config.eval.evaluators` calls it.

    def __init__(self, setting: Setting):
        self.setting = setting

    def run(self, models: Sequence[Model]) -> list[dict[str, float]]:
        """One dict of metrics per model, in the order of `models` (models[0]: the teacher)."""
        return [self.score(model) for model in models]

    def score(self, model: Model) -> dict[str, float]:
        """The metrics of `model` alone."""
        raise NotImplementedError(f"{type(self).__name__} compares models: call run(models)")


def quality_metric(task) -> str:
    """The headline quality metric of `task`: GLUE's (or the task file's first) for
    classification, F1 for generation, student/teacher agreement for pre-training."""
    if task.kind == "classification":
        return task.metrics[0]
    return "f1" if task.kind == "generation" else "agreement"


def decoder_length(task, config) -> int:
    """Decoder positions the measured path computes: one for classification (the verbalizer
    position), the targets for span corruption, the answer tokens for generation."""
    return 1 if task.kind == "classification" else config.max_target_length


def one_pass(setting: Setting, model: Model):
    """`setting.data` for one quality pass over `model`: announced, with progress lines."""
    from variator_jax.experiment import eval_batch_size
    from variator_jax.progress import Progress, say
    say(f"evaluating {model.name} on {setting.config.data.eval} ...")
    return Progress(setting.data, model.name, eval_batch_size(setting.config))
