"""Training-free compressors: the baselines a Variator plugin is measured against.

Each one replaces the plugin's learned merge and expand (plugins.py, docs/DESIGN.md §1) at the
same place, around every encoder FFN, and reduces the sequence the frozen FFN sees to the
same length, n/k (n padded to a multiple of k). None has parameters: they are selected by
`PluginConfig(ratio=k, compressor=NAME)` and run, save, load, evaluate and serve like a
plugin whose tree holds no arrays.

  mean_pool  c_g = mean of the k members of group g (real members only when mask-aware);
             every position gets its group's FFN output back.
  strided    c_g = the first member of group g (positions 0, k, 2k, ...); copied back.
  tome       Token Merging (Bolya et al., ICLR 2023), bipartite soft matching: tokens split
             alternately into sets A and B; each A token is linked to its most similar B
             token (cosine similarity); the r best-linked A tokens are merged into their B
             partner by a size-weighted average; repeated with r = min(m/2, m - n/k) until
             n/k tokens remain. Every position gets the FFN output of the token it was
             merged into ("unmerge by copying"). ToMe scores similarity with the attention
             keys; here, before the FFN, it scores the FFN's own (normalised) inputs, which
             is what gets merged. Sizes start at 1 per real token and 0 per pad token, so
             padding never moves a real token's average and an all-pad token yields 0.

Every function maps x [batch, n, d] (n a multiple of k) and mask [batch, n] to
(merged [batch, n/k, d], assign [batch, n] int32): position i reads merged[assign[i]].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NAMES = ("variator", "mean_pool", "tome", "strided")
TRAINING_FREE = NAMES[1:]


def _groups(n: int, k: int):
    return jnp.arange(n, dtype=jnp.int32) // k


def mean_pool(x, mask, k: int, mask_aware: bool = True):
    """Mean of each group of k neighbours."""
    b, n, d = x.shape
    groups = x.reshape(b, n // k, k, d)
    if mask_aware:
        member = (mask.reshape(b, n // k, k) > 0).astype(x.dtype)[..., None]
        merged = (groups * member).sum(2) / jnp.maximum(member.sum(2), 1)
    else:
        merged = groups.mean(2)
    return merged, jnp.broadcast_to(_groups(n, k), (b, n))


def strided(x, mask, k: int, mask_aware: bool = True):
    """Member 0 of each group of k neighbours (with right padding, a group whose first
    member is padding is all padding: it yields 0 when mask-aware)."""
    b, n, d = x.shape
    merged = x[:, ::k]
    if mask_aware:
        merged = jnp.where(mask[:, ::k, None] > 0, merged, 0)
    return merged, jnp.broadcast_to(_groups(n, k), (b, n))


def _gather(values, index):
    """values [b, m, ...], index [b, j] -> [b, j, ...]."""
    return jax.vmap(lambda v, i: v[i])(values, index)


def tome(x, mask, k: int, mask_aware: bool = True):
    """Bipartite soft matching down to n/k tokens, size-weighted (module docstring)."""
    b, n, d = x.shape
    target = n // k
    size = (mask > 0).astype(jnp.float32) if mask_aware else jnp.ones((b, n), jnp.float32)
    total = x.astype(jnp.float32) * size[..., None]  # Size-weighted sums of the merged tokens.
    assign = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    m = n
    while m > target:
        r = min(m // 2, m - target)
        a_tot, b_tot, a_sz, b_sz = total[:, ::2], total[:, 1::2], size[:, ::2], size[:, 1::2]
        na, nb = a_tot.shape[1], b_tot.shape[1]
        a_dir = a_tot / jnp.maximum(jnp.linalg.norm(a_tot, axis=-1, keepdims=True), 1e-12)
        b_dir = b_tot / jnp.maximum(jnp.linalg.norm(b_tot, axis=-1, keepdims=True), 1e-12)
        scores = jnp.einsum("bid,bjd->bij", a_dir, b_dir)
        if mask_aware:  # Real tokens merge into real ones; empty A tokens go first, for free.
            scores = jnp.where(b_sz[:, None, :] > 0, scores, -jnp.inf)
        best, partner = scores.max(-1), scores.argmax(-1).astype(jnp.int32)
        if mask_aware:
            best = jnp.where(a_sz > 0, best, jnp.inf)
        order = jnp.argsort(-best, axis=-1).astype(jnp.int32)  # Most similar first.
        src, unm = order[:, :r], order[:, r:]
        dst = jnp.take_along_axis(partner, src, axis=-1)
        rows = jnp.arange(b)[:, None]
        b_tot = b_tot.at[rows, dst].add(_gather(a_tot, src))
        b_sz = b_sz.at[rows, dst].add(jnp.take_along_axis(a_sz, src, axis=-1))
        kept = na - r  # New order: the unmerged A tokens, then the B tokens.
        a_new = jnp.zeros((b, na), jnp.int32)
        a_new = a_new.at[rows, unm].set(jnp.arange(kept, dtype=jnp.int32))
        a_new = a_new.at[rows, src].set(kept + dst)
        b_new = jnp.broadcast_to(kept + jnp.arange(nb, dtype=jnp.int32), (b, nb))
        old_to_new = jnp.zeros((b, m), jnp.int32).at[:, ::2].set(a_new).at[:, 1::2].set(b_new)
        assign = jnp.take_along_axis(old_to_new, assign, axis=-1)
        total = jnp.concatenate([_gather(a_tot, unm), b_tot], axis=1)
        size = jnp.concatenate([jnp.take_along_axis(a_sz, unm, axis=-1), b_sz], axis=1)
        m = kept + nb
    merged = total / jnp.where(size > 0, size, 1.0)[..., None]
    return merged.astype(x.dtype), assign


_MERGE = {"mean_pool": mean_pool, "strided": strided, "tome": tome}


def compressed_ffn(x, mask, k: int, name: str, ffn, mask_aware: bool = True):
    """A training-free compressor around `ffn`: x [batch, n, d] (n a multiple of k) ->
    the FFN block's output o [batch, n, d], each position reading its merged token's output."""
    merged, assign = _MERGE[name](x, mask, k, mask_aware)
    y = ffn(merged).astype(x.dtype)
    return jnp.take_along_axis(y, assign[..., None], axis=1)


def matching_flops(n: int, k: int, d: int) -> int:
    """ToMe's similarity products for one layer on n tokens (the merges themselves are sums)."""
    flops, m, target = 0, n, n // k
    while m > target:
        r = min(m // 2, m - target)
        na, nb = (m + 1) // 2, m // 2
        flops += 2 * na * nb * d
        m = na - r + nb
    return flops
