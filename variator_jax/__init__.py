"""variator_jax: Variator compression plugins for a frozen T5, in JAX (Findings of EMNLP 2023).

    import variator_jax as vj
    cfg, backbone = vj.load_hf_t5("demo_workdir/backbone_stage/backbone")  # or /models/t5-base
    pcfg, plugin = vj.load_plugin("demo_workdir/plugin", cfg=cfg, backbone=backbone)
    tokenizer = vj.load_tokenizer(None, "demo_workdir/backbone_stage/backbone")
    batch = tokenizer(["Return the absolute value of x."], return_tensors="np")
    out = vj.forward(cfg, backbone, batch["input_ids"], batch["attention_mask"],
                     vj.shift_right(batch["input_ids"]), plugin=(pcfg, plugin))
"""
from variator_jax.convert import CheckpointError, load_hf_t5, save_hf_t5
from variator_jax.data import load_tokenizer
from variator_jax.model import encode, forward, generate, shift_right
from variator_jax.plugins import (Plugin, PluginConfig, backbone_fingerprint, backbone_identity,
                                  init_plugin, load_plugin, plugin_param_count, save_plugin)
from variator_jax.t5 import T5Config, init_t5

__all__ = [
    "CheckpointError", "Plugin", "PluginConfig", "T5Config", "backbone_fingerprint", "backbone_identity",
    "encode", "forward", "generate", "init_plugin", "init_t5", "load_hf_t5", "load_plugin",
    "load_tokenizer", "plugin_param_count", "save_hf_t5", "save_plugin", "shift_right",
]
