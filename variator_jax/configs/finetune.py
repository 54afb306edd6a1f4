r"""Stage 0 (docs/DESIGN.md §2): full fine-tuning of the backbone on a task, saving an HF backbone.

Classification reads the verbalizer logits at the first decoder position (cross-entropy
over the label words); span corruption and SQuAD use token cross-entropy over the targets.

  python train.py --config=configs/finetune.py:task=sst2,size=base \
      --config.backbone=/models/t5-base --workdir=runs/t5-base-sst2

prints, from process 0 (long lines wrapped here):

  Parameters: backbone 222,903,552 (trainable, full fine-tuning)
  Mesh: {'data': 4, 'model': 2} over 8 device(s) (gpu), 1 process(es)
  Compiled the train step in 45.0s; training steps 1..10000
  step   100/10000  loss 2.1e-01 (task_ce 2.1e-01)  lr 1.00e-04  grad_norm 3.2  4.02 steps/s
      12.6k tokens/s  ETA 0:41:03
  ...
  eval at step 10000: ce 0.1  accuracy 0.93
  Backbone written to runs/t5-base-sst2/backbone (HF format)

`runs/t5-base-sst2/backbone` is what `configs/plugin.py:stage=adapt` takes as `backbone`.
With `backbone=""` and a `variant`, the backbone starts from a random init of that variant
(plus `model_overrides`): stage (a) of `python -m variator_jax.stages` pre-trains
its small T5 this way.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from variator_jax.configs import common


def get_config(arg=None):
    preset = common.parse_preset(arg, ("task", "size"))
    task = preset.get("task", "sst2")
    c = ml_collections.ConfigDict()
    c.stage = "finetune"  # Stage 0: every backbone weight is trained.
    c.task = task  # pretrain|mnli|qqp|qnli|sst2|rte|mrpc|squad|stdlib_docs, or a task's PATH.json.
    c.dropout = True  # Train with the backbone's dropout.

    # -- Model ------------------------------------------------------------------------------------
    c.backbone = ""  # HF T5 dir to start from; "" = random init of `variant` + `model_overrides`.
    c.tokenizer = placeholder(str)  # "byte" (ByT5), a tokenizer dir; None: the backbone dir's.
    c.variant = common.variant_name(preset.get("size", ""))  # Expected, or initialised, variant.
    c.model_overrides = ml_collections.ConfigDict()  # T5Config fields for a random init.
    c.dtype = "float32"  # Compute dtype; "bfloat16" on TPU/GPU (parameters stay float32).

    # -- Data -------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()  # Sources: text:, jsonl:, tfds:NAME[:SPLIT], builtin:.
    train, evaluate = common.task_sources(task)
    c.data.train = train  # Training source (a task file's: yours, e.g. jsonl:DIR).
    c.data.eval = evaluate  # Eval source; "" = no evaluation.
    c.data.data_dir = placeholder(str)  # tfds data_dir; None: tfds's default.
    c.data.train_split = placeholder(str)  # Split or slice, e.g. "train[:95%]"; None: train.
    c.data.eval_split = placeholder(str)  # Eval split or slice; None: the task's eval split.
    c.data.workers = 0  # grain worker processes building pre-training rows; 0 = none.
    c.data.noise_density = 0.15  # Span corruption: fraction of tokens masked (T5's 0.15).
    c.data.mean_noise_span_length = 3.0  # Span corruption: mean masked span (T5's 3).
    c.max_input_length = common.MAX_INPUT_LENGTH.get(task, 224)  # Encoder tokens (released, §2).
    c.max_target_length = 32  # Decoder tokens.

    # -- Optimisation (stage 0's settings are not in docs/DESIGN.md §2: common T5 AdamW ones) ------
    c.batch_size = 32  # Global batch, split over the mesh's data axis.
    c.total_steps = 10_000  # Optimizer steps.
    c.lr = 1e-4  # Peak learning rate of AdamW.
    c.warmup_steps = 500  # Linear warm-up, then linear decay to 0 at total_steps.
    c.weight_decay = 0.0  # Decoupled (AdamW) weight decay.
    c.clip_grad = 1.0  # Global gradient-norm clipping; 0 = none.
    c.divergence_factor = 1000.0  # Stop if a mean loss per log window is this x the lowest; 0: off.
    c.seed = 0  # Random init (if any), data order, span corruption and dropout.

    # -- Bookkeeping ------------------------------------------------------------------------------
    c.log_every = 100  # Steps between metrics.jsonl / TensorBoard lines and progress lines.
    c.eval_every = 0  # Steps between evaluations on data.eval; 0 = only at the end.
    c.eval_batch_size = 0  # Global eval batch; 0 = batch_size.
    c.checkpoint_every = 1000  # Steps between checkpoints (and one at the end).
    c.keep_checkpoints = 2  # Most recent checkpoints kept (each holds the whole backbone).

    return common.add_eval_and_mesh(c)
