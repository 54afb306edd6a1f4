"""Analytic FLOPs of a T5 forward pass, with and without a compression plugin (docs/DESIGN.md §1).

Convention: a multiply-add is 2 FLOPs, and by default only matrix products are counted, the
convention of XLA's `cost_analysis()` for dot ops and of the FLOPs figures in papers. Norms,
softmax, activations, bias adds and residuals are left out: for T5 sizes they are under 1 % of
the total (t5-small, n = 512, m = 32: 99.7 % of XLA's count for a jnp forward). For tiny models
(d_kv = 8) they are not negligible (~10 %); `elementwise=True` adds an estimate of them, counted
the way XLA's cost analysis does (1 FLOP per element per op; exp/tanh/rsqrt are
"transcendentals", not FLOPs). Embedding lookups and the relative position bias are gathers (0).
Everything is for one sequence (batch 1); multiply by the batch size.

Where the plugin sits (docs/DESIGN.md §1): in every encoder layer, around the FFN only. Attention
runs at full length `n`; the FFN-block runs on `n` padded to a multiple of `k`, and its FFN on
`ceil(n/k)` merged vectors; the decoder is untouched.

Example:
  >>> from variator_jax.t5 import T5Config
  >>> cfg = T5Config.variant("t5-base")
  >>> f = encoder_flops(cfg, 512), encoder_flops(cfg, 512, ratio=4)
  >>> round(100 * (1 - f[1]["total"] / f[0]["total"]), 1)
  43.1

Command: `python -m variator_jax.flops --variant t5-base` prints the encoder table.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from variator_jax import cli, compressors
from variator_jax.report import markdown_table
from variator_jax.t5 import T5Config


def _plugin_args(ratio: Any, bottleneck: int) -> tuple[int | None, int]:
    """(k, r) from ints or from a `PluginConfig`-like object with `.ratio`/`.bottleneck`."""
    if ratio is None:
        return None, bottleneck
    if hasattr(ratio, "ratio"):
        scope = getattr(ratio, "scope", "ffn")
        if scope != "ffn":  # Compressing attention too is an extension with no count here.
            raise NotImplementedError(f"FLOPs are counted for scope='ffn' only, got {scope!r}")
        ratio, bottleneck = ratio.ratio, getattr(ratio, "bottleneck", bottleneck)
    if int(ratio) != ratio or ratio < 1 or int(bottleneck) != bottleneck or bottleneck < 1:
        raise ValueError(f"ratio and bottleneck must be positive ints, got {ratio}, {bottleneck}")
    return int(ratio), int(bottleneck)


def _ffn_flops(cfg: T5Config, tokens: int) -> int:
    """FFN on `tokens` vectors: wi [d, d_ff] (two of them when gated) and wo [d_ff, d]."""
    matmuls = 3 if cfg.is_gated else 2
    return matmuls * 2 * tokens * cfg.d_model * cfg.d_ff


def _attention_proj_flops(cfg: T5Config, q_len: int, kv_len: int) -> int:
    """q, o projections on `q_len` vectors, k, v on `kv_len`; each [d, inner] or [inner, d]."""
    return 2 * cfg.d_model * cfg.inner_dim * (2 * q_len + 2 * kv_len)


def _attention_scores_flops(cfg: T5Config, q_len: int, kv_len: int) -> int:
    """q @ k^T and probs @ v, over all heads: 2 products of q_len*kv_len*inner MACs.

    The full score matrix is counted also for causal self-attention: that is what a
    teacher-forced forward computes (the mask only zeroes half of it).
    """
    return 2 * 2 * q_len * kv_len * cfg.inner_dim


# XLA's FLOPs per element of the ops between matmuls (measured with `cost_analysis()`).
_NORM = 4  # RMSNorm: x*x, mean, x*rsqrt(.), *scale.
_SOFTMAX = 5  # + bias/mask, max, -max, sum, /sum; exp is a transcendental.
_ACTIVATION = {"relu": 1, "gelu_new": 8, "gelu": 5, "silu": 2}


def _elementwise_block(cfg: T5Config, q_len: int, kv_lens: Sequence[int], ffn_tokens: int) -> int:
    """Norms, softmaxes, residuals and activation of one layer (one attention per kv_len)."""
    n_sub = len(kv_lens) + 1  # Sub-blocks, each with a pre-norm and a residual add.
    act = _ACTIVATION.get(cfg.activation, 4) + (1 if cfg.is_gated else 0)
    return (n_sub * (_NORM + 1) * q_len * cfg.d_model
            + sum(_SOFTMAX * cfg.num_heads * q_len * kv for kv in kv_lens)
            + act * ffn_tokens * cfg.d_ff)


def plugin_flops(cfg: T5Config, n: int, ratio: Any, bottleneck: int = 64) -> dict[str, int]:
    """Matmul FLOPs of one layer's plugin on a sequence of length `n` (docs/DESIGN.md §1).

    With `n_pad = ceil(n/k)*k` and `g = n_pad/k` groups:
      compress:   scores W_c [k, k*d] per group, 2*g*k*k*d; weighted sum of k vectors, 2*g*k*d.
      decompress: W_i [r, 2d] and W_o [d, r] per position, 2*n_pad*(2*d*r + r*d).
    The frozen FFN between them is not counted here (see `encoder_flops`).
    """
    k, r = _plugin_args(ratio, bottleneck)
    d, groups = cfg.d_model, math.ceil(n / k)
    n_pad = groups * k
    compressor = getattr(ratio, "compressor", "variator")
    if compressor != "variator":  # Training-free: no matmuls but ToMe's similarity products.
        match = compressors.matching_flops(n_pad, k, d) if compressor == "tome" else 0
        return dict(compress=match, decompress=0, total=match)
    compress = 2 * groups * k * (k * d) + 2 * groups * k * d
    decompress = 2 * n_pad * (r * 2 * d + d * r)
    return dict(compress=compress, decompress=decompress, total=compress + decompress)


def encoder_flops(cfg: T5Config, n: int, ratio: Any = None, bottleneck: int = 64,
                  elementwise: bool = False) -> dict[str, int]:
    """Encoder matmul FLOPs for one sequence of `n` tokens, summed over all encoder layers.

    Args:
      cfg: the backbone.
      n: encoder length (real tokens plus padding: the model computes on all of them).
      ratio: plugin compression ratio k, a `PluginConfig` (its `ratio`/`bottleneck` are used),
        or None for the uncompressed backbone.
      bottleneck: plugin bottleneck r (ignored when `ratio` is a `PluginConfig` or None).
      elementwise: also count norms/softmax/activations/residuals (estimate, see module doc).
    Returns:
      dict of ints: attention_proj, attention_scores, ffn, plugin (0 without one),
      [elementwise,] total.
    """
    k, r = _plugin_args(ratio, bottleneck)
    layers, ffn_tokens = cfg.num_layers, n if k is None else math.ceil(n / k)
    out = dict(attention_proj=layers * _attention_proj_flops(cfg, n, n),
               attention_scores=layers * _attention_scores_flops(cfg, n, n),
               # §1: with a plugin the FFN sees ceil(n/k) merged vectors, in every layer.
               ffn=layers * _ffn_flops(cfg, ffn_tokens),
               plugin=0 if k is None else layers * plugin_flops(cfg, n, ratio, r)["total"])
    if elementwise:
        per_layer = _elementwise_block(cfg, n, [n], ffn_tokens)
        if k is not None:  # Group softmax + bias; W_i, W_o biases and the y^ add per position.
            n_pad = ffn_tokens * k
            if getattr(ratio, "compressor", "variator") == "variator":
                per_layer += _SOFTMAX * n_pad + n_pad * (r + 2 * cfg.d_model)
        out["elementwise"] = layers * per_layer + _NORM * n * cfg.d_model  # + final norm.
    out["total"] = sum(out.values())
    return out


def decoder_flops(cfg: T5Config, n_enc: int, m: int, elementwise: bool = False) -> dict[str, int]:
    """Decoder matmul FLOPs for `m` target tokens attending to `n_enc` encoder outputs.

    Teacher-forced (one forward over all `m` positions), summed over decoder layers. The
    plugin never changes the decoder. The cross-attention k/v projections run over the
    `n_enc` encoder outputs. lm_head is [d, vocab] on every target position.
    Returns dict of ints: self_attention_proj, self_attention_scores, cross_attention_proj,
    cross_attention_scores, ffn, lm_head, [elementwise,] total.
    """
    layers, d = cfg.num_decoder_layers, cfg.d_model
    out = dict(self_attention_proj=layers * _attention_proj_flops(cfg, m, m),
               self_attention_scores=layers * _attention_scores_flops(cfg, m, m),
               cross_attention_proj=layers * _attention_proj_flops(cfg, m, n_enc),
               cross_attention_scores=layers * _attention_scores_flops(cfg, m, n_enc),
               ffn=layers * _ffn_flops(cfg, m),
               lm_head=2 * m * d * cfg.vocab_size)
    if elementwise:  # + final norm and the d**-0.5 output scaling of tied models.
        out["elementwise"] = (layers * _elementwise_block(cfg, m, [m, n_enc], m)
                              + (_NORM + int(cfg.scale_decoder_outputs)) * m * d)
    out["total"] = sum(out.values())
    return out


def forward_flops(cfg: T5Config, n: int, m: int, ratio: Any = None, bottleneck: int = 64,
                  elementwise: bool = False) -> int:
    """FLOPs of one teacher-forced forward: encoder (n) + decoder (m) + lm_head.

    Example:
      >>> forward_flops(T5Config.variant("t5-base"), 512, 32) / 1e9  # doctest: +ELLIPSIS
      119.69...
    """
    return (encoder_flops(cfg, n, ratio, bottleneck, elementwise)["total"]
            + decoder_flops(cfg, n, m, elementwise)["total"])


# -- The table a reader of the paper checks ----------------------------------------------------
def flops_table(cfg: T5Config, lengths: Sequence[int] = (128, 256, 512),
                ratios: Sequence[int] = (2, 4, 8), bottleneck: int = 64) -> list[dict]:
    """Encoder FLOPs with and without a plugin, one row per (n, k).

    Each row: n, ratio, uncompressed, compressed (ints), saving = 1 - compressed/uncompressed.
    """
    rows = []
    for n in lengths:
        base = encoder_flops(cfg, n)["total"]
        for k in ratios:
            comp = encoder_flops(cfg, n, k, bottleneck)["total"]
            rows.append(dict(n=n, ratio=k, uncompressed=base, compressed=comp,
                             saving=1.0 - comp / base))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per n; per k, compressed GFLOPs and the saving in per cent."""
    lengths = list(dict.fromkeys(row["n"] for row in rows))
    ratios = list(dict.fromkeys(row["ratio"] for row in rows))
    cell = {(row["n"], row["ratio"]): row for row in rows}
    table = []
    for n in lengths:
        base = next(row["uncompressed"] for row in rows if row["n"] == n)
        cells = [f"{cell[n, k]['compressed'] / 1e9:.2f} (-{100 * cell[n, k]['saving']:.1f} %)"
                 if (n, k) in cell else "" for k in ratios]
        table.append([n, f"{base / 1e9:.2f}", *cells])
    return markdown_table(["n", "uncompressed GFLOPs", *(f"k = {k}" for k in ratios)], table,
                          align="r" * (2 + len(ratios)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Encoder FLOPs saved by Variator plugins.")
    parser.add_argument("--variant", default="t5-base", help="a T5Config.variant name")
    parser.add_argument("--lengths", default="128,256,512", help="encoder lengths n")
    parser.add_argument("--ratios", default="2,4,8", help="compression ratios k")
    parser.add_argument("--bottleneck", type=int, default=64, help="plugin bottleneck r")
    args = parser.parse_args(argv)
    cfg = T5Config.variant(args.variant)
    rows = flops_table(cfg, [int(x) for x in args.lengths.split(",")],
                       [int(x) for x in args.ratios.split(",")], args.bottleneck)
    print(f"{args.variant}: encoder FLOPs per sequence (matmuls, multiply-add = 2), "
          f"compressed GFLOPs (saving), bottleneck r = {args.bottleneck}")
    print(format_table(rows))


if __name__ == "__main__":
    cli.run_main(main)  # Bad input: one line, not a traceback.
