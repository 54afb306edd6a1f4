"""Load simulation: a bursty arrival trace served always-off, always-k=4 and adaptively.

    python -m benchmarks.serve                     # tiny random T5, < 1 min on 2 CPU cores
    python -m benchmarks.serve --backbone /models/t5-base \\
        --plugins runs/k2/plugin,runs/k4/plugin,runs/k8/plugin \\
        --results DIR/eval/results.json --batch-sizes 1,8,32 --lengths 128,256 --max-len 256

It prints the measured latency profile and a table (p50/p95/p99 latency, share of requests
within budget, throughput, goodput, average quality proxy, ratio mix per policy), and writes
`serve.md`, `serve.json` and `serve.png` (chosen ratio and latency over time) to `--out`.

How it runs: a discrete-event simulation on a simulated clock (`variator_jax/simulation.py`).
Arrivals come from a seeded non-homogeneous Poisson trace (steady, burst, steady, ramp up, ramp
down); whenever the engine is free and requests wait, up to a full batch starts; its service
time is the latency profile measured at start-up on this machine (median of `--repeats`
interleaved runs per ratio x bucket), so the three policies see exactly the same machine and
the run is deterministic given the profile (`--profile FILE` replays a saved one;
`--flops-per-s` uses an analytic one).
With `--execute` (default) every batch of the adaptive policy also really runs through the
precompiled engine, switching executables per batch under the guard that fails on any
compilation; the JSON records how its measured wall times compare with the profile. (The fixed
baselines never switch and are only simulated, which keeps the run short.)

Load and budget scale with the machine: rates are in units of the uncompressed capacity C1
(full batches of the longest bucket), durations and the budget in units of T0, the time of one
such batch. So "burst 1.6" means 60 % more traffic than the uncompressed model can serve,
whatever the hardware, and every machine sees the same trace in those units.
"""
from __future__ import annotations

if __name__ == "__main__":  # On CPU: before NumPy and JAX load (benchmarks/host.py).
    from benchmarks import host as _host
    _host.keep_freed_memory()

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from variator_jax import cli, serving
from variator_jax.report import markdown_table
from variator_jax.serving import OFF, AdaptivePolicy, FixedPolicy, LatencyProfile, PolicyConfig

# The trace and its replay (also reached as benchmarks.serve.make_trace etc.).
from variator_jax.simulation import (
    DEFAULT_PHASES,
    Phase,
    make_trace,
    parse_phases,
    simulate,
    summarize,
)


# -- Report ---------------------------------------------------------------------------------------
def format_table(rows: Mapping[str, dict], ratios: Sequence[int]) -> str:
    """Markdown, one line per policy."""
    names = ["off" if r == OFF else f"k={r}" for r in ratios]
    table = [[name, f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}",
              f"{100 * r['within_budget']:.1f} %", f"{r['throughput']:.1f}", f"{r['goodput']:.1f}",
              f"{r['quality']:.4f}", " / ".join(f"{100 * r['mix'][k]:.0f}" for k in ratios)]
             for name, r in rows.items()]
    return markdown_table(["policy", "p50 ms", "p95 ms", "p99 ms", "within budget",
                           "throughput req/s", "goodput req/s", "avg quality",
                           "ratio mix (" + " / ".join(names) + ")"], table, align="lrrrrrrrl")


def format_phase_table(rows: Mapping[str, dict], phases: Sequence[Phase]) -> str:
    """Markdown: share within budget per phase and policy."""
    table = [[name, *(f"{100 * r['by_phase'][i]['within_budget']:.0f} %" if i in r["by_phase"]
                      else "" for i in range(len(phases)))] for name, r in rows.items()]
    return markdown_table(["policy", *(p.name for p in phases)], table,
                          align="l" + "r" * len(phases))


# -- The benchmark ------------------------------------------------------------------------------
def run(profile: LatencyProfile, quality: Mapping[int, float], *, engine=None,
        phases: Sequence[Phase] = DEFAULT_PHASES, budget_x: float = 4.0,
        budget_s: float | None = None, fixed: Sequence[int] = (OFF, 4), margin: float = 0.1,
        max_utilization: float = 0.9, min_len: int | None = None, max_len: int | None = None,
        vocab_size: int = 384, seed: int = 0, out=None) -> dict:
    """Replays one trace against each fixed ratio and the adaptive policy; prints the tables.

    `profile` gives the service times; `engine` (optional) really runs every batch of the
    adaptive policy (the fixed baselines never switch, so they are only simulated).
    Returns a dict: budget_s, t0_s, c1 (requests/s), ratios, trace, rows (summary per
    policy), sims (per-request and per-batch records per policy), phases.
    """
    out = out or sys.stdout
    missing = sorted(set(profile.ratios) - set(quality))
    if missing:
        raise ValueError(f"no quality for ratios {missing}; quality has {sorted(quality)}")
    max_len = max_len or max(b.length for b in profile.buckets)
    min_len = min_len or max(1, max_len // 8)
    t0 = profile.latency(OFF, profile.max_batch, max_len)
    budget = budget_s or budget_x * t0
    trace = make_trace(phases, unit_rate=profile.max_batch, unit_time=t0, min_len=min_len,
                       max_len=max_len, vocab_size=vocab_size, seed=seed)
    policies = [FixedPolicy(r, profile, budget_s=budget) for r in fixed]
    policies.append(AdaptivePolicy(profile, PolicyConfig(budget, margin=margin,
                                                         max_utilization=max_utilization)))
    rows, sims = {}, {}
    for policy in policies:
        # Only the adaptive run executes: it is the one that switches executables per batch.
        runner = engine if isinstance(policy, AdaptivePolicy) else None
        sims[policy.name] = simulate(serving.AdaptiveServer(policy, runner), trace)
        rows[policy.name] = summarize(sims[policy.name], trace, budget, quality, profile.ratios)
    print(f"{len(trace.arrivals)} requests, budget {budget * 1e3:.1f} ms = {budget / t0:.2g} T0 "
          f"(T0 = {t0 * 1e3:.2f} ms, one uncompressed batch of {profile.max_batch} x {max_len}; "
          f"C1 = {profile.max_batch / t0:.0f} req/s)", file=out)
    print(format_table(rows, profile.ratios), file=out)
    print("\nwithin budget by phase (load x C1: "
          + ", ".join(f"{p.name} {p.start:g}" + (f"-{p.end:g}" if p.end != p.start else "")
                      for p in phases) + ")", file=out)
    print(format_phase_table(rows, phases), file=out)
    return dict(budget_s=budget, t0_s=t0, c1=profile.max_batch / t0, ratios=profile.ratios,
                trace=trace, rows=rows, sims=sims, phases=[dataclasses.asdict(p) for p in phases])


def plot(result: dict, path: str) -> None:
    """Three panels over time: offered load, the adaptive ratio, every request's latency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trace, sims, budget = result["trace"], result["sims"], result["budget_s"]
    fig, (ax_load, ax_ratio, ax_lat) = plt.subplots(3, 1, figsize=(10, 8), sharex=True,
                                                    height_ratios=(1, 1, 2))
    bins = np.linspace(0, trace.arrivals.max(), 120)
    counts, _ = np.histogram(trace.arrivals, bins)
    ax_load.step(bins[:-1], counts / np.diff(bins) / result["c1"], where="post", color="gray")
    ax_load.axhline(1.0, ls=":", color="k", lw=0.8)
    ax_load.set_ylabel("arrivals / C1")
    adaptive = sims["adaptive"]["batches"]
    ax_ratio.step([b["start"] for b in adaptive], [b["ratio"] for b in adaptive], where="post")
    ratios = result["ratios"]
    ax_ratio.set_yscale("log", base=2)
    ax_ratio.set_yticks(ratios, ["off" if r == OFF else f"k={r}" for r in ratios])
    ax_ratio.minorticks_off()
    ax_ratio.set_ylabel("adaptive ratio")
    for name, sim in sims.items():
        ax_lat.scatter(trace.arrivals, sim["latency"] * 1e3, s=2, label=name, alpha=0.5)
    ax_lat.axhline(budget * 1e3, ls="--", color="k", lw=1, label="budget")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("time (s, simulated)")
    ax_lat.legend(markerscale=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- Command line -------------------------------------------------------------------------------
def tiny_config():
    """A byte-vocabulary T5 whose FFN dominates (as in real T5s), so compression is visible."""
    from variator_jax.t5 import T5Config
    return T5Config(vocab_size=384, d_model=64, d_kv=16, num_heads=4, d_ff=1024, num_layers=2,
                    num_decoder_layers=1, feed_forward_proj="relu", name="tiny-random")


def build_bank(args):
    """(cfg, backbone, plugins) from the flags: an HF dir + plugin dirs, or tiny and random."""
    import variator_jax as vj
    if args.backbone:
        cfg, backbone = vj.load_hf_t5(args.backbone)
    else:
        cfg = tiny_config()
        backbone = vj.init_t5(jax.random.key(args.seed), cfg)
    if args.plugins:
        loaded = (vj.load_plugin(d, cfg=cfg, backbone=backbone) for d in args.plugins.split(","))
        plugins = {pc.ratio: (pc, p) for pc, p in loaded}
    else:  # Untrained plugins: right for timing, and the quality proxy says how far off they are.
        plugins = {}
        for k in _ints(args.ratios):
            if k != OFF:
                pcfg = vj.PluginConfig(ratio=k, bottleneck=args.bottleneck)
                plugins[k] = (pcfg, vj.init_plugin(jax.random.key(args.seed + k), cfg, pcfg))
    return cfg, backbone, plugins


def _ints(text: str, flag: str = "a list") -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything but positive integers is a one-line error."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers >= 1")
    return values


def check_args(args) -> LatencyProfile | None:
    """Every flag checked before anything is built or compiled -> the --profile file's
    profile (None without one): a bad flag or file is one line at once, not a JAX error (or
    a missing file after a minute of compiling)."""
    for name in ("batch_sizes", "lengths", "ratios", "fixed"):
        _ints(getattr(args, name), "--" + name.replace("_", "-"))
    for name in ("bottleneck", "max_new_tokens", "repeats", "max_len", "flops_per_s",
                 "budget_x", "budget_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected a number > 0")
    if not args.margin >= 0 or not 0 < args.max_utilization <= 1:
        raise ValueError(f"--margin {args.margin} must be >= 0 and --max-utilization "
                         f"{args.max_utilization} in (0, 1]")
    if not args.profile:
        return None
    try:
        with open(args.profile) as f:
            return LatencyProfile.from_dict(json.load(f)["profile"])
    except OSError as e:
        raise ValueError(f"--profile {args.profile}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--profile {args.profile}: not a saved serve.json profile "
                         f"({type(e).__name__}: {e})") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", help="HF T5 directory (default: a tiny random T5)")
    p.add_argument("--plugins", help="comma-separated plugin directories (default: random k=2,4,8)")
    p.add_argument("--ratios", default="2,4,8", help="random plugins' ratios (without --plugins)")
    p.add_argument("--bottleneck", type=int, default=16, help="random plugins' bottleneck r")
    p.add_argument("--results", help="eval results.json giving the quality per ratio "
                   "(default: teacher agreement measured at start-up)")
    p.add_argument("--quality-key", help="the number to read from --results entries")
    p.add_argument("--mode", default="encode", choices=("encode", "generate"))
    p.add_argument("--max-new-tokens", type=int, default=8, help="decoding length (generate)")
    p.add_argument("--batch-sizes", default="1,4,16", help="bucket batch sizes")
    p.add_argument("--lengths", default="32,64", help="bucket lengths")
    p.add_argument("--max-len", type=int, help="longest request (default: longest bucket)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per ratio x bucket")
    p.add_argument("--profile", help="a saved profile JSON (serve.json) instead of measuring")
    p.add_argument("--flops-per-s", type=float, help="analytic profile at this FLOP rate")
    p.add_argument("--budget-x", type=float, default=4.0, help="latency budget in units of T0")
    p.add_argument("--budget-ms", type=float, help="latency budget in ms (overrides --budget-x)")
    p.add_argument("--margin", type=float, default=0.1, help="policy safety margin")
    p.add_argument("--max-utilization", type=float, default=0.9)
    p.add_argument("--fixed", default="1,4", help="fixed-ratio baselines")
    p.add_argument("--phases", help="name:duration_T0:rate[-end],... (rates x C1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--execute", action=argparse.BooleanOptionalAction, default=True,
                   help="really run the adaptive policy's batches through the compiled engine")
    p.add_argument("--out", default="workdir/serve", help="where serve.{md,json,png} go")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    saved_profile = check_args(args)
    cfg, backbone, plugins = build_bank(args)
    buckets = serving.bucket_grid(_ints(args.batch_sizes), _ints(args.lengths))
    engine = None
    if args.execute or not (args.profile or args.flops_per_s) or not args.results:
        engine = serving.AdaptiveEngine(cfg, backbone, plugins, buckets, mode=args.mode,
                                        max_new_tokens=args.max_new_tokens)
        print(f"compiled {len(engine.ratios)} ratios x {len(buckets)} buckets "
              f"({engine.compile_count} traces/compiles) in {engine.compile_seconds:.1f} s")
    profile = saved_profile or load_or_measure_profile(args, cfg, sorted([OFF, *plugins]),
                                                     buckets, engine)
    print(f"\nlatency profile, {profile.source}:\n{profile.format_table()}\n")
    quality = (serving.load_quality(args.results, args.quality_key) if args.results
               else engine.teacher_agreement())
    print("quality proxy: " + ", ".join(f"{'off' if r == OFF else f'k={r}'} {q:.4f}"
                                         for r, q in sorted(quality.items()))
          + ("" if args.results else " (teacher agreement: "
             + ("cosine of encoder states)" if args.mode == "encode" else "greedy tokens)")) + "\n")
    # -- Serve the trace; nothing may compile from here on ----------------------------------
    with serving.CompileCounter() as counter:
        result = run(profile, quality, engine=engine if args.execute else None,
                     phases=parse_phases(args.phases) if args.phases else DEFAULT_PHASES,
                     budget_x=args.budget_x,
                     budget_s=args.budget_ms / 1e3 if args.budget_ms else None,
                     fixed=_ints(args.fixed), margin=args.margin,
                     max_utilization=args.max_utilization, max_len=args.max_len,
                     vocab_size=cfg.vocab_size, seed=args.seed)
    print(f"\ncompilations while serving: {counter.count}")
    save(result, profile, quality, counter.count, args)
    return result


def load_or_measure_profile(args, cfg, ratios, buckets, engine) -> LatencyProfile:
    """--profile FILE (a saved serve.json), --flops-per-s (analytic), else measured now."""
    if args.profile:
        return check_args(args)
    if args.flops_per_s:
        return LatencyProfile.from_flops(
            cfg, ratios, buckets, flops_per_s=args.flops_per_s, bottleneck=args.bottleneck,
            decoder_tokens=args.max_new_tokens if args.mode == "generate" else 0)
    return LatencyProfile.measure(engine, repeats=args.repeats)


def save(result: dict, profile: LatencyProfile, quality, compiles: int, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    ratios = profile.ratios
    table = format_table(result["rows"], ratios)
    with open(os.path.join(args.out, "serve.md"), "w") as f:
        f.write(f"Budget {result['budget_s'] * 1e3:.1f} ms; profile: {profile.source}\n\n"
                f"{profile.format_table()}\n\n{table}\n\n"
                f"{format_phase_table(result['rows'], [Phase(**p) for p in result['phases']])}\n")
    summary = dict(args=vars(args), device=str(jax.devices()[0]), budget_s=result["budget_s"],
                   t0_s=result["t0_s"], c1_per_s=result["c1"], phases=result["phases"],
                   requests=len(result["trace"].arrivals), compiles_while_serving=compiles,
                   quality={str(k): v for k, v in quality.items()}, profile=profile.to_dict(),
                   policies={name: dict(row, mix={str(k): v for k, v in row["mix"].items()},
                                        by_phase={str(k): v for k, v in row["by_phase"].items()})
                             for name, row in result["rows"].items()})
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(result, os.path.join(args.out, "serve.png"))
    print(f"wrote {args.out}/serve.md, serve.json, serve.png")


if __name__ == "__main__":
    cli.run_main(main)  # Bad input: one line, not a traceback.
