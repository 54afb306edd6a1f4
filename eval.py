"""`python eval.py ...` in a checkout: the same as `variator-eval` (variator_jax/eval.py)."""
from variator_jax.eval import run

if __name__ == "__main__":
    run()
