"""T5 in Flax Linen: `T5Config` (HF config.json, variant table) and modules named as in HF."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from variator_jax import plugins, sharding
from variator_jax.plugins import NEG_INF, PluginConfig

# Published sizes (HF hub config.json files of google-t5/* and google/*).
# (d_model, d_kv, d_ff, num_layers, num_heads); the decoder has as many layers.
_T5_V1_0 = {
    "small": (512, 64, 2048, 6, 8),
    "base": (768, 64, 3072, 12, 12),
    "large": (1024, 64, 4096, 24, 16),
    "3b": (1024, 128, 16384, 24, 32),
    "11b": (1024, 128, 65536, 24, 128),
}
_T5_V1_1 = {  # t5-v1_1-* and flan-t5-* share these sizes.
    "small": (512, 64, 1024, 8, 6),
    "base": (768, 64, 2048, 12, 12),
    "large": (1024, 64, 2816, 24, 16),
    "xl": (2048, 64, 5120, 24, 32),
    "xxl": (4096, 64, 10240, 24, 64),
}


# config.json fields whose JSON type must be exact ("d_model": "64" is refused, not guessed).
_HF_INT = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
           "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance")
_HF_TYPES = {**{k: (int, "an integer") for k in _HF_INT},
             "dropout_rate": ((int, float), "a number"),
             "layer_norm_epsilon": ((int, float), "a number"),
             "feed_forward_proj": (str, "a string"),
             "tie_word_embeddings": (bool, "true or false")}


def _check_hf_types(d, where: str) -> None:
    """Raises a one-line ValueError unless `d` is a JSON object with well-typed fields."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}/config.json is not a T5 config: a JSON object is expected, "
                         f"got a JSON {type(d).__name__}")
    for key, (kind, what) in _HF_TYPES.items():
        value = d.get(key)
        if value is None:
            continue
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(f"{where}/config.json: {key} must be {what}, got "
                             f"{json.dumps(value)} ({type(value).__name__})")


ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "blocked", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 hyper-parameters; field names follow HF `T5Config`.

    Example:
      >>> cfg = T5Config.variant("t5-v1_1-small")
      >>> cfg.feed_forward_proj, cfg.tie_word_embeddings
      ('gated-gelu', False)
    """
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers.
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1, flan, mT5).
    tie_word_embeddings: bool = True  # Shared input/output embedding.
    scale_decoder_outputs: bool | None = None  # d_model**-0.5 before lm_head; None: = tied.
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"  # Compute dtype ("bfloat16" on TPU/GPU); see `frozen_in_compute_dtype`.
    name: str = ""  # Identity of the backbone (variant name or path), for plugin fingerprints.
    # How the model runs, not what it is (never written to config.json; see RUNTIME_FIELDS):
    scan_layers: bool = True  # nn.scan over each stack's layers (params stacked on `layers`).
    # Per-layer rematerialisation: "none", "full", or a jax.checkpoint_policies name.
    remat: str = "none"
    # Encoder self-attention: "dense", "blocked", "auto" (blocked on CPU, else dense), or
    # `jax.nn.dot_product_attention`'s "xla" or "cudnn" (fused; GPU, bf16/fp16 only).
    attention: str = "auto"
    # "blocked": bytes of float32 scores per block, per device.
    attention_block_bytes: int = 4 << 20

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        act = self.feed_forward_proj.split("-")
        if len(act) > 2 or (len(act) == 2 and act[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not "
                             "'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"T5Config.{field} must be positive, got {getattr(self, field)}")
        remat_policy(self.remat)  # Raises for an unknown name.
        check_dtype(self.dtype)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"T5Config.attention {self.attention!r} is not one of "
                             f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
        if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"T5Config.attention 'cudnn' needs dtype bfloat16 or float16 "
                             f"(cuDNN's fused attention), got dtype {self.dtype!r}")

    # -- Derived ---------------------------------------------------------------------------------
    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Activation name as HF resolves it ('gated-gelu' uses the tanh-approximate gelu_new)."""
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **kw) -> T5Config:
        return dataclasses.replace(self, **kw)

    # -- HF interop ------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> T5Config:
        """From an HF `config.json` (a file, its directory, or its dict).

        Absent fields take HF `T5Config` defaults. Reads both conventions for the output scaling:
        transformers-5 files say `scale_decoder_outputs` (and always tie), v4-era files
        (t5-v1_1, flan-t5) only say `tie_word_embeddings`.
        """
        name = ""
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path) as f:
                    d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            name = os.path.abspath(os.path.dirname(path))
        _check_hf_types(d, name or "config")
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"config model_type is {model_type!r}, not a T5 "
                             "(expected 't5' or 'mt5')")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and k not in RUNTIME_FIELDS}
        kw.setdefault("tie_word_embeddings", True)
        if "scale_decoder_outputs" not in d:
            kw["scale_decoder_outputs"] = kw["tie_word_embeddings"]
        kw["name"] = d.get("_name_or_path") or name
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The config.json dict HF `T5ForConditionalGeneration.from_pretrained` reads."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in RUNTIME_FIELDS}
        d.update(model_type="t5", architectures=["T5ForConditionalGeneration"],
                 is_encoder_decoder=True, is_gated_act=self.is_gated,
                 dense_act_fn=self.activation)
        return d

    @classmethod
    def variant(cls, name: str, **overrides) -> T5Config:
        """A published size: t5-{small,base,large,3b,11b}, t5-v1_1-* and flan-t5-* {small..xxl}."""
        short = name.split("/")[-1]
        v1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        v1_0 = dict(feed_forward_proj="relu", tie_word_embeddings=True)
        for prefix, table, kw in (("t5-v1_1-", _T5_V1_1, v1_1), ("flan-t5-", _T5_V1_1, v1_1),
                                  ("t5-", _T5_V1_0, v1_0)):
            if short.startswith(prefix) and short[len(prefix):] in table:
                d_model, d_kv, d_ff, layers, heads = table[short[len(prefix):]]
                kw = dict(kw, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                          num_heads=heads, name=short)
                kw.update(overrides)
                return cls(**kw)
        known = [f"{p}{s}" for p, t in (("t5-", _T5_V1_0), ("t5-v1_1-", _T5_V1_1),
                                          ("flan-t5-", _T5_V1_1)) for s in t]
        close = difflib.get_close_matches(short, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown T5 variant {name!r}; {hint}known: {', '.join(known)}")


# A config is static data: passing it to a jitted function keys the cache, it is never traced.
jax.tree_util.register_static(T5Config)

# Fields that say how this process runs the model, not what the model is: never read from or
# written to an HF config.json.
RUNTIME_FIELDS = ("dtype", "name", "scan_layers", "remat", "attention", "attention_block_bytes")


# jax.checkpoint_policies that are policies themselves (the others are factories of policies).
_READY_POLICIES = ("dots_with_no_batch_dims_saveable", "dots_saveable", "checkpoint_dots",
                   "checkpoint_dots_with_no_batch_dims", "nothing_saveable", "everything_saveable")


def check_dtype(name, field: str = "T5Config.dtype") -> None:
    """Raises a one-line ValueError naming `field` unless `name` is a floating-point dtype
    (a compute dtype), before a bad one fails deep inside Flax."""
    try:
        ok = jnp.issubdtype(jnp.dtype(name), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{field} {name!r} is not a floating-point type: use 'float32', "
                         "'bfloat16' or 'float16'")


def remat_policy(name: str):
    """`T5Config.remat` -> (remat?, policy). "none": keep every activation; "full": recompute
    the whole layer in the backward pass (policy None); any other name is a ready policy of
    `jax.checkpoint_policies` (e.g. "dots_with_no_batch_dims_saveable": keep matmul outputs
    without batch dims, recompute the rest; "dots_saveable": keep every matmul output)."""
    if name == "none":
        return False, None
    if name == "full":
        return True, None
    if name not in _READY_POLICIES:
        raise ValueError(f"T5Config.remat {name!r} is not 'none', 'full' or one of "
                         f"jax.checkpoint_policies' {', '.join(_READY_POLICIES)}")
    policy = getattr(jax.checkpoint_policies, name)
    return True, policy


# ================================================================================================
# Flax Linen modules. Parameter names mirror HF T5 (`encoder.block.3.layer.1.DenseReluDense.wi`
# is `encoder/block_3/layer_1/DenseReluDense/wi`, or layer 3 of `encoder/layers/layer_1/...`
# when scanned; see stacking.py), so conversion is a rename, transposes and stacking.
# Every parameter carries logical axis names; only sharding.py maps them onto a mesh.
# ================================================================================================


def _dense_init(axes):
    return nn.with_logical_partitioning(nn.initializers.normal(0.05), axes)


def _act(name):
    return {"relu": nn.relu, "gelu": functools.partial(nn.gelu, approximate=False),
            "gelu_new": functools.partial(nn.gelu, approximate=True), "silu": nn.silu,
            "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}[name]


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction; statistics in float32 as HF."""
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (w * x32).astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Mesh TensorFlow's bucketing (as HF `T5Attention._relative_position_bucket`).

    Half the buckets are exact small offsets, the other half log-spaced up to `max_distance`.
    """
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # float32 log, then truncation toward zero: bit-compatible with HF's `.to(torch.long)`.
    log_ratio = jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / np.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head); owned by a stack and shared by all its layers (HF keeps
    it in the first layer's self-attention; conversion moves it, see stacking.py)."""
    cfg: T5Config
    bidirectional: bool

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.05), ("relpos_buckets", "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)

    def _lookup(self, relative_position):
        """Relative positions k - q (any shape) -> bias [..., heads] float32."""
        cfg = self.cfg
        return self.embedding[relative_position_bucket(
            relative_position, self.bidirectional, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance)]

    def __call__(self, q_pos, k_pos):
        """q_pos [q], k_pos [k] (absolute positions) -> bias [1, heads, q, k] float32."""
        return jnp.transpose(self._lookup(k_pos[None, :] - q_pos[:, None]), (2, 0, 1))[None]

    def by_offset(self, length):
        """The bias depends on k - q only: [heads, 2*length - 1], entry length-1 + k - q.

        For a full sequence this holds all of `__call__`'s values in O(length) memory."""
        return self._lookup(jnp.arange(1 - length, length)).T


class ToeplitzBias(NamedTuple):
    """Encoder self-attention bias in O(batch*n + heads*n) memory instead of [batch, heads, n, n].

    `mask` [batch, 1, 1, n] (0 or NEG_INF); `offsets` [heads, 2n-1] (see
    `RelativePositionBias.by_offset`), added by the first layer and shared by the rest.
    `block(q0, q_len)` is rows q0 .. q0+q_len-1 of mask + position bias,
    [batch, heads|1, q_len, n]: the same values, summed in the same order, as the dense bias.
    """
    mask: jax.Array
    offsets: jax.Array | None = None

    def block(self, q0, q_len: int):
        if self.offsets is None:
            return self.mask
        n = self.mask.shape[-1]
        # Row q is the contiguous slice offsets[:, n-1-q : 2n-1-q]: a gather of whole rows,
        # ~3x faster on CPU than gathering each (q, k) element.
        starts = (n - 1 - q0) - jnp.arange(q_len)
        rows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(self.offsets, s, n, axis=1),
                        out_axes=1)(starts)  # [heads, q_len, n]
        return self.mask + rows[None]


# XLA:CPU gives each call one fresh block of temporaries, and glibc maps blocks over 32 MiB
# afresh each time, so every page of them is faulted in on every call (~3 us per 4 KiB here):
# a dense [batch, heads, n, n] float32 score tensor (48 MiB for t5-base at n = 1024) costs more
# in page faults than in arithmetic. On CPU (`T5Config.attention` "auto" or "blocked") encoder
# attention therefore runs in blocks whose scores stay under `T5Config.attention_block_bytes`
# per device (default this many, and in cache); accelerators take one block.
ATTENTION_BLOCK_BYTES = 4 << 20
# With freed memory kept (`benchmarks/host.py`) the pages are reused, and the fewer the blocks the
# faster (t5-base widths, the attention core alone): at n = 1024 one block took 0.64-0.74x the
# time of 64-query blocks (batch 1 and 4), at n = 2048 0.51x; at n <= 512 all budgets were
# within noise. The benchmarks that keep freed memory set this budget in the config
# (`benchmarks.host.attention_block_bytes`); it then only bounds the memory the scores take.
ATTENTION_BLOCK_BYTES_KEPT = 256 << 20


def uses_blocked_attention(cfg: T5Config) -> bool:
    """Whether encoder self-attention runs in blocks: "blocked", or "auto" on a CPU backend."""
    return cfg.attention == "blocked" or (cfg.attention == "auto"
                                          and jax.default_backend() == "cpu")


def attention_blocks(batch: int, heads: int, q_len: int, k_len: int,
                     budget: int = ATTENTION_BLOCK_BYTES) -> tuple[int, int]:
    """(examples, queries) per attention block, for `batch` examples on one device: all of it
    when its float32 scores fit `budget` bytes; else whole examples per block if one fits, else
    one example and the largest power of two of queries within the budget (1024 -> 64 at
    t5-base widths and 4 MiB), or, where that would pad q_len by more than 1/8, q_len split
    evenly into multiples of 8 (300 -> 152, not 256)."""
    per_example = heads * q_len * k_len * 4
    if batch * per_example <= budget:
        return batch, q_len
    if per_example <= budget:
        return max(e for e in range(1, batch + 1)
                   if batch % e == 0 and e * per_example <= budget), q_len
    rows = max(8, budget // (heads * k_len * 4))  # Queries within the budget.
    queries = 1 << (rows.bit_length() - 1)  # Measured faster than e.g. 80 at n = 1024.
    if -q_len % queries > q_len // 8:
        queries = 8 * _ceil_div(_ceil_div(q_len, _ceil_div(q_len, rows)), 8)
    return 1, queries


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def blocked_attention(q, k, v, bias: ToeplitzBias, block: tuple[int, int], dropout=None):
    """softmax(q k^T + bias) v, one block of examples x queries at a time (exact blocking).

    q, k, v: [batch, n, heads, d_kv] in the compute dtype; `block` (examples, queries) from
    `attention_blocks`, with examples counted over all devices the batch is sharded over.
    `dropout` (weights -> weights) only with a single block. Returns [batch, n, heads, d_kv].
    """
    b, n, h, d = q.shape
    examples, queries = block
    if dropout is not None and block != (b, n):
        raise ValueError(f"attention dropout needs a single block, got {block} for {(b, n)}")
    pad = -n % queries
    # [batch, heads, length, d_kv]: the batched matmuls below then need no transposes.
    q, k, v = (jnp.pad(x, ((0, 0), (0, p), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
               for x, p in ((q, pad), (k, 0), (v, 0)))

    def query_block(qg, kg, vg, mask, i):
        qb = jax.lax.dynamic_slice_in_dim(qg, i * queries, queries, axis=2)
        scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kg).astype(jnp.float32)
        weights = jax.nn.softmax(scores + bias._replace(mask=mask).block(i * queries, queries),
                                 axis=-1).astype(q.dtype)
        weights = weights if dropout is None else dropout(weights)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, vg)

    def example_block(args):
        qg, kg, vg, mask = args
        if queries == n + pad:
            return query_block(qg, kg, vg, mask, 0)
        out = jax.lax.map(lambda i: query_block(qg, kg, vg, mask, i),
                          jnp.arange((n + pad) // queries))  # [blocks, e, h, queries, d]
        return jnp.moveaxis(out, 0, 2).reshape(qg.shape)

    if examples >= b:
        out = example_block((q, k, v, bias.mask))
    else:
        # Block j holds examples j, j + b/examples, ...: the batch axis is split minor-major, so
        # a batch sharded over devices stays sharded inside every block, and each device
        # works on its own examples (`examples` counts all devices' examples per block).
        def split(x):
            return sharding.constrain(jnp.swapaxes(
                x.reshape(examples, b // examples, *x.shape[1:]), 0, 1), (None, "batch"))

        out = jax.lax.map(example_block, tuple(map(split, (q, k, v, bias.mask))))
        out = jnp.swapaxes(out, 0, 1).reshape(q.shape)
    return out[:, :, :n].transpose(0, 2, 1, 3)


def fused_attention(q, k, v, bias, implementation: str):
    """softmax(q k^T + bias) v through `jax.nn.dot_product_attention`: T5 does not scale by
    1/sqrt(d_kv) (scale 1), and its position bias plus the mask is the additive `bias`.

    q, k, v: [batch, n, heads, d_kv]; bias [batch|1, heads|1, n, n] float32 (cuDNN takes it
    in the compute dtype, as HF's bf16 T5 holds it). Returns [batch, n, heads, d_kv].
    """
    if implementation == "cudnn":
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0,
                                        implementation=implementation)


class Attention(nn.Module):
    """T5 multi-head attention: no 1/sqrt(d_kv) scaling (folded into the init), additive bias.

    `bias` [batch|1, heads|1, q, k] float32 holds the mask plus the stack's position bias.
    The encoder passes a `ToeplitzBias` instead (self-attention over the full sequence, where
    the position bias is a function of k - q); on CPU (`uses_blocked_attention`) attention then
    runs in blocks (`blocked_attention`) that never hold [batch, heads, n, n].

    `cache`: None (no caching); for self-attention while decoding, a dict of `k`, `v`
    [batch, max_len, heads, d_kv] and `index` (the new keys/values are written there and
    attention runs over the whole cache, the bias masking unwritten slots); for
    cross-attention, the dict of precomputed `k`, `v`. With `x` None the call only computes
    the keys/values of `kv` and returns them as that cross-attention cache.
    Returns (output [batch, q_len, d_model], cache).
    """
    cfg: T5Config

    @nn.compact
    def __call__(self, x, kv, bias, deterministic=True, cache=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        proj = functools.partial(nn.DenseGeneral, features=(cfg.num_heads, cfg.d_kv),
                                 use_bias=False, dtype=dt, param_dtype=jnp.float32,
                                 kernel_init=_dense_init(("embed", "heads", "kv")))
        if x is None:  # Cross-attention keys/values for a decoding cache.
            return None, {"k": proj(name="k")(kv), "v": proj(name="v")(kv)}
        q = proj(name="q")(x)  # [batch, q_len, heads, d_kv]
        if cache is not None and "index" not in cache:  # Cross, precomputed.
            k, v = cache["k"], cache["v"]
        else:
            k, v = proj(name="k")(kv), proj(name="v")(kv)
            if cache is not None:  # Self-attention decoding step.
                idx = (0, cache["index"], 0, 0)
                k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), idx)
                v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), idx)
                cache = dict(cache, k=k, v=v)
        dropout = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=deterministic)
        active = not deterministic and cfg.dropout_rate > 0  # Flax dropout needs one block.
        if isinstance(bias, ToeplitzBias) and uses_blocked_attention(cfg) and not active:
            per_device = q.shape[0] // sharding.batch_shards(q.shape[0])
            examples, queries = attention_blocks(per_device, cfg.num_heads, q.shape[1],
                                                 k.shape[1], cfg.attention_block_bytes)
            block = (examples * (q.shape[0] // per_device), queries)
            out = blocked_attention(q, k, v, bias, block)
        elif isinstance(bias, ToeplitzBias) and cfg.attention in ("xla", "cudnn") and not active:
            out = fused_attention(q, k.astype(dt), v.astype(dt), bias.block(0, q.shape[1]),
                                  cfg.attention)
        else:
            if isinstance(bias, ToeplitzBias):
                bias = bias.block(0, q.shape[1])
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(dt)).astype(jnp.float32) + bias
            weights = dropout(jax.nn.softmax(scores, axis=-1).astype(dt))
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(dt))
        out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dt,
                              param_dtype=jnp.float32, name="o",
                              kernel_init=_dense_init(("heads", "kv", "embed")))(out)
        return out, cache


class DenseReluDense(nn.Module):
    """The FFN: wo(act(wi x)) (v1.0) or wo(act(wi_0 x) * wi_1 x) (gated, v1.1 / flan / mT5)."""
    cfg: T5Config

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = functools.partial(nn.Dense, use_bias=False, dtype=dt, param_dtype=jnp.float32)
        act = _act(cfg.activation)
        if cfg.is_gated:
            wi_0 = dense(cfg.d_ff, name="wi_0", kernel_init=_dense_init(("embed", "mlp")))(x)
            wi_1 = dense(cfg.d_ff, name="wi_1", kernel_init=_dense_init(("embed", "mlp")))(x)
            h = act(wi_0) * wi_1
        else:
            h = act(dense(cfg.d_ff, name="wi", kernel_init=_dense_init(("embed", "mlp")))(x))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, name="wo", kernel_init=_dense_init(("mlp", "embed")))(h)



class LayerSelfAttention(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, h, bias, deterministic=True, cache=None):
        cfg = self.cfg
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="layer_norm")(h)
        y, cache = Attention(cfg, name="SelfAttention")(x, x, bias, deterministic, cache)
        return h + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic), cache


class LayerCrossAttention(nn.Module):
    """Pre-norm cross-attention with residual; with `h` None, only the cache of `enc` (see
    `Attention`)."""
    cfg: T5Config

    @nn.compact
    def __call__(self, h, enc, bias, deterministic=True, cache=None):
        cfg = self.cfg
        if h is None:
            return None, Attention(cfg, name="EncDecAttention")(None, enc, None)[1]
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="layer_norm")(h)
        y, cache = Attention(cfg, name="EncDecAttention")(x, enc, bias, deterministic, cache)
        return h + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic), cache


class LayerFF(nn.Module):
    """Pre-norm FFN block with residual; with a plugin, the FFN runs on merged vectors (§1).

    `pcfg` (static) and `plugin` (one layer's params) are both None for a plain FFN."""
    cfg: T5Config
    pcfg: PluginConfig | None = None

    @nn.compact
    def __call__(self, h, mask=None, plugin=None, deterministic=True):
        cfg = self.cfg
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="layer_norm")(h)
        ffn = DenseReluDense(cfg, name="DenseReluDense")
        drop = nn.Dropout(cfg.dropout_rate)
        if self.pcfg is None:
            return h + drop(ffn(x, deterministic), deterministic=deterministic)
        o = plugins.compressed_ffn(
            x, mask, plugin, self.pcfg,
            lambda c: drop(ffn(c, deterministic), deterministic=deterministic))
        return h + o.astype(h.dtype)


# The residual stream between layers: batch over data, the rest as the rules say (t5x, MaxText).
RESIDUAL_AXES = ("batch", "length", "embed")


class EncoderBlock(nn.Module):
    """One encoder layer, in the form `nn.scan` wants:
    (h, *broadcast, plugin layer) -> (h, None)."""
    cfg: T5Config
    pcfg: PluginConfig | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, h, bias, mask, plugin):
        h, _ = LayerSelfAttention(self.cfg, name="layer_0")(h, bias, self.deterministic)
        h = LayerFF(self.cfg, self.pcfg, name="layer_1")(h, mask, plugin, self.deterministic)
        return sharding.constrain(h, RESIDUAL_AXES), None


class DecoderBlock(nn.Module):
    """One decoder layer: (h, *broadcast, cache layer) -> (h, new cache layer or None).

    `prefill`: compute only this layer's cross-attention cache from `enc` (h passes through)."""
    cfg: T5Config
    deterministic: bool = True
    prefill: bool = False

    @nn.compact
    def __call__(self, h, enc, self_bias, cross_bias, index, cache):
        cfg, det = self.cfg, self.deterministic
        if self.prefill:
            return h, LayerCrossAttention(cfg, name="layer_1")(None, enc, None)[1]
        self_cache = None if cache is None else dict(cache["self"], index=index)
        h, self_cache = LayerSelfAttention(cfg, name="layer_0")(h, self_bias, det, self_cache)
        h, cross_cache = LayerCrossAttention(cfg, name="layer_1")(
            h, enc, cross_bias, det, None if cache is None else cache["cross"])
        h = LayerFF(cfg, name="layer_2")(h, deterministic=det)
        new_cache = None if cache is None else {
            "self": {"k": self_cache["k"], "v": self_cache["v"]}, "cross": cross_cache}
        return sharding.constrain(h, RESIDUAL_AXES), new_cache


def layer_stack(cfg: T5Config, block, length: int, carry, broadcast: tuple, xs, **attrs):
    """`length` layers of `block(cfg, **attrs)`, called as `block(carry, *broadcast, xs[i])
    -> (carry, y_i)`; returns (carry, the y_i stacked on a leading axis).

    `cfg.scan_layers`: one `nn.scan` named `layers` (parameters stacked on the `layers`
    logical axis; the compiler sees one layer, whatever the depth), else `block_0 ..`
    unrolled. `cfg.remat` wraps each layer in `nn.remat` with its policy (t5x scalable_t5,
    MaxText decoders). Must be called inside a Flax module's compact method.
    """
    do_remat, policy = remat_policy(cfg.remat)
    if do_remat:
        block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        scanned = nn.scan(block, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=length,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        return scanned(cfg, name="layers", **attrs)(carry, *broadcast, xs)
    ys = []
    for i in range(length):
        carry, y = block(cfg, name=f"block_{i}", **attrs)(
            carry, *broadcast, jax.tree.map(lambda x, i=i: x[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def _mask_bias(mask):
    """[batch, k] 1/0 -> additive [batch, 1, 1, k] float32."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, NEG_INF).astype(jnp.float32)


class Encoder(nn.Module):
    """Encoder stack on embedded inputs [batch, n, d_model] -> final hidden [batch, n, d_model].

    `plugin`: None or a `plugins.Plugin` whose params are stacked [num_layers, ...]."""
    cfg: T5Config

    @nn.compact
    def __call__(self, h, mask, plugin=None, deterministic=True):
        cfg = self.cfg
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = sharding.constrain(h, RESIDUAL_AXES)
        # The stack owns the position bias; every layer adds the same one (HF: layer 0's).
        relative = RelativePositionBias(cfg, True, name="relative_attention_bias")
        bias = ToeplitzBias(_mask_bias(mask), relative.by_offset(h.shape[1]))
        pcfg, params = (None, None) if plugin is None else (plugin.config, plugin.params)
        if plugin is not None and plugin.num_layers not in (None, cfg.num_layers):
            raise ValueError(f"plugin num_layers {plugin.num_layers} != model num_layers "
                             f"(encoder) {cfg.num_layers}")
        h, _ = layer_stack(cfg, EncoderBlock, cfg.num_layers, h, (bias, mask), params,
                           pcfg=pcfg, deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="final_layer_norm")(h)
        return nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class Decoder(nn.Module):
    """Decoder stack. Full sequence: positions 0..m-1, causal. Decoding (`cache` given, leaves
    stacked [layers, ...]): positions from `cache_index`, attending to the cache's max_len
    slots (later ones masked). `prefill`: only the cross-attention cache of `enc`."""
    cfg: T5Config

    @nn.compact
    def __call__(self, h, enc, enc_mask, dec_mask=None, deterministic=True, cache=None,
                 cache_index=None, prefill=False):
        cfg = self.cfg
        if prefill:
            return layer_stack(cfg, DecoderBlock, cfg.num_decoder_layers, jnp.zeros(()),
                               (enc, None, None, None), None, prefill=True)[1]
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = sharding.constrain(h, RESIDUAL_AXES)
        if cache is None:
            m = h.shape[1]
            q_pos = k_pos = jnp.arange(m)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, m, m] causal.
            if dec_mask is not None:
                allowed = allowed & (dec_mask[:, None, None, :] > 0)
        else:
            max_len = cache["self"]["k"].shape[2]  # [layers, batch, max_len, heads, d_kv]
            q_pos, k_pos = cache_index + jnp.arange(h.shape[1]), jnp.arange(max_len)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        relative = RelativePositionBias(cfg, False, name="relative_attention_bias")
        self_bias = jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32) + relative(q_pos, k_pos)
        h, new_cache = layer_stack(cfg, DecoderBlock, cfg.num_decoder_layers, h,
                                   (enc, self_bias, _mask_bias(enc_mask), cache_index), cache,
                                   deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, jnp.dtype(cfg.dtype), name="final_layer_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return h, new_cache


class T5(nn.Module):
    """Encoder-decoder T5 with HF's parameter names. Methods: `encode`, `decode`, `logits`,
    `cross_cache`."""
    cfg: T5Config

    def setup(self):
        cfg = self.cfg
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.float32, embedding_init=nn.with_logical_partitioning(
                                   nn.initializers.normal(1.0), ("vocab", "embed")))
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                                    param_dtype=jnp.float32,
                                    kernel_init=_dense_init(("embed", "vocab")))

    def encode(self, input_ids, attention_mask, plugin=None, deterministic=True):
        """[batch, n] ids and 1/0 mask -> encoder hidden [batch, n, d_model]. `plugin`: None,
        a `plugins.Plugin` or a `(PluginConfig, params)` tuple."""
        return self.encoder(self.shared(input_ids), attention_mask, plugins.as_plugin(plugin),
                            deterministic)

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask,
               decoder_attention_mask=None, deterministic=True, cache=None, cache_index=None):
        """-> (decoder hidden [batch, m, d_model] after the final norm, new cache or None)."""
        return self.decoder(self.shared(decoder_input_ids), encoder_hidden, attention_mask,
                            decoder_attention_mask, deterministic, cache, cache_index)

    def cross_cache(self, encoder_hidden):
        """The cross-attention part of a decoding cache: {k, v} [layers, batch, n, heads, d_kv]."""
        return self.decoder(None, encoder_hidden, None, prefill=True)

    def logits(self, decoder_hidden):
        """[batch, m, d_model] -> [batch, m, vocab] float32."""
        if self.cfg.scale_decoder_outputs:  # v1.0 scales before the shared output embedding.
            decoder_hidden = decoder_hidden * (self.cfg.d_model ** -0.5)
        if self.cfg.tie_word_embeddings:
            out = self.shared.attend(decoder_hidden)
        else:
            out = self.lm_head(decoder_hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 plugin=None, deterministic=True):
        enc = self.encode(input_ids, attention_mask, plugin, deterministic)
        dec, _ = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                             deterministic)
        return {"logits": self.logits(dec), "encoder_hidden": enc, "decoder_hidden": dec}


# Leaves a frozen backbone keeps in float32 in any compute dtype: the norms' scales and the
# position-bias tables enter float32 arithmetic (RMSNorm, the scores) and are small.
_FLOAT32_LEAVES = ("layer_norm", "relative_attention_bias")


def frozen_in_compute_dtype(cfg: T5Config, backbone):
    """The frozen backbone as every step reads it: kernels and embeddings stored in
    `cfg.dtype`, so that a step never casts frozen weights (the modules cast float32 params
    to the compute dtype on each call; already there, the cast is free) and the devices hold
    half the bytes in bfloat16. The numbers are those of casting per step.

    `backbone`: a tree of numpy or jax arrays, or of `jax.ShapeDtypeStruct`s (shardings kept).
    A trained tree (the plugin, a backbone being fine-tuned) stays float32.
    """
    dt = jnp.dtype(cfg.dtype)
    if backbone is None or dt == jnp.float32:
        return backbone

    def store(path, x):
        if any(name in jax.tree_util.keystr(path) for name in _FLOAT32_LEAVES):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)

    return jax.tree_util.tree_map_with_path(store, backbone)


def init_t5(rng, cfg: T5Config):
    """A random backbone: the same tree (float32) as `load_hf_t5` returns.

    Example:
      >>> backbone = init_t5(jax.random.key(0), T5Config.variant("t5-small"))
      >>> backbone["shared"]["embedding"].shape
      (32128, 512)
    """
    return nn.unbox(jax.jit(functools.partial(_init_boxed, cfg=cfg))(rng))


def _init_boxed(rng, cfg):
    ids = jnp.ones((1, 2), jnp.int32)
    return T5(cfg).init(rng, ids, ids, ids)["params"]


def logical_axes(cfg: T5Config):
    """The backbone tree with a `PartitionSpec` of logical axis names per leaf."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, cfg=cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)
