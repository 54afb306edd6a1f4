"""Load test of `variator-serve` over HTTP: bursty traces, three policies, every answer scored.

    python -m benchmarks.serve_load                       # starts the server on make demo's model
    python -m benchmarks.serve_load --url http://127.0.0.1:8000   # a server already running
    python -m benchmarks.serve_load --random-variant t5-base      # where the model takes the time

Every request is one or more examples of the task's test split sent to POST /v1/classify, so
what is served is scored. The arrival trace is open-loop Poisson in machine-independent units,
as the simulation's (`variator_jax/simulation.py`): rates in units of C1, the uncompressed
capacity: by default the inputs/s the server answers through HTTP at ratio 1, measured just
before (`--units profile`: full batches of the largest bucket by the start-up profile, which
overstates it where HTTP handling shares the host with the model), the durations of its phases
shares of `--seconds`, the wall-clock length of the trace. The same trace is sent once per
policy, pinned by the request's "ratio" (always uncompressed, always k = 4) or left to the
server (adaptive), and then an overload trace (a burst of 3 x C1) against the adaptive server,
which must shed the excess with 503.

Reported per policy: answered inputs/s, p50/p95/p99 latency (arrival to answer, as the client
sees it), the share of requests answered within the server's latency budget (a shed or failed
request is not), accuracy of the answers, the ratio mix and the ratio over time, 503s,
failures, the server's compilations during the run (from /healthz; must be 0), and the model
slowdown: how much slower than its start-up profile the server measured its batches while
serving (`Bank.calibrate`, from /v1/models). A probe of sequential single requests at idle
gives the server's overhead, latency beyond the model time the server reports, beside Ray
Serve's own round trip (GET /healthz, no model).
Results: `benchmarks/results/serve-load-<machine>.{json,md,png}`.
Bounded: every phase has a fixed length, requests time out after `--timeout` seconds, and at
most `--max-outstanding` are in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

from variator_jax.simulation import Phase, parse_phases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Steady, a burst, steady, ramp up and down: the simulation's shape. The burst is 1.8 x C1, or
# less where the most compressed plugin cannot carry that (`trace`).
BURST = 1.8


def trace(burst: float) -> tuple[Phase, ...]:
    peak = min(1.4, burst)
    return (Phase("steady", 60, 0.5, 0.5), Phase("burst", 60, burst, burst),
            Phase("steady", 60, 0.5, 0.5), Phase("ramp up", 50, 0.4, peak),
            Phase("ramp down", 50, peak, 0.4))



OVERLOAD = (Phase("steady", 30, 0.5, 0.5), Phase("burst 3x", 60, 3.0, 3.0),
            Phase("steady", 40, 0.5, 0.5))


# -- The server -----------------------------------------------------------------------------------
def _get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def start_server(args) -> subprocess.Popen:
    """`variator-serve` on the given files, returned once it answers /healthz."""
    port = args.url.rsplit(":", 1)[1].rstrip("/")
    cmd = [sys.executable, "-m", "variator_jax.serve_app", "--backbone", args.backbone,
           "--plugins", args.plugins, "--task", args.task, "--port", port,
           "--lengths", args.lengths, "--batch-sizes", args.batch_sizes, "--truncate",
           "--profile-repeats", str(args.profile_repeats)]
    log = open(os.path.join(args.workdir, "serve-load-server.log"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"variator-serve exited with {proc.returncode}; see {log.name}")
        try:
            _get(f"{args.url}/healthz", timeout=2)
            return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"variator-serve did not answer within {args.start_timeout} s")


def stop_server(proc: subprocess.Popen) -> float:
    """SIGTERM, as an operator stops it; -> seconds until it exited."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    return time.monotonic() - start


# -- The trace and its requests -------------------------------------------------------------------
@dataclasses.dataclass
class Load:
    """What every policy is sent: examples, their labels, and the machine's units."""
    texts: list[str]
    labels: list[str]
    t0: float  # Seconds of one uncompressed batch of the largest bucket.
    c1: float  # Inputs per second at full uncompressed batches.
    budget_s: float
    most: float = 1.0  # The most compressed ratio's capacity, x C1 (from the same profile).


def load_units(models: dict, texts: list[str], labels: list[str]) -> Load:
    """T0 and C1 from the server's measured classify profile; the budget is the server's."""
    profile = {(e["ratio"], e["batch"], e["length"]): e["seconds"]
               for e in models["profiles"]["classify"]["entries"]}
    batch = models["max_batch"]
    length = max(e["length"] for e in models["buckets"])
    t0 = profile[1, batch, length]
    most = t0 / profile[max(models["ratios"]), batch, length]
    return Load(texts, labels, t0, batch / t0, models["budget_ms"]["classify"] / 1e3, most)


def arrivals(phases, load: Load, per_request: int, seconds: float, seed: int):
    """Open-loop Poisson arrival times [N] (s) and phase index [N]: rates in units of C1,
    phase durations as shares of `seconds`."""
    from variator_jax.simulation import make_trace
    unit = seconds / sum(p.duration for p in phases)  # Seconds per unit of phase duration.
    trace = make_trace(phases, unit_rate=load.c1 / per_request * unit, unit_time=unit,
                       min_len=1, max_len=1, vocab_size=3, seed=seed)
    return trace.arrivals, trace.phase


async def drive(session, url: str, load: Load, times, ratio: int | None, per_request: int,
                timeout: float, max_outstanding: int, seed: int) -> list[dict]:
    """Sends one request per arrival time (open loop), returns one record per request."""
    import aiohttp
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(load.texts), (len(times), per_request))
    gate = asyncio.Semaphore(max_outstanding)
    start = time.monotonic() + 0.5

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, start + times[i] - time.monotonic()))
        body = {"inputs": [load.texts[j] for j in picks[i]], **({"ratio": ratio} if ratio else {})}
        record = dict(t=float(times[i]), status=0, latency=None)
        if gate.locked():  # The client's own bound: counted as shed, never queued unboundedly.
            record["status"] = -1
            return record
        async with gate:
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/v1/classify", json=body,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    text = await r.text()
                    record.update(status=r.status, retry_after=r.headers.get("Retry-After"))
                    out = json.loads(text) if r.status == 200 else {"error": text[:200]}
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                record.update(status=-2, error=type(e).__name__)
                return record
            # Latency from the scheduled arrival: a client that fell behind counts against it.
            record["latency"] = time.monotonic() - (start + times[i])
            record["client_lag"] = sent - (start + times[i])
            if record["status"] != 200:
                record["error"] = str(out.get("error", out))[:200]
        if record["status"] == 200:
            gold = [load.labels[j] for j in picks[i]]
            record.update(ratio=out["ratio"], ratios=out["ratios"],
                          correct=sum(a == b for a, b in zip(out["labels"], gold, strict=True)),
                          inputs=per_request, queue_ms=out["queue_ms"],
                          compute_ms=out["compute_ms"])
        return record

    return await asyncio.gather(*(one(i) for i in range(len(times))))


def summarize(records: list[dict], phase: np.ndarray, phases, budget_s: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    span = max((r["t"] + r["latency"] for r in ok), default=1.0) - min(r["t"] for r in records)
    within = np.array([r["status"] == 200 and r["latency"] <= budget_s for r in records])
    inputs = sum(r["inputs"] for r in ok)
    ratios = [k for r in ok for k in r["ratios"]]
    row = {f"p{q}_ms": float(np.percentile(lat, q) * 1e3) for q in (50, 95, 99)}
    row.update(requests=len(records), answered=len(ok),
               shed_503=sum(r["status"] == 503 for r in records),
               shed_client=sum(r["status"] == -1 for r in records),
               failed=sum(r["status"] not in (200, 503, -1) for r in records),
               retry_after=sorted({r.get("retry_after") for r in records
                                   if r["status"] == 503} - {None}),
               within_budget=float(within.mean()), throughput_inputs_s=inputs / span,
               accuracy=sum(r["correct"] for r in ok) / max(inputs, 1),
               mix={str(k): ratios.count(k) / max(len(ratios), 1) for k in sorted(set(ratios))},
               by_phase={p.name + f" ({p.start:g}" + (f"-{p.end:g}" if p.end != p.start else "")
                         + "x)": float(within[phase == i].mean())
                         for i, p in enumerate(phases) if (phase == i).any()})
    return row


async def capacity_probe(session, url: str, load: Load, per_request: int, seconds: float,
                         clients: int = 3, ratio: int = 1) -> float:
    """Inputs/s the server answers through HTTP at `ratio` (1: uncompressed), closed loop:
    `clients` send requests back to back for `seconds`. Where HTTP handling shares the host
    with the model, this is less than the profile's figure, and compression gains less
    through HTTP than in the profile: HTTP's share of the work does not shrink with k."""
    deadline, answered = time.monotonic() + seconds, [0]
    start = time.monotonic()

    async def client(c: int):
        i = c
        while time.monotonic() < deadline:
            j = (i * per_request) % max(1, len(load.texts) - per_request)
            body = {"inputs": load.texts[j:j + per_request], "ratio": ratio}
            async with session.post(f"{url}/v1/classify", json=body) as r:
                await r.read()
                if r.status == 200:
                    answered[0] += per_request
            i += clients

    await asyncio.gather(*(client(c) for c in range(clients)))
    return answered[0] / (time.monotonic() - start)


async def overhead_probe(session, url: str, load: Load, n: int) -> dict:
    """Sequential single-input requests at idle: client latency vs the model time reported;
    and Ray Serve's own round trip, GET /healthz (no model, no batching), as its floor."""
    floor = []
    for _ in range(n):
        sent = time.monotonic()
        async with session.get(f"{url}/healthz") as r:
            await r.read()
        floor.append((time.monotonic() - sent) * 1e3)
    rows = []
    for i in range(n):
        sent = time.monotonic()
        async with session.post(f"{url}/v1/classify",
                                json={"inputs": [load.texts[i % len(load.texts)]]}) as r:
            out = await r.json()
        rows.append(((time.monotonic() - sent) * 1e3, out["compute_ms"], out["queue_ms"]))
    total, compute, queue = map(np.median, zip(*rows, strict=True))
    return dict(requests=n, latency_ms=float(total), compute_ms=float(compute),
                queue_ms=float(queue), overhead_ms=float(total - compute),
                overhead_share=float((total - compute) / compute),
                healthz_ms=float(np.median(floor)))


# -- Report ---------------------------------------------------------------------------------------
def table(rows: dict) -> str:
    from variator_jax.report import markdown_table
    body = [[name, r["requests"], f"{r['throughput_inputs_s']:.0f}", f"{r['p50_ms']:.0f}",
             f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{100 * r['within_budget']:.1f} %",
             f"{100 * r['accuracy']:.1f} %",
             " / ".join(f"k={k} {100 * v:.0f} %" for k, v in r["mix"].items()),
             r["shed_503"], r["failed"], f"{r.get('slowdown', float('nan')):.2f}x"]
            for name, r in rows.items()]
    return markdown_table(["policy", "requests", "inputs/s", "p50 ms", "p95 ms", "p99 ms",
                           "within budget", "accuracy", "ratio mix", "503", "failed",
                           "model slowdown"], body, align="lrrrrrrrlrrr")


def plot(runs: dict, budget_s: float, path: str) -> None:
    """One panel per policy: every request's latency over time, and the ratio it ran at."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True)
    for ax, (name, records) in zip(np.atleast_1d(axes), runs.items(), strict=True):
        ok = [r for r in records if r["status"] == 200]
        shed = [r["t"] for r in records if r["status"] != 200]
        ax.scatter([r["t"] for r in ok], [r["latency"] * 1e3 for r in ok], s=3, alpha=0.5)
        if shed:
            ax.scatter(shed, np.full(len(shed), budget_s * 1e3), marker="x", s=8, color="red",
                       label=f"shed / failed ({len(shed)})")
            ax.legend(loc="upper left", fontsize=8)
        ax.axhline(budget_s * 1e3, ls="--", color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        ax.set_title(name, fontsize=9, loc="left")
        k = ax.twinx()
        k.step([r["t"] for r in ok], [r["ratio"] for r in ok], where="post", color="orange",
               lw=0.8)
        k.set_ylabel("k", color="orange")
        k.set_ylim(0, 9)
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- Command line ---------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback)")
    p.add_argument("--start", action=argparse.BooleanOptionalAction, default=None,
                   help="start variator-serve for the run (default: when none answers --url)")
    p.add_argument("--backbone", default="demo_workdir/finetune/backbone")
    p.add_argument("--plugins", default="demo_workdir/adapt-k4/plugin")
    p.add_argument("--task", default="stdlib_docs")
    p.add_argument("--random-variant", default="", help="serve a random backbone at these "
                   "widths (e.g. t5-base; 4 encoder layers, --backbone's tokenizer) with random "
                   "k = 4 and 8 plugins instead of --backbone/--plugins: a size where the model "
                   "takes the time; accuracy is chance")
    p.add_argument("--data", default="builtin:stdlib_docs", help="where the test split is")
    p.add_argument("--test-split", default="test")
    p.add_argument("--lengths", default="32,64", help="buckets of a server started here")
    p.add_argument("--batch-sizes", default="1,4,16", help="buckets of a server started here")
    p.add_argument("--per-request", type=int, default=16, help="examples per request (a "
                   "client's batch: HTTP costs CPU per request, which a 2-core host shares with "
                   "the model)")
    p.add_argument("--seconds", type=float, default=40.0, help="wall-clock length of a trace")
    p.add_argument("--phases", help="name:duration:rate[-end],... (x C1); default: steady, "
                   "a burst of 1.8 (or 0.85 x what the most compressed plugin carries, if less), "
                   "steady, ramp")
    p.add_argument("--fixed", default="1,4", help="the pinned-ratio baselines")
    p.add_argument("--units", choices=("measured", "profile"), default="measured",
                   help="C1, the unit of load: the uncompressed inputs/s measured through HTTP "
                   "before the traces (default), or the start-up profile's (the model alone)")
    p.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    p.add_argument("--max-outstanding", type=int, default=256)
    p.add_argument("--probe", type=int, default=50, help="sequential requests of the probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="workdir", help="the started server's log")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="", help="results file stem (default serve-load-MACHINE)")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--profile-repeats", type=int, default=9, help="a started server's timed "
                   "runs per (ratio, bucket): its profile sets the burst and the policy")
    args = p.parse_args(argv)
    if args.per_request < 1 or args.seconds <= 0 or args.max_outstanding < 1:
        raise ValueError("--per-request and --max-outstanding must be >= 1, --seconds > 0")
    return args


def _answers(url: str) -> bool:
    try:
        _get(f"{url}/healthz", timeout=2)
        return True
    except OSError:
        return False


def _slowdown(url: str) -> float:
    """The server's measured / profiled batch time (a moving average, `Bank.calibrate`): how
    much slower the model ran while sharing the host with HTTP handling and the clients."""
    return float(_get(f"{url}/v1/models")["slowdown"]["classify"])


async def run_all(args, load: Load, models: dict) -> dict:
    import aiohttp
    rows, runs = {}, {}
    connector = aiohttp.TCPConnector(limit=args.max_outstanding)
    async with aiohttp.ClientSession(connector=connector) as session:
        probe = await overhead_probe(session, args.url, load, args.probe)
        measured = await capacity_probe(session, args.url, load, args.per_request, 6.0)
        print(f"uncompressed capacity through HTTP: {measured:.0f} inputs/s "
              f"({measured / load.c1:.2f} x the profile's C1)", flush=True)
        most_ratio = max(models["ratios"])
        most = await capacity_probe(session, args.url, load, args.per_request, 6.0,
                                    ratio=most_ratio)
        print(f"k = {most_ratio} through HTTP: {most:.0f} inputs/s ({most / measured:.2f} x "
              f"the uncompressed; the profile says {load.most:.2f} x)", flush=True)
        if args.units == "measured":  # Load in units of what the server really carries.
            load = dataclasses.replace(load, c1=measured, most=most / measured)
        # A burst the most compressed plugin can carry (15 % to spare), at most 1.8 x C1; the
        # ramp peaks at 1.4 x C1, or at the burst if that is less.
        if args.phases:  # Given: the burst is their highest rate.
            phases = parse_phases(args.phases)
            burst = max(max(p.start, p.end) for p in phases)
        else:
            burst = round(min(BURST, 0.85 * load.most), 2)
            phases = trace(burst)
        times, phase = arrivals(phases, load, args.per_request, args.seconds, args.seed)
        over_t, over_phase = arrivals(OVERLOAD, load, args.per_request, args.seconds * 0.6,
                                      args.seed + 1)
        print(f"idle probe: latency {probe['latency_ms']:.1f} ms, model {probe['compute_ms']:.1f} "
              f"ms, overhead {probe['overhead_ms']:.1f} ms ({100 * probe['overhead_share']:.0f} "
              f"% of the model time; Ray Serve's round trip alone, GET /healthz: "
              f"{probe['healthz_ms']:.1f} ms)", flush=True)
        compiles_before = _get(f"{args.url}/healthz")["compiles_since_start"]
        policies = [(f"always k={k}" if k != 1 else "always off", k)
                    for k in (int(x) for x in args.fixed.split(",") if x)]
        for name, ratio in [*policies, ("adaptive", None)]:
            print(f"{name}: {len(times)} requests over {times.max():.0f} s ...", flush=True)
            runs[name] = await drive(session, args.url, load, times, ratio, args.per_request,
                                     args.timeout, args.max_outstanding, args.seed)
            rows[name] = summarize(runs[name], phase, phases, load.budget_s)
            rows[name]["slowdown"] = _slowdown(args.url)
        name = "adaptive, 3x burst"
        print(f"{name}: {len(over_t)} requests over {over_t.max():.0f} s ...", flush=True)
        runs[name] = await drive(session, args.url, load, over_t, None, args.per_request,
                                 args.timeout, args.max_outstanding, args.seed + 1)
        rows[name] = summarize(runs[name], over_phase, OVERLOAD, load.budget_s)
        rows[name]["slowdown"] = _slowdown(args.url)
        compiles = _get(f"{args.url}/healthz")["compiles_since_start"] - compiles_before
    return dict(rows=rows, runs=runs, probe=probe, compiles_while_serving=compiles,
                c1_measured_inputs_s=measured, most_measured_inputs_s=most, burst=burst,
                units=args.units, c1_used_inputs_s=load.c1,
                phases=[dataclasses.asdict(p) for p in phases],
                overload_phases=[dataclasses.asdict(p) for p in OVERLOAD])


def main(argv=None) -> dict:
    args = parse_args(argv)
    from benchmarks import speed
    from variator_jax import data as data_lib
    task = data_lib.get_task(args.task)
    examples = data_lib.read_source(args.data, args.test_split)
    texts = [e["text"] for e in examples]
    labels = [task.labels[task.label_index(e)] for e in examples]
    os.makedirs(args.workdir, exist_ok=True)
    if args.random_variant:
        from benchmarks.models import random_models
        args.backbone, plugins = random_models(
            args.random_variant, os.path.join(args.workdir, f"serve-load-{args.random_variant}"),
            tokenizer_from=args.backbone)
        args.plugins = ",".join(plugins.values())
    start = args.start if args.start is not None else not _answers(args.url)
    proc = start_server(args) if start else None
    try:
        models = _get(f"{args.url}/v1/models")
        load = load_units(models, texts, labels)
        print(f"{len(texts)} test examples of {args.task}, {args.per_request} per request; "
              f"T0 {load.t0 * 1e3:.1f} ms, C1 {load.c1:.0f} inputs/s, budget "
              f"{load.budget_s * 1e3:.0f} ms; ratios {models['ratios']}, the most compressed "
              f"carrying {load.most:.2f} x C1 by the profile", flush=True)
        result = asyncio.run(run_all(args, load, models))
    finally:
        stop_s = stop_server(proc) if proc else None
    info = speed.machine_info(None)
    result.update(machine=info, server=models, t0_s=load.t0, c1_inputs_s=load.c1,
                  budget_s=load.budget_s, per_request=args.per_request, args=vars(args),
                  sigterm_stop_s=stop_s)
    text = table(result["rows"])
    print(f"\n{text}\n\ncompilations while serving: {result['compiles_while_serving']}")
    stem = os.path.join(args.out, args.name or f"serve-load-{speed.machine_slug(info)}")
    os.makedirs(args.out, exist_ok=True)
    plot(result["runs"], load.budget_s, stem + ".png")
    runs = result.pop("runs")
    result["requests"] = {name: records for name, records in runs.items()}
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(f"# variator-serve under load ({info['cpu']}, {info['cores']} cores, "
                f"{info['date']})\n\nT0 {load.t0 * 1e3:.1f} ms, "
                f"profiled C1 {load.c1:.0f} inputs/s, "
                f"measured through HTTP {result['c1_measured_inputs_s']:.0f} inputs/s (load in "
                f"units of the {result['units']} one; k = {max(models['ratios'])} through HTTP "
                f"{result['most_measured_inputs_s']:.0f} inputs/s; burst {result['burst']} x), "
                f"budget {load.budget_s * 1e3:.0f} ms, {args.per_request} inputs per request; "
                f"idle overhead {result['probe']['overhead_ms']:.1f} ms on "
                f"{result['probe']['compute_ms']:.1f} ms of model time (Ray Serve's own round "
                f"trip, GET /healthz: {result['probe']['healthz_ms']:.1f} ms).\n\n{text}\n\n"
                f"Compilations while serving: {result['compiles_while_serving']}.\n")
    print(f"wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    from variator_jax import cli
    cli.run_main(main)
