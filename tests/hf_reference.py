"""Tiny random HF PyTorch T5s, the reference nobody here wrote, in each published variant."""
from __future__ import annotations

import json
import os

import numpy as np

# name -> (transformers.T5Config kwargs, give lm_head its own weights, write a v4-era config)
VARIANTS = {
    # t5 v1.0: relu FFN, tied embeddings, d_model**-0.5 output scaling.
    "v1_0": (dict(feed_forward_proj="relu", tie_word_embeddings=True), False, False),
    # t5-v1_1 as transformers 5 saves it: gated-gelu, separate lm_head, no scaling.
    "v1_1": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), True, False),
    # flan-t5 as published (v4-era config.json): untied, more decoder layers than encoder
    # layers, num_heads * d_kv != d_model.
    "flan_v4": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     num_decoder_layers=3, num_heads=3, d_kv=5), True, True),
    # v1.1 built with tie_word_embeddings=False but no own lm_head: transformers 5 shares the
    # output embedding and saves no lm_head.weight; a loader must fall back to shared.
    "v1_1_shared_head": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                         False, False),
}

BASE = dict(vocab_size=96, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=24,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_hf_t5(variant: str, seed: int = 0, **overrides):
    """A random `T5ForConditionalGeneration` in eval mode."""
    import torch
    import transformers
    kwargs, own_head, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{**BASE, **kwargs, **overrides})).eval()
    if own_head:  # transformers 5 shares lm_head even when untied; give it its own weights.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


def save_hf_dir(model, path: str, variant: str) -> str:
    """save_pretrained, then (v4-era variants) rewrite config.json as transformers 4 wrote it."""
    model.save_pretrained(path)
    if VARIANTS[variant][2]:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config.pop("scale_decoder_outputs", None)
        config["tie_word_embeddings"] = False
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return path


def padded_batch(vocab: int, seed: int = 0, n: int = 19, m: int = 7):
    """Two rows; the second padded after 11 tokens; decoder inputs start with 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (2, n)).astype(np.int32)
    mask = np.ones((2, n), np.int32)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    dec = rng.integers(2, vocab, (2, m)).astype(np.int32)
    dec[:, 0] = 0
    return ids, mask, dec


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
