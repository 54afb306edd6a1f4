"""Config -> mesh, tokenizer, backbone, objective, data: the setup training and evaluation share.

Nothing here writes to disk; `prepare` also checks the config and that the workdir holds
no other run, so that a bad input fails before anything is trained.

Example:
  >>> exp = prepare(config, "runs/t5-base-k4")     # training's setup (checks the workdir)
  >>> exp = setup(config, "/models/t5-base")       # evaluation's: mesh, tokenizer, backbone
  >>> backbone = exp.place_backbone()              # global arrays on exp.mesh
  >>> data = exp.eval_batches()                    # None when config.data.eval is empty
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from variator_jax import data as data_lib
from variator_jax import pipeline, plugin_file, sharding
from variator_jax import run as run_lib
from variator_jax.convert import load_hf_t5
from variator_jax.errors import UserError, user_errors
from variator_jax.objectives import LOSSES, Objective
from variator_jax.objectives import make as make_objective
from variator_jax.plugins import PluginConfig, backbone_identity, fingerprint_of
from variator_jax.progress import say
from variator_jax.t5 import T5Config, check_dtype, init_t5, logical_axes

STAGES = ("finetune", "pretrain", "adapt")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config made concrete: the devices, the tokenizer, the backbone and the task, and for
    training the objective, the run's identity and its data (nothing here has touched disk).

    Built once (`setup`, `prepare`; `with_data` adds training's data streams) and never
    changed: a step that needs something else makes a new one (`dataclasses.replace`)."""
    config: Any
    mesh: Any
    rules: tuple
    tokenizer: Any
    cfg: T5Config
    task: data_lib.Task
    host_backbone: Any  # numpy tree from disk, or None (random init; released once placed).
    # Training only.
    workdir: str = ""
    objective: Objective | None = None
    backbone_id: dict = dataclasses.field(default_factory=dict)  # Recorded with the plugin.
    identity: dict = dataclasses.field(default_factory=dict)  # What must match to resume.
    train_data: Any = None
    eval_data: Any = None
    eval_step: Any = None  # The jitted eval step, set by the trainer (jit compiles on first use).
    data_report: dict = dataclasses.field(default_factory=dict)  # Split sizes, overlap (0).

    def backbone_shardings(self):
        """-> (the backbone's shardings on the mesh, its ShapeDtypeStructs)."""
        return backbone_shardings(self.cfg, self.mesh, self.rules)

    def place_backbone(self):
        """The loaded backbone as global arrays on the mesh (None for a random init)."""
        if self.host_backbone is None:
            return None
        return sharding.put_global(self.host_backbone, self.backbone_shardings()[0])

    def with_data(self) -> Experiment:
        """Training's Experiment: its data streams, and for a task, the check that no example
        of `data.eval` is in `data.train` (`check_held_out`; its counts in `data_report`)."""
        train, held_out = self.train_batches(), self.eval_batches()
        report = ({} if held_out is None or self.objective is None
                  or self.task.kind == "pretrain" else check_held_out(self.config, self.task))
        return dataclasses.replace(self, train_data=train, eval_data=held_out,
                                   data_report=report)

    def eval_batches(self):
        """One pass over `data.eval` per call, sliced for this process; None if unset."""
        config = self.config
        if not config.data.get("eval"):
            return None
        index, count = sharding.data_shard(self.mesh, self.rules)
        with user_errors(f"data.eval {config.data.eval}"):
            batches = pipeline.eval_batches(
                config.data.eval, self.task, self.tokenizer,
                global_batch_size=eval_batch_size(config), seed=config.seed,
                data_dir=config.data.get("data_dir") or None,
                split=config.data.get("eval_split") or None, process_index=index,
                process_count=count, max_input_length=config.max_input_length,
                max_target_length=config.max_target_length, noise=noise(config))
        return batches

    def train_batches(self):
        """The endless, resumable training stream of `data.train`, sliced for this process."""
        config = self.config
        index, count = sharding.data_shard(self.mesh, self.rules)
        with user_errors(f"data.train {config.data.train}"):
            batches = pipeline.train_batches(
                config.data.train, config.task, self.tokenizer,
                global_batch_size=config.batch_size, seed=config.seed,
                data_dir=config.data.get("data_dir") or None,
                split=config.data.get("train_split") or None, process_index=index,
                process_count=count, workers=config.data.get("workers") or 0,
                max_input_length=config.max_input_length,
                max_target_length=config.max_target_length, noise=noise(config),
                unlabelled=self.objective is not None and self.objective.learns_from_unlabelled)
        if batches.checks.get("unlabelled"):
            say(f"data.train: {batches.checks['unlabelled']:,} of "
                f"{batches.checks['num_examples']:,} examples are unlabelled (label -1): "
                "they train the hidden-state loss only")
        return batches


def eval_batch_size(config) -> int:
    return config.get("eval_batch_size") or config.batch_size


def noise(config) -> tuple[float, float]:
    """Span corruption's (noise density, mean span length): `data.noise_density` and
    `data.mean_noise_span_length`, T5's 0.15 and 3 where a config predates them."""
    return (config.data.get("noise_density", data_lib.NOISE_DENSITY),
            config.data.get("mean_noise_span_length", data_lib.MEAN_NOISE_SPAN_LENGTH))


def check_held_out(config, task) -> dict:
    """No example of `data.eval`'s split is in `data.train`'s (inputs compared, `overlap`):
    -> the split sizes and the overlap count (0); else a one-line UserError naming both."""
    from variator_jax import overlap
    data_dir = config.data.get("data_dir") or None
    train_split = config.data.get("train_split") or None
    held_split = data_lib.eval_split(config.data.eval, task, config.data.get("eval_split") or None)
    train_name = f"data.train {config.data.train}" + (f" ({train_split})" if train_split else "")
    held_name = f"data.eval {config.data.eval}" + (f" ({held_split})" if held_split else "")
    with user_errors(""):
        train = pipeline.open_source(config.data.train, split=train_split, data_dir=data_dir)
        held = pipeline.open_source(config.data.eval, split=held_split, data_dir=data_dir)
        trained = overlap.input_hashes(task, (train[i] for i in range(len(train))))
        found = overlap.overlapping(task, (held[i] for i in range(len(held))), trained)
        overlap.refuse(found, held_name, train_name)
    return {"train_examples": len(train), "eval_examples": len(held), "overlap": len(found)}


# -- The pieces -----------------------------------------------------------------------------------
def mesh_and_rules(config):
    """-> (the `data` x `model` mesh, the logical axis rules, FSDP folded in), validated."""
    with user_errors("mesh"):
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
        rules = tuple(tuple(r) for r in config.mesh.get("rules", sharding.DEFAULT_RULES))
        if config.mesh.get("fsdp", False):
            rules = sharding.with_fsdp(rules)
        sharding.mesh_spec(("batch",), rules)  # Validates the rules.
    return mesh, rules


def runtime_fields(config) -> dict:
    """How the model runs (T5Config's runtime fields) as the config says: compute dtype,
    scanned layers, rematerialisation, attention."""
    return dict(dtype=config.get("dtype", "float32"), scan_layers=config.get("scan_layers", True),
                remat=config.get("remat", "none"), attention=config.get("attention", "auto"))


def load_tokenizer(config, backbone_dir: str | None):
    """`config.tokenizer`, else the one saved beside the backbone."""
    with user_errors("tokenizer"):
        return data_lib.load_tokenizer(config.get("tokenizer") or None, backbone_dir or None)


def load_backbone(config, backbone_dir: str | None, tokenizer):
    """-> (T5Config, numpy tree): an HF T5 directory, or with none, `config.variant` and no
    tree (a random init, sized by `model_overrides` and the tokenizer)."""
    runtime = runtime_fields(config)
    with user_errors(""):  # Named as the user sets it (evaluation skips check_config).
        check_dtype(runtime["dtype"], "config.dtype")
    with user_errors("config"):
        T5Config(**runtime)  # A bad remat name fails here, in one line.
    if backbone_dir:
        with user_errors(f"backbone {backbone_dir}"):
            return load_hf_t5(backbone_dir, **runtime)
    if not config.get("variant"):  # Only `finetune` gets here (check_config).
        raise UserError("config.backbone is empty and config.variant is not set: give an HF T5 "
                        "directory, or a variant (e.g. t5-small) to train from a random init")
    overrides = (config.get("model_overrides") or ml_collections.ConfigDict()).to_dict()
    overrides.setdefault("vocab_size", len(tokenizer))
    with user_errors("config.variant"):
        return T5Config.variant(config.variant, **runtime, **overrides), None


def backbone_shardings(cfg: T5Config, mesh, rules):
    """-> (the backbone's shardings, its ShapeDtypeStructs), from its config alone."""
    shapes = jax.eval_shape(functools.partial(init_t5, cfg=cfg), jax.random.key(0))
    return sharding.tree_shardings(mesh, logical_axes(cfg), shapes, rules), shapes


def setup(config, backbone_dir: str | None) -> Experiment:
    """Mesh, tokenizer, backbone (`backbone_dir`; empty: `config.variant`, random) and task."""
    mesh, rules = mesh_and_rules(config)
    tokenizer = load_tokenizer(config, backbone_dir)
    cfg, host_backbone = load_backbone(config, backbone_dir, tokenizer)
    with user_errors("config.task"):
        task = data_lib.get_task(config.task)
    return Experiment(config, mesh, rules, tokenizer, cfg, task, host_backbone)


def objective_for(config, cfg: T5Config, task, verbalizer) -> Objective:
    """The config's stage as an objective: `finetune` trains the backbone, the plugin
    stages distill into the plugin `config.plugin` describes."""
    pcfg = None
    if config.stage != "finetune":
        with user_errors("config.plugin"):
            pcfg = PluginConfig(ratio=config.plugin.ratio, bottleneck=config.plugin.bottleneck,
                                mask_aware=config.plugin.mask_aware)
    return make_objective(cfg, pcfg, config.get("loss", "hidden"), task.kind, verbalizer,
                          bool(config.get("dropout", True)), config.get("init_plugin") or "")


# -- Training's setup -----------------------------------------------------------------------------
def check_config(config, backbone_pending: bool = False) -> None:
    """Raises UserError naming the first bad field. `backbone_pending`: an empty `backbone`
    is fine, a `backbone_stage` will make it."""
    if config.stage not in STAGES:
        raise UserError(f"config.stage {config.stage!r} is not one of {', '.join(STAGES)}")
    with user_errors("config.task"):
        data_lib.get_task(config.task)
    if config.stage != "finetune":
        if config.get("loss", "hidden") not in LOSSES:
            raise UserError(f"config.loss {config.loss!r} is not one of {', '.join(LOSSES)}")
        if not isinstance(config.plugin.ratio, int) or config.plugin.ratio < 1:
            raise UserError(f"config.plugin.ratio must be an integer >= 1, got "
                            f"{config.plugin.ratio!r}")
        if not config.backbone and not backbone_pending:
            raise UserError("config.backbone is empty: set --config.backbone=DIR, an HF T5 "
                            "directory (config.json + model.safetensors)")
    for name in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "max_input_length", "max_target_length"):
        if not isinstance(config[name], int) or config[name] < 1:
            raise UserError(f"config.{name} must be a positive integer, got {config[name]!r}")
    for name in ("lr", "warmup_steps", "weight_decay", "clip_grad"):
        # Finite in float32, where the optimizer computes: 1e39 is inf there.
        if not plugin_file.is_finite_number(config[name]) or config[name] < 0:
            raise UserError(f"config.{name} must be a finite number >= 0, got {config[name]!r}")
    with user_errors(""):
        check_dtype(config.get("dtype", "float32"), "config.dtype")
    for name in ("train", "eval"):
        spec = config.data.get(name)
        if spec or name == "train":
            with user_errors(f"config.data.{name}"):
                data_lib.parse_source(spec)
    if config.backbone and not os.path.isdir(config.backbone):
        raise UserError(f"config.backbone: {config.backbone}: no such directory (expected an HF "
                        "T5 directory: config.json + model.safetensors)")


def check_batch_sizes(config, mesh) -> None:
    """Every batch splits evenly over the mesh's `data` axis."""
    blocks = mesh.shape["data"]
    for name in ("batch_size", "eval_batch_size"):
        if config.get(name) and config[name] % blocks:
            raise UserError(f"config.{name} {config[name]} is not divisible by the mesh's "
                            f"data axis ({blocks} devices)")


def prepare(config, workdir: str) -> Experiment:
    """Training's setup: the config checked, mesh, tokenizer, backbone, objective, and the
    run's identity checked against `workdir`'s (a workdir of another run is refused)."""
    check_config(config)
    mesh, rules = mesh_and_rules(config)
    check_batch_sizes(config, mesh)
    tokenizer = load_tokenizer(config, config.backbone)
    cfg, host_backbone = load_backbone(config, config.backbone, tokenizer)
    if config.backbone:
        _check_variant(cfg, config.get("variant"), config.backbone)
        backbone_id = backbone_identity(cfg, host_backbone)
    else:
        backbone_id = {"name": f"random {config.variant}", "seed": config.seed,
                       "d_model": cfg.d_model, "num_layers": cfg.num_layers,
                       "vocab_size": cfg.vocab_size}
    if len(tokenizer) > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the backbone's "
                        f"vocab_size {cfg.vocab_size}")
    task = data_lib.get_task(config.task)
    verbalizer = None
    if task.kind == "classification":
        with user_errors(f"task {task.name}"):
            verbalizer = tuple(int(i) for i in task.verbalizer_ids(tokenizer))
    objective = objective_for(config, cfg, task, verbalizer)
    # The backbone's path is left out: a moved directory is still the same backbone.
    identity = {"stage": config.stage, "task": task.name,
                "backbone": {k: v for k, v in backbone_id.items() if k != "name"},
                **objective.identity()}
    with user_errors(""):
        saved = (run_lib.read_identity(workdir) or {}).get("backbone")
        if isinstance(saved, dict) and "fingerprint_version" not in saved and host_backbone \
                is not None and "fingerprint_version" in identity["backbone"]:
            # A workdir from before fingerprint version 2: compare the way it was recorded.
            identity["backbone"] = dict(identity["backbone"],
                                        fingerprint=fingerprint_of(saved, host_backbone))
            del identity["backbone"]["fingerprint_version"]
        run_lib.check_identity(workdir, identity)
    return Experiment(config, mesh, rules, tokenizer, cfg, task, host_backbone, workdir=workdir,
                      objective=objective, backbone_id=backbone_id, identity=identity)


def _check_variant(cfg: T5Config, variant: str | None, path: str) -> None:
    """A `size=`/`variant` in the config must match the directory's config.json."""
    if not variant:
        return
    with user_errors("config.variant"):
        want = T5Config.variant(variant)
    for field in ("d_model", "num_layers", "num_heads", "d_ff", "feed_forward_proj"):
        if getattr(cfg, field) != getattr(want, field):
            raise UserError(f"backbone {path} is not a {variant}: {field} is "
                            f"{getattr(cfg, field)}, a {variant} has {getattr(want, field)}")
