"""Interleaved timing (variator_jax/timing.py) with named fns and several warm-up calls, as
the serving profile and the benchmarks use it. (Rotation and per-call means: test_evaluate.)"""
import numpy as np

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
    # Each round starts one later: x k4 z, k4 z x, z x k4.
    assert calls == warm + ["x", "k4", "z", "k4", "z", "x", "z", "x", "k4"]
    calls.clear()
    timing.interleaved_times([fn("a")], rounds=1, warmup=0)
    assert calls == ["a"]  # No warm-up call.
