"""host.keep_freed_memory: XLA:CPU temporaries over 32 MiB stop page-faulting on every call.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into
other tests, and the "before" case needs glibc's defaults."""
import os
import re
import subprocess
import sys

import pytest

from variator_jax import host, t5

SCRIPT = r"""
import resource, statistics, sys
from variator_jax import host  # Loads neither NumPy nor JAX: no thread but this one yet.
if sys.argv[1] == "thread-first":  # Another thread calls malloc first: it gets its own arena.
    import threading
    t = threading.Thread(target=bytearray, args=(100_000,))
    t.start()
    t.join()
if sys.argv[1] != "default":
    print(host.keep_freed_memory(), host.malloc_setting(), sep="\n")
    if sys.argv[1] == "thread-first":
        sys.exit()
import ctypes
import jax, jax.numpy as jnp
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33).
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
medians, fewest, temps, unexplained = [], [], [], 0
for cols in (3072, 6144):
    # Two [2048, cols] float32 temporaries (the product and its reversal; a reversal is fused
    # into no library call, so no XLA:CPU version keeps them inside one): one block of 48 and
    # one of 96 MiB. (jax 0.12's XLA:CPU runs `sin(x @ w).sum(0)` as one YNNPACK fusion with
    # no XLA temporary at all.)
    f = jax.jit(lambda x, w: (x @ w)[::-1].sum(0))
    x, w = jnp.ones((2048, 64)), jnp.ones((64, cols))
    block = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    temps.append(block >> 20)
    faults = []
    for _ in range(12):
        before, heap = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, libc.mallinfo2().arena
        f(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        grown = libc.mallinfo2().arena - heap
        # A call that faulted in half the block or more, without the heap growing by half the
        # block: the pages were unmapped, not fresh.
        unexplained += faults[-1] > block // 4096 // 2 and grown < block // 2
    # The heap grows to its high-water mark over the first few calls, then stays.
    medians.append(statistics.median(faults[4:]))
    fewest.append(min(faults[4:]))
if sys.argv[1] != "default":
    print(unexplained)
print(*temps)
print(*medians, *fewest)
"""


def _python(code, *args):
    """The output lines of `python -c code args` in a clean environment: no MALLOC_* settings
    from the caller; the repository on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return out.stdout.strip().splitlines()


def _run(mode):
    """SCRIPT's output lines: for "keep" and "thread-first", what keep_freed_memory() returned
    and malloc_setting(); then (not for "thread-first") the temporaries' MiB, and the median
    faults per call of each case, then the fewest."""
    return _python(SCRIPT, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_page_faults_on_large_temporaries():
    # 48 and 96 MiB = 12,288 and 24,576 pages of 4 KiB: by default they fault in on every call
    # (median per call over calls 5-12).
    temps, faults = _run("default")
    assert temps == "48 96", f"XLA no longer allocates the temporaries (MiB): {temps}"
    default = [float(v) for v in faults.split()]
    assert min(default) > 8000, default  # Medians and fewest per call: every call faults.
    # Called before NumPy and JAX are imported (as the entry points do), no other thread
    # can have an arena yet: it takes effect.
    applied, setting, unexplained, temps, faults = _run("keep")
    assert temps == "48 96", temps
    assert applied == "True", setting
    assert setting.endswith("one arena, no mmap, no trim (variator_jax.host.keep_freed_memory)")
    keep = [float(v) for v in faults.split()]
    # The fewest per call, not the median: on a loaded machine some calls still fault in the
    # whole block (a full `make test` here, 2026-12-04: median 4,914 at 48 MiB). Each such
    # call grows the heap by a block: XLA asks for an aligned block, glibc serves it from a
    # chunk a little larger and frees the slack as small chunks, and when other threads'
    # small allocations take that slack first, the freed block is a few bytes too small for
    # the next identical request (measured: largest free chunk 50,331,665 bytes for a
    # 50,331,648-byte block). Every faulting call must show that growth: pages never unmapped.
    assert unexplained == "0", (unexplained, keep)
    # And a call with no faults shows that the block stays mapped, which glibc's default
    # never allows.
    assert max(keep[2:]) < 500, keep


def test_importing_host_or_an_entry_point_loads_neither_numpy_nor_jax():
    """So that `host.keep_freed_memory()` can run before their threads exist: the package's
    names load on first use, and train.py / eval.py call it before parsing flags (cli.py)."""
    for entry in ("train", "evaluate"):  # Each defines the same absl flags: one per process.
        code = (f"import sys; from variator_jax import host, {entry}; import variator_jax; "
                "print(sorted({'numpy', 'jax'} & set(sys.modules)))")
        assert _python(code) == ["[]"], entry
    code = "import sys, variator_jax as vj; vj.T5Config; print('jax' in sys.modules)"
    assert _python(code) == ["True"]  # The public names still work, loaded on use.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_says_false_when_a_thread_already_has_an_arena():
    applied, setting = _run("thread-first")
    assert applied == "False"
    # Two here; more where an import's threads also allocated first (a CI host).
    found = re.search(r"no mmap, no trim, but (\d+) arenas already existed", setting)
    assert found and int(found.group(1)) >= 2, setting


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
