"""A config file of one's own that chains two stages (train.py's `backbone_stage`): a tiny
byte-level T5 trained from a random init on CPython's docs (stage 0), then a k = 4 plugin
pre-trained on it (stage 1). The tests load it as a user's file: `--config=PATH`.

  python train.py --config=tests/data/chained_config.py --workdir=RUN

runs stage 0 in RUN/backbone_stage (-> RUN/backbone_stage/backbone) and then the plugin
stage on its output (-> RUN/plugin); `--config.backbone_stage.total_steps=...` reaches
stage 0.
"""
from variator_jax.configs import finetune, plugin

# t5-v1_1-small's layout (gated-GELU, untied head), shrunk.
MODEL = dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
             relative_attention_max_distance=64)
CORPUS = "builtin:pydoc"


def _shared(c, steps, lr):
    """What both stages share: byte tokens, CPython's docs, small batches, one device."""
    c.tokenizer = "byte"  # ByT5 bytes: needs no files.
    c.data.train = CORPUS  # CPython's pydoc topics: English text that needs no download.
    c.data.train_split = "train[:95%]"  # The first 95 % of the topics.
    c.data.eval = CORPUS  # Evaluated on ...
    c.data.eval_split = "train[95%:]"  # ... the held-out last 5 %.
    c.max_input_length = 96  # Bytes; span corruption fits 84-byte chunks into 96 / 24.
    c.max_target_length = 24  # Bytes of sentinels + corrupted spans.
    c.batch_size = 16  # Global batch.
    c.total_steps = steps  # Optimizer steps of this stage.
    c.lr = lr  # Peak AdamW learning rate.
    c.mesh.data = 1  # One CPU device: splitting 2 cores ...
    c.mesh.model = 1  # ... into devices would only add communication.
    return c


def get_config(arg=None):
    del arg  # No presets.
    stage0 = _shared(finetune.get_config("task=pretrain"), steps=600, lr=2e-3)
    stage0.variant = "t5-v1_1-small"  # Layout to initialise; sizes from MODEL.
    stage0.model_overrides.update(MODEL)

    c = _shared(plugin.get_config("stage=pretrain,ratio=4"), steps=600, lr=1e-3)
    c.backbone = ""  # Empty: made by backbone_stage below.
    c.backbone_stage = stage0  # The stage-0 config that makes the backbone.
    return c
