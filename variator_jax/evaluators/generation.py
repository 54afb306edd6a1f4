"""Generation quality: greedy answers scored by the official SQuAD v1.1 exact match and F1.

Each model decodes `config.max_target_length` tokens greedily (KV cache, model.py); the
answers are compared with every reference answer of the eval split (metrics.py).
"""
from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from variator_jax import sharding
from variator_jax.errors import UserError
from variator_jax.evaluators.common import Evaluator, Model, one_pass
from variator_jax.metrics import squad_em_f1
from variator_jax.model import generate


class Generation(Evaluator):
    """`exact_match` and `f1` (percentages) of each model's greedy answers."""
    name = "generation"

    def __init__(self, setting):
        super().__init__(setting)
        if setting.task.kind != "generation":  # Only answers have references to match.
            raise UserError(f"config.eval.evaluators: 'generation' needs a generation task "
                            f"(reference answers); {setting.task.name} is {setting.task.kind}")

    def score(self, model: Model) -> dict[str, float]:
        s = self.setting
        data = one_pass(s, model)
        predictions, answers = [], []
        for local in data:
            batch = sharding.global_batch(s.mesh, local, s.rules)
            tokens = generate(s.cfg, s.backbone, batch["input_ids"], batch["attention_mask"],
                              s.config.max_target_length, model.plugin)
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
            index = multihost_utils.process_allgather(batch["index"], tiled=True)
            for row, i in zip(np.asarray(tokens), np.asarray(index), strict=True):
                if i >= 0:  # -1: a padding row of the last batch.
                    predictions.append(s.tokenizer.decode(row, skip_special_tokens=True).strip())
                    answers.append(data.references[i])
        return squad_em_f1(predictions, answers)
