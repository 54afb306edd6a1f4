"""host.keep_freed_memory: XLA:CPU temporaries over 32 MiB stop page-faulting on every call.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into
other tests, and the "before" case needs glibc's defaults."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, statistics, sys
import jax, jax.numpy as jnp
from variator_jax import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
    assert "no mmap" in host.malloc_setting()
medians = []
for cols in (6144, 12288):  # [2048, cols] float32 temporaries: 48 and 96 MiB.
    f = jax.jit(lambda x, w: jnp.sin(x @ w).sum(0))
    x, w = jnp.ones((2048, 64)), jnp.ones((64, cols))
    faults = []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The heap grows to its high-water mark over the first few calls, then stays.
    medians.append(statistics.median(faults[4:]))
print(*medians)
"""


def _faults_per_call(mode):
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return [float(v) for v in out.stdout.split()[-2:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_page_faults_on_large_temporaries():
    # 48 and 96 MiB = 12,288 and 24,576 pages of 4 KiB: by default they fault in on every call
    # (median per call over calls 5-12).
    default, keep = _faults_per_call("default"), _faults_per_call("keep")
    assert min(default) > 8000, default
    assert max(keep) < 500, keep
