"""variator_jax: Variator compression plugins for a frozen T5, in JAX (Findings of EMNLP 2023).

    import variator_jax as vj
    cfg, backbone = vj.load_hf_t5("/models/t5-base")
    pcfg, plugin = vj.load_plugin("runs/k4/plugin", cfg=cfg, backbone=backbone)
    out = vj.forward(cfg, backbone, ids, mask, dec_ids, plugin=(pcfg, plugin))
"""
from variator_jax.convert import CheckpointError, load_hf_t5, save_hf_t5
from variator_jax.model import encode, forward, generate, shift_right
from variator_jax.plugins import (Plugin, PluginConfig, backbone_fingerprint, backbone_identity,
                                  init_plugin, load_plugin, plugin_param_count, save_plugin)
from variator_jax.t5 import T5Config, init_t5

__all__ = [
    "CheckpointError", "Plugin", "PluginConfig", "T5Config", "backbone_fingerprint", "backbone_identity",
    "encode", "forward", "generate", "init_plugin", "init_t5", "load_hf_t5", "load_plugin",
    "plugin_param_count", "save_hf_t5", "save_plugin", "shift_right",
]
