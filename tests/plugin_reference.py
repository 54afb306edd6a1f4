"""An independent NumPy restatement of the Variator plugin (docs/DESIGN.md §1).

Deliberately naive: float64, explicit loops over batch rows, groups and
positions, one equation of §1 per line, so that it can be checked against the
design by eye and serve as the oracle for both the JAX and the PyTorch code.
Nothing here is shared with `variator_jax`.

Weights use the plugin FILE convention (PyTorch `Linear`, weight = [out, in]):

    compress.weight        [k, k*d]   compress.bias        [k]
    decompress.wi.weight   [r, 2d]    decompress.wi.bias   [r]
    decompress.wo.weight   [d, r]     decompress.wo.bias   [d]

Dropout is not modelled: the reference is the deterministic (eval) forward.
"""
import math

import numpy as np

PLUGIN_KEYS = (
    "compress.weight", "compress.bias",
    "decompress.wi.weight", "decompress.wi.bias",
    "decompress.wo.weight", "decompress.wo.bias",
)


def rms_norm(v, norm_weight, eps):
    """T5 layer norm of one vector [d]: no mean subtraction, no bias."""
    return v / math.sqrt(np.mean(v * v) + eps) * norm_weight


def gelu_new(v):
    """The tanh approximation of GELU (HF's "gelu_new", T5 'gated-gelu')."""
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def reference_relu_ffn(wi, wo):
    """T5 v1.0 FFN, `wo @ relu(wi @ x)`, on rows [m, d]; wi [d_ff, d], wo [d, d_ff]."""
    wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
    return lambda x: np.maximum(x @ wi.T, 0.0) @ wo.T


def reference_gated_gelu_ffn(wi0, wi1, wo):
    """T5 v1.1 FFN, `wo @ (gelu_new(wi0 @ x) * (wi1 @ x))`, on rows [m, d]."""
    wi0, wi1, wo = (np.asarray(w, np.float64) for w in (wi0, wi1, wo))
    return lambda x: (gelu_new(x @ wi0.T) * (x @ wi1.T)) @ wo.T


def random_plugin_layer(rng, d, k, r, scale=0.3):
    """One layer's plugin weights, i.i.d. N(0, scale^2), biases included.

    Far from the near-zero initialisation on purpose: softmax scores of order
    scale * sqrt(k*d) make the merge weights uneven and the decompressor's
    output comparable to the FFN's, so a wrong concatenation order, a softmax
    over the wrong axis or a transposed weight changes the result clearly.
    """
    shapes = {
        "compress.weight": (k, k * d), "compress.bias": (k,),
        "decompress.wi.weight": (r, 2 * d), "decompress.wi.bias": (r,),
        "decompress.wo.weight": (d, r), "decompress.wo.bias": (d,),
    }
    return {name: scale * rng.standard_normal(shape) for name, shape in shapes.items()}


def _merge(X, real, w_c, b_c):
    """Lines 3-5 of §1 for one group: X [k, d], real [k] bool -> c [d]."""
    k, d = X.shape
    if not real.any():
        return np.zeros(d)                        # an all-pad group yields 0
    # Pad members enter concat(X_g) as zero vectors, like the zeros that pad n
    # to a multiple of k: otherwise a pad's content would move the real
    # members' scores (every score sees all k members), and outputs would
    # depend on how much padding the batch has, against §1's stated intent.
    X_in = [X[j] if real[j] else np.zeros(d) for j in range(k)]
    concat = np.concatenate(X_in)                               # [k*d]: X_0, X_1, ...
    s = w_c @ concat + b_c                                      # [k]
    s = np.where(real, s, -np.inf)                              # pad members: -inf
    a = np.exp(s - s[real].max())
    a = a / a.sum()                                             # softmax over members
    return sum(a[j] * X[j] for j in range(k))


def reference_ffn_block(h, mask, ffn, norm_weight, eps, plugin_layer, k, mask_aware=True):
    """T5's FFN block with the plugin of docs/DESIGN.md §1, residual included.

    Args:
      h: [batch, n, d] hidden states entering the FFN block.
      mask: [batch, n], 1 for real tokens, 0 for padding (None: all real).
      ffn: the frozen FFN, a callable on rows [m, d] -> [m, d].
      norm_weight: [d] the block's RMS-norm scale; eps its epsilon.
      plugin_layer: dict of arrays keyed like `PLUGIN_KEYS`.
      k: compression ratio (group size).
      mask_aware: mask pad members (DESIGN default): score -inf, zero vector in
        the score input, an all-pad group gives c = 0. False masks nothing,
        not even the zero vectors that pad n to a multiple of k.

    Returns:
      [batch, n, d] float64, the block's new hidden states.
    """
    h = np.asarray(h, np.float64)
    batch, n, d = h.shape
    mask = np.ones((batch, n)) if mask is None else np.asarray(mask)
    p = {name: np.asarray(v, np.float64) for name, v in plugin_layer.items()}
    w_c, b_c = p["compress.weight"], p["compress.bias"]
    w_i, b_i = p["decompress.wi.weight"], p["decompress.wi.bias"]
    w_o, b_o = p["decompress.wo.weight"], p["decompress.wo.bias"]
    norm_weight = np.asarray(norm_weight, np.float64)

    # Pad n up to a multiple of k with zero vectors; they are pad members.
    n_pad = -(-n // k) * k
    h_pad = np.zeros((batch, n_pad, d))
    h_pad[:, :n] = h
    real = np.zeros((batch, n_pad), bool)
    real[:, :n] = mask != 0
    if not mask_aware:
        real[:] = True                             # the released code masks nothing

    out = np.zeros_like(h_pad)
    for b in range(batch):
        x = np.stack([rms_norm(h_pad[b, i], norm_weight, eps) for i in range(n_pad)])
        for g in range(n_pad // k):
            members = slice(g * k, (g + 1) * k)
            c = _merge(x[members], real[b, members], w_c, b_c)
            y = ffn(c[None, :])[0]                 # FFN on the compressed vector
            for i in range(g * k, (g + 1) * k):    # y^_i = y_{floor(i/k)}
                z = np.concatenate([y, x[i]])      # concat(y^_i, x_i), y first
                o = y + w_o @ np.tanh(w_i @ z + b_i) + b_o
                out[b, i] = h_pad[b, i] + o        # the block's residual
    return out[:, :n]
