r"""Training configs: ml_collections files with `get_config(arg)` and presets after a colon.

  finetune  stage 0: full fine-tuning of the backbone on a task (task=..., size=...)
  plugin    stages 1 and 2: plugin pre-training and adaptation (stage=, task=, size=, ratio=)

The entry points take a file path or a packaged name (`variator-train --config=plugin:stage=adapt`
is `python train.py --config=configs/plugin.py:stage=adapt` in a checkout; the demo chains
them: `python -m variator_jax.stages`); in Python:

  >>> from variator_jax import configs
  >>> c = configs.get_config("plugin", "stage=adapt,task=sst2,size=base")
  >>> c.lr, c.batch_size, c.variant
  (1e-05, 32, 't5-base')
"""
import importlib

NAMES = ("finetune", "plugin")  # The packaged configs, by module name.


def get_config(name: str, arg: str | None = None):
    """The packaged config `name` (one of NAMES) with presets `arg`, as a ConfigDict."""
    if name not in NAMES:
        raise ValueError(f"unknown config {name!r}; packaged configs: {', '.join(NAMES)}")
    return importlib.import_module(f"variator_jax.configs.{name}").get_config(arg)
