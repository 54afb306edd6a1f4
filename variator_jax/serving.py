"""Workload-adaptive serving: one frozen backbone, a bank of plugins, the ratio chosen per batch.

The paper's promise (Xiao et al., 2023, §1): because plugins are plug-and-play, a service can
pick its acceleration ratio by the current workload. This module makes that concrete:

- `AdaptiveEngine`: the backbone plus plugins for ratios (1 = off, 2, 4, 8), every
  (ratio, bucket) compiled ahead of time into an XLA executable. A request batch is padded
  into the smallest bucket that fits and run by calling a `jax.stages.Compiled` object, which
  cannot recompile; a guard also counts JAX traces/compilations around every call and raises
  if one happens on the request path.
- `LatencyProfile`: seconds per (ratio, bucket), measured at start-up on the machine at hand
  (`AdaptiveEngine.measure_profile`), or analytic (`LatencyProfile.from_flops`) for planning
  and for tests that must not depend on a noisy machine.
- `AdaptivePolicy`: given the queue (arrival times, lengths, arrival rate) and a latency
  budget, the least compression that still meets the budget, else the most compression.
- `AdaptiveServer`: the request path: a FIFO queue, an arrival-rate meter, the policy and the
  engine; time is passed in, so a discrete-event simulation drives it exactly as a clock would
  (see `benchmarks/serve.py`).

Example:
    >>> buckets = bucket_grid((1, 8), (64, 128))
    >>> engine = AdaptiveEngine(cfg, backbone, {2: p2, 4: p4, 8: p8}, buckets)
    >>> profile = engine.measure_profile()
    >>> server = AdaptiveServer(AdaptivePolicy(profile, PolicyConfig(budget_s=0.05)), engine)
    >>> server.submit(request_id, token_ids, now=time.monotonic())
    >>> batch = server.dispatch(now=time.monotonic())   # batch.ratio, batch.outputs
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from variator_jax import flops
from variator_jax.model import encode, generate
from variator_jax.plugins import Plugin, PluginConfig, check_compatible
from variator_jax.t5 import T5Config

OFF = 1  # The ratio of the uncompressed teacher: no plugin.


# -- Buckets ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """One compiled input shape: `batch` sequences of `length` tokens."""
    batch: int
    length: int

    @property
    def size(self) -> int:
        return self.batch * self.length

    def fits(self, batch: int, length: int) -> bool:
        return batch <= self.batch and length <= self.length


def bucket_grid(batch_sizes: Iterable[int], lengths: Iterable[int]) -> tuple[Bucket, ...]:
    """Every (batch, length) combination, sorted: `bucket_grid((1, 8), (64, 128))`."""
    return tuple(sorted(Bucket(int(b), int(n)) for b in set(batch_sizes) for n in set(lengths)))


def pick_bucket(buckets: Sequence[Bucket], batch: int, length: int) -> Bucket:
    """The smallest bucket (padded tokens, then length) that holds `batch` x `length`."""
    fitting = [b for b in buckets if b.fits(batch, length)]
    if not fitting:
        raise ValueError(f"no bucket holds batch {batch} x length {length} (buckets: "
                         f"{', '.join(f'{b.batch}x{b.length}' for b in buckets)}); truncate the "
                         "input or add a bucket")
    return min(fitting, key=lambda b: (b.size, b.length))


def plan_chunks(buckets: Sequence[Bucket], batch: int, length: int) -> list[tuple[int, Bucket]]:
    """Split `batch` rows into (rows, bucket) chunks: full chunks of the largest batch a bucket
    of this length offers, the rest in the smallest bucket that fits."""
    fitting = [b.batch for b in buckets if b.length >= length]
    if not fitting:
        pick_bucket(buckets, 1, length)  # Raises with the message naming the buckets.
    largest, chunks = max(fitting), []
    while batch > 0:
        rows = min(batch, largest)
        chunks.append((rows, pick_bucket(buckets, rows, length)))
        batch -= rows
    return chunks


# -- Compile guard ------------------------------------------------------------------------------
# Event names recorded by jax._src.dispatch whenever a function is traced or compiled.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_events = [0]  # Events seen since the listener was installed (process-wide).
_listener_installed = [False]


def _on_duration_event(event: str, duration: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_events[0] += 1


def compile_events() -> int:
    """Traces + XLA compilations in this process since the first call (monotone counter)."""
    if not _listener_installed[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
        _listener_installed[0] = True
    return _compile_events[0]


class CompileCounter:
    """Counts JAX traces and compilations inside a `with` block (in any thread).

    Example:
      >>> with CompileCounter() as c:
      ...     engine.run(4, ids, mask)
      >>> assert c.count == 0
    """

    def __enter__(self) -> "CompileCounter":
        self._start, self.count = compile_events(), 0
        return self

    def __exit__(self, *exc) -> None:
        self.count = compile_events() - self._start


class CompiledOnRequestPath(RuntimeError):
    """A request triggered a JAX trace or compilation (it must only run precompiled code)."""


# -- Engine -------------------------------------------------------------------------------------
class AdaptiveEngine:
    """One backbone and a bank of plugins, every (ratio, bucket) compiled ahead of time.

    Args:
      cfg, backbone: the frozen T5 (`init_t5` or `load_hf_t5`).
      plugins: ratio -> `(PluginConfig, params)` or a `Plugin`; ratio 1 (off, the teacher) is
        always added; kept as `Plugin`s (which unpack like the tuple).
        Each plugin is checked against the backbone and against its key.
      buckets: the input shapes to compile (see `bucket_grid`); a request of more rows than
        the largest bucket runs in several calls, one longer than the longest is refused.
      mode: "encode" -> encoder states [batch, n, d_model] float32 (classification heads,
        retrieval; the part a plugin accelerates), or "generate" -> greedy tokens
        [batch, max_new_tokens] int32.
      max_new_tokens: decoding length in "generate" mode (static: part of the executable).
      guard: raise `CompiledOnRequestPath` if a `run` traces or compiles anything. The counter
        is process-wide, so code compiling in another thread during a `run` also trips it.

    Switching ratio only picks another executable; switching to another plugin of the same
    ratio (`set_plugin`) reuses it too, since plugin weights are arguments, not constants.
    """

    def __init__(self, cfg: T5Config, backbone, plugins: Mapping[int, Any],
                 buckets: Sequence[Bucket], *, mode: str = "encode", max_new_tokens: int = 16,
                 guard: bool = True):
        if mode not in ("encode", "generate"):
            raise ValueError(f"mode must be 'encode' or 'generate', got {mode!r}")
        if not buckets:
            raise ValueError("at least one bucket is needed")
        # On the device once: host (numpy) leaves would be copied again on every call.
        self.cfg, self.backbone = cfg, jax.device_put(backbone)
        self.mode, self.guard = mode, guard
        self.max_new_tokens = int(max_new_tokens)
        self.buckets = tuple(sorted(set(buckets)))
        self.plugins = {OFF: None}
        for ratio, plugin in sorted(plugins.items()):
            self._check_plugin(int(ratio), plugin)
            if int(ratio) != OFF:
                self.plugins[int(ratio)] = Plugin(plugin[0], jax.device_put(plugin[1]))
        self.ratios = tuple(sorted(self.plugins))
        self._executables: dict[tuple[int, Bucket], Any] = {}
        start = time.perf_counter()
        with CompileCounter() as counter:
            for ratio in self.ratios:
                for bucket in self.buckets:
                    self._executables[ratio, bucket] = self._compile(ratio, bucket)
        self.compile_seconds, self.compile_count = time.perf_counter() - start, counter.count

    def _check_plugin(self, ratio: int, plugin) -> None:
        if ratio == OFF:
            if plugin is not None:
                raise ValueError("ratio 1 is the uncompressed teacher and takes no plugin")
            return
        pcfg, params = plugin
        if not isinstance(pcfg, PluginConfig) or pcfg.ratio != ratio:
            raise ValueError(f"plugin under key {ratio} has config {pcfg!r}: ratio mismatch")
        check_compatible(self.cfg, pcfg, params)

    def _compile(self, ratio: int, bucket: Bucket):
        """Lower with abstract [batch, length] int32 inputs and compile: nothing runs."""
        spec = jax.ShapeDtypeStruct((bucket.batch, bucket.length), np.int32)
        plugin = self.plugins[ratio]
        if self.mode == "encode":
            lowered = encode.lower(self.cfg, self.backbone, spec, spec, plugin)
        else:
            lowered = generate.lower(self.cfg, self.backbone, spec, spec, self.max_new_tokens,
                                     plugin)
        return lowered.compile()

    def set_plugin(self, ratio: int, plugin) -> None:
        """Swap in another plugin of a compiled ratio (same shapes): no recompilation."""
        if ratio not in self.plugins or ratio == OFF:
            raise ValueError(f"ratio {ratio} is not a compiled plugin ratio {self.ratios[1:]}")
        self._check_plugin(ratio, plugin)
        if plugin[0] != self.plugins[ratio][0]:
            raise ValueError(f"plugin config {plugin[0]} differs from the compiled "
                             f"{self.plugins[ratio][0]}")
        self.plugins[ratio] = Plugin(plugin[0], jax.device_put(plugin[1]))

    @property
    def max_length(self) -> int:
        return max(b.length for b in self.buckets)

    # -- The request path -----------------------------------------------------------------------
    def run(self, ratio: int, input_ids, attention_mask=None) -> np.ndarray:
        """Runs a batch at compression `ratio`, padded into precompiled buckets.

        Args:
          input_ids: [batch, n] int (host array); n <= the longest bucket.
          attention_mask: [batch, n], 1 for real tokens; default all ones.
        Returns:
          "encode": [batch, n, d_model] float32; "generate": [batch, max_new_tokens] int32.
        """
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids {ids.shape} / attention_mask {mask.shape}: "
                             "want equal [batch, n]")
        if ratio not in self.plugins:
            raise ValueError(f"ratio {ratio} is not compiled; have {self.ratios}")
        before = compile_events() if self.guard else 0
        outs, start = [], 0
        for rows, bucket in plan_chunks(self.buckets, ids.shape[0], ids.shape[1]):
            outs.append(self._run_bucket(ratio, bucket, ids[start:start + rows],
                                         mask[start:start + rows]))
            start += rows
        if self.guard and compile_events() != before:
            raise CompiledOnRequestPath(
                f"run(ratio={ratio}, shape={ids.shape}) traced or compiled JAX code; the request "
                "path must only call precompiled executables")
        return np.concatenate(outs)

    def _run_bucket(self, ratio, bucket, ids, mask) -> np.ndarray:
        # Padding and slicing in numpy: a jnp op here would compile on the request path.
        rows, n = ids.shape
        padded_ids = np.full((bucket.batch, bucket.length), self.cfg.pad_token_id, np.int32)
        padded_mask = np.zeros((bucket.batch, bucket.length), np.int32)
        padded_ids[:rows, :n], padded_mask[:rows, :n] = ids, mask
        out = self._executables[ratio, bucket](self.cfg, self.backbone, padded_ids, padded_mask,
                                               self.plugins[ratio])
        out = np.asarray(out)  # Waits for the result and copies it to the host.
        return out[:rows, :n] if self.mode == "encode" else out[:rows]

    # -- Start-up measurements ------------------------------------------------------------------
    def measure_profile(self, repeats: int = 5, warmup: int = 1, stat: str = "median",
                        seed: int = 0) -> "LatencyProfile":
        """Times `run` (host padding, transfer, compute, copy back) for every ratio x bucket.

        Rounds are interleaved (each round visits every ratio x bucket once), so a change in
        machine load during start-up hits all ratios alike instead of biasing one of them.
        `stat` is "median" (default) or "min" (the uncontended cost, for very noisy hosts).
        """
        reduce = {"median": np.median, "min": np.min}[stat]
        rng = np.random.default_rng(seed)
        inputs = {b: rng.integers(2, self.cfg.vocab_size, (b.batch, b.length), dtype=np.int32)
                  for b in self.buckets}
        times = collections.defaultdict(list)
        for round_ in range(warmup + repeats):
            for ratio in self.ratios:
                for bucket in self.buckets:
                    start = time.perf_counter()
                    self.run(ratio, inputs[bucket])
                    if round_ >= warmup:
                        times[ratio, bucket].append(time.perf_counter() - start)
        seconds = {key: float(reduce(ts)) for key, ts in times.items()}
        return LatencyProfile(seconds, source=f"measured ({stat} of {repeats})").monotone()

    def teacher_agreement(self, batches: int = 2, seed: int = 0) -> dict[int, float]:
        """Default quality proxy: how closely each ratio reproduces the teacher (ratio 1 -> 1.0).

        On random inputs of random lengths in the largest bucket: in "encode" mode the mean
        cosine similarity of encoder states over real tokens; in "generate" mode the fraction
        of greedy tokens equal to the teacher's, up to and including the teacher's first EOS.
        Uses the compiled executables only. A trained plugin's eval results
        (`load_quality`) are the better proxy; this one needs nothing but the bank.
        """
        rng = np.random.default_rng(seed)
        bucket = max(self.buckets, key=lambda b: b.size)
        scores = collections.defaultdict(list)
        for _ in range(batches):
            shape = (bucket.batch, bucket.length)
            ids = rng.integers(2, self.cfg.vocab_size, shape, dtype=np.int32)
            lengths = rng.integers(max(1, bucket.length // 4), bucket.length + 1, bucket.batch)
            mask = (np.arange(bucket.length)[None, :] < lengths[:, None]).astype(np.int32)
            ids = np.where(mask > 0, ids, self.cfg.pad_token_id)
            teacher = self.run(OFF, ids, mask)
            for ratio in self.ratios:
                scores[ratio].append(self._agreement(teacher, self.run(ratio, ids, mask), mask))
        return {ratio: float(np.mean(s)) for ratio, s in scores.items()}

    def _agreement(self, teacher: np.ndarray, student: np.ndarray, mask: np.ndarray) -> float:
        if self.mode == "encode":
            cos = (teacher * student).sum(-1) / np.maximum(
                np.linalg.norm(teacher, axis=-1) * np.linalg.norm(student, axis=-1), 1e-12)
            return float((cos * mask).sum() / mask.sum())
        eos = teacher == self.cfg.eos_token_id
        upto = (np.cumsum(eos, axis=1) - eos) == 0  # Up to and including the first EOS.
        return float(((teacher == student) & upto).sum() / upto.sum())


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

    def monotone(self) -> "LatencyProfile":
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
                   decoder_tokens: int = 0) -> "LatencyProfile":
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
    def from_dict(cls, d: Mapping) -> "LatencyProfile":
        return cls({(e["ratio"], Bucket(e["batch"], e["length"])): e["seconds"]
                    for e in d["entries"]}, d.get("source", "file"))

    def format_table(self) -> str:
        """Markdown: one row per bucket, ms per ratio and the speedup over ratio 1."""
        head = "| bucket | " + " | ".join("off" if r == OFF else f"k = {r}" for r in self.ratios)
        lines = [head + " |", "|---|" + "---:|" * len(self.ratios)]
        for b in self.buckets:
            base = self.seconds.get((OFF, b))
            cells = [f"{self.seconds[r, b] * 1e3:.2f} ms" +
                     (f" ({base / self.seconds[r, b]:.2f}x)" if base and r != OFF else "")
                     for r in self.ratios]
            lines.append(f"| {b.batch} x {b.length} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


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

    def service_s(self, ratio: int, lengths: np.ndarray) -> float:
        """Predicted seconds (with margin) for one batch of requests of these lengths."""
        seconds = self.profile.latency(ratio, len(lengths), int(max(lengths)))
        return (1 + self.config.margin) * seconds

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


def start_server(cfg: T5Config, backbone, plugins: Mapping[int, Any], buckets: Sequence[Bucket],
                 budget_s: float, *, mode: str = "encode", max_new_tokens: int = 16,
                 repeats: int = 5, **policy_kw) -> AdaptiveServer:
    """Compile the bank, measure its profile on this machine, and wrap it in an adaptive server.

    Example:
      >>> server = start_server(cfg, backbone, {4: (pcfg, plugin)}, bucket_grid((1, 8), (128,)),
      ...                       budget_s=0.05, margin=0.2)
    """
    engine = AdaptiveEngine(cfg, backbone, plugins, buckets, mode=mode,
                            max_new_tokens=max_new_tokens)
    profile = engine.measure_profile(repeats=repeats)
    return AdaptiveServer(AdaptivePolicy(profile, PolicyConfig(budget_s, **policy_kw)), engine)

