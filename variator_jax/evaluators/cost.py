"""Analytic cost: FLOPs per example, the share saved over the teacher, and plugin size.

Counted, not measured (flops.py): the forward path the speed evaluator times, at
`config.max_input_length` input tokens and `decoder_length` decoder positions.
"""
from __future__ import annotations

from variator_jax import flops as flops_lib
from variator_jax.evaluators.common import Evaluator, Model, Setting, decoder_length
from variator_jax.plugins import plugin_param_count


def flops_per_example(setting: Setting, model: Model) -> int:
    """FLOPs of one example's forward pass through `model` (flops.forward_flops)."""
    config = setting.config
    return flops_lib.forward_flops(setting.cfg, config.max_input_length,
                                   decoder_length(setting.task, config), model.pcfg)


class Cost(Evaluator):
    """`flops_per_example`, `encoder_flops_saving` (the encoder alone, where plugins act),
    `plugin_params` (and as a % of the backbone), `flops_saving` over the teacher."""
    name = "cost"

    def run(self, models):
        rows = [self._costs(model) for model in models]
        for row in rows:
            row["flops_saving"] = 1 - row["flops_per_example"] / rows[0]["flops_per_example"]
        return rows

    def _costs(self, model: Model) -> dict:
        s = self.setting
        n = s.config.max_input_length
        # flops takes the PluginConfig itself (ratio and bottleneck); None is the teacher.
        saving = 1 - (flops_lib.encoder_flops(s.cfg, n, model.pcfg)["total"]
                      / flops_lib.encoder_flops(s.cfg, n)["total"])
        params = plugin_param_count(s.cfg, model.pcfg) if model.pcfg else 0
        return {"flops_per_example": flops_per_example(s, model),
                "encoder_flops_saving": saving, "plugin_params": params,
                "plugin_params_pct": 100.0 * params / s.backbone_params}
