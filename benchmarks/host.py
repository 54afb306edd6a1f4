"""The benchmarks' setting of the host process: glibc malloc keeps freed memory for XLA:CPU.

XLA:CPU puts a call's temporaries in one block that it allocates on every call and frees after
it. glibc's malloc serves a block over its mmap threshold (at most 32 MiB) with a fresh `mmap`
and unmaps it on free, so every page of it faults in again on every call. For t5-base widths at
batch 4, n = 512 that is ~12,000 page faults per encoder call, with or without a plugin: a
fixed cost that also pulls the measured speedup of compression below the FLOPs ceiling
(benchmarks/README.md, "Page faults"). XLA allocates on its worker threads, whose own malloc
arenas showed the same faults for blocks of 40 MiB and more even with mmap turned off.

`keep_freed_memory()` makes glibc serve every allocation from one heap and keep freed memory
there: the next call reuses the same pages. It changes the whole process, so only the
benchmarks' entry points call it, before they load NumPy or JAX (importing this module loads
neither); the library and its commands leave malloc alone. The same effect for any command,
`variator-train` included, from the shell:
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`.

Only the shell form is certain. A thread that called malloc before `keep_freed_memory()` already
has its own arena, and glibc then hands new threads (XLA's) that arena and the main one in turn:
calls whose temporaries land in the other arena fault as before (shown here by a thread that
allocates first). `keep_freed_memory()` therefore counts the arenas (`malloc_info`) and
reports False when there is more than one.

Even with one arena, on a loaded machine some calls still fault in a whole block, and each
such call grows the heap by one block. The block is
fragmented out of reuse. XLA asks for an aligned block, and glibc serves that from a chunk a
little larger, freeing the slack as small chunks. When other threads' small allocations take
that slack before the block is freed, the freed block cannot merge with it, and it is then a
few bytes too small for the next identical request (measured: the largest free chunk was
50,331,665 bytes for a 50,331,648-byte block). Which calls hit this depends on thread timing.
No mallopt setting prevents it. Such calls cost what glibc's default costs on every call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys
import tempfile

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB at the top are free.

_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_applied: bool | None = None
_arenas = 0  # Arenas glibc had when keep_freed_memory() applied its setting (0: not applied
#              or malloc_info unreadable).


def keep_freed_memory() -> bool:
    """Tells glibc malloc to use one heap for all threads, never to `mmap` a block and never to
    give freed heap back to the OS. Call it first thing: before importing NumPy or JAX, whose
    threads may take malloc arenas of their own (see below), at the latest before any JAX
    computation.

    Returns True when it took effect (Linux with glibc, JAX on CPU), False where it did
    nothing: another platform; an accelerator, whose temporaries are not in host memory
    (`accelerator_expected`); or an environment that already sets one of `MALLOC_ARENA_MAX`,
    `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_` (glibc follows those; they win).
    Also False when another thread already had its own malloc arena: the setting is applied,
    but calls that allocate there still fault (module docstring; `malloc_setting` says so).
    The process's resident memory then stays at its high-water mark.

    Example:
      >>> from benchmarks import host
      >>> host.keep_freed_memory()  # doctest: +SKIP
      True
    """
    global _applied, _arenas
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or accelerator_expected():
        return False
    if any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # Not glibc (musl has no mallopt).
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # One arena for all threads: XLA allocates on its worker threads, and in their own arenas
    # blocks of 40 MiB and more still faulted in on every call (measured with getrusage).
    # Must come before those threads first allocate, i.e. before the first JAX computation.
    if not all(mallopt(param, value) for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_NEVER))):
        return False
    _arenas = _count_arenas(libc)
    _applied = _arenas <= 1  # 0: malloc_info unreadable; the setting is trusted, as before.
    return _applied


def _count_arenas(libc) -> int:
    """How many malloc arenas the process has, from glibc's `malloc_info` XML (one `<heap>`
    element per arena); 0 where it cannot be read."""
    try:
        libc.fdopen.restype, libc.fdopen.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_char_p)
        libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.fclose.argtypes = (ctypes.c_void_p,)
        with tempfile.TemporaryFile("w+") as f:
            fd = os.dup(f.fileno())
            stream = libc.fdopen(fd, b"w")  # fclose closes fd.
            if not stream:
                os.close(fd)
                return 0
            libc.malloc_info(0, stream)
            libc.fclose(stream)
            f.seek(0)
            return f.read().count("<heap nr=")
    except (OSError, AttributeError):
        return 0


def freed_memory_kept() -> bool:
    """Whether large freed blocks stay mapped in this process: `keep_freed_memory()` took
    effect, or the environment set the same (one arena, no mmap). Encoder attention on CPU
    can then run in fewer, larger blocks (`attention_block_bytes`)."""
    if _applied:
        return True
    return (os.environ.get("MALLOC_ARENA_MAX") == "1"
            and os.environ.get("MALLOC_MMAP_MAX_") == "0")


def accelerator_expected() -> bool:
    """Whether JAX will run on something other than the CPU, decided without starting a
    backend (that would start XLA's threads, after which the malloc setting comes too late):
    `jax_platforms` (JAX_PLATFORMS) when set, else whether a TPU library or a PJRT plugin
    (CUDA, ROCm, ...: the `jax_plugins` entry points and namespace package) is installed."""
    # JAX's config when JAX is loaded; else the variable it reads (host.py loads no JAX, so
    # that the entry points can call keep_freed_memory before NumPy and JAX start threads).
    jax = sys.modules.get("jax")
    platforms = jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS")
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # A namespace package: its modules are the installed plugins.
    except ImportError:
        return False
    import pkgutil
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def malloc_setting() -> str:
    """One line for benchmark headers: what malloc does with large blocks in this process."""
    env = {k: os.environ[k] for k in _ENV if k in os.environ}
    if env:
        return "glibc malloc from the environment: " + ", ".join(f"{k}={v}" for k, v in env.items())
    if _applied:
        return "glibc malloc: one arena, no mmap, no trim (benchmarks.host.keep_freed_memory)"
    if _arenas > 1:
        return (f"glibc malloc: no mmap, no trim, but {_arenas} arenas already existed "
                "(threads allocated before benchmarks.host.keep_freed_memory): large "
                "temporaries still fault on some calls")
    return "malloc: the platform's default"


def attention_block_bytes() -> int:
    """The budget of CPU encoder-attention blocks for this process, for
    `T5Config.attention_block_bytes`: `t5.ATTENTION_BLOCK_BYTES_KEPT` when freed memory is
    kept (`freed_memory_kept`), else `t5.ATTENTION_BLOCK_BYTES`. The entry points put it in
    the config; the model itself never reads process state."""
    from variator_jax import t5
    return t5.ATTENTION_BLOCK_BYTES_KEPT if freed_memory_kept() else t5.ATTENTION_BLOCK_BYTES
