"""Plugin training step vs full fine-tuning step: time and compiled peak memory (issue 4).

    python -m benchmarks.train_step                      # t5-small layout, ~1.5 min on 2 CPU cores
    python -m benchmarks.train_step --variant t5-base --batch 32 --input-length 224

Both steps are `trainer.make_train_step` on the same random backbone and the same batch:
  - plugin: pre-training loss (teacher + student in one jit, masked hidden-state MSE); the
    backbone is a frozen argument (stop_gradient), so no backbone weight gradient and no
    optimizer state for it exists;
  - full fine-tuning: token cross-entropy, gradients and AdamW state for every weight.
It prints each step's median time and the peak memory XLA plans for it
(`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries), and
the two ratios, with the issue's targets (time <= 0.75x, memory <= 0.6x). On an accelerator
it also gives the model FLOPs utilisation (`fit.step_flops` per second over the chip's dense
peak, `benchmarks/speed.py`'s table) and the device's measured peak memory, e.g. on a GPU:

    python -m benchmarks.train_step --variant t5-large --batch 64 --input-length 224 \
        --dtype bfloat16 --remat full

With --out it writes train_step-<machine>.json and .md there.
"""
from __future__ import annotations

if __name__ == "__main__":  # On CPU: before NumPy and JAX load (benchmarks/host.py).
    from benchmarks import host as _host
    _host.keep_freed_memory()

import argparse
import time
from types import SimpleNamespace

import jax
import numpy as np

from benchmarks.speed import machine_info, machine_slug, peak_flops, save
from variator_jax import cli, objectives, sharding, trainer
from variator_jax.fit import step_flops
from variator_jax.plugins import PluginConfig, init_plugin, plugin_param_count
from variator_jax.report import markdown_table
from variator_jax.t5 import T5Config, init_t5


def _batch(cfg, batch, n, m, seed=0):
    """Full-length random rows (no padding: both steps see every position)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, cfg.vocab_size, (batch, m)).astype(np.int32)
    return dict(input_ids=rng.integers(2, cfg.vocab_size, (batch, n)).astype(np.int32),
                attention_mask=np.ones((batch, n), np.int32), labels=labels,
                decoder_input_ids=np.concatenate([np.zeros((batch, 1), np.int32),
                                                  labels[:, :-1]], axis=1),
                decoder_attention_mask=np.ones((batch, m), np.int32))


def _peak_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)


def _measure(name, setup, params, frozen, batch, mesh, repeats):
    """Compile `train_step` for `setup` -> (median seconds per step, planned peak bytes,
    measured peak bytes: the device's high-water mark after the steps, None where the backend
    does not say; it includes what was allocated before, e.g. the backbone)."""
    opt = SimpleNamespace(lr=1e-4, warmup_steps=0, total_steps=1000, clip_grad=1.0,
                          weight_decay=0.0)
    tx, schedule = trainer.make_optimizer(opt)
    repl = sharding.replicated(mesh)
    state = jax.jit(lambda p: trainer.create_state(p, jax.random.key(0), tx),
                    out_shardings=repl)(params)
    shardings = jax.tree.map(lambda _: repl, state)
    frozen_sh = None if frozen is None else jax.tree.map(lambda _: repl, frozen)
    step = trainer.make_train_step(setup, tx, schedule, mesh, shardings, frozen_sh)
    tic = time.time()
    compiled = step.lower(state, batch, frozen).compile()
    print(f"  {name}: compiled in {time.time() - tic:.1f}s", flush=True)
    state, metrics = compiled(state, batch, frozen)  # Warm-up.
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - tic)
    measured = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return float(np.median(times)), _peak_bytes(compiled), measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="t5-small", help="T5Config.variant name.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=32)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype (bfloat16 on accelerators)")
    parser.add_argument("--remat", default="none",
                        help="none, full or a jax.checkpoint_policies name")
    parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                        help="nn.scan over the layers (--no-scan-layers: unrolled)")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the full fine-tuning step (--no-full: the plugin's alone)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for MFU "
                             "(default: benchmarks/speed.py's table; none on CPU)")
    parser.add_argument("--out", default=None, help="write train_step-<machine>.json/.md here")
    args = parser.parse_args(argv)

    cfg = T5Config.variant(args.variant, dropout_rate=0.0, dtype=args.dtype, remat=args.remat,
                           scan_layers=args.scan_layers)
    pcfg = PluginConfig(args.ratio)
    mesh = sharding.make_mesh(1, 1)
    backbone = jax.jit(lambda k: init_t5(k, cfg), out_shardings=sharding.replicated(mesh))(
        jax.random.key(0))
    plugin = init_plugin(jax.random.key(1), cfg, pcfg)
    batch = sharding.global_batch(mesh, _batch(cfg, args.batch, args.input_length,
                                               args.target_length), sharding.DEFAULT_RULES)
    count = sum(x.size for x in jax.tree.leaves(backbone))
    print(f"{args.variant}: {count:,} backbone parameters, plugin k={args.ratio} "
          f"{plugin_param_count(cfg, pcfg):,}; batch {args.batch} x {args.input_length} -> "
          f"{args.target_length}; {jax.devices()[0].platform}, 1 device", flush=True)

    plugin_setup = objectives.make(cfg, pcfg, "hidden", "pretrain", dropout=False)
    # The frozen backbone as training places it: in bf16 under --dtype bfloat16.
    steps = {"plugin": _measure("plugin step", plugin_setup, plugin,
                                plugin_setup.frozen(backbone), batch, mesh, args.repeats)}
    if args.full:
        # Full fine-tuning trains (and donates) its own copy of the backbone.
        full_setup = objectives.make(cfg, None, "task", "pretrain", dropout=False)
        steps["full"] = _measure("full fine-tuning step", full_setup,
                                 jax.tree.map(lambda x: x.copy(), backbone), None, batch, mesh,
                                 args.repeats)
    info = machine_info(None)
    peak = peak_flops(info, args.dtype, args.peak_tflops)
    n, m = args.input_length, args.target_length
    rows = []
    for name, (seconds, planned, measured) in steps.items():
        flops = step_flops(cfg, pcfg if name == "plugin" else None, args.batch, n, m)
        rows.append(dict(step=name, seconds=seconds, planned_peak_bytes=planned,
                         measured_peak_bytes=measured, flops=flops,
                         tokens_per_sec=args.batch * (n + m) / seconds,
                         mfu=flops / seconds / peak if peak else None))
    text = _table(rows, args, info)
    print("\n" + text)
    if args.out:
        base = save(args.out, machine_slug(info), text,
                    dict(machine=info, args=vars(args), peak_flops=peak, steps=rows,
                         backbone_params=count, plugin_params=plugin_param_count(cfg, pcfg)),
                    kind="train_step")
        print(f"wrote {base}.md and {base}.json")
    return rows


def _table(rows, args, info) -> str:
    mib = 2.0 ** 20
    table = []
    for r in rows:
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        measured = ("" if r["measured_peak_bytes"] is None
                    else f"{r['measured_peak_bytes'] / mib:,.0f} MiB")
        table.append([r["step"], f"{r['seconds'] * 1e3:,.1f} ms", f"{r['tokens_per_sec']:,.0f}",
                      f"{r['flops'] / 1e12:.2f}", mfu,
                      f"{r['planned_peak_bytes'] / mib:,.0f} MiB", measured])
    lines = [f"{args.variant}, batch {args.batch} x {args.input_length} -> {args.target_length}, "
             f"dtype {args.dtype}, remat {args.remat}, scan_layers {args.scan_layers}, "
             f"k = {args.ratio}; {info['device']} ({info['backend']}), jax {info['jax']}",
             "",
             markdown_table(["step", "time (median)", "tokens/s", "model TFLOP/step", "MFU",
                             "peak memory (XLA plan)", "peak memory (measured)"], table,
                            align="lrrrrrr")]
    if len(rows) == 2:
        plugin, full = rows
        time_ratio = plugin["seconds"] / full["seconds"]
        mem_ratio = plugin["planned_peak_bytes"] / full["planned_peak_bytes"]

        def verdict(ok):
            return "ok" if ok else "MISSED"
        lines += ["", f"plugin / full: time {time_ratio:.2f}x (target <= 0.75: "
                      f"{verdict(time_ratio <= 0.75)}), memory {mem_ratio:.2f}x (target <= 0.6: "
                      f"{verdict(mem_ratio <= 0.6)})"]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_main(main)  # Bad input: one line, not a traceback.
