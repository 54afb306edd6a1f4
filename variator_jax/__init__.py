"""variator_jax: Variator compression plugins for a frozen T5, in JAX (Findings of EMNLP 2023).

    import variator_jax as vj
    cfg, backbone = vj.load_hf_t5("demo_workdir/finetune/backbone")  # or /models/t5-base
    pcfg, plugin = vj.load_plugin("demo_workdir/adapt-k4/plugin", cfg=cfg, backbone=backbone)
    tokenizer = vj.load_tokenizer(None, "demo_workdir/finetune/backbone")
    batch = tokenizer(["Return the absolute value of x."], return_tensors="np")
    out = vj.forward(cfg, backbone, batch["input_ids"], batch["attention_mask"],
                     vj.shift_right(batch["input_ids"]), plugin=(pcfg, plugin))

The names below are imported on first use (PEP 562): importing the package or a light
submodule (`cli`, `boundary`, `errors`) loads neither NumPy nor JAX, so that `--help` and a
bad flag answer at once.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "CheckpointError": "errors", "load_hf_t5": "convert", "save_hf_t5": "convert",
    "load_tokenizer": "data",
    "encode": "model", "forward": "model", "generate": "model", "shift_right": "model",
    "Plugin": "plugins", "PluginConfig": "plugins", "backbone_fingerprint": "plugins",
    "backbone_identity": "plugins", "init_plugin": "plugins", "load_plugin": "plugins",
    "plugin_param_count": "plugins", "save_plugin": "plugins",
    "T5Config": "t5", "init_t5": "t5",
}

__all__ = [
    "CheckpointError", "Plugin", "PluginConfig", "T5Config", "backbone_fingerprint",
    "backbone_identity", "encode", "forward", "generate", "init_plugin", "init_t5",
    "load_hf_t5", "load_plugin", "load_tokenizer", "plugin_param_count", "save_hf_t5",
    "save_plugin", "shift_right",
]
assert sorted(_EXPORTS) == __all__


def __getattr__(name: str):
    """A public name (imported from its submodule, then kept here), or a submodule."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # For type checkers and IDEs: the same names, imported eagerly.
    from variator_jax.convert import load_hf_t5, save_hf_t5
    from variator_jax.data import load_tokenizer
    from variator_jax.errors import CheckpointError
    from variator_jax.model import encode, forward, generate, shift_right
    from variator_jax.plugins import (
        Plugin,
        PluginConfig,
        backbone_fingerprint,
        backbone_identity,
        init_plugin,
        load_plugin,
        plugin_param_count,
        save_plugin,
    )
    from variator_jax.t5 import T5Config, init_t5
