r"""The embedded default (`make demo`, docs/DESIGN.md §5): no network, no pre-trained weights.

  python train.py --config=configs/demo.py --workdir=demo_workdir

Two stages, chained by `backbone_stage` (train_lib runs it first because `backbone` is
empty, in WORKDIR/backbone_stage, and then uses its output as `backbone`):

  0. `backbone_stage`: a tiny byte-level T5 (ByT5 tokenizer, vocabulary 384, d_model 128,
     2 + 2 layers) from a random init, trained on span corruption over `builtin:pydoc`
     (CPython's own documentation) -> WORKDIR/backbone_stage/backbone (an HF directory).
  1. the plugin stage: a k = 4 plugin pre-trained on that frozen backbone by hidden-state
     distillation (§2 step 1) on the same corpus -> WORKDIR/plugin.

prints, from process 0 (3.5 minutes on 2 busy CPU cores):

  == backbone stage: finetune -> demo_workdir/backbone_stage
  Parameters: backbone 886,528 (trainable, full fine-tuning)
  Mesh: {'data': 1, 'model': 1} over 1 device(s) (cpu), 1 process(es)
  Compiled the train step in 7.5s; training steps 1..600
  step  50/600  loss 4.1531e+00 (task_ce 4.153e+00)  lr 1.02e-03  grad_norm 1.17  7.27 steps/s ...
  ...
  step 600/600  loss 2.4465e+00 (task_ce 2.446e+00)  lr 9.27e-05  grad_norm 0.732  5.14 steps/s ...
  eval at step 600: ce 2.452
  Backbone written to demo_workdir/backbone_stage/backbone (HF format)
  == pretrain stage on demo_workdir/backbone_stage/backbone -> demo_workdir
  Parameters: backbone 886,528 (frozen) | plugin k=4 r=64: 53,640 (trainable, 6.05 % of the backbone) ...
  ...
  Compiled the train step in 4.2s; training steps 1..600
  step  50/600  loss 2.5852e-01 (enc_mse 2.466e-01 dec_mse 1.193e-02)  lr 5.10e-04 ...
  ...
  step 600/600  loss 1.8371e-02 (enc_mse 1.719e-02 dec_mse 1.185e-03)  lr 4.64e-05 ...
  eval at step 600: enc_mse 0.01621  dec_mse 0.001063  ce 2.451  teacher_ce 2.452
  Plugin written to demo_workdir/plugin

Running it again skips what is finished (each stage's `result.json`) and resumes what is
not. `--config.backbone=DIR` (an HF T5 directory) skips stage 0 and trains the plugin on
that model instead (with `--config.tokenizer=DIR` too: the demo's tokenizer is ByT5's).
Overrides reach stage 0 through `--config.backbone_stage.total_steps=...`.
"""
from variator_jax.configs import finetune, plugin

# The demo's model: t5-v1_1-small's layout (gated-GELU, untied head), shrunk for 2 CPU cores.
TINY_MODEL = dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2,
                  relative_attention_max_distance=64)
CORPUS = "builtin:pydoc"
TRAIN_SPLIT, EVAL_SPLIT = "train[:95%]", "train[95%:]"  # Held-out 5 % of the pydoc topics.


def _shared(c, steps, lr):
    """What both demo stages share: tiny batches and lengths, frequent logs, one device."""
    c.tokenizer = "byte"  # ByT5 bytes: needs no files.
    c.data.train = CORPUS  # CPython's pydoc topics: English text that needs no download.
    c.data.train_split = TRAIN_SPLIT  # The first 95 % of the topics.
    c.data.eval = CORPUS  # Evaluated on ...
    c.data.eval_split = EVAL_SPLIT  # ... the held-out last 5 %.
    c.max_input_length = 96  # Bytes; span corruption fits 84-byte chunks into 96 / 24.
    c.max_target_length = 24  # Bytes of sentinels + corrupted spans.
    c.batch_size = 16  # Global batch.
    c.eval_batch_size = 32  # Global eval batch.
    c.total_steps = steps  # Optimizer steps of this stage.
    c.lr = lr  # Peak AdamW learning rate.
    c.warmup_steps = 50  # Linear warm-up, then linear decay.
    c.log_every = 50  # A progress line every 50 steps.
    c.checkpoint_every = 100  # Kill it and run it again: it resumes.
    c.mesh.data = 1  # One CPU device: splitting 2 cores ...
    c.mesh.model = 1  # ... into devices would only add communication.
    return c


def get_config(arg=None):
    del arg  # No presets: the demo is one fixed recipe.
    stage0 = _shared(finetune.get_config("task=pretrain"), steps=600, lr=2e-3)
    stage0.variant = "t5-v1_1-small"  # Layout to initialise (gated-GELU); sizes from TINY_MODEL.
    stage0.model_overrides.update(TINY_MODEL)

    c = _shared(plugin.get_config("stage=pretrain,ratio=4"), steps=600, lr=1e-3)
    c.backbone = ""  # Empty: made by backbone_stage below.
    c.backbone_stage = stage0  # The stage-0 config that makes the backbone (see docstring).
    return c
