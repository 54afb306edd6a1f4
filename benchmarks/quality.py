"""`python -m benchmarks.quality` is `python -m variator_jax.stages` (the paper's stage chain
and its results: variator_jax/stages.py), under the name the benchmarks' docs used."""
if __name__ == "__main__":  # On CPU: before NumPy and JAX load (benchmarks/host.py).
    from benchmarks import host as _host

    _host.keep_freed_memory()

from variator_jax.stages import main

if __name__ == "__main__":
    from variator_jax import cli

    cli.run_main(main)  # Bad input: one line, not a traceback.
