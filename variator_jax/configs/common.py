r"""What every config file shares: preset parsing, per-task tables, the eval and mesh fields.

As big_vision's `configs/common.py`: the presets after a colon, the per-task tables, and the
eval.py / mesh fields every training config has.

Config files import it as `from variator_jax.configs import common`, so a config loaded by
path (`--config=configs/plugin.py`) and one loaded from the installed package
(`--config=plugin`) run the same code.
"""
import ml_collections

# Released maximum input lengths per task (docs/DESIGN.md §2); targets are label words or answers.
MAX_INPUT_LENGTH = {"mnli": 256, "qqp": 256, "rte": 256, "qnli": 356, "sst2": 96, "mrpc": 96,
                    "squad": 512}
TFDS_NAME = {"squad": "squad/v1.1"}  # GLUE tasks are glue/NAME.


def parse_preset(arg, known):
    """'stage=adapt,task=sst2' -> {'stage': 'adapt', 'task': 'sst2'} (only `known` keys)."""
    preset = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in known:
            raise ValueError(f"config preset {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(known)}")
        preset[key.strip()] = value.strip()
    return preset


def variant_name(size):
    """'base' -> 't5-base'; a full variant name passes through; '' -> ''."""
    if not size or "-" in size:
        return size or ""
    return f"t5-{size}"


def tfds_source(task):
    """'sst2' -> 'tfds:glue/sst2'; 'squad' -> 'tfds:squad/v1.1'."""
    return f"tfds:{TFDS_NAME.get(task, 'glue/' + task)}"


def task_sources(task):
    """A task's default (train, eval) sources: CPython's docs for `pretrain` (no eval), the
    builtin for `stdlib_docs`, tfds for GLUE and SQuAD; none for a task file (set
    `data.train` and `data.eval`, e.g. `jsonl:DIR`)."""
    from variator_jax import task_file
    if task == "pretrain":
        return "builtin:pydoc", ""
    if task == "stdlib_docs":
        return "builtin:stdlib_docs", "builtin:stdlib_docs"
    if task_file.is_task_file(task):
        return "", ""
    return f"{tfds_source(task)}:train", tfds_source(task)


def add_eval_and_mesh(c):
    """The eval.py, mesh and scale fields every training config shares (finetune.py too)."""
    # -- eval.py --------------------------------------------------------------------------------
    c.eval = ml_collections.ConfigDict()  # What eval.py compares with the teacher.
    c.eval.plugins = ""  # Comma-separated plugin dirs / compressors (tome:4); "" = WORKDIR/plugin.
    c.eval.evaluators = ""  # Any of classification,generation,cost,speed; "" = quality,cost,speed.
    c.eval.speed_repeats = 10  # Timed rounds (models interleaved); median and IQR reported.
    c.eval.speed_calls = 3  # Calls per model per round, so that each timing is long enough.

    # -- Mesh -------------------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()  # Device mesh ("data", "model") and axis rules.
    c.mesh.data = -1  # Devices along the batch axis; -1 = all the rest.
    c.mesh.model = 1  # Devices along the backbone's mlp / heads / vocab dims (tensor parallel).
    c.mesh.rules = (  # Logical axis -> mesh axis (or None).
        ("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
        ("kv", None), ("embed", None), ("relpos_buckets", None), ("length", None),
        ("layers", None))
    c.mesh.fsdp = False  # Shard weights' embed dim over data too (FSDP); gathered layer by layer.

    # -- Scale (docs/DESIGN.md §5): see `python train.py ... --dry_run` for what fits --------------
    c.scan_layers = True  # nn.scan over layers: compile time independent of depth.
    c.remat = "none"  # Recompute layers in backward: none | full | a jax.checkpoint_policies name.
    c.attention = "auto"  # Encoder attention: auto (CPU: blocked) | dense | blocked | xla | cudnn.
    return c
