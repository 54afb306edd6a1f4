"""`python train.py ...` in a checkout: the same as `variator-train` (variator_jax/train.py)."""
from variator_jax.train import run

if __name__ == "__main__":
    run()
