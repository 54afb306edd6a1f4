"""Adaptive serving's request path: a queue before the compiled bank, the ratio chosen per batch.

The pieces, one module each (all re-exported here, so `from variator_jax.serving import ...`
reaches every serving name):

- `engine.py`, the compiled bank: `AdaptiveEngine` (the backbone plus plugins for ratios 1 =
  off, 2, 4, 8, every (ratio, bucket) compiled ahead of time), the buckets, and the guard that
  raises if anything compiles on the request path.
- `policy.py`, costs and choice: `LatencyProfile` (seconds per (ratio, bucket), measured or
  analytic), `load_quality`, and `AdaptivePolicy` (the least compression that still meets the
  latency budget given the queue) or `FixedPolicy`.
- this module, the request path: `AdaptiveServer`, a FIFO queue, an arrival-rate meter, the
  policy and the engine. Time is passed in, so a discrete-event simulation
  (`simulation.py`, trace replay) drives it exactly as a clock would.

Example:
    >>> buckets = bucket_grid((1, 8), (64, 128))
    >>> engine = AdaptiveEngine(cfg, backbone, {2: p2, 4: p4, 8: p8}, buckets)
    >>> profile = LatencyProfile.measure(engine)
    >>> server = AdaptiveServer(AdaptivePolicy(profile, PolicyConfig(budget_s=0.05)), engine)
    >>> server.submit(request_id, token_ids, now=time.monotonic())
    >>> batch = server.dispatch(now=time.monotonic())   # batch.ratio, batch.outputs
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import numpy as np

from variator_jax.engine import (
    OFF,
    AdaptiveEngine,
    Bucket,
    CompileCounter,
    CompiledOnRequestPath,
    bucket_grid,
    compile_events,
    pick_bucket,
    plan_chunks,
)
from variator_jax.policy import (
    QUALITY_KEYS,
    AdaptivePolicy,
    Decision,
    FixedPolicy,
    LatencyProfile,
    PolicyConfig,
    QueueState,
    load_quality,
)

# The serving API as one namespace (README, benchmarks/serve.py, tests): this module's
# request path and the engine's and policy's names.
__all__ = [
    "OFF", "AdaptiveEngine", "Bucket", "CompileCounter", "CompiledOnRequestPath", "bucket_grid",
    "compile_events", "pick_bucket", "plan_chunks",
    "QUALITY_KEYS", "AdaptivePolicy", "Decision", "FixedPolicy", "LatencyProfile",
    "PolicyConfig", "QueueState", "load_quality",
    "RateMeter", "Request", "Batch", "AdaptiveServer",
]


# -- Server: the request path ---------------------------------------------------------------------
class RateMeter:
    """Arrivals per second over a sliding window of `window_s` seconds."""

    def __init__(self, window_s: float):
        self.window_s, self._times = float(window_s), collections.deque()

    def observe(self, t: float) -> None:
        self._times.append(t)

    def rate(self, now: float) -> float:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) / self.window_s


@dataclasses.dataclass
class Request:
    id: Any
    arrival: float
    input_ids: np.ndarray  # [n] int32, real tokens only.


@dataclasses.dataclass
class Batch:
    """One dispatched batch. `service_s`: the profile's prediction (no margin); `outputs`:
    the engine's result rows in request order (None without an engine); `wall_s`: the
    measured time of the engine call (None without an engine)."""
    requests: list[Request]
    ratio: int
    bucket: Bucket
    start: float
    service_s: float
    decision: Decision
    outputs: np.ndarray | None = None
    wall_s: float | None = None


class AdaptiveServer:
    """A FIFO queue in front of an `AdaptiveEngine`, its ratio chosen per batch by a policy.

    Time is an argument (`now`), not read from a clock: a live server passes
    `time.monotonic()`, a simulation its event time. Dispatch is work-conserving: whenever the
    engine is free and requests wait, up to `max_batch` of them start at once.

    Args:
      policy: an `AdaptivePolicy` (or `FixedPolicy` for a baseline).
      engine: the compiled bank; None predicts service times only (a dry run).
      rate_window_s: window of the arrival-rate meter; default 2 x the policy's budget (the
        horizon over which load matters to a request), or 1 s without a budget.
    """

    def __init__(self, policy, engine: AdaptiveEngine | None = None, *,
                 rate_window_s: float | None = None):
        budget = getattr(getattr(policy, "config", None), "budget_s", None)
        self.policy, self.engine = policy, engine
        self.meter = RateMeter(rate_window_s or (2 * budget if budget else 1.0))
        self.queue: collections.deque[Request] = collections.deque()
        if engine is not None:
            missing = sorted(set(policy.ratios) - set(engine.ratios))
            if missing:
                raise ValueError(f"policy ratios {missing} are not compiled in the engine")

    def submit(self, request_id, input_ids, now: float) -> None:
        ids = np.asarray(input_ids, np.int32).reshape(-1)
        if self.engine is not None and len(ids) > self.engine.max_length:
            raise ValueError(f"request {request_id}: {len(ids)} tokens > longest bucket "
                             f"{self.engine.max_length}; truncate it")
        self.queue.append(Request(request_id, now, ids))
        self.meter.observe(now)

    def state(self, now: float) -> QueueState:
        return QueueState(now, np.array([r.arrival for r in self.queue], float),
                          np.array([len(r.input_ids) for r in self.queue], int),
                          self.meter.rate(now))

    def dispatch(self, now: float) -> Batch | None:
        """Chooses a ratio for the next batch, runs it (if there is an engine), returns it."""
        if not self.queue:
            return None
        decision = self.policy.choose(self.state(now))
        requests = [self.queue.popleft() for _ in range(max(decision.batch, 1))]
        length = max(len(r.input_ids) for r in requests)
        profile = self.policy.profile
        batch = Batch(requests, decision.ratio, pick_bucket(profile.buckets, len(requests), length),
                      now, profile.latency(decision.ratio, len(requests), length), decision)
        if self.engine is not None:
            ids = np.full((len(requests), length), self.engine.cfg.pad_token_id, np.int32)
            mask = np.zeros_like(ids)
            for row, r in enumerate(requests):
                ids[row, :len(r.input_ids)], mask[row, :len(r.input_ids)] = r.input_ids, 1
            start = time.perf_counter()
            batch.outputs = self.engine.run(decision.ratio, ids, mask)
            batch.wall_s = time.perf_counter() - start
        return batch

