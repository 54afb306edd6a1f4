"""Adaptive serving: buckets, the policy on synthetic profiles, the compiled engine, the
discrete-event load simulation and its command line.

Claims about the policy are checked on analytic or hand-made profiles, so they hold on a noisy
shared machine; the engine is real (a tiny T5, every ratio x bucket compiled) and must never
compile while serving.
"""
import json

import jax
import numpy as np
import pytest

import variator_jax as vj
from benchmarks import serve
from tests.test_utils import tiny_t5
from variator_jax import serving
from variator_jax.serving import (
    OFF,
    AdaptivePolicy,
    Bucket,
    LatencyProfile,
    PolicyConfig,
    QueueState,
)

# d = 32, FFN 512 wide: the FFN dominates, as in real T5s, so FLOPs speedups are 1.6x-3.3x.
TINY = tiny_t5(vocab_size=64, d_kv=8, num_heads=4, d_ff=512, num_layers=1, num_decoder_layers=1,
               feed_forward_proj="relu", name="tiny-serving")
BUCKETS = (Bucket(2, 16), Bucket(8, 16), Bucket(8, 32))  # Few: each costs a compile per ratio.
QUALITY = [{"ratio": None, "quality": 1.0}, {"ratio": 2, "quality": 0.97},
           {"ratio": 4, "quality": 0.93}, {"ratio": 8, "quality": 0.85}]


@pytest.fixture(scope="module")
def engine():
    backbone = vj.init_t5(jax.random.key(0), TINY)
    plugins = {}
    for k in (2, 4, 8):
        pcfg = vj.PluginConfig(ratio=k, bottleneck=8)
        plugins[k] = (pcfg, vj.init_plugin(jax.random.key(k), TINY, pcfg))
    return serving.AdaptiveEngine(TINY, backbone, plugins, BUCKETS)


def hand_profile():
    """Per batch of 8 (of 1): off 10 (4) ms, k=2 7 (3), k=4 5 (2.5), k=8 4 (2); length 32."""
    table = {1: (4, 10), 2: (3, 7), 4: (2.5, 5), 8: (2, 4)}
    return LatencyProfile({(r, Bucket(b, 32)): ms[i] / 1e3 for r, ms in table.items()
                           for i, b in enumerate((1, 8))}, source="hand")


def queue(depth, waited=0.0, rate=0.0, length=32, now=1.0):
    return QueueState(now, np.full(depth, now - waited), np.full(depth, length), rate)


# -- Buckets ------------------------------------------------------------------------------------
def test_smallest_bucket_that_fits_and_chunks():
    buckets = serving.bucket_grid((1, 4, 16), (32, 64))
    assert serving.pick_bucket(buckets, 1, 10) == Bucket(1, 32)
    assert serving.pick_bucket(buckets, 3, 33) == Bucket(4, 64)
    assert serving.pick_bucket(buckets, 5, 32) == Bucket(16, 32)
    assert serving.plan_chunks(buckets, 35, 40) == [(16, Bucket(16, 64)), (16, Bucket(16, 64)),
                                                    (3, Bucket(4, 64))]
    with pytest.raises(ValueError, match="truncate"):
        serving.pick_bucket(buckets, 1, 65)


# -- Policy on synthetic profiles ---------------------------------------------------------------
@pytest.mark.parametrize("depth, expected", [
    (1, 1), (24, 1),  # Drains in 4 / 30 ms uncompressed: within the 30 ms budget.
    (32, 2),          # Four batches: off 40 ms, k=2 28 ms.
    (40, 4),          # Five: k=2 35, k=4 25.
    (56, 8),          # Seven: k=4 35, k=8 28.
])
def test_policy_picks_least_compression_by_queue_depth(depth, expected):
    policy = AdaptivePolicy(hand_profile(), PolicyConfig(budget_s=0.0301, margin=0.0))
    decision = policy.choose(queue(depth))
    assert ((decision.ratio, decision.meets_budget, decision.batch)
            == (expected, True, min(depth, 8)))
    assert decision.predicted_s <= 0.0301 + 1e-12


def test_policy_respects_allowed_ratios_margin_and_arrival_rate():
    profile = hand_profile()
    only_1_4 = AdaptivePolicy(profile, PolicyConfig(0.0301, ratios=(1, 4), margin=0))
    assert only_1_4.choose(queue(32)).ratio == 4
    # A 25 % margin turns off's 30 ms for 24 requests into 37.5 ms; k=2: 21 * 1.25 = 26.25.
    assert AdaptivePolicy(profile, PolicyConfig(0.0301, margin=0.25)).choose(queue(24)).ratio == 2
    # One request waiting, but the arrival rate decides: per request, full batches take
    # 1.25 / 0.875 / 0.625 / 0.5 ms; at most 90 % busy.
    policy = AdaptivePolicy(profile, PolicyConfig(0.0301, margin=0.0))
    chosen = {rate: policy.choose(queue(1, rate=rate)) for rate in (700, 1000, 1500, 2000)}
    assert [chosen[r].ratio for r in (700, 1000, 1500, 2000)] == [1, 2, 8, 8]
    assert [chosen[r].meets_budget for r in (700, 1000, 1500, 2000)] == [True, True, True, False]


def test_policy_falls_back_to_most_compression():
    policy = AdaptivePolicy(hand_profile(),
                            PolicyConfig(budget_s=0.0301, ratios=(1, 2, 4), margin=0))
    late = policy.choose(queue(4, waited=0.031))  # Everyone already over budget.
    assert (late.ratio, late.meets_budget) == (4, False)
    # 80 requests: at k=4 only the first 6 batches (30 ms) can make it; they do at k=4 only.
    deep = policy.choose(queue(80))
    assert (deep.ratio, deep.meets_budget) == (4, True)


def drain_by_hand(profile, ratio, q, max_batch, margin):
    """Independent reference: each request's latency when all batches run at `ratio`."""
    t, out = q.now, []
    for start in range(0, q.depth, max_batch):
        rows = q.lengths[start:start + max_batch]
        b = serving.pick_bucket(profile.buckets, len(rows), int(rows.max()))
        t += (1 + margin) * profile.seconds[ratio, b]
        out += [t - a for a in q.arrivals[start:start + max_batch]]
    return np.array(out)


def test_policy_never_exceeds_budget_when_a_ratio_could_meet_it():
    profile = LatencyProfile.from_flops(TINY, (1, 2, 4, 8),
                                        serving.bucket_grid((1, 4, 8), (16, 32)),
                                        flops_per_s=2e9, overhead_s=2e-4, bottleneck=8)
    rng = np.random.default_rng(0)
    met = fell_back = 0
    for _ in range(300):
        budget, margin = rng.uniform(0.005, 0.05), rng.choice([0.0, 0.1, 0.3])
        policy = AdaptivePolicy(profile, PolicyConfig(budget, margin=margin))
        depth = int(rng.integers(1, 60))
        q = QueueState(1.0, np.sort(1.0 - rng.uniform(0, budget, depth)),
                       rng.integers(1, 33, depth), 0.0)
        lat = {r: drain_by_hand(profile, r, q, 8, margin) for r in policy.ratios}
        savable = lat[8] <= budget
        feasible = [r for r in policy.ratios if savable.any() and lat[r][savable].max() <= budget]
        d = policy.choose(q)
        if feasible:
            met += 1
            assert d.ratio == feasible[0] and d.meets_budget
            assert lat[d.ratio][savable].max() <= budget
        else:
            fell_back += 1
            assert d.ratio == 8 and not d.meets_budget
    assert met > 50 and fell_back > 20  # Both branches were exercised.


def test_batches_the_policy_calls_on_time_are_on_time():
    """End to end on the simulator: a request that could still make its deadline when its batch
    started (at the most compression) makes it whenever the policy said the batch meets it."""
    profile = LatencyProfile.from_flops(TINY, (1, 2, 4, 8), BUCKETS, flops_per_s=2e9, bottleneck=8,
                                        overhead_s=2e-4)
    t0 = profile.latency(OFF, 8, 32)
    budget, margin = 3 * t0, 0.1
    policy = AdaptivePolicy(profile, PolicyConfig(budget, margin=margin))
    server = serving.AdaptiveServer(policy)
    trace = serve.make_trace(serve.DEFAULT_PHASES, unit_rate=8, unit_time=t0, min_len=4,
                             max_len=32, vocab_size=64, seed=1)
    batches, now, i, n = [], 0.0, 0, len(trace.arrivals)
    while i < n or server.queue:  # The simulator's loop, keeping the batches.
        now = now if server.queue else max(now, trace.arrivals[i])
        while i < n and trace.arrivals[i] <= now:
            server.submit(i, trace.tokens[i], trace.arrivals[i])
            i += 1
        batch = server.dispatch(now)
        batches.append(batch)
        now += batch.service_s
    checked = 0
    for b in batches:
        fastest = profile.seconds[8, b.bucket] * (1 + margin)
        for r in b.requests:
            if b.decision.meets_budget and b.start + fastest - r.arrival <= budget:
                assert b.start + b.service_s - r.arrival <= budget
                checked += 1
    assert checked > 0.9 * n
    assert {b.ratio for b in batches} == {1, 2, 4, 8}


# -- Profiles and quality -----------------------------------------------------------------------
def test_profile_from_flops_monotone_and_round_trip():
    profile = LatencyProfile.from_flops(TINY, (1, 2, 4, 8), BUCKETS, flops_per_s=1e9, bottleneck=8)
    big = Bucket(8, 32)
    assert [profile.seconds[r, big] for r in (1, 2, 4, 8)] == sorted(
        (profile.seconds[r, big] for r in (1, 2, 4, 8)), reverse=True)
    assert profile.capacity(8, 32) / profile.capacity(OFF, 32) > 3
    round_trip = LatencyProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert round_trip.seconds == profile.seconds
    # A noisy small bucket measured slower than the big one that contains it is capped.
    noisy = dict(profile.seconds)
    noisy[1, Bucket(2, 16)] = 1.0
    fixed = LatencyProfile(noisy).monotone().seconds
    assert fixed[1, Bucket(2, 16)] == profile.seconds[1, Bucket(8, 16)]


def test_load_quality_is_tolerant(tmp_path):
    assert serving.load_quality(QUALITY) == {1: 1.0, 2: 0.97, 4: 0.93, 8: 0.85}
    nested = {"task": "sst2", "results": [
        {"name": "teacher", "metrics": {"accuracy": 0.9}},
        {"ratio": 0, "metrics": {"accuracy": 0.92}},
        {"plugin": "k4/a", "ratio": 4, "metrics": {"accuracy": 0.8, "f1": 0.1}},
        {"plugin": "k4/b", "ratio": "4", "metrics": {"accuracy": 0.9}},
        {"ratio": 8, "loss": 3.0}]}  # No quality number: skipped.
    path = tmp_path / "results.json"
    path.write_text(json.dumps(nested))
    assert serving.load_quality(str(path)) == pytest.approx({1: 0.91, 4: 0.85})
    assert serving.load_quality(nested, key="f1") == {4: 0.1}
    by_name = {"teacher": {"ratio": None, "agreement": 1.0}, "k2": {"k": 2, "agreement": 0.5}}
    assert serving.load_quality(by_name) == {1: 1.0, 2: 0.5}
    with pytest.raises(ValueError, match="no entry"):
        serving.load_quality([{"ratio": 4}])


# -- The compiled engine ------------------------------------------------------------------------
def test_engine_matches_encode_and_switches_without_compiling(engine):
    assert engine.compile_count > 0 and engine.compiled == 4 * len(BUCKETS)
    rng = np.random.default_rng(0)
    lengths = np.array([5, 29, 17])  # Padded into the 8 x 32 bucket.
    mask = (np.arange(29)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(2, 64, (3, 29)), 0).astype(np.int32)
    want = {r: np.asarray(vj.encode(TINY, engine.backbone, ids, mask, engine.plugins[r]))
            for r in engine.ratios}
    with serving.CompileCounter() as counter:
        for r in (8, 1, 4, 2, 1, 8):  # Switch back and forth.
            got = engine.run(r, ids, mask)
            assert got.shape == (3, 29, TINY.d_model)
            np.testing.assert_allclose(got * mask[..., None], want[r] * mask[..., None], atol=2e-5)
        assert engine.run(4, ids[:1, :5]).shape == (1, 5, 32)  # A 2 x 16 bucket.
        assert engine.run(2, np.ones((19, 8), np.int32)).shape == (19, 8, 32)  # Three chunks.
    assert counter.count == 0
    assert not np.allclose(want[1], want[8])  # The plugins do change the output.


def test_engine_guard_catches_compilation_on_the_request_path(engine):
    key = (4, Bucket(2, 16))
    compiled = engine._executables[key]
    engine._executables[key] = lambda *args: jax.jit(lambda x: x * 3)(args[2])  # Fresh trace.
    try:
        with pytest.raises(serving.CompiledOnRequestPath):
            engine.run(4, np.ones((1, 4), np.int32))
    finally:
        engine._executables[key] = compiled
    with pytest.raises(ValueError, match="not compiled"):
        engine.run(3, np.ones((1, 4), np.int32))


def test_engine_swaps_a_plugin_of_the_same_ratio_without_compiling(engine):
    ids = np.arange(2, 14, dtype=np.int32)[None]
    original = engine.plugins[4]
    other = vj.init_plugin(jax.random.key(99), TINY, original[0])
    try:
        with serving.CompileCounter() as counter:
            before = engine.run(4, ids)
            engine.set_plugin(4, (original[0], other))
            after = engine.run(4, ids)
        assert counter.count == 0 and not np.allclose(before, after)
    finally:
        engine.set_plugin(4, original)
    with pytest.raises(ValueError, match="differs"):
        engine.set_plugin(4, (vj.PluginConfig(ratio=4, bottleneck=8, mask_aware=False), other))


def test_measured_profile_and_teacher_agreement(engine):
    with serving.CompileCounter() as counter:
        profile = LatencyProfile.measure(engine, repeats=2)
        agreement = engine.teacher_agreement(batches=1)
    assert counter.count == 0
    assert set(profile.seconds) == {(r, b) for r in (1, 2, 4, 8) for b in BUCKETS}
    for r in profile.ratios:  # monotone(): a bucket is never slower than one containing it.
        assert profile.seconds[r, Bucket(2, 16)] <= profile.seconds[r, Bucket(8, 32)]
    assert agreement[OFF] == pytest.approx(1.0)
    assert all(0 < agreement[r] < 1 for r in (2, 4, 8))


def test_simulation_on_tiny_model(engine, capsys):
    """Adaptive keeps the budget during bursts as k=4 does, and keeps more quality.

    Service times come from the analytic profile (deterministic on any machine); every
    adaptive batch really runs on the compiled engine, which must not compile.
    """
    profile = LatencyProfile.from_flops(TINY, engine.ratios, BUCKETS, flops_per_s=2e9, bottleneck=8,
                                        overhead_s=2e-4)
    phases = serve.parse_phases("steady:40:0.5,burst:25:1.6,steady:30:0.5,ramp:40:0.4-1.4")
    with serving.CompileCounter() as counter:
        result = serve.run(profile, serving.load_quality(QUALITY), engine=engine, phases=phases,
                           budget_x=4, vocab_size=TINY.vocab_size, seed=0)
    assert counter.count == 0
    table = capsys.readouterr().out
    assert "| always off |" in table and "| always k=4 |" in table and "| adaptive |" in table
    off, k4, ada = (result["rows"][name] for name in ("always off", "always k=4", "adaptive"))
    assert ada["within_budget"] >= off["within_budget"] + 0.2  # Off drowns in the burst ...
    assert ada["within_budget"] >= 0.97
    assert ada["quality"] > k4["quality"] + 0.02  # ... k=4 pays quality all the time.
    # Because of the policy: uncompressed while load is light, compressed in the burst.
    assert ada["by_phase"][0]["quality"] > 0.99 and ada["by_phase"][1]["quality"] < 0.95
    assert off["by_phase"][1]["within_budget"] < 0.5
    assert all(b["wall_s"] is not None for b in result["sims"]["adaptive"]["batches"])


def test_benchmark_command_line_writes_outputs(engine, tmp_path, capsys, monkeypatch):
    # The fixture's bank instead of a fresh tiny model: initialising one costs seconds.
    bank = (TINY, engine.backbone, {k: p for k, p in engine.plugins.items() if k != OFF})
    monkeypatch.setattr(serve, "build_bank", lambda args: bank)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(QUALITY))
    out = tmp_path / "serve"
    serve.main(["--no-execute", "--flops-per-s", "2e9", "--results", str(results),
                "--bottleneck", "8", "--batch-sizes", "2,8", "--lengths", "32",
                "--phases", "steady:20:0.5,burst:10:1.6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| adaptive |" in printed and "compilations while serving: 0" in printed
    summary = json.loads((out / "serve.json").read_text())
    assert set(summary["policies"]) == {"always off", "always k=4", "adaptive"}
    assert summary["quality"] == {"1": 1.0, "2": 0.97, "4": 0.93, "8": 0.85}
    assert (out / "serve.png").stat().st_size > 10_000
    assert "| adaptive |" in (out / "serve.md").read_text()
