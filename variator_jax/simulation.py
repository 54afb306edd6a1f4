"""Trace replay: a seeded bursty arrival trace served on a simulated clock, and its summary.

Arrivals come from a seeded non-homogeneous Poisson trace of phases (steady, burst, ramp),
in machine-independent units: rates in units of C1, the uncompressed capacity (full batches
of the longest bucket), durations in units of T0, the time of one such batch. `simulate`
replays it against a `serving.AdaptiveServer` on a simulated clock: whenever the engine is
free and requests wait, up to a full batch starts, and the clock advances by the profile's
service time for it, so every policy sees exactly the same machine and the run is
deterministic given the profile. With an engine the server also really runs every batch.
`benchmarks/serve.py` compares policies with it.

Example:
    >>> trace = make_trace(DEFAULT_PHASES, unit_rate=8, unit_time=t0, min_len=4, max_len=32,
    ...                    vocab_size=cfg.vocab_size)
    >>> sim = simulate(serving.AdaptiveServer(policy, engine), trace)
    >>> summarize(sim, trace, budget_s, quality, profile.ratios)["within_budget"]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Annotations only: replay uses just the server's queue, submit, dispatch.
    from variator_jax.serving import AdaptiveServer


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of the trace: `duration` in T0, arrival rate from `start` to `end` x C1."""
    name: str
    duration: float
    start: float
    end: float

    def rate(self, u):
        """Rate (x C1) at `u` in [0, 1] of the phase."""
        return self.start + (self.end - self.start) * u


DEFAULT_PHASES = (Phase("steady", 120, 0.5, 0.5), Phase("burst", 40, 1.6, 1.6),
                  Phase("steady", 80, 0.5, 0.5), Phase("ramp up", 100, 0.4, 1.4),
                  Phase("ramp down", 100, 1.4, 0.4))


def parse_phases(text: str) -> tuple[Phase, ...]:
    """'steady:120:0.5,burst:40:1.6,ramp:100:0.4-1.4' -> phases (name:duration:rate[-end])."""
    phases = []
    for item in text.split(","):
        name, duration, rates = item.split(":")
        start, _, end = rates.partition("-")
        phases.append(Phase(name, float(duration), float(start), float(end or start)))
    return tuple(phases)


# -- Trace --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trace:
    """Arrival times [N] (seconds), lengths [N] (tokens), phase index [N], token ids (list)."""
    arrivals: np.ndarray
    lengths: np.ndarray
    phase: np.ndarray
    tokens: list


def make_trace(phases: Sequence[Phase], *, unit_rate: float, unit_time: float, min_len: int,
               max_len: int, vocab_size: int, seed: int = 0) -> Trace:
    """Non-homogeneous Poisson arrivals by thinning, in units of T0, then scaled to seconds.

    `unit_rate` is C1 in requests per T0 (the batch size of a full batch); the trace in those
    units is the same on every machine for a given seed.
    """
    rng = np.random.default_rng(seed)
    peak = max(max(p.start, p.end) for p in phases) * unit_rate
    total = sum(p.duration for p in phases)
    u = np.cumsum(rng.exponential(1.0 / peak, int(peak * total * 1.5) + 100))
    u = u[u < total]
    edges = np.cumsum([0.0] + [p.duration for p in phases])
    index = np.searchsorted(edges, u, side="right") - 1
    rate = np.array([phases[i].rate((t - edges[i]) / phases[i].duration)
                     for t, i in zip(u, index, strict=True)])
    keep = rng.random(len(u)) < rate * unit_rate / peak
    u, index = u[keep], index[keep]
    lengths = rng.integers(min_len, max_len + 1, len(u))
    tokens = [rng.integers(2, vocab_size, n, dtype=np.int32) for n in lengths]
    return Trace(u * unit_time, lengths, index, tokens)


# -- Discrete-event simulation ------------------------------------------------------------------
def simulate(server: AdaptiveServer, trace: Trace) -> dict:
    """Serves the trace on a simulated clock; returns per-request and per-batch records.

    Each step: if nothing waits, the clock jumps to the next arrival; arrivals up to `now`
    join the queue; the server dispatches a batch (choosing its ratio, and running it if it
    has an engine); the clock advances by the profile's service time for that batch.
    """
    n = len(trace.arrivals)
    done, ratio = np.full(n, np.nan), np.zeros(n, int)
    batches, now, i = [], 0.0, 0
    while i < n or server.queue:
        if not server.queue:
            now = max(now, trace.arrivals[i])
        while i < n and trace.arrivals[i] <= now:
            server.submit(i, trace.tokens[i], trace.arrivals[i])
            i += 1
        batch = server.dispatch(now)
        ids = [r.id for r in batch.requests]
        now += batch.service_s
        done[ids], ratio[ids] = now, batch.ratio
        batches.append(dict(start=batch.start, ratio=batch.ratio, size=len(ids),
                            service_s=batch.service_s, wall_s=batch.wall_s,
                            depth=len(server.queue) + len(ids)))
    return dict(latency=done - trace.arrivals, ratio=ratio, done=done, batches=batches)


def summarize(sim: dict, trace: Trace, budget_s: float, quality: Mapping[int, float],
              ratios: Sequence[int]) -> dict:
    """Latency percentiles, budget attainment, throughput, goodput, quality, ratio mix."""
    lat, used = sim["latency"], sim["ratio"]
    span = sim["done"].max() - trace.arrivals.min()
    within = lat <= budget_s
    row = {f"p{q}_ms": float(np.percentile(lat, q) * 1e3) for q in (50, 95, 99)}
    row.update(requests=len(lat), within_budget=float(within.mean()),
               throughput=len(lat) / span, goodput=float(within.sum() / span),
               quality=float(np.mean([quality[r] for r in used])),
               mix={int(r): float((used == r).mean()) for r in ratios})
    walls = [b["wall_s"] / b["service_s"] for b in sim["batches"] if b["wall_s"] is not None]
    row["wall_over_profile"] = float(np.median(walls)) if walls else None
    row["by_phase"] = {
        int(p): dict(within_budget=float(within[trace.phase == p].mean()),
                     quality=float(np.mean([quality[r] for r in used[trace.phase == p]])))
        for p in np.unique(trace.phase)}
    return row
