"""Choosing a compression ratio by load: what each (ratio, bucket) costs, and the policy.

The paper's promise (Xiao et al., 2023, §1): because plugins are plug-and-play, a service can
pick its acceleration ratio by the current workload. This module decides; `engine.py` runs.

- `LatencyProfile`: seconds per (ratio, bucket), measured at start-up on the machine at hand
  (`LatencyProfile.measure(engine)`, interleaved rounds), or analytic
  (`LatencyProfile.from_flops`) for planning and for tests that must not depend on a noisy
  machine.
- `load_quality`: the quality per ratio from eval results (what a ratio is worth).
- `AdaptivePolicy`: given the queue (arrival times, lengths, arrival rate) and a latency
  budget, the least compression that still meets the budget, else the most compression;
  `FixedPolicy`: always one ratio (the baselines).

Example:
    >>> profile = LatencyProfile.measure(engine)
    >>> policy = AdaptivePolicy(profile, PolicyConfig(budget_s=0.05))
    >>> policy.choose(QueueState(now, arrivals, lengths, arrival_rate)).ratio
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from variator_jax import flops, timing
from variator_jax.engine import OFF, AdaptiveEngine, Bucket, plan_chunks
from variator_jax.report import markdown_table
from variator_jax.t5 import T5Config


# -- Latency profile ------------------------------------------------------------------------------
class LatencyProfile:
    """Seconds per call for each (ratio, bucket): what the policy predicts service times from.

    Attributes:
      seconds: {(ratio, Bucket): seconds}; must cover every ratio x bucket.
      source: where the numbers come from ("measured (median of 5)", "flops", a file).
    """

    def __init__(self, seconds: Mapping[tuple[int, Bucket], float], source: str = ""):
        self.seconds = {(int(r), b): float(s) for (r, b), s in seconds.items()}
        self.source = source
        self.ratios = tuple(sorted({r for r, _ in self.seconds}))
        self.buckets = tuple(sorted({b for _, b in self.seconds}))
        missing = [(r, b) for r in self.ratios for b in self.buckets if (r, b) not in self.seconds]
        if missing:
            raise ValueError(f"profile lacks {len(missing)} (ratio, bucket) entries, "
                             f"e.g. {missing[0]}")
        if any(not s > 0 for s in self.seconds.values()):
            raise ValueError("profile latencies must be positive")

    @classmethod
    def measure(cls, engine: AdaptiveEngine, repeats: int = 5, warmup: int = 1,
                stat: str = "median", seed: int = 0) -> LatencyProfile:
        """Times `engine.run` (host padding, transfer, compute, copy back) per ratio x bucket.

        Rounds are interleaved (`timing.interleaved_times`: each round visits every ratio x
        bucket once, in a random order), so a change in machine load during start-up hits
        all ratios alike instead of biasing one of them. `stat` is "median" (default) or
        "min" (the uncontended cost, for very noisy hosts). The result is `monotone()`.
        """
        reduce = {"median": np.median, "min": np.min}[stat]
        rng = np.random.default_rng(seed)
        inputs = {b: rng.integers(2, engine.cfg.vocab_size, (b.batch, b.length), dtype=np.int32)
                  for b in engine.buckets}
        fns = {(ratio, bucket): (lambda r=ratio, b=bucket: engine.run(r, inputs[b]))
               for ratio in engine.ratios for bucket in engine.buckets}
        times = timing.interleaved_times(fns, repeats, warmup=warmup)
        seconds = {key: float(reduce(ts)) for key, ts in times.items()}
        return cls(seconds, source=f"measured ({stat} of {repeats})").monotone()

    def latency(self, ratio: int, batch: int, length: int) -> float:
        """Predicted seconds to serve `batch` requests of at most `length` tokens at `ratio`."""
        return sum(self.seconds[ratio, bucket]
                   for _, bucket in plan_chunks(self.buckets, batch, length))

    @property
    def max_batch(self) -> int:
        return max(b.batch for b in self.buckets)

    def capacity(self, ratio: int, length: int) -> float:
        """Requests/s sustained with full batches of sequences of `length` tokens."""
        return self.max_batch / self.latency(ratio, self.max_batch, length)

    def monotone(self) -> LatencyProfile:
        """A bucket is never predicted slower than a larger bucket that contains it (per ratio).

        Noise can make a measured 8x64 call look slower than 8x128 (the policy would then pad
        more to go faster). Each entry becomes the minimum over the buckets containing it:
        on a shared host, noise only ever slows a call down, so the smaller time is the truer.
        """
        fixed = {(r, b): min(self.seconds[r, c] for c in self.buckets if c.fits(b.batch, b.length))
                 for r, b in self.seconds}
        return LatencyProfile(fixed, self.source)

    @classmethod
    def from_flops(cls, cfg: T5Config, ratios: Sequence[int], buckets: Sequence[Bucket], *,
                   flops_per_s: float, overhead_s: float = 0.0, bottleneck: int = 64,
                   decoder_tokens: int = 0) -> LatencyProfile:
        """Analytic profile: overhead + FLOPs / rate, FLOPs from `flops.encoder_flops`.

        Deterministic, for capacity planning before a machine exists and for tests that must
        not depend on a noisy host. `decoder_tokens` > 0 adds a teacher-forced decoder of that
        many tokens (generation; the same for every ratio).
        """
        seconds = {}
        for ratio in ratios:
            for b in buckets:
                per_seq = flops.encoder_flops(cfg, b.length, None if ratio == OFF else ratio,
                                              bottleneck)["total"]
                if decoder_tokens:
                    per_seq += flops.decoder_flops(cfg, b.length, decoder_tokens)["total"]
                seconds[ratio, b] = overhead_s + b.batch * per_seq / flops_per_s
        return cls(seconds, source=f"flops ({flops_per_s:.3g} FLOP/s + {overhead_s * 1e3:.3g} ms)")

    def to_dict(self) -> dict:
        return {"source": self.source,
                "entries": [{"ratio": r, "batch": b.batch, "length": b.length, "seconds": s}
                            for (r, b), s in sorted(self.seconds.items())]}

    @classmethod
    def from_dict(cls, d: Mapping) -> LatencyProfile:
        return cls({(e["ratio"], Bucket(e["batch"], e["length"])): e["seconds"]
                    for e in d["entries"]}, d.get("source", "file"))

    def format_table(self) -> str:
        """Markdown: one row per bucket, ms per ratio and the speedup over ratio 1."""
        rows = []
        for b in self.buckets:
            base = self.seconds.get((OFF, b))
            rows.append([f"{b.batch} x {b.length}"] + [
                f"{self.seconds[r, b] * 1e3:.2f} ms" +
                (f" ({base / self.seconds[r, b]:.2f}x)" if base and r != OFF else "")
                for r in self.ratios])
        return markdown_table(["bucket", *("off" if r == OFF else f"k = {r}" for r in self.ratios)],
                              rows, align="l" + "r" * len(self.ratios))


# -- Quality proxy --------------------------------------------------------------------------------
# Keys read as "the quality number" of an eval entry, in this order.
QUALITY_KEYS = ("quality", "score", "accuracy", "acc", "f1", "exact_match", "em",
                "teacher_agreement", "agreement", "span_agreement")
_RATIO_KEYS = ("ratio", "k", "compression_ratio")


def load_quality(source, key: str | None = None) -> dict[int, float]:
    """ratio -> quality from eval results (a path to a JSON file, or its parsed content).

    Tolerant of layouts: a list of entries; or a dict holding such a list under "results",
    "entries", "rows", "plugins" or "evals"; or a dict of name -> entry. An entry needs a ratio
    (`ratio`, `k` or `compression_ratio`; 0, 1, null, "off" or "teacher" mean the teacher)
    and a number: `key` if given, else the first of `QUALITY_KEYS` found in the entry or in
    its `metrics` dict. Entries sharing a ratio (several tasks, several plugins) are averaged.
    Entries without both are skipped; if none remains, ValueError.

    Example:
      >>> load_quality([{"ratio": None, "quality": 0.91}, {"ratio": 4, "accuracy": 0.88}])
      {1: 0.91, 4: 0.88}
    """
    data = source
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            data = json.load(f)
    values = collections.defaultdict(list)
    for entry in _entries(data):
        ratio, value = _entry_ratio(entry), _entry_quality(entry, key)
        if ratio is not None and value is not None:
            values[ratio].append(value)
    if not values:
        raise ValueError(f"no entry with a ratio and a quality number ({key or QUALITY_KEYS}) "
                         f"in {source if isinstance(source, (str, os.PathLike)) else 'the data'}")
    return {ratio: float(np.mean(v)) for ratio, v in sorted(values.items())}


def _entries(data) -> list:
    if isinstance(data, list):
        return [e for e in data if isinstance(e, Mapping)]
    if isinstance(data, Mapping):
        for name in ("results", "entries", "rows", "plugins", "evals"):
            if isinstance(data.get(name), list):
                return _entries(data[name])
        return [e for e in data.values() if isinstance(e, Mapping)]
    return []


def _entry_ratio(entry: Mapping) -> int | None:
    for name in _RATIO_KEYS:
        if name in entry:
            value = entry[name]
            if value is None or value in (0, 1) or str(value).lower() in ("off", "teacher", "none"):
                return OFF
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    # No ratio key: an entry named "teacher" or "off" is the uncompressed model.
    return OFF if str(entry.get("name", "")).lower() in ("teacher", "off") else None


def _entry_quality(entry: Mapping, key: str | None) -> float | None:
    for where in (entry, entry.get("metrics") if isinstance(entry.get("metrics"), Mapping) else {}):
        for name in (key,) if key else QUALITY_KEYS:
            value = where.get(name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and math.isfinite(value):
                return float(value)
    return None


# -- Policy ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """What the adaptive policy optimises for.

    Attributes:
      budget_s: latency budget per request, arrival to result, in seconds.
      ratios: the ratios it may choose (1 = off); None: every ratio in the profile.
      margin: safety margin; predicted service times are multiplied by 1 + margin, to absorb
        noise around the profile's medians.
      max_utilization: a ratio is chosen only if it serves the current arrival rate with full
        batches at most this busy; otherwise the queue would grow even if this batch is on
        time. 0.9 leaves headroom for Poisson bursts.
      max_batch: largest batch dispatched at once; None: the profile's largest bucket batch.

    The bucket set is the engine's (`AdaptiveEngine(buckets=...)`): only compiled shapes can
    run, and the profile, measured on them, carries them to the policy.
    """
    budget_s: float
    ratios: tuple[int, ...] | None = None
    margin: float = 0.1
    max_utilization: float = 0.9
    max_batch: int | None = None

    def __post_init__(self):
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {self.budget_s}")
        if self.margin < 0 or not 0 < self.max_utilization:
            raise ValueError("margin must be >= 0 and max_utilization > 0")


@dataclasses.dataclass(frozen=True)
class QueueState:
    """The waiting work when a batch is about to start.

    Attributes:
      now: the current time (seconds, any epoch; arrivals share it).
      arrivals: [depth] arrival times of the waiting requests, oldest first (FIFO).
      lengths: [depth] their token counts.
      arrival_rate: recent arrivals per second (see `RateMeter`).
    """
    now: float
    arrivals: np.ndarray
    lengths: np.ndarray
    arrival_rate: float = 0.0

    @property
    def depth(self) -> int:
        return len(self.arrivals)


@dataclasses.dataclass(frozen=True)
class Decision:
    """A policy's answer: serve the next `batch` queued requests at `ratio`.

    `predicted_s` is the worst predicted latency among the requests the decision tries to
    keep within budget; `meets_budget` False means the policy fell back.
    """
    ratio: int
    batch: int
    predicted_s: float
    meets_budget: bool


class AdaptivePolicy:
    """The least compression that still meets the latency budget, from a measured profile.

    The queue is predicted to drain FIFO in batches of `max_batch`, every batch at the
    candidate ratio, each batch padded to its longest request's bucket; the service times come
    from the profile, times (1 + margin). A ratio *meets the budget* if

      1. every waiting request that could still finish within budget at the most compression
         does so at this ratio (a request late even at the most compression is lost whatever
         is chosen: it does not pull the choice, but its service still delays the others), and
      2. it sustains the current arrival rate: rate * service time per request of a full batch
         <= max_utilization (otherwise a queue that is fine now grows without bound).

    The policy picks the smallest allowed ratio that meets the budget; if none does (or every
    waiting request is already lost), the largest allowed ratio, which drains fastest.

    Example:
      >>> policy = AdaptivePolicy(profile, PolicyConfig(budget_s=0.05, ratios=(1, 4, 8)))
      >>> policy.choose(QueueState(now, arrivals, lengths, arrival_rate)).ratio
    """

    def __init__(self, profile: LatencyProfile, config: PolicyConfig):
        ratios = config.ratios or profile.ratios
        unknown = sorted(set(ratios) - set(profile.ratios))
        if unknown:
            raise ValueError(f"ratios {unknown} are not in the profile {profile.ratios}")
        self.profile, self.config = profile, config
        self.ratios = tuple(sorted(ratios))
        self.max_batch = config.max_batch or profile.max_batch
        self.name = "adaptive"
        # Measured / profiled time of recent batches: a live server keeps it current
        # (`server.Bank`), since the profile was taken with the machine to itself.
        self.slowdown = 1.0

    def service_s(self, ratio: int, lengths: np.ndarray) -> float:
        """Predicted seconds (with margin and slowdown) for one batch of these lengths."""
        seconds = self.profile.latency(ratio, len(lengths), int(max(lengths)))
        return (1 + self.config.margin) * self.slowdown * seconds

    def drain_latencies(self, ratio: int, queue: QueueState) -> np.ndarray:
        """[depth] predicted latency of each waiting request if all are served at `ratio`."""
        done, finish = queue.now, np.empty(queue.depth)
        for start in range(0, queue.depth, self.max_batch):
            stop = min(start + self.max_batch, queue.depth)
            done += self.service_s(ratio, queue.lengths[start:stop])
            finish[start:stop] = done
        return finish - np.asarray(queue.arrivals, float)

    def sustains(self, ratio: int, queue: QueueState) -> bool:
        """Rule 2: full batches at `ratio` keep up with the arrival rate."""
        if queue.arrival_rate <= 0:
            return True
        longest = max(b.length for b in self.profile.buckets)
        length = min(int(max(queue.lengths, default=longest)), longest)
        per_request = self.service_s(ratio, np.full(self.max_batch, length)) / self.max_batch
        return queue.arrival_rate * per_request <= self.config.max_utilization

    def choose(self, queue: QueueState) -> Decision:
        """The smallest allowed ratio meeting rules 1 and 2, else the largest (fallback)."""
        batch, most = min(queue.depth, self.max_batch), self.ratios[-1]
        budget = self.config.budget_s
        fastest = self.drain_latencies(most, queue)
        savable = fastest <= budget
        if queue.depth and not savable.any():  # Every waiting request is late: drain fastest.
            return Decision(most, batch, float(fastest.max()), False)
        for ratio in self.ratios:
            worst = float(self.drain_latencies(ratio, queue)[savable].max(initial=0.0))
            if worst <= budget and self.sustains(ratio, queue):
                return Decision(ratio, batch, worst, True)
        return Decision(most, batch, float(fastest[savable].max(initial=0.0)), False)


class FixedPolicy:
    """Always the same ratio (the baselines: always off, always k = 4)."""

    def __init__(self, ratio: int, profile: LatencyProfile, max_batch: int | None = None,
                 budget_s: float = math.inf):
        if ratio not in profile.ratios:
            raise ValueError(f"ratio {ratio} is not in the profile {profile.ratios}")
        self.ratio, self.profile = ratio, profile
        self.max_batch, self.budget_s = max_batch or profile.max_batch, budget_s
        self.ratios = (ratio,)
        self.name = "always off" if ratio == OFF else f"always k={ratio}"

    def choose(self, queue: QueueState) -> Decision:
        batch = min(queue.depth, self.max_batch)
        if batch == 0:
            return Decision(self.ratio, 0, 0.0, True)
        lengths = queue.lengths[:batch]
        finish = queue.now + self.profile.latency(self.ratio, batch, int(max(lengths)))
        worst = float(finish - min(queue.arrivals[:batch]))
        return Decision(self.ratio, batch, worst, worst <= self.budget_s)

