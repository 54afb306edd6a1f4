"""Speed measurements a reader can trust: interleaved rounds, a spread, a FLOPs ceiling.

A speedup measured on a shared machine is a ratio of two noisy times. Three habits keep it
honest (as in benchmarks/speed.py):
  - the models are timed in interleaved rounds, in a rotating order, so that a change in
    machine load hits all of them alike, and each round's speedup pairs the teacher's time
    with the model's time from the same round;
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

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np


def interleaved_times(fns: Sequence[Callable] | Mapping[Any, Callable], rounds: int,
                      calls: int = 1, warmup: int = 1) -> np.ndarray | dict[Any, np.ndarray]:
    """Seconds per call of each of `fns`: [len(fns), rounds], or {key: [rounds]} for a mapping.

    Each fn is called `warmup` times first (compilation, caches). Then, in every round, each
    fn is called `calls` times back to back (results blocked on) and its mean time recorded;
    the order of the fns rotates from round to round, so none always runs first.
    """
    keys = list(fns) if isinstance(fns, Mapping) else None
    fns = [fns[k] for k in keys] if keys is not None else list(fns)
    for _ in range(warmup):
        for fn in fns:
            jax.block_until_ready(fn())
    times = np.zeros((len(fns), max(rounds, 1)))
    for r in range(times.shape[1]):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            start = time.perf_counter()
            for _ in range(max(calls, 1)):
                jax.block_until_ready(fns[i]())
            times[i, r] = (time.perf_counter() - start) / max(calls, 1)
    return times if keys is None else dict(zip(keys, times))


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
