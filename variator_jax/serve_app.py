"""`variator-serve`: the Ray Serve application around a `server.Bank`, and its command line.

    variator-serve --backbone HF_DIR --plugins DIR[,DIR...] [--task NAME|FILE]
                   [--host 127.0.0.1] [--port 8000] [--replicas N] [--address auto]

`VariatorServer` is one replica: a FastAPI ingress whose two POST routes feed two
`@serve.batch` queues (one per endpoint). Each batch handler asks the bank's policy for a ratio
from the live queue, runs the engine in a worker thread (JAX releases the GIL, so the event
loop keeps accepting and timing requests meanwhile; one thread, so the endpoints never run
at once) and answers every request of the batch. A request is never lost to an exception:
bad input is 400/413, a failure while computing is 500 with one line, and the replica lives
on. Overload is refused at once with 503 and Retry-After, in two ways: a request the latency
profile predicts would wait past the budget (`--shed-x`), and, as the hard bound, anything past
`max_ongoing_requests` per replica plus `max_queued_requests` (Ray Serve's backpressure).

Scaling: `--replicas N` starts N replicas behind Ray's HTTP proxy; on a host or Ray cluster
with GPUs, `--gpus-per-replica 1` puts each on its own accelerator (Ray sets
CUDA_VISIBLE_DEVICES); `--address auto` joins a running cluster (`ray start --head`) instead of
starting one. The replicas import this package, so every node needs it installed.
"""
import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import fastapi
import ray
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.config import BackpressureConfig

from variator_jax.server import Bank, Done, HTTPError, ServeSpec

_LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_BATCH = [1, 2, 4, 8, 16, 32, 64, 128]

app = fastapi.FastAPI(title="variator_jax", docs_url=None, redoc_url=None)


@serve.deployment(name="variator", graceful_shutdown_timeout_s=20,
                  graceful_shutdown_wait_loop_s=0.5, health_check_period_s=5)
@serve.ingress(app)
class VariatorServer:
    """One replica: the compiled bank, two batch queues, and the metrics."""

    def __init__(self, spec: dict):
        self.bank = Bank(ServeSpec(**spec))
        # One thread runs the engines: batches of both endpoints take turns on the device.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        for handler in (self._generate_batch, self._classify_batch):
            handler.set_max_batch_size(self.bank.spec.max_batch)
            handler.set_batch_wait_timeout_s(self.bank.spec.batch_wait_ms / 1e3)
        self.requests = metrics.Counter(
            "variator_requests", description="HTTP requests by endpoint and status code",
            tag_keys=("endpoint", "status"))
        self.latency = metrics.Histogram(
            "variator_latency_ms", description="Arrival to answer, per input, by ratio",
            boundaries=_LATENCY_MS, tag_keys=("endpoint", "ratio"))
        self.batch_size = metrics.Histogram(
            "variator_batch_size", description="Inputs per engine call, by ratio",
            boundaries=_BATCH, tag_keys=("endpoint", "ratio"))
        self.queue_depth = metrics.Gauge(
            "variator_queue_depth", description="Inputs waiting when a batch starts",
            tag_keys=("endpoint",))

    # -- Routes ---------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz(self) -> dict:
        """200 once the replica exists: its constructor compiled every bucket first."""
        return {"status": "ok", "ratios": list(self.bank.ratios),
                "compiled": sum(e.compiled for e in self.bank.engines.values()),
                "compiles_since_start": self.bank.compiles_since_ready()}

    @app.get("/v1/models")
    def models(self) -> dict:
        return self.bank.describe()

    @app.post("/v1/generate")
    async def generate(self, request: fastapi.Request):
        return await self._serve("generate", request)

    @app.post("/v1/classify")
    async def classify(self, request: fastapi.Request):
        return await self._serve("classify", request)

    async def _serve(self, endpoint: str, request: fastapi.Request):
        arrival = time.monotonic()
        try:
            body = await request.body()
            try:
                parsed = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"the body is not valid JSON: {e}") from None
            items = self.bank.parse(endpoint, parsed, arrival)
            self.bank.admit(endpoint, items, time.monotonic())
            batched = self._generate_batch if endpoint == "generate" else self._classify_batch
            try:
                done = await asyncio.gather(*(batched(item) for item in items))
            finally:
                self.bank.release(endpoint, items)
            response = self.bank.answer(endpoint, done, items)
        except HTTPError as e:
            return self._error(endpoint, e.status, e.message, e.retry_after)
        except Exception as e:  # noqa: BLE001 - no request may take the replica down.
            return self._error(endpoint, 500, f"{type(e).__name__}: {e}".splitlines()[0])
        self.requests.inc(tags={"endpoint": endpoint, "status": "200"})
        now = time.monotonic()
        for d in done:
            self.latency.observe((now - arrival) * 1e3, tags={"endpoint": endpoint,
                                                               "ratio": str(d.ratio)})
        return response

    def _error(self, endpoint: str, status: int, message: str,
               retry_after: int | None = None) -> JSONResponse:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    # -- Batches --------------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, items):
        return await self._run_batch("generate", items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items):
        return await self._run_batch("classify", items)

    async def _run_batch(self, endpoint: str, items) -> list[Done]:
        """Picks the ratio from the live queue, runs each ratio's group, one `Done` per item."""
        start = time.monotonic()
        self.queue_depth.set(len(self.bank.pending[endpoint]), tags={"endpoint": endpoint})
        groups = self.bank.plan(endpoint, items, start)
        self.bank.release(endpoint, items)  # Started: no longer part of the waiting queue.
        loop, done = asyncio.get_running_loop(), [None] * len(items)
        for ratio, rows in groups:
            group = [items[i] for i in rows]
            t0 = time.monotonic()
            out = await loop.run_in_executor(self.executor, self.bank.run, endpoint, ratio, group)
            compute_ms = (time.monotonic() - t0) * 1e3
            self.batch_size.observe(len(group), tags={"endpoint": endpoint, "ratio": str(ratio)})
            for row, i in enumerate(rows):
                done[i] = Done(out[row], ratio, (t0 - items[i].arrival) * 1e3, compute_ms,
                               len(group))
        return done


# -- Command line -------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="variator-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", required=True, help="HF T5 directory (with its tokenizer)")
    p.add_argument("--plugins", default="", help="comma-separated plugin directories")
    p.add_argument("--task", default="", help="classification task name or task file for "
                   "/v1/classify (default: no /v1/classify)")
    p.add_argument("--tokenizer", default="", help="'byte' or a tokenizer dir (default: the "
                   "backbone's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas behind Ray's HTTP proxy")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs Ray reserves for each replica (1: one accelerator each)")
    p.add_argument("--address", default="", help="Ray cluster to join ('auto': the running "
                   "one); default: start a local Ray")
    p.add_argument("--batch-sizes", default="1,4,16", help="compiled bucket batch sizes")
    p.add_argument("--lengths", default="64,128", help="compiled bucket lengths (tokens)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest generation")
    p.add_argument("--budget-ms", type=float, default=0.0,
                   help="latency budget (default: 4 x one uncompressed batch of the largest "
                   "bucket, measured at start-up)")
    p.add_argument("--policy", default="adaptive", help="'adaptive' or 'fixed:K'")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a batch waits to fill")
    p.add_argument("--max-ongoing", type=int, default=0,
                   help="requests a replica holds at once (default 4 x the largest batch)")
    p.add_argument("--max-queued", type=int, default=0,
                   help="requests queued before Ray's proxy answers 503 (default: the largest "
                   "batch)")
    p.add_argument("--retry-after-s", type=float, default=1.0,
                   help="Retry-After on Ray Serve's own 503 (past --max-queued)")
    p.add_argument("--shed-x", type=float, default=1.0,
                   help="refuse (503) a request predicted to wait over this x the budget, "
                   "rather than queue it to miss the budget (0: never)")
    p.add_argument("--truncate", action="store_true",
                   help="cut over-long inputs to the longest bucket instead of answering 413")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus port of Ray's metrics agent (a local Ray only)")
    p.add_argument("--profile-repeats", type=int, default=3)
    args = p.parse_args(argv)
    spec = ServeSpec(backbone=args.backbone, plugins=tuple(x for x in args.plugins.split(",") if x),
                     task=args.task, tokenizer=args.tokenizer,
                     batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                     lengths=_ints(args.lengths, "--lengths"),
                     max_new_tokens=args.max_new_tokens, budget_ms=args.budget_ms,
                     policy=args.policy, batch_wait_ms=args.batch_wait_ms,
                     truncate=args.truncate, profile_repeats=args.profile_repeats,
                     shed_x=args.shed_x)
    check(spec, args)
    return args, spec


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: want comma-separated positive integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: want comma-separated positive integers")
    return values


def check(spec: ServeSpec, args) -> None:
    """Flags and files that can be checked before Ray starts (seconds) and compiles (minutes)."""
    for path in (spec.backbone, *spec.plugins):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"not a directory: {path}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: want 1-65535")
    if args.replicas < 1 or spec.max_new_tokens < 1 or spec.budget_ms < 0 or spec.shed_x < 0:
        raise ValueError("--replicas and --max-new-tokens must be >= 1, --budget-ms and "
                         "--shed-x >= 0")
    if spec.policy != "adaptive" and not spec.policy.startswith("fixed:"):
        raise ValueError(f"--policy {spec.policy!r}: want 'adaptive' or 'fixed:K'")


def build(spec: ServeSpec, args):
    """The bound application: the deployment with its replica count and queue bounds."""
    ongoing = args.max_ongoing or 4 * spec.max_batch
    options = dict(num_replicas=args.replicas, max_ongoing_requests=ongoing,
                   max_queued_requests=args.max_queued or spec.max_batch,
                   backpressure_config=BackpressureConfig(status_code=503,
                                                          retry_after_s=args.retry_after_s),
                   ray_actor_options={"num_cpus": 0, "num_gpus": args.gpus_per_replica})
    return VariatorServer.options(**options).bind(dataclasses.asdict(spec))


def main(argv=None) -> int:
    args, spec = parse_args(argv)
    init = {"address": args.address} if args.address else {
        # A local Ray talks to itself on loopback only.
        "num_cpus": os.cpu_count(), "include_dashboard": False, "_node_ip_address": "127.0.0.1",
        "object_store_memory": 200 * 2**20,
        **({"_metrics_export_port": args.metrics_port} if args.metrics_port else {})}
    ray.init(logging_level="warning", log_to_driver=False, **init)
    # After ray.init, which installs its own handlers: SIGTERM and Ctrl-C (`make serve`) drain
    # and stop the application and the local Ray instead of killing this driver alone.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"compiling {len(spec.batch_sizes) * len(spec.lengths)} buckets per ratio and "
              "measuring the latency profile ...", flush=True)
        started = time.monotonic()
        serve.run(build(spec, args), name="variator", route_prefix="/", blocking=False)
        print(f"serving on http://{args.host}:{args.port} (ready in "
              f"{time.monotonic() - started:.0f} s): POST /v1/generate"
              + (", /v1/classify" if spec.task else "") + "; GET /healthz, /v1/models"
              + (f"; metrics on :{args.metrics_port}/metrics" if args.metrics_port else ""),
              flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping: draining requests in flight ...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", flush=True)
    return 0


def run() -> None:
    """The `variator-serve` console script: bad flags and files give one line, not a traceback."""
    from variator_jax import cli
    sys.exit(cli.run_main(main))


if __name__ == "__main__":
    run()
