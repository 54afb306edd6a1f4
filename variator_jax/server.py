"""The adaptive plugin bank behind Ray Serve: HTTP requests in, the ratio chosen per batch by load.

    variator-serve --backbone demo_workdir/finetune/backbone \\
        --plugins demo_workdir/adapt-k4/plugin --task stdlib_docs --port 8000
    curl -s localhost:8000/v1/generate -d '{"inputs": ["Return the absolute value"]}'

One Ray Serve deployment (`VariatorServer`, a FastAPI ingress) holds the frozen backbone and
its plugins as compiled banks (`engine.AdaptiveEngine`, one per endpoint: every (ratio,
bucket) compiled at start-up, nothing compiles on the request path). Requests are batched
dynamically (`@serve.batch`); before each batch the policy (`policy.AdaptivePolicy`, as the
simulation uses it) picks the least compression that keeps the live queue (the depth and age
of every request accepted and not yet started, and the arrival rate) within the latency
budget, from the latency profile measured at start-up.

HTTP:
  POST /v1/generate  {"inputs": ["text", ...], "max_new_tokens": 8, "ratio": 4 (optional)}
                     -> {"outputs": [...], "ratio": k, "ratios": [...], "queue_ms", "compute_ms"}
  POST /v1/classify  {"inputs": ["text" or {field: text}, ...], "ratio": (optional)}
                     -> {"labels": [...], "scores": [[p per label], ...], "ratio": k, ...}
                     (with --task: the task's label words, scored as evaluation scores them)
  GET  /healthz      200 once every bucket is compiled (the replica is routed to only then)
  GET  /v1/models    backbone identity, plugins and ratios, buckets, latency profiles, policy
Bad requests get 400 (413 for an input longer than the longest bucket, unless --truncate) with
{"error": "<one line>"}; past the bound on queued requests Ray Serve answers 503 with
Retry-After. Metrics go through Ray's metrics agent (Prometheus, port --metrics-port).

`Bank` is the replica's state without Ray (parsing, the policy, the engines): tests and the
load test's checks call it directly.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from variator_jax.engine import OFF, AdaptiveEngine, bucket_grid, compile_events
from variator_jax.policy import (
    AdaptivePolicy,
    FixedPolicy,
    LatencyProfile,
    PolicyConfig,
    QueueState,
)
from variator_jax.serving import RateMeter

# -- What a server holds ------------------------------------------------------------------------
_SLOWDOWN_WEIGHT = 0.2  # Of each new batch in the slowdown's moving average.


@dataclasses.dataclass(frozen=True)
class ServeSpec:
    """Everything a replica needs to build its bank (plain data: Ray ships it to replicas).

    Attributes:
      backbone: HF T5 directory (config.json, weights, and its tokenizer unless `tokenizer`).
      plugins: plugin directories, one per ratio.
      task: a task name or task file (`data.get_task`) for /v1/classify; "" = no classify.
      tokenizer: "" (the backbone's), "byte", or a tokenizer directory.
      batch_sizes, lengths: the compiled buckets (every combination).
      max_new_tokens: the longest decoding a request may ask for (compiled once).
      budget_ms: latency budget per request; 0 = 4 x T0, the time of one uncompressed batch
        of the largest bucket (as the simulation's default).
      policy: "adaptive" or "fixed:K" (always ratio K; K = 1 is the uncompressed backbone).
      batch_wait_ms: how long a batch waits to fill once its first request is there.
      truncate: cut over-long inputs to the longest bucket instead of answering 413.
      profile_repeats: timed runs per (ratio, bucket) for the start-up latency profile.
      shed_x: admission control; a request whose predicted wait (the queue ahead of it and
        itself, drained at the most compression it may get) exceeds shed_x x the budget is
        refused with 503 at once rather than queued to miss it; 0 = never (only Ray Serve's
        count bounds then apply).
    """
    backbone: str
    plugins: tuple[str, ...] = ()
    task: str = ""
    tokenizer: str = ""
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    lengths: tuple[int, ...] = (64, 128)
    max_new_tokens: int = 16
    budget_ms: float = 0.0
    policy: str = "adaptive"
    batch_wait_ms: float = 2.0
    truncate: bool = False
    profile_repeats: int = 3
    shed_x: float = 1.0

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


class HTTPError(Exception):
    """A request refused with `status` and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
        self.retry_after: int | None = None  # Seconds, for a 503.


@dataclasses.dataclass
class Item:
    """One input of a request, as it waits in a batch queue."""
    arrival: float  # time.monotonic() when the request was parsed.
    ids: np.ndarray  # [n] int32 token ids, EOS last.
    ratio: int | None  # Pinned by the request, else None (the policy decides).
    max_new_tokens: int = 0


@dataclasses.dataclass
class Done:
    """What serving one item gave: the engine's row and how long it waited and ran."""
    row: np.ndarray
    ratio: int
    queue_ms: float
    compute_ms: float
    batch: int


# -- The bank: a replica without Ray ------------------------------------------------------------
class Bank:
    """The backbone, tokenizer and one compiled `AdaptiveEngine` per endpoint, with its policy.

    Building it loads and checks every file, compiles every (ratio, bucket) and measures the
    latency profile; nothing compiles afterwards (the engines' guard raises if it does).
    """

    def __init__(self, spec: ServeSpec):
        import jax

        import variator_jax as vj
        from variator_jax import data as data_lib
        self.spec = spec
        cfg, backbone = vj.load_hf_t5(spec.backbone)
        backbone = jax.device_put(backbone)  # Once: both engines share these buffers.
        self.cfg = cfg
        self.tokenizer = data_lib.load_tokenizer(spec.tokenizer or None, spec.backbone)
        plugins, self.plugin_dirs = {}, {OFF: None}
        for path in spec.plugins:
            pcfg, params = vj.load_plugin(path, cfg=cfg, backbone=backbone)
            if pcfg.ratio in plugins:
                raise ValueError(f"two plugins of ratio {pcfg.ratio} ({path}); give one per ratio")
            plugins[pcfg.ratio], self.plugin_dirs[pcfg.ratio] = (pcfg, params), path
        self.identity = vj.backbone_identity(cfg, backbone)
        buckets = bucket_grid(spec.batch_sizes, spec.lengths)
        self.task = data_lib.get_task(spec.task) if spec.task else None
        if self.task is not None and self.task.kind != "classification":
            raise ValueError(f"--task {spec.task}: /v1/classify needs a classification task, "
                             f"this one is {self.task.kind}")
        start = time.perf_counter()
        self.engines = {"generate": AdaptiveEngine(cfg, backbone, plugins, buckets,
                                                   mode="generate",
                                                   max_new_tokens=spec.max_new_tokens)}
        if self.task is not None:
            self.engines["classify"] = AdaptiveEngine(
                cfg, backbone, plugins, buckets, mode="classify",
                label_ids=self.task.verbalizer_ids(self.tokenizer))
        self.compile_seconds = time.perf_counter() - start
        self.ratios = self.engines["generate"].ratios
        self.max_length = max(spec.lengths)
        self.profiles = {name: LatencyProfile.measure(engine, repeats=spec.profile_repeats)
                         for name, engine in self.engines.items()}
        self.policies = {name: self._policy(profile) for name, profile in self.profiles.items()}
        self.meters = {name: RateMeter(2 * self.budget_s(name)) for name in self.engines}
        self.slowdown = {name: 1.0 for name in self.engines}  # See `calibrate`.
        self.compiles_at_ready = compile_events()
        # Items accepted and not yet started, per endpoint: what the policy sees as the queue.
        self.pending: dict[str, dict[int, Item]] = {name: {} for name in self.engines}

    def _policy(self, profile):
        # The budget: given, else 4 x T0, one uncompressed batch of the largest bucket.
        budget = self.spec.budget_ms / 1e3 or 4 * self._t0(profile)
        if self.spec.policy == "adaptive":
            return AdaptivePolicy(profile, PolicyConfig(budget, max_batch=self.spec.max_batch))
        kind, _, ratio = self.spec.policy.partition(":")
        if kind != "fixed" or not ratio.isdigit():
            raise ValueError(f"--policy {self.spec.policy!r}: want 'adaptive' or 'fixed:K'")
        return FixedPolicy(int(ratio), profile, max_batch=self.spec.max_batch, budget_s=budget)

    def _t0(self, profile) -> float:
        """One uncompressed batch of the largest bucket: the simulation's unit of time."""
        return profile.latency(OFF, profile.max_batch, self.max_length)

    def budget_s(self, endpoint: str) -> float:
        policy = self.policies[endpoint]
        return getattr(policy, "budget_s", None) or policy.config.budget_s

    # -- Requests -------------------------------------------------------------------------------
    def parse(self, endpoint: str, body: Any, arrival: float) -> list[Item]:
        """A request's JSON body -> one `Item` per input; `HTTPError` (400/404/413) if bad."""
        if endpoint not in self.engines:
            raise HTTPError(404, f"/v1/{endpoint} needs a classification task: start the server "
                            "with --task")
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        known = {"inputs", "ratio"} | ({"max_new_tokens"} if endpoint == "generate" else set())
        unknown = sorted(set(body) - known)
        if unknown:
            raise HTTPError(400, f"unknown field {unknown[0]!r}; /v1/{endpoint} takes "
                            f"{', '.join(sorted(known))}")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HTTPError(400, "'inputs' must be a non-empty list")
        if len(inputs) > 16 * self.spec.max_batch:
            raise HTTPError(413, f"{len(inputs)} inputs in one request; at most "
                            f"{16 * self.spec.max_batch}")
        ratio = body.get("ratio")
        if ratio is not None and (_not_int(ratio) or ratio not in self.ratios):
            raise HTTPError(400, f"'ratio' must be one of {list(self.ratios)} (1 = uncompressed)")
        new_tokens = 0
        if endpoint == "generate":
            new_tokens = body.get("max_new_tokens", min(8, self.spec.max_new_tokens))
            if _not_int(new_tokens) or not 1 <= new_tokens <= self.spec.max_new_tokens:
                raise HTTPError(400, "'max_new_tokens' must be an integer in "
                                f"[1, {self.spec.max_new_tokens}]")
        texts = [self._text(endpoint, x, i) for i, x in enumerate(inputs)]
        return [Item(arrival, self._encode(text, i), ratio, new_tokens)
                for i, text in enumerate(texts)]

    def _text(self, endpoint: str, value, index: int) -> str:
        """An input as the model reads it: text as is for generation; for classification, the
        task's formatting of the example (a string fills the task's one input field)."""
        if endpoint == "generate":
            if not isinstance(value, str):
                raise HTTPError(400, f"inputs[{index}] must be a string")
            return value
        fields = self.task.features
        if isinstance(value, str):
            if len(fields) != 1:
                raise HTTPError(400, f"inputs[{index}]: task {self.task.name} reads "
                                f"{len(fields)} fields ({', '.join(fields)}): send an object")
            value = {fields[0]: value}
        if not isinstance(value, dict):
            raise HTTPError(400, f"inputs[{index}] must be a string or an object")
        for field in fields:
            if not isinstance(value.get(field), str):
                raise HTTPError(400, f"inputs[{index}].{field} must be a string")
        extra = sorted(set(value) - set(fields))
        if extra:
            raise HTTPError(400, f"inputs[{index}]: unknown field {extra[0]!r}; task "
                            f"{self.task.name} reads {', '.join(fields)}")
        return self.task.format({**value, "label": -1})[0]

    def _encode(self, text: str, index: int) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        eos = self.tokenizer.eos_token_id
        if len(ids) + 1 > self.max_length:
            if not self.spec.truncate:
                raise HTTPError(413, f"inputs[{index}] is {len(ids) + 1} tokens; the longest "
                                f"bucket is {self.max_length} (shorten it, or start the server "
                                "with --truncate)")
            ids = ids[: self.max_length - 1]  # EOS stays last, as evaluation truncates.
        return np.asarray([*ids, eos], np.int32)

    # -- Batches --------------------------------------------------------------------------------
    def admit(self, endpoint: str, items: Sequence[Item], now: float) -> None:
        """Records items as waiting (the policy's view of the queue) and as arrivals, or
        raises 503 (`HTTPError`, with `retry_after`) if they would wait past the shed limit."""
        for item in items:
            self.meters[endpoint].observe(item.arrival)
        wait = self.predicted_wait(endpoint, items, now)
        limit = self.spec.shed_x * self.budget_s(endpoint)
        if limit and wait > limit:
            error = HTTPError(503, f"overloaded: this request would wait {wait * 1e3:.0f} ms, "
                              f"over the {limit * 1e3:.0f} ms limit; retry later")
            error.retry_after = max(1, math.ceil(wait))
            raise error
        for item in items:
            self.pending[endpoint][id(item)] = item

    def predicted_wait(self, endpoint: str, items: Sequence[Item], now: float) -> float:
        """Seconds until the last of `items` is answered if every waiting item before it and
        it run FIFO in full batches at the most compression they may get (`items` pinned to a
        ratio: that one). From the latency profile; the batch running now is not counted."""
        ratio = items[0].ratio or max(self.policies[endpoint].ratios)
        waiting = sorted(self.pending[endpoint].values(), key=lambda it: it.arrival)
        lengths = [len(it.ids) for it in [*waiting, *items]]
        profile, batch = self.profiles[endpoint], self.spec.max_batch
        service = self.slowdown[endpoint] * sum(
            profile.latency(ratio, len(lengths[i:i + batch]), max(lengths[i:i + batch]))
            for i in range(0, len(lengths), batch))
        return now - min(it.arrival for it in items) + service

    def release(self, endpoint: str, items: Sequence[Item]) -> None:
        for item in items:
            self.pending[endpoint].pop(id(item), None)

    def choose(self, endpoint: str, now: float) -> int:
        """The policy's ratio for the next batch, given every item waiting now (FIFO)."""
        waiting = sorted(self.pending[endpoint].values(), key=lambda it: it.arrival)
        state = QueueState(now, np.array([it.arrival for it in waiting], float),
                           np.array([len(it.ids) for it in waiting], int),
                           self.meters[endpoint].rate(now))
        return self.policies[endpoint].choose(state).ratio

    def plan(self, endpoint: str, items: Sequence[Item], now: float) -> list[tuple[int, list]]:
        """Groups a batch by ratio: pinned items at their ratio, the rest at the policy's."""
        chosen = self.choose(endpoint, now) if any(it.ratio is None for it in items) else None
        groups = collections.defaultdict(list)
        for index, item in enumerate(items):
            groups[item.ratio or chosen].append(index)
        return sorted(groups.items())

    def run(self, endpoint: str, ratio: int, items: Sequence[Item]) -> np.ndarray:
        """One engine call for items of one ratio (padded into a bucket; no compilation)."""
        length = max(len(it.ids) for it in items)
        ids = np.full((len(items), length), self.cfg.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for row, it in enumerate(items):
            ids[row, :len(it.ids)], mask[row, :len(it.ids)] = it.ids, 1
        start = time.perf_counter()
        out = self.engines[endpoint].run(ratio, ids, mask)
        self.calibrate(endpoint, time.perf_counter() - start,
                       self.profiles[endpoint].latency(ratio, len(items), length))
        return out

    def calibrate(self, endpoint: str, measured_s: float, profiled_s: float) -> None:
        """Keeps the slowdown (measured / profiled batch time, a moving average) current.

        The profile was measured with the machine to itself; serving shares it with HTTP
        handling (and on a small host with the clients), so batches run slower than profiled.
        Predictions (the policy's choice, the admission control) are scaled by it.
        """
        ratio = min(max(measured_s / profiled_s, 0.5), 4.0)
        self.slowdown[endpoint] += _SLOWDOWN_WEIGHT * (ratio - self.slowdown[endpoint])
        if isinstance(self.policies[endpoint], AdaptivePolicy):
            self.policies[endpoint].slowdown = self.slowdown[endpoint]

    def answer(self, endpoint: str, done: Sequence[Done], items: Sequence[Item]) -> dict:
        """The response body for one request's items."""
        ratios = [d.ratio for d in done]
        out = {"ratio": max(ratios), "ratios": ratios,
               "queue_ms": round(max(d.queue_ms for d in done), 3),
               "compute_ms": round(max(d.compute_ms for d in done), 3),
               "batches": [d.batch for d in done]}
        if endpoint == "generate":
            rows = [d.row[:it.max_new_tokens] for d, it in zip(done, items, strict=True)]
            out["outputs"] = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        else:
            logits = np.stack([d.row for d in done])
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            out["labels"] = [self.task.labels[i] for i in logits.argmax(-1)]
            out["scores"] = np.round(scores.astype(np.float64), 6).tolist()
        return out

    def compiles_since_ready(self) -> int:
        """JAX traces and compilations in this process since the bank was built (must stay 0)."""
        return compile_events() - self.compiles_at_ready

    def describe(self) -> dict:
        """GET /v1/models: what is loaded and how it decides."""
        return {
            "backbone": {"path": self.spec.backbone, **self.identity},
            "plugins": [{"ratio": r, "path": self.plugin_dirs.get(r)} for r in self.ratios],
            "ratios": list(self.ratios),
            "buckets": [dataclasses.asdict(b) for b in self.engines["generate"].buckets],
            "task": None if self.task is None else {"name": self.task.name,
                                                    "labels": list(self.task.labels),
                                                    "inputs": list(self.task.features)},
            "max_new_tokens": self.spec.max_new_tokens,
            "policy": self.spec.policy,
            "budget_ms": {e: self.budget_s(e) * 1e3 for e in self.engines},
            "max_batch": self.spec.max_batch,
            "compile_seconds": round(self.compile_seconds, 2),
            "slowdown": {e: round(s, 3) for e, s in self.slowdown.items()},
            "profiles": {e: p.to_dict() for e, p in self.profiles.items()},
        }


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
