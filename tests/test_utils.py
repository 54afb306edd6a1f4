"""Shared test helpers: tiny models, fake batches, tiny HF directories, tiny training configs."""
from __future__ import annotations

import os

import jax
import numpy as np

from variator_jax.convert import save_hf_t5
from variator_jax.t5 import T5Config, init_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE_VOCAB = 384  # transformers.ByT5Tokenizer(): 3 specials + 256 bytes + 125 extra ids.


def tiny_t5(**overrides) -> T5Config:
    """d_model 32, 2 + 2 layers, 2 heads x 16, gated-gelu, ByT5-size vocabulary."""
    kw = dict(vocab_size=BYTE_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
              relative_attention_num_buckets=8, relative_attention_max_distance=32, name="tiny")
    kw.update(overrides)
    return T5Config(**kw)


def make_hf_dir(path: str, cfg: T5Config | None = None, seed: int = 0,
                tokenizer: bool = True) -> str:
    """A random HF-format T5 directory (config.json + model.safetensors) and, by default,
    the ByT5 tokenizer's files, so that `tokenizer=None` finds it there."""
    cfg = cfg or tiny_t5()
    save_hf_t5(path, cfg, jax.device_get(init_t5(jax.random.key(seed), cfg)),
               tokenizer="byte" if tokenizer else None)
    return path


def fake_batch(batch: int = 4, n: int = 32, m: int = 8, vocab: int = BYTE_VOCAB, seed: int = 0,
               num_labels: int | None = None) -> dict[str, np.ndarray]:
    """Random ids with ragged padding, the keys `data.collate` produces."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(n // 2, n + 1, batch)
    tlengths = rng.integers(2, m + 1, batch)
    ids = rng.integers(3, vocab, (batch, n)).astype(np.int32)
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    labels = rng.integers(3, vocab, (batch, m)).astype(np.int32)
    dmask = (np.arange(m)[None] < tlengths[:, None]).astype(np.int32)
    labels = labels * dmask
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), labels[:, :-1]], axis=1)
    out = dict(input_ids=ids * mask, attention_mask=mask, labels=labels,
               decoder_input_ids=dec_in, decoder_attention_mask=dmask)
    if num_labels:
        out["label"] = rng.integers(0, num_labels, batch).astype(np.int32)
    return out


def load_config(name: str, arg: str | None = None):
    """variator_jax/configs/NAME.py's get_config(arg), as `--config=NAME:arg` loads it."""
    from variator_jax import configs
    return configs.get_config(name, arg)


# Shrinks configs/plugin.py to seconds: batch 8, lengths 32 / 8, log and save every 4 steps.
# Shared by in-process runs and `train.py` subprocesses, so both train the same thing.
TINY_OVERRIDES = {
    "tokenizer": "byte", "batch_size": 8, "total_steps": 12, "warmup_steps": 2,
    "max_input_length": 32, "max_target_length": 8, "log_every": 4, "checkpoint_every": 4,
    "keep_checkpoints": 2, "plugin.bottleneck": 8, "mesh.data": 1, "mesh.model": 1,
}
TINY_CORPUS = {"data.train": "builtin:pydoc", "data.train_split": "train[:20%]"}


def override(config, overrides: dict):
    """Applies {"a.b": value} overrides in place, as `--config.a.b=value` would."""
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return config


def tiny_plugin_config(backbone: str, arg: str = "stage=pretrain", **overrides):
    """configs/plugin.py:ARG with TINY_OVERRIDES, then `overrides` ("a__b" means "a.b")."""
    c = load_config("plugin", arg)
    c.backbone = backbone
    override(c, TINY_OVERRIDES)
    if c.stage == "pretrain":
        override(c, TINY_CORPUS)
    return override(c, {k.replace("__", "."): v for k, v in overrides.items()})


def cli_flags(overrides: dict) -> list[str]:
    """{"a.b": v} -> ["--config.a.b=v", ...] for `train.py`."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def train_py(args: list[str], devices: int = 1, extra_env: dict | None = None):
    """`python train.py ARGS` as a subprocess with `devices` fake CPU devices -> Popen."""
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **(extra_env or {}))
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_plugin(directory: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(os.path.join(directory, "plugin.safetensors"))


def read_metrics(workdir: str) -> list[dict]:
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
