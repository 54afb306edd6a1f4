"""`python eval.py ...` in a checkout: the same as `variator-eval` (variator_jax/evaluate.py)."""
from variator_jax.evaluate import run

if __name__ == "__main__":
    run()
