"""benchmarks/host.py: the benchmarks' malloc setting, applied and reported honestly.

Each case runs in a fresh interpreter: the setting is process-wide and must not leak into
other tests. What the setting does to page faults is measured by the benchmarks (`speed.py`
prints the setting in force), never asserted here: kernel counters depend on the host."""
import os
import re
import subprocess
import sys

import pytest

from benchmarks import host
from variator_jax import t5

SCRIPT = r"""
import sys
from benchmarks import host  # Loads neither NumPy nor JAX: no thread but this one yet.
if sys.argv[1] == "thread-first":  # Another thread calls malloc first: it gets its own arena.
    import threading
    t = threading.Thread(target=bytearray, args=(100_000,))
    t.start()
    t.join()
print(host.keep_freed_memory(), host.malloc_setting(), sep="\n")
print(sorted({"numpy", "jax"} & set(sys.modules)))
"""


def _python(code, *args):
    """The output lines of `python -c code args` in a clean environment: no MALLOC_* settings
    from the caller; the repository on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_takes_effect_before_other_threads_allocate():
    applied, setting, loaded = _python(SCRIPT, "first")
    assert applied == "True", setting
    assert setting.endswith("one arena, no mmap, no trim (benchmarks.host.keep_freed_memory)")
    assert loaded == "[]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_says_false_when_a_thread_already_has_an_arena():
    applied, setting, _ = _python(SCRIPT, "thread-first")
    assert applied == "False"
    # Two here; more where an import's threads also allocated first (a CI host).
    found = re.search(r"no mmap, no trim, but (\d+) arenas already existed", setting)
    assert found and int(found.group(1)) >= 2, setting


def test_the_library_leaves_malloc_alone():
    """No command of the library changes the process's malloc: train.py and eval.py load
    without the benchmarks' setting, and without NumPy or JAX until they run."""
    for entry in ("train", "evaluate"):  # One per process: a fresh interpreter each.
        code = (f"import sys; from variator_jax import {entry}; import variator_jax; "
                "print(sorted({'numpy', 'jax', 'benchmarks.host'} & set(sys.modules)))")
        assert _python(code) == ["[]"], entry
    code = "import sys, variator_jax as vj; vj.T5Config; print('jax' in sys.modules)"
    assert _python(code) == ["True"]  # The public names still work, loaded on use.


def test_encoder_attention_takes_larger_blocks_when_freed_memory_is_kept(monkeypatch):
    """t5-base widths, batch 4, n = 1024 on CPU: 64-query blocks of 3 MiB of scores by default
    (big temporaries would fault), the whole batch at once (192 MiB) when memory is kept."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(host, "_applied", False)
    assert not host.freed_memory_kept()
    budget = host.attention_block_bytes()
    assert budget == t5.ATTENTION_BLOCK_BYTES == t5.T5Config().attention_block_bytes
    assert t5.attention_blocks(4, 12, 1024, 1024, budget) == (1, 64)
    monkeypatch.setattr(host, "_applied", True)
    assert host.freed_memory_kept()
    budget = host.attention_block_bytes()
    assert t5.attention_blocks(4, 12, 1024, 1024, budget) == (4, 1024)
    assert t5.attention_blocks(4, 12, 2048, 2048, budget) == (1, 2048)  # One example: 192 MiB.
    assert t5.attention_blocks(1, 12, 4096, 4096, budget) == (1, 1024)  # 256 MiB bounds them.
