"""Interleaved timing (variator_jax/timing.py) with named fns and several warm-up calls, as
the serving profile and the benchmarks use it. (Rotation and per-call means: test_evaluate.)"""
import numpy as np
import pytest

from variator_jax import timing


def test_interleaved_times_by_name_with_warmup():
    calls = []

    def fn(name):
        return lambda: calls.append(name)

    times = timing.interleaved_times({"x": fn("x"), ("k", 4): fn("k4"), "z": fn("z")}, rounds=3,
                                     warmup=2)
    assert list(times) == ["x", ("k", 4), "z"] and all(t.shape == (3,) for t in times.values())
    assert all(np.all(t >= 0) for t in times.values())
    warm = ["x", "k4", "z"] * 2
    assert calls[:9] == warm + ["x", "k4", "z"]  # Warm-up, then the first round as given.
    rounds = [tuple(calls[6 + 3 * r:9 + 3 * r]) for r in range(3)]
    assert all(sorted(r) == ["k4", "x", "z"] for r in rounds)  # Each fn once per round.
    calls.clear()
    timing.interleaved_times({"x": fn("x"), ("k", 4): fn("k4"), "z": fn("z")}, rounds=3,
                             warmup=2)
    assert calls[6:] == [name for r in rounds for name in r]  # The same seed, the same order.
    calls.clear()
    timing.interleaved_times({name: fn(name) for name in "abcd"}, rounds=12, warmup=0)
    follows = {(calls[i - 1], calls[i]) for i in range(1, len(calls)) if i % 4}
    assert len(follows) > 4  # A fixed rotation would give only a-b, b-c, c-d and d-a.
    calls.clear()
    timing.interleaved_times([fn("a")], rounds=1, warmup=0)
    assert calls == ["a"]  # No warm-up call.


HLO = """HloModule step
%body (p: (s32[], f32[6,8,4])) -> (s32[], f32[6,8,4]) {
  %dynamic-slice_bitcast_fusion.2 = f32[8,4]{1,0} fusion(%a, %i), kind=kLoop, calls=%f1
  %dynamic-slice_fusion = f32[2,16]{1,0} fusion(%b, %i), kind=kLoop, calls=%f2
  %ynn_fusion.1 = f32[2,4]{1,0} fusion(%x, %dynamic-slice_bitcast_fusion.2), kind=kCustom
  ROOT %bitcast_dynamic-update-slice_fusion = (f32[6,2,4]{2,1,0}, s32[]) fusion(%c), kind=kLoop
}
ENTRY %main (x: f32[2,8]) -> f32[2,4] {
  %wrapped_broadcast = f32[6,2,4]{2,1,0} fusion(%z), kind=kLoop, calls=%f3
  %while.3 = (s32[], f32[6,8,4]) while(%t), condition=%cond, body=%body
  %copy_bitcast_fusion.7 = f32[4,8]{1,0} fusion(%w), kind=kLoop, calls=%f4
  ROOT %add.1 = f32[2,4]{1,0} add(%p, %q)
}
"""


def test_op_breakdown_sums_instructions_by_kind_and_measures_overlap():
    assert timing.hlo_instructions(HLO)["while.3"] == ("while", "(s32[], f32[6,8,4])")
    assert timing.hlo_instructions(HLO)["bitcast_dynamic-update-slice_fusion"][0] == "fusion"
    # One layer's weight is [8, 2, 2]: its slice may come out as [8, 4] (or [16, 2], [4, 8]).
    shapes = timing.weight_shapes({"w": np.zeros((8, 2, 2))})
    assert {(8, 2, 2), (8, 4), (4, 8), (16, 2), (2, 16), (2, 2, 8)} == shapes

    def x(name, ts, dur):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur}
    # Two steps; microseconds. The while event encloses its body and is not counted; events
    # that name no instruction of the program (Python, runtime) are ignored.
    events = [x("ThunkExecutor::Execute", 0, 5000), x("while.3", 100, 900),
              x("dynamic-slice_bitcast_fusion.2", 100, 300),
              x("dynamic-slice_fusion", 200, 400),       # overlaps the first for 200 us
              x("ynn_fusion.1", 600, 400), x("bitcast_dynamic-update-slice_fusion", 1000, 100),
              x("wrapped_broadcast", 0, 100), x("copy_bitcast_fusion.7", 2000, 1000),
              x("add.1", 3000, 200), {"ph": "i", "name": "add.1", "ts": 0}]
    out = timing.op_breakdown(events, 2, HLO, shapes)
    ms = {k: round(v, 4) for k, v in out["kinds"].items()}
    # [2, 16] is a flattening of the weight too: only the shape decides, so both are weights.
    assert ms == {"dynamic-slice of a weight (per-layer read)": 0.35,
                  "copy / transpose": 0.5, "library fusions (matmuls, reductions)": 0.2,
                  "other": 0.1, "dynamic-update-slice (writes into stacked buffers)": 0.05,
                  "broadcast (buffer fills)": 0.05}
    assert list(out["kinds"])[0] == "copy / transpose"  # Largest first.
    # Busy: 0-1100 and 2000-3200 us = 2300 us; two at once 200-400 us; span 0-3200 us.
    assert (round(out["busy"], 4), round(out["overlap"], 4), round(out["span"], 4)) == (
        1.15, 0.1, 1.6)
    # Without the weight's shapes the [2, 16] and [8, 4] slices read activations.
    assert "dynamic-slice of activations (per-layer read)" in timing.op_breakdown(
        events, 2, HLO)["kinds"]
    with pytest.raises(ValueError, match="xprof_traceme"):
        timing.op_breakdown([x("ThunkExecutor::Execute", 0, 5)], 1, HLO)


PROFILED = """
import json, sys, tempfile
import jax, jax.numpy as jnp
from variator_jax import timing

def layers(ws, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

ws, x = jnp.ones((4, 64, 64)) / 64, jnp.ones((8, 64))
f = jax.jit(layers)
compiled = f.lower(ws, x).compile()
jax.block_until_ready(compiled(ws, x))
with tempfile.TemporaryDirectory() as tmp:
    events = timing.trace_events(timing.profile_steps(lambda: compiled(ws, x), 2, tmp))
out = timing.op_breakdown(events, 2, compiled.as_text(), timing.weight_shapes(ws[0]))
print(json.dumps(out))
"""


def test_profile_steps_of_a_real_scan_names_its_instructions():
    """XLA:CPU's per-instruction events match the compiled HLO's names: a scan over stacked
    weights shows its matmul and the per-layer weight slice XLA:CPU copies out."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_xprof_traceme=true", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", PROFILED], env=env, capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["kinds"]["library fusions (matmuls, reductions)"] > 0
    assert out["kinds"]["dynamic-slice of a weight (per-layer read)"] > 0
    assert 0 < out["busy"] <= out["span"] and out["overlap"] <= out["busy"]
