"""Will this run fit? `train.py ... --dry_run`: the real train step, compiled ahead of time.

The step is compiled exactly as training would compile it (same `trainer.make_train_step`,
mesh, rules, shardings, donation) against abstract parameters (`jax.eval_shape`): no weight
is read, allocated or initialised, so a laptop with fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) can size an 11B run for a pod.
`config.backbone` may be empty; the variant's sizes (`size=11b`) suffice.

Attention is compiled as an accelerator runs it (dense), whatever this machine is, so the
figures describe the target's program, not the CPU's blocked one. Temporaries per device
come from XLA's `memory_analysis()` of the compiled executable; parameter and optimizer bytes
are each leaf's shard shape; FLOPs are the model's (`step_flops`).

Example:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python train.py \\
      --config=configs/plugin.py:stage=pretrain,size=11b,ratio=4 --config.mesh.fsdp=True \\
      --config.remat=full --workdir=/tmp/fit --dry_run
prints a table and writes /tmp/fit/fit.json.
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

from variator_jax import data as data_lib
from variator_jax import experiment as experiment_lib
from variator_jax import flops as flops_lib
from variator_jax import sharding, trainer
from variator_jax.errors import UserError, user_errors
from variator_jax.fileio import write_json
from variator_jax.objectives import Objective
from variator_jax.plugins import PluginConfig
from variator_jax.progress import say
from variator_jax.t5 import T5Config

FIT_FILE = "fit.json"
GIB = 1 << 30


def model_config(config, **runtime_overrides) -> T5Config:
    """The T5Config a run would use, from the backbone's config.json alone (no weights) or,
    with no backbone, from `config.variant`; attention as an accelerator runs it ("auto" is
    dense there) unless the config or `runtime_overrides` say otherwise."""
    runtime = experiment_lib.runtime_fields(config)
    runtime = {**runtime, "attention": {"auto": "dense"}.get(runtime["attention"],
                                                              runtime["attention"]),
               **runtime_overrides}
    with user_errors("config"):
        if config.backbone:
            return T5Config.from_hf(config.backbone, **runtime)
        if not config.get("variant"):
            raise UserError("--dry_run needs config.backbone (its config.json) or a "
                            "variant (e.g. size=11b)")
        overrides = (config.get("model_overrides") or {})
        overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
        return T5Config.variant(config.variant, **runtime, **overrides)


def abstract_batch(config, objective: Objective, mesh, rules) -> dict:
    """ShapeDtypeStructs of one global batch, placed as training places it."""
    b, n, m = config.batch_size, config.max_input_length, config.max_target_length
    shapes = {"input_ids": (b, n), "attention_mask": (b, n), "labels": (b, m),
              "decoder_input_ids": (b, m), "decoder_attention_mask": (b, m)}
    if objective.kind == "classification":
        shapes["label"] = (b,)
    return {k: jax.ShapeDtypeStruct(s, jnp.int32,
                                    sharding=sharding.batch_sharding(mesh, rules, len(s)))
            for k, s in shapes.items()}


def step_flops(cfg: T5Config, pcfg: PluginConfig | None, batch: int, n: int, m: int) -> int:
    """Model FLOPs of one train step (matmuls, `flops.py`), rematerialisation not counted.

    Plugin stages: the teacher's forward, the student's forward, and its backward, which with
    a frozen backbone forms activation gradients only (one forward's worth) plus the plugin's
    weight gradients. Fine-tuning: forward + backward with weight gradients (3 forwards).
    (XLA's `cost_analysis` counts a scanned layer once, not once per layer, so it is no
    measure of a scanned model's work.)"""
    teacher = flops_lib.forward_flops(cfg, n, m)
    if pcfg is None:
        return batch * 3 * teacher
    student = flops_lib.forward_flops(cfg, n, m, pcfg)
    plugin = flops_lib.encoder_flops(cfg, n, pcfg)["plugin"]
    return batch * (teacher + 2 * student + plugin)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def dry_run(config, workdir: str) -> dict:
    """Compiles the train step of `config` on its mesh against abstract params; writes and
    returns the fit report (WORKDIR/fit.json). Raises `errors.UserError` for bad input."""
    start = time.perf_counter()
    lowered, parts = lower_train_step(config)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    report = make_report(config, parts["cfg"], parts["pcfg"], parts["mesh"], compiled, seconds,
                     parts["state"], parts["backbone"])
    os.makedirs(workdir, exist_ok=True)
    write_json(workdir, FIT_FILE, report)
    say(format_report(report) + f"\nWritten to {os.path.join(workdir, FIT_FILE)}")
    return report


def lower_train_step(config, **runtime_overrides):
    """The train step of `config`, traced and lowered for its mesh against abstract state,
    backbone and batch -> (jax `Lowered`, dict of cfg, mesh, state, backbone (None when
    fine-tuning: the backbone is the state), batch). `runtime_overrides`: T5Config runtime
    fields (default: dense attention, as accelerators run it)."""
    experiment_lib.check_config(config, backbone_pending=True)
    mesh, rules = experiment_lib.mesh_and_rules(config)
    experiment_lib.check_batch_sizes(config, mesh)
    cfg = model_config(config, **runtime_overrides)
    task = data_lib.get_task(config.task)
    # Classification reads one logit per label; which token ids they are does not matter here.
    verbalizer = tuple(range(len(task.labels))) if task.kind == "classification" else None
    objective = experiment_lib.objective_for(config, cfg, task, verbalizer)
    exp = experiment_lib.Experiment(config, mesh, rules, None, cfg, task, None,
                                    objective=objective)
    tx, schedule = trainer.make_optimizer(config)
    backbone_shardings, backbone_shapes = exp.backbone_shardings()
    backbone = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            backbone_shapes, backbone_shardings)
    # Nothing is read from disk: the fresh state's shapes are a loaded one's.
    state, state_shardings, _ = trainer.initial_state(exp, tx)
    frozen = objective.frozen(backbone)  # Fine-tuning: none, the backbone is the state.
    step = trainer.make_train_step(objective, tx, schedule, mesh, state_shardings,
                                   None if frozen is None else backbone_shardings, rules)
    batch = abstract_batch(config, objective, mesh, rules)
    pcfg = getattr(objective, "pcfg", None)
    return step.lower(state, batch, frozen), dict(cfg=cfg, pcfg=pcfg, mesh=mesh, state=state,
                                                  backbone=frozen, batch=batch)


def make_report(config, cfg: T5Config, pcfg, mesh, compiled, seconds: float, state,
                frozen) -> dict:
    """fit.json's contents, from a compiled step and the abstract trees it was compiled for."""
    memory = compiled.memory_analysis()
    params = bytes_per_device(state.params) + (0 if frozen is None else bytes_per_device(frozen))
    params_total = total_bytes(state.params) + (0 if frozen is None else total_bytes(frozen))
    optimizer = bytes_per_device(state.opt_state)
    temp = int(getattr(memory, "temp_size_in_bytes", 0) or 0)
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    total = params + optimizer + temp
    return {
        "variant": cfg.name or "from config.json", "stage": config.stage,
        "devices": {"count": mesh.size, "platform": jax.devices()[0].platform,
                    "kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape)},
        "batch_size": config.batch_size, "max_input_length": config.max_input_length,
        "max_target_length": config.max_target_length, "dtype": cfg.dtype,
        "scan_layers": cfg.scan_layers, "remat": cfg.remat,
        "fsdp": bool(config.mesh.get("fsdp", False)), "attention": cfg.attention,
        "compile_seconds": round(seconds, 2),
        "flops_per_step": step_flops(cfg, pcfg, config.batch_size, config.max_input_length,
                                     config.max_target_length),
        "bytes_per_device": {"params": params, "optimizer": optimizer, "temp": temp,
                             "total": total},
        "params_total_bytes": params_total,
        "device_memory": limit,
        "fits": None if limit is None else total <= limit,
    }


def format_report(r: dict) -> str:
    """The fit report as a small table."""
    b = r["bytes_per_device"]
    dev = r["devices"]
    rows = [
        ("devices", f"{dev['count']} x {dev['kind']} ({dev['platform']}), mesh {dev['mesh']}"),
        ("model", f"{r['variant']}  dtype {r['dtype']}  scan_layers {r['scan_layers']}  "
                  f"remat {r['remat']}  fsdp {r['fsdp']}  attention {r['attention']}"),
        ("batch", f"{r['batch_size']} x ({r['max_input_length']} in, "
                  f"{r['max_target_length']} out)"),
        ("compile", f"{r['compile_seconds']:.1f} s"),
        ("flops/step", f"{r['flops_per_step']:.3e}"),
        ("params", f"{b['params'] / GIB:8.2f} GiB per device "
                   f"({r['params_total_bytes'] / GIB:.2f} GiB in all)"),
        ("optimizer", f"{b['optimizer'] / GIB:8.2f} GiB per device"),
        ("temp", f"{b['temp'] / GIB:8.2f} GiB per device"),
        ("total", f"{b['total'] / GIB:8.2f} GiB per device"),
        ("device memory", "unknown (this backend does not say)" if r["device_memory"] is None
         else f"{r['device_memory'] / GIB:.2f} GiB: "
              + ("fits" if r["fits"] else "DOES NOT FIT")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
