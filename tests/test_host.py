"""host.keep_freed_memory: XLA:CPU temporaries over 32 MiB stop page-faulting on every call.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into
other tests, and the "before" case needs glibc's defaults."""
import os
import subprocess
import sys

import pytest

from variator_jax import host, t5

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
    # A clean environment: no MALLOC_* settings from the caller; the repository on the path.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
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


def test_encoder_attention_takes_larger_blocks_when_freed_memory_is_kept(monkeypatch):
    """t5-base widths, batch 4, n = 1024 on CPU: 64-query blocks of 3 MiB of scores by default
    (big temporaries would fault), the whole batch at once (192 MiB) when memory is kept."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(host, "_applied", False)
    assert not host.freed_memory_kept()
    budget = host.attention_block_bytes()  # What train.py and eval.py put in T5Config.
    assert budget == t5.ATTENTION_BLOCK_BYTES
    assert t5.attention_blocks(4, 12, 1024, 1024, budget) == (1, 64)
    monkeypatch.setattr(host, "_applied", True)
    assert host.freed_memory_kept()
    budget = host.attention_block_bytes()
    assert t5.attention_blocks(4, 12, 1024, 1024, budget) == (4, 1024)
    assert t5.attention_blocks(4, 12, 2048, 2048, budget) == (1, 2048)  # One example: 192 MiB.
    assert t5.attention_blocks(1, 12, 4096, 4096, budget) == (1, 1024)  # 256 MiB bounds them.
