r"""Plugin training (docs/DESIGN.md §2): stage 1 `pretrain` and stage 2 `adapt`.

Stage 1, task-agnostic pre-training on a frozen pre-trained T5 (span corruption, released
settings: Adam lr 1e-3, batch 64, 60k steps, lengths 224 / 32):

  python train.py --config=configs/plugin.py:stage=pretrain,size=base,ratio=4 \
      --config.backbone=/models/t5-base --config.data.train=text:/data/wiki.txt \
      --workdir=runs/t5-base-k4

prints, from process 0 (long lines wrapped here):

  Parameters: backbone 222,903,552 (frozen) | plugin k=4 r=64: 1,926,960 (trainable, 0.86 % of the
      backbone) over 12 encoder layers
  Mesh: {'data': 8, 'model': 1} over 8 device(s) (tpu), 1 process(es)
  Compiled the train step in 38.1s; training steps 1..60000
  step   100/60000  loss 4.1e-02 (enc_mse 2.9e-02 dec_mse 1.2e-02)  lr 1.00e-03  grad_norm 0.41
      5.10 steps/s  85.3k tokens/s  ETA 3:15:40
  ...
  Plugin written to runs/t5-base-k4/plugin

Stage 2, adaptation to a task: the task-fine-tuned backbone (configs/finetune.py), the
stage-1 plugin as the start, hidden-state distillation (released: lr 1e-5, batch 32):

  python train.py --config=configs/plugin.py:stage=adapt,task=sst2,size=base,ratio=4 \
      --config.backbone=runs/t5-base-sst2/backbone \
      --config.init_plugin=runs/t5-base-k4/plugin --workdir=runs/t5-base-sst2-k4

Presets after the colon, comma-separated: `stage=pretrain|adapt`, `task=NAME` (adapt:
mnli qqp qnli sst2 rte mrpc squad), `size=small|base|large|...` or a full variant name
(`t5-v1_1-base`, `flan-t5-xl`: the backbone directory must have those sizes), `ratio=K`.
Any field can then be overridden: `--config.lr=3e-4 --config.mesh.model=2`.
Running the same command again resumes from the workdir's latest checkpoint.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from variator_jax.configs import common


def get_config(arg=None):
    preset = common.parse_preset(arg, ("stage", "task", "size", "ratio"))
    stage = preset.get("stage", "pretrain")
    if stage not in ("pretrain", "adapt"):
        raise ValueError(f"configs/plugin.py: stage={stage!r}; use stage=pretrain or stage=adapt "
                         "(backbone fine-tuning is configs/finetune.py)")
    task = preset.get("task", "pretrain" if stage == "pretrain" else "sst2")
    adapt = stage == "adapt"
    c = ml_collections.ConfigDict()
    c.stage = stage  # "pretrain" (task-agnostic, §2 step 1) or "adapt" (per task, step 2).
    c.task = task  # pretrain|mnli|qqp|qnli|sst2|rte|mrpc|squad|stdlib_docs, or a task's PATH.json.
    c.loss = "hidden"  # hidden: MSE of final encoder + decoder hidden; task / task+hidden add CE.
    c.init_plugin = ""  # A plugin dir to start from (adapt: the stage-1 plugin); "" = fresh init.
    c.dropout = False  # Student with the backbone's dropout; off: it only adds noise to the MSE.

    # -- Model ------------------------------------------------------------------------------------
    c.backbone = ""  # HF T5 dir (config.json + model.safetensors), frozen; required.
    c.tokenizer = placeholder(str)  # "byte" (ByT5), a tokenizer dir; None: the backbone dir's.
    c.variant = common.variant_name(preset.get("size", ""))  # Expected T5 variant (sizes checked).
    c.dtype = "float32"  # Compute dtype; "bfloat16" on TPU/GPU: backbone in bf16, plugin float32.
    c.plugin = ml_collections.ConfigDict()  # The plugin's shape (docs/DESIGN.md §1).
    c.plugin.ratio = int(preset.get("ratio", 4))  # k: neighbouring vectors merged into one.
    c.plugin.bottleneck = 64  # r: width of the decompression MLP (paper: 64).
    c.plugin.mask_aware = True  # Padding never joins a group; False = released code's behaviour.

    # -- Data -------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()  # Sources: text:, jsonl:, tfds:NAME[:SPLIT], builtin:.
    train, evaluate = common.task_sources(task)
    c.data.train = train  # text:, jsonl:, tfds:, builtin: (a task file's: yours, e.g. jsonl:DIR).
    c.data.eval = evaluate  # Eval source (split: the task's); "" = no evaluation.
    c.data.data_dir = placeholder(str)  # tfds data_dir; None: tfds's default.
    c.data.train_split = placeholder(str)  # Split or slice, e.g. "train[:95%]"; None: train.
    c.data.eval_split = placeholder(str)  # Eval split or slice; None: the task's eval split.
    c.data.workers = 0  # grain worker processes building pre-training rows; 0 = none.
    c.data.noise_density = 0.15  # Span corruption: fraction of tokens masked (T5's 0.15).
    c.data.mean_noise_span_length = 3.0  # Span corruption: mean masked span (T5's 3).
    c.max_input_length = common.MAX_INPUT_LENGTH.get(task, 224)  # Encoder tokens (released, §2).
    c.max_target_length = 32  # Decoder tokens (released: 32).

    # -- Optimisation (released settings, §2) ----------------------------------------------------
    c.batch_size = 32 if adapt else 64  # Global batch, split over the mesh's data axis.
    c.total_steps = 20_000 if adapt else 60_000  # Optimizer steps (adapt: not in §2, per task).
    c.lr = 1e-5 if adapt else 1e-3  # Peak learning rate of AdamW.
    c.warmup_steps = 50  # Linear warm-up, then linear decay to 0 at total_steps.
    c.weight_decay = 1e-5  # Decoupled (AdamW) weight decay.
    c.clip_grad = 10.0  # Global gradient-norm clipping; 0 = none.
    c.divergence_factor = 1000.0  # Stop if a mean loss per log window is this x the lowest; 0: off.
    c.seed = 0  # Plugin init, data order, span corruption and dropout.

    # -- Bookkeeping ------------------------------------------------------------------------------
    c.log_every = 100  # Steps between metrics.jsonl / TensorBoard lines and progress lines.
    c.eval_every = 0  # Steps between evaluations on data.eval; 0 = only at the end.
    c.eval_batch_size = 0  # Global eval batch; 0 = batch_size.
    c.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
    c.keep_checkpoints = 3  # Most recent checkpoints kept in WORKDIR/checkpoints.
    return common.add_eval_and_mesh(c)
