"""Compile time and fit of the plugin train step, t5-small .. t5-11b (issue 10).

    python -m benchmarks.compile                 # all five sizes, then the speed ratio
    python -m benchmarks.compile --variants t5-small,t5-3b --speed-repeats 0
    python -m benchmarks.compile --speed-only    # re-measure the ratio, keep the compile rows
    python -m benchmarks.compile --speed-only --profile   # and where each step's time goes

For every variant it compiles the real plugin train step (`fit.lower_train_step`, what
`train.py --dry_run` compiles) against abstract parameters on 8 fake CPU devices, at the
released pre-training shape (batch 64, n = 224, m = 32) with `mesh.fsdp` and `remat=full`,
scanned layers, attention as an accelerator runs it (dense), and reports:
  - trace (lowering) and compile seconds;
  - the fit report's bytes per device (params, optimizer, temp, total).
Then, at t5-small widths on one device, the train step's time with layers scanned vs
unrolled (the same batch, interleaved rounds; the median and quartiles of the per-round
ratio, of wall time and of CPU time, are the figure), at batch 4 and 16 x 128 tokens.

Targets: t5-3b compiles in <= 1.5x t5-small's time; t5-3b <= 16 GiB and t5-11b <= 32 GiB per
device; scan / unrolled step time ~1 (within noise). Results go to
benchmarks/results/compile-MACHINE.{json,md}. CPU heavy: run it under `nice`, once.
"""
from __future__ import annotations

if __name__ == "__main__":  # On CPU: before NumPy and JAX load (benchmarks/host.py).
    from benchmarks import host as _host
    _host.keep_freed_memory()

import os

# 8 fake devices; one profiler event per executed instruction (`--profile`; inactive
# otherwise: a flag check per instruction, against milliseconds of work).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import (
    host,  # noqa: E402
    speed,  # noqa: E402
)
from benchmarks.train_step import _batch  # noqa: E402
from tests.test_utils import load_config, override  # noqa: E402
from variator_jax import fit, objectives, sharding, timing, trainer  # noqa: E402
from variator_jax.plugins import PluginConfig, init_plugin  # noqa: E402
from variator_jax.report import markdown_table  # noqa: E402
from variator_jax.t5 import T5Config, init_t5  # noqa: E402

GIB = float(1 << 30)
VARIANTS = "t5-small,t5-base,t5-large,t5-3b,t5-11b"
TARGETS_GIB = {"t5-3b": 16, "t5-11b": 32}
PROFILE_STEPS = 3


def compile_variant(variant: str, args) -> dict:
    """Lower + compile the plugin train step of `variant` -> timings and the fit report."""
    size = variant.split("-", 1)[1]
    config = load_config("plugin", f"stage=pretrain,size={size},ratio=4")
    override(config, {"batch_size": args.batch, "max_input_length": args.input_length,
                      "max_target_length": args.target_length, "mesh.data": -1,
                      "mesh.fsdp": True, "remat": args.remat,
                      "scan_layers": not args.unrolled})
    tic = time.perf_counter()
    lowered, parts = fit.lower_train_step(config)
    traced = time.perf_counter() - tic
    tic = time.perf_counter()
    compiled = lowered.compile()
    compiled_s = time.perf_counter() - tic
    report = fit.make_report(config, parts["cfg"], parts["pcfg"], parts["mesh"], compiled,
                         traced + compiled_s, parts["state"], parts["backbone"])
    report.update(variant=variant, trace_seconds=round(traced, 2),
                  compile_only_seconds=round(compiled_s, 2))
    b = report["bytes_per_device"]
    print(f"{variant:>9}: trace {traced:6.1f} s  compile {compiled_s:6.1f} s  params "
          f"{b['params'] / GIB:6.2f}  optimizer {b['optimizer'] / GIB:5.2f}  temp "
          f"{b['temp'] / GIB:6.2f}  total {b['total'] / GIB:6.2f} GiB per device", flush=True)
    return report


def speed_ratio(args) -> dict:
    """`args.speed_variant`'s widths (t5-small unless told), 1 device: the plugin train step
    with layers scanned vs unrolled, in interleaved rounds (`timing.interleaved_times`). Per
    round, the scan / unrolled ratio of wall time and of CPU time (the process's user + system
    seconds: the work a step costs, which other processes on a shared machine do not inflate);
    median and quartiles.
    `args.profile`: then `PROFILE_STEPS` more calls of each under the JAX profiler, and where
    their time goes (`timing.op_breakdown`), in `out["profile"]`."""
    import resource
    import tempfile
    mesh = sharding.make_mesh(1, 1)
    variant = getattr(args, "speed_variant", "t5-small")
    base = T5Config.variant(variant, dropout_rate=0.0,
                            attention_block_bytes=host.attention_block_bytes())
    pcfg = PluginConfig(4)
    opt = argparse.Namespace(lr=1e-4, warmup_steps=0, total_steps=1000, clip_grad=1.0,
                             weight_decay=0.0)
    tx, schedule = trainer.make_optimizer(opt)
    repl = sharding.replicated(mesh)
    batch = sharding.global_batch(mesh, _batch(base, args.speed_batch, args.speed_length, 32),
                                  sharding.DEFAULT_RULES)

    def cpu_seconds():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    names, fns, cpu, hlo = ("scan", "unrolled"), [], {}, {}
    for name in names:
        cfg = base.replace(scan_layers=name == "scan")
        backbone = jax.jit(lambda k, cfg=cfg: init_t5(k, cfg), out_shardings=repl)(
            jax.random.key(0))
        state = jax.jit(lambda p: trainer.create_state(p, jax.random.key(0), tx),
                        out_shardings=repl)(init_plugin(jax.random.key(1), cfg, pcfg))
        setup = objectives.make(cfg, pcfg, "hidden", "pretrain", dropout=False)
        step = trainer.make_train_step(setup, tx, schedule, mesh,
                                         jax.tree.map(lambda _: repl, state),
                                         jax.tree.map(lambda _: repl, backbone))
        tic = time.perf_counter()
        compiled = step.lower(state, batch, backbone).compile()
        print(f"  {variant} step, {name}: compiled in {time.perf_counter() - tic:.1f} s",
              flush=True)
        if args.profile:
            hlo[name] = compiled.as_text()
            if name == "unrolled":  # One layer's parameter shapes, to tell weight slices apart.
                weight_shapes = timing.weight_shapes((backbone, state.params))
        cpu[name], box = [], [state]

        def run(compiled=compiled, box=box, backbone=backbone, spent=cpu[name]):
            start = cpu_seconds()
            box[0], metrics = compiled(box[0], batch, backbone)  # The state is donated.
            jax.block_until_ready((box[0], metrics))
            spent.append(cpu_seconds() - start)
            return metrics
        fns.append(run)
    wall = timing.interleaved_times(fns, rounds=args.speed_repeats)
    cpu_s = np.array([cpu[n][1:] for n in names])  # The first call is the warm-up.
    out = {"variant": variant, "batch": args.speed_batch, "input_length": args.speed_length,
           "target_length": 32, "rounds": args.speed_repeats, "load_average": list(os.getloadavg())}
    for what, t in (("wall", wall), ("cpu", cpu_s)):
        q25, med, q75 = np.percentile(t[0] / t[1], [25, 50, 75])
        medians = {n: float(np.median(row)) for n, row in zip(names, t, strict=True)}
        out[what] = {"median_seconds": medians,
                     "scan_over_unrolled": float(med), "q25": float(q25), "q75": float(q75)}
        print(f"  {variant} step ({what} time): scan {out[what]['median_seconds']['scan']:.3f} s, "
              f"unrolled {out[what]['median_seconds']['unrolled']:.3f} s; scan / unrolled "
              f"{med:.3f} (IQR {q25:.3f}-{q75:.3f}, {args.speed_repeats} rounds)", flush=True)
    if args.profile:
        out["profile"] = {"steps": PROFILE_STEPS}
        for name, fn in zip(names, fns, strict=True):
            with tempfile.TemporaryDirectory() as tmp:
                events = timing.trace_events(timing.profile_steps(fn, PROFILE_STEPS, tmp))
            out["profile"][name] = timing.op_breakdown(events, PROFILE_STEPS, hlo[name],
                                                       weight_shapes)
            print(f"  {variant} step, {name}, ms per step by kind of instruction: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in out["profile"][name]["kinds"].items()),
                  flush=True)
    return out


def markdown(results: dict) -> str:
    rows = results["variants"]
    small = next((r for r in rows if r["variant"] == "t5-small"), None)
    lines = [f"# Plugin train step: compile time and fit ({results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores, jax {results['machine']['jax']})", ""]
    if rows:
        lines += [f"8 fake CPU devices, batch {results['batch']}, n = {results['input_length']}, "
                  f"m = {results['target_length']}, mesh.fsdp, remat={results['remat']}, "
                  f"scan_layers={not results['unrolled']}, dense attention; "
                  f"load average at start {results['machine']['load_average_start']}.", ""]
    table = []
    for r in rows:
        b = r["bytes_per_device"]
        rel = f"{r['compile_seconds'] / small['compile_seconds']:.2f}x" if small else ""
        target = TARGETS_GIB.get(r["variant"])
        verdict = "" if target is None else (
            f"<= {target}: {'ok' if b['total'] / GIB <= target else 'MISSED'}")
        table.append([r["variant"], f"{r['trace_seconds']:.1f}", f"{r['compile_only_seconds']:.1f}",
                      f"{r['compile_seconds']:.1f}", rel, f"{b['params'] / GIB:.2f}",
                      f"{b['optimizer'] / GIB:.3f}", f"{b['temp'] / GIB:.2f}",
                      f"{b['total'] / GIB:.2f}", verdict])
    if table:
        lines.append(markdown_table(["variant", "trace s", "compile s", "total s", "vs t5-small",
                                     "params GiB/dev", "optimizer GiB/dev", "temp GiB/dev",
                                     "total GiB/dev", "target"], table))
    if results.get("speed"):
        m = results.get("speed_machine", results["machine"])
        lines += ["", f"Scan vs unrolled step, measured {m['date']} on {m['cpu']}, {m['cores']} "
                  "cores (shared: other jobs ran; CPU time is the work, wall time also waits):"]
    for s in results.get("speed", []):
        lines += ["", f"{s.get('variant', 't5-small')} widths, 1 device, batch {s['batch']} x "
                  f"{s['input_length']}, "
                  f"{s['rounds']} interleaved rounds, load average "
                  f"{s['load_average'][0]:.1f} at the end: plugin train step scanned / unrolled"]
        for what, label in (("cpu", "CPU time (the work)"), ("wall", "wall time")):
            r = s[what]
            lines.append(f"- {label}: {r['median_seconds']['scan'] * 1e3:.0f} ms vs "
                         f"{r['median_seconds']['unrolled'] * 1e3:.0f} ms, ratio "
                         f"{r['scan_over_unrolled']:.3f} (IQR {r['q25']:.3f}-{r['q75']:.3f})")
        if "profile" in s:
            lines += ["", *profile_table(s["profile"])]
    return "\n".join(lines) + "\n"


def profile_table(profile: dict) -> list[str]:
    """Markdown lines: ms per step by kind of instruction, scanned vs unrolled, and the time
    with two instructions running at once."""
    scan, unrolled = profile["scan"], profile["unrolled"]
    kinds = list(dict.fromkeys([*scan["kinds"], *unrolled["kinds"]]))
    rows = [[k, f"{scan['kinds'].get(k, 0):.1f}", f"{unrolled['kinds'].get(k, 0):.1f}",
             f"{scan['kinds'].get(k, 0) - unrolled['kinds'].get(k, 0):+.1f}"] for k in kinds]
    for key, label in (("span", "step, first to last instruction"),
                       ("busy", "time with an instruction running"),
                       ("overlap", "time with two or more at once")):
        rows.append([f"*{label}*", f"{scan[key]:.1f}", f"{unrolled[key]:.1f}",
                     f"{scan[key] - unrolled[key]:+.1f}"])
    return [f"Where the time goes (JAX profiler, {profile['steps']} more steps each; ms per "
            "step, summed over the instructions of each kind; instructions that run at once "
            "share the cores, so a kind's sum grows with the overlap):", "",
            markdown_table(["kind of instruction", "scanned", "unrolled", "difference"], rows)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=VARIANTS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-length", type=int, default=224)
    p.add_argument("--target-length", type=int, default=32)
    p.add_argument("--remat", default="full")
    p.add_argument("--unrolled", action="store_true", help="scan_layers=False (for comparison)")
    p.add_argument("--speed-batch", default="4,16", help="batch sizes of the speed ratio")
    p.add_argument("--speed-length", type=int, default=128)
    p.add_argument("--speed-variant", default="t5-small",
                   help="widths of the speed ratio; another than t5-small writes its own file")
    p.add_argument("--speed-repeats", type=int, default=8, help="rounds; 0: skip the ratio")
    p.add_argument("--speed-only", action="store_true",
                   help="only the speed ratio; the compile rows of the results file are kept")
    p.add_argument("--profile", action="store_true",
                   help="also profile the two steps and report where the time goes")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    info = speed.machine_info(None)
    name = f"compile-{speed.machine_slug(info)}" + ("-unrolled" if args.unrolled else "")
    if args.speed_variant != "t5-small":
        name += f"-speed-{args.speed_variant}"
    path = os.path.join(args.out, name + ".json")
    if args.speed_only and os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    elif args.speed_only:  # The ratio alone.
        results = dict(machine=info, batch=args.batch, input_length=args.input_length,
                       target_length=args.target_length, remat=args.remat,
                       unrolled=args.unrolled, variants=[])
    else:
        # One small compile first, not reported: JAX's and XLA's one-time start-up costs
        # would otherwise all land on the first variant.
        compile_variant("t5-small", argparse.Namespace(**dict(
            vars(args), batch=8, input_length=32, target_length=8)))
        print("(warm-up above, not reported)", flush=True)
        results = dict(machine=info, batch=args.batch, input_length=args.input_length,
                       target_length=args.target_length, remat=args.remat,
                       unrolled=args.unrolled,
                       variants=[compile_variant(v, args) for v in args.variants.split(",")])
    results.pop("speed", None)
    if args.speed_repeats:
        results["speed_machine"] = info
        results["speed"] = [speed_ratio(argparse.Namespace(**dict(vars(args), speed_batch=b)))
                            for b in map(int, args.speed_batch.split(","))]
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    from variator_jax import cli
    cli.run_main(main)  # Errors, Ctrl-C, a closed pipe: one line (boundary.py).
