"""The compiled plugin bank: a frozen backbone, a plugin per ratio, each (ratio, bucket) compiled.

- `Bucket`, `bucket_grid`, `pick_bucket`, `plan_chunks`: the input shapes compiled ahead of
  time, and how a request batch is padded or split into them.
- `CompileCounter`, `CompiledOnRequestPath`: the guard that counts JAX traces and
  compilations, so that the request path provably runs precompiled code only.
- `AdaptiveEngine`: the bank itself. A request batch is padded into the smallest bucket that
  fits and run by calling a `jax.stages.Compiled` object, which cannot recompile.

Which ratio to run is not decided here: `policy.py` predicts costs from the engine's measured
profile and chooses; `serving.py` queues requests in front of the engine.

Example:
    >>> buckets = bucket_grid((1, 8), (64, 128))
    >>> engine = AdaptiveEngine(cfg, backbone, {2: p2, 4: p4, 8: p8}, buckets)
    >>> states = engine.run(4, input_ids, attention_mask)   # [batch, n, d_model], no compilation
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from variator_jax.model import classify, encode, generate
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

    def __enter__(self) -> CompileCounter:
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
        retrieval; the part a plugin accelerates), "generate" -> greedy tokens
        [batch, max_new_tokens] int32, or "classify" -> verbalizer logits [batch, num_labels]
        float32 at `label_ids` (`model.classify`, as evaluation scores a label).
      max_new_tokens: decoding length in "generate" mode (static: part of the executable).
      label_ids: [num_labels] token ids in "classify" mode (`Task.verbalizer_ids`).
      guard: raise `CompiledOnRequestPath` if a `run` traces or compiles anything. The counter
        is process-wide, so code compiling in another thread during a `run` also trips it.

    Switching ratio only picks another executable; switching to another plugin of the same
    ratio (`set_plugin`) reuses it too, since plugin weights are arguments, not constants.
    """

    def __init__(self, cfg: T5Config, backbone, plugins: Mapping[int, Any],
                 buckets: Sequence[Bucket], *, mode: str = "encode", max_new_tokens: int = 16,
                 label_ids: Sequence[int] | None = None, guard: bool = True):
        if mode not in ("encode", "generate", "classify"):
            raise ValueError(f"mode must be 'encode', 'generate' or 'classify', got {mode!r}")
        if (mode == "classify") != (label_ids is not None):
            raise ValueError("label_ids are needed in 'classify' mode, and only there")
        if not buckets:
            raise ValueError("at least one bucket is needed")
        # On the device once: host (numpy) leaves would be copied again on every call.
        self.cfg, self.backbone = cfg, jax.device_put(backbone)
        self.mode, self.guard = mode, guard
        self.max_new_tokens = int(max_new_tokens)
        self.label_ids = None if label_ids is None else np.asarray(label_ids, np.int32)
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
        elif self.mode == "classify":
            lowered = classify.lower(self.cfg, self.backbone, spec, spec, self.label_ids, plugin)
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

    @property
    def compiled(self) -> int:
        """How many executables (ratio, bucket) are compiled: all of them once built."""
        return len(self._executables)

    # -- The request path -----------------------------------------------------------------------
    def run(self, ratio: int, input_ids, attention_mask=None) -> np.ndarray:
        """Runs a batch at compression `ratio`, padded into precompiled buckets.

        Args:
          input_ids: [batch, n] int (host array); n <= the longest bucket.
          attention_mask: [batch, n], 1 for real tokens; default all ones.
        Returns:
          "encode": [batch, n, d_model] float32; "generate": [batch, max_new_tokens] int32;
          "classify": [batch, num_labels] float32.
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
        extra = () if self.label_ids is None else (self.label_ids,)
        out = self._executables[ratio, bucket](self.cfg, self.backbone, padded_ids, padded_mask,
                                               *extra, self.plugins[ratio])
        out = np.asarray(out)  # Waits for the result and copies it to the host.
        return out[:rows, :n] if self.mode == "encode" else out[:rows]

    # -- Start-up measurements (the latency profile: policy.LatencyProfile.measure) ----------
    def teacher_agreement(self, batches: int = 2, seed: int = 0) -> dict[int, float]:
        """Default quality proxy: how closely each ratio reproduces the teacher (ratio 1 -> 1.0).

        On random inputs of random lengths in the largest bucket: in "encode" mode the mean
        cosine similarity of encoder states over real tokens; in "classify" mode the share of
        rows given the teacher's label; in "generate" mode the fraction
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
        if self.mode == "classify":  # The share of rows given the teacher's label.
            return float((teacher.argmax(-1) == student.argmax(-1)).mean())
        eos = teacher == self.cfg.eos_token_id
        upto = (np.cumsum(eos, axis=1) - eos) == 0  # Up to and including the first EOS.
        return float(((teacher == student) & upto).sum() / upto.sum())

