"""Speed measurements a reader can trust: interleaved rounds, a spread, a FLOPs ceiling.

A speedup measured on a shared machine is a ratio of two noisy times. Three habits keep it
honest (as in benchmarks/speed.py):
  - the models are timed in interleaved rounds, each in a fresh random order, so that a
    change in machine load, or what one model leaves behind for the next, hits all alike,
    and each round's speedup pairs the teacher's time with the model's from the same round;
  - the speedup is reported as the median over rounds with its spread (interquartile range,
    and min-max in the JSON);
  - a speedup is checked against its ceiling, the FLOPs ratio: a model that saves 17 % of
    the FLOPs cannot run 2.7x faster. A speedup whose lower quartile is above the ceiling is
    noise (load that hit the teacher's timings), and is flagged rather than reported.

    >>> times = interleaved_times([teacher_fn, plugin_fn], rounds=10, calls=3)
    >>> stats = speedup_stats(times[0], times[1], ceiling=1 / (1 - 0.171))
    >>> stats["speedup"], stats["speedup_q25"], stats["speedup_q75"], stats["above_ceiling"]
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def interleaved_times(fns: Sequence[Callable] | Mapping[Any, Callable], rounds: int,
                      calls: int = 1, warmup: int = 1,
                      seed: int = 0) -> np.ndarray | dict[Any, np.ndarray]:
    """Seconds per call of each of `fns`: [len(fns), rounds], or {key: [rounds]} for a mapping.

    Each fn is called `warmup` times first (compilation, caches). Then, in every round, each
    fn is called `calls` times back to back (results blocked on) and its mean time recorded;
    the first round runs them in the order given, every later one in a random order (`seed`),
    so that none always runs first or always right after the same other.
    """
    keys = list(fns) if isinstance(fns, Mapping) else None
    fns = [fns[k] for k in keys] if keys is not None else list(fns)
    for _ in range(warmup):
        for fn in fns:
            jax.block_until_ready(fn())
    times = np.zeros((len(fns), max(rounds, 1)))
    rng = np.random.default_rng(seed)
    for r in range(times.shape[1]):
        for i in _round_order(len(fns), r, rng):
            start = time.perf_counter()
            for _ in range(max(calls, 1)):
                jax.block_until_ready(fns[i]())
            times[i, r] = (time.perf_counter() - start) / max(calls, 1)
    return times if keys is None else dict(zip(keys, times, strict=True))


def _round_order(count: int, r: int, rng) -> list[int]:
    """Round r's order: the first round as given, then a fresh random order each round, so
    that no fn always starts a round, nor always follows the same fn (whose after-effects,
    threads spinning or caches it filled, would then always fall on it)."""
    return list(range(count)) if r == 0 else [int(i) for i in rng.permutation(count)]


def speedup_stats(base: np.ndarray, times: np.ndarray, ceiling: float | None = None) -> dict:
    """Per-round speedups `base / times` -> median, quartiles, min, max and the ceiling check.

    `ceiling`: the most the FLOPs allow (teacher FLOPs / model FLOPs). `above_ceiling` is
    True when even the lower quartile exceeds it: the excess is larger than the noise.
    """
    ratios = np.asarray(base, float) / np.asarray(times, float)
    q25, median, q75 = np.percentile(ratios, [25, 50, 75])
    out = {"speedup": float(median), "speedup_q25": float(q25), "speedup_q75": float(q75),
           "speedup_min": float(ratios.min()), "speedup_max": float(ratios.max()),
           "speed_rounds": int(ratios.size)}
    if ceiling is not None:
        out["speedup_ceiling"] = float(ceiling)
        out["above_ceiling"] = bool(q25 > ceiling * (1 + 1e-9))
    return out


def format_speedup(row: dict) -> str:
    """'1.12x (1.08-1.15)': median and interquartile range; a speedup above the FLOPs
    ceiling by more than its spread is not a result and reads as such."""
    spread = f"{row['speedup']:.2f}x ({row['speedup_q25']:.2f}-{row['speedup_q75']:.2f})"
    if row.get("above_ceiling"):
        return f"n/a: {spread} exceeds the FLOPs ceiling {row['speedup_ceiling']:.2f}x"
    return spread


# ------------------------------------------------------------------------------------------
# Where a compiled step's time goes, op by op (XLA:CPU). With XLA_FLAGS containing
# --xla_cpu_enable_xprof_traceme=true (set before JAX starts), XLA:CPU's thunk runtime
# records one profiler event per executed instruction (`ynn_fusion.12`, `while.3`, ...).
# `profile_steps` captures a few calls in a Perfetto trace; `op_breakdown` sums the events by
# kind of instruction, read from the compiled HLO text, and measures how much of the step
# had two instructions running at once (the thunk runtime runs independent ones together).

# (kind, regex on the instruction's name): the first match names the kind. Containers
# (while, conditional, call) are not counted: their events enclose their bodies' events.
OP_KINDS = (
    ("library fusions (matmuls, reductions)", r"^(ynn|xnn|onednn)_fusion|^dot|^convolution"),
    ("dynamic-update-slice (writes into stacked buffers)", r"dynamic-update-slice"),
    ("dynamic-slice of a weight (per-layer read)", r"dynamic-slice"),
    ("broadcast (buffer fills)", r"broadcast"),
    ("copy / transpose", r"copy|transpose"),
    ("other", r""),
)
_CONTAINERS = ("while", "conditional", "call")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Compiled HLO text -> {instruction name: (opcode, result shape)}."""
    out = {}
    for name, shape, opcode in re.findall(
            r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(", hlo_text, re.M):
        out[name] = (opcode, shape)
    return out


def _dims(shape: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"[a-z0-9]+\[([\d,]*)\](\{.*\})?", shape)
    return None if m is None else tuple(int(d) for d in m.group(1).split(",") if d)


def weight_shapes(tree) -> frozenset:
    """The shapes a compiled program may give the leaves of `tree` (one layer's parameters):
    each leaf's shape, and every way of flattening it to two dimensions, either way round."""
    out = set()
    for shape in (tuple(x.shape) for x in jax.tree.leaves(tree)):
        out |= {shape, shape[::-1]}
        for i in range(1, len(shape)):
            two = (int(np.prod(shape[:i])), int(np.prod(shape[i:])))
            out |= {two, two[::-1]}
    return frozenset(out)


def op_kind(name: str, shape: str, weight_shapes=frozenset()) -> str:
    """The OP_KINDS kind of instruction `name`; a dynamic-slice whose result does not have
    the shape of a per-layer weight is a read of stacked activations."""
    kind = next(k for k, pattern in OP_KINDS if re.search(pattern, name))
    if kind.startswith("dynamic-slice") and _dims(shape) not in weight_shapes:
        kind = "dynamic-slice of activations (per-layer read)"
    return kind


def profile_steps(fn: Callable, steps: int, directory: str) -> str:
    """Calls `fn` (warm: compiled already) `steps` times under the JAX profiler; returns the
    path of the Perfetto trace (`*.trace.json.gz`) it wrote under `directory`."""
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    try:
        for _ in range(steps):
            jax.block_until_ready(fn())
    finally:
        jax.profiler.stop_trace()
    found = sorted(glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.trace.json.gz")),
                   key=os.path.getmtime)
    if not found:
        raise RuntimeError(f"the profiler wrote no trace under {directory}")
    return found[-1]


def op_breakdown(events: Sequence[Mapping], steps: int, hlo_text: str,
                 weight_shapes=frozenset()) -> dict:
    """Profiler events (Chrome-trace dicts: name, ph, ts, dur in microseconds) of `steps`
    calls of one compiled program -> milliseconds per step.

    `kinds`: summed durations of the program's instructions by `op_kind`, containers left out;
    `busy`: time with at least one instruction running; `overlap`: time with two or more;
    `span`: from the first instruction's start to the last one's end. `weight_shapes`: the
    shapes (tuples) of one layer's parameters, to tell weight slices from activation slices.
    """
    insts = hlo_instructions(hlo_text)
    kinds: dict[str, float] = {}
    edges = []
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in insts:
            continue
        opcode, shape = insts[e["name"]]
        if opcode in _CONTAINERS:
            continue
        kind = op_kind(e["name"], shape, weight_shapes)
        kinds[kind] = kinds.get(kind, 0.0) + e["dur"]
        edges += [(e["ts"], 1), (e["ts"] + e["dur"], -1)]
    if not edges:
        raise ValueError("no event of the profile names an instruction of this program (was "
                         "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true set before JAX started?)")
    edges.sort()
    busy = overlap = 0.0
    level, last = 0, edges[0][0]
    for ts, step in edges:  # `level` instructions ran from `last` to `ts`.
        busy += (ts - last) * (level >= 1)
        overlap += (ts - last) * (level >= 2)
        level, last = level + step, ts
    per_step = 1e-3 / steps
    return {"kinds": {k: v * per_step for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "busy": busy * per_step, "overlap": overlap * per_step,
            "span": (edges[-1][0] - edges[0][0]) * per_step}


def trace_events(path: str) -> list[dict]:
    """The events of a Perfetto/Chrome trace file written by `profile_steps`."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data
