"""Plugin training step vs full fine-tuning step: time and compiled peak memory (issue 4).

    python -m benchmarks.train_step                      # t5-small layout, ~1.5 min on 2 CPU cores
    python -m benchmarks.train_step --variant t5-base --batch 32 --input-length 224

Both steps are `train_lib.make_train_step` on the same random backbone and the same batch:
  - plugin: pre-training loss (teacher + student in one jit, masked hidden-state MSE); the
    backbone is a frozen argument (stop_gradient), so no backbone weight gradient and no
    optimizer state for it exists;
  - full fine-tuning: token cross-entropy, gradients and AdamW state for every weight.
It prints each step's median time and the peak memory XLA plans for it
(`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries), and
the two ratios, with the issue's targets (time <= 0.75x, memory <= 0.6x).
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import jax
import numpy as np

from variator_jax import cli, host, sharding, train_lib
from variator_jax.plugins import PluginConfig, init_plugin, plugin_param_count
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
    """Compile `train_step` for `setup` -> (median seconds per step, peak bytes)."""
    opt = SimpleNamespace(lr=1e-4, warmup_steps=0, total_steps=1000, clip_grad=1.0,
                          weight_decay=0.0)
    tx, schedule = train_lib.make_optimizer(opt)
    repl = sharding.replicated(mesh)
    state = jax.jit(lambda p: train_lib.create_state(p, jax.random.key(0), tx),
                    out_shardings=repl)(params)
    shardings = jax.tree.map(lambda _: repl, state)
    frozen_sh = None if frozen is None else jax.tree.map(lambda _: repl, frozen)
    step = train_lib.make_train_step(setup, tx, schedule, mesh, shardings, frozen_sh)
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
    return float(np.median(times)), _peak_bytes(compiled)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="t5-small", help="T5Config.variant name.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=32)
    parser.add_argument("--ratio", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = T5Config.variant(args.variant, dropout_rate=0.0)
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

    plugin_setup = train_lib.Setup(cfg, pcfg, "hidden", "pretrain", dropout=False)
    full_setup = train_lib.Setup(cfg, None, "task", "pretrain", dropout=False)
    t_plugin, m_plugin = _measure("plugin step", plugin_setup, plugin, backbone, batch, mesh,
                                  args.repeats)
    # Full fine-tuning trains (and donates) its own copy of the backbone.
    t_full, m_full = _measure("full fine-tuning step", full_setup,
                              jax.tree.map(lambda x: x.copy(), backbone), None, batch, mesh,
                              args.repeats)

    mib = 2.0 ** 20
    print(f"\n{'':24}{'step time (median)':>20}{'peak memory':>16}")
    print(f"{'full fine-tuning':24}{t_full * 1e3:>17.0f} ms{m_full / mib:>12.0f} MiB")
    print(f"{'plugin k=' + str(args.ratio):24}{t_plugin * 1e3:>17.0f} ms"
          f"{m_plugin / mib:>12.0f} MiB")
    time_ratio, mem_ratio = t_plugin / t_full, m_plugin / m_full
    print(f"{'plugin / full':24}{time_ratio:>18.2f}x{mem_ratio:>15.2f}x")
    verdict = lambda ok: "ok" if ok else "MISSED"
    print(f"time ratio {time_ratio:.2f} (target <= 0.75: {verdict(time_ratio <= 0.75)}), "
          f"memory ratio {mem_ratio:.2f} (target <= 0.6: {verdict(mem_ratio <= 0.6)})")


if __name__ == "__main__":
    host.keep_freed_memory()  # On CPU; before any JAX computation (variator_jax/host.py).
    cli.run_main(main)  # Bad input: one line, not a traceback.
