"""Forward passes over (config, backbone tree, optional plugin): teacher and student alike.

The teacher is `forward(..., plugin=None)`; the student is the same call with
`plugin=(pcfg, plugin_params)` or a `plugins.Plugin`. Configs are static pytree data, so
passing a different plugin of the same ratio reuses the compiled function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from variator_jax.plugins import as_plugin
from variator_jax.t5 import T5, T5Config


def shift_right(targets, start_id: int = 0):
    """Teacher forcing: [batch, m] targets -> decoder inputs starting with `start_id`.

    Example:
      >>> shift_right(jnp.array([[5, 6, 1, 0]]))
      Array([[0, 5, 6, 1]], dtype=int32)
    """
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


def apply_forward(cfg: T5Config, backbone, input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask=None, plugin=None, *, deterministic: bool = True,
            dropout_rng=None):
    """The full encoder-decoder pass.

    Args:
      input_ids, attention_mask: [batch, n] int; mask 1 for real tokens, 0 for padding.
      decoder_input_ids: [batch, m] (targets shifted right, see `shift_right`).
      decoder_attention_mask: optional [batch, m]; masks padded decoder keys.
      plugin: None (the uncompressed teacher), `(PluginConfig, plugin_params)` or a
        `plugins.Plugin`.
      deterministic: False enables dropout, drawn from `dropout_rng`.
    Returns:
      dict with `logits` [batch, m, vocab] float32, `encoder_hidden` [batch, n, d_model]
      and `decoder_hidden` [batch, m, d_model] (both after the final layer norm, as HF's
      `last_hidden_state`).

    Example:
      >>> out = forward(cfg, backbone, ids, mask, shift_right(labels), plugin=(pcfg, plugin))
    """
    rngs = None if deterministic else {"dropout": dropout_rng}
    return T5(cfg).apply({"params": backbone}, input_ids, attention_mask, decoder_input_ids,
                         decoder_attention_mask, as_plugin(plugin), deterministic, rngs=rngs)


# `forward` jitted on its own. Steps that are jitted as a whole call `apply_forward`: a nested
# jit would reuse a trace made outside the step's `sharding.activation_sharding` context.
forward = jax.jit(apply_forward, static_argnames=("deterministic",))


@jax.jit
def encode(cfg: T5Config, backbone, input_ids, attention_mask, plugin=None):
    """Encoder only: [batch, n] -> [batch, n, d_model] (the part a plugin accelerates).

    Example:
      >>> hidden = encode(cfg, backbone, ids, mask, plugin=(pcfg, plugin))
      >>> hidden.shape == (*ids.shape, cfg.d_model)
      True
    """
    return T5(cfg).apply({"params": backbone}, input_ids, attention_mask, as_plugin(plugin),
                         method=T5.encode)


@jax.jit
def classify(cfg: T5Config, backbone, input_ids, attention_mask, label_ids, plugin=None):
    """Verbalizer scores: the decoder's logits at its first position, at each label's token.

    As evaluation scores classification (docs/DESIGN.md §2, stage 0): one decoder step from
    the start token; the predicted label is the argmax.
    Args:
      label_ids: [num_labels] int, the first token of each label word
        (`data.Task.verbalizer_ids`).
    Returns:
      [batch, num_labels] float32 logits.
    """
    start = jnp.full((input_ids.shape[0], 1), cfg.decoder_start_token_id, jnp.int32)
    logits = apply_forward(cfg, backbone, input_ids, attention_mask, start, plugin=plugin)["logits"]
    return logits[:, 0][:, label_ids].astype(jnp.float32)


def _decode_step(cfg, backbone, token, enc, enc_mask, cache, index):
    """One greedy step: token [batch, 1] at position `index` -> (logits [batch, vocab], cache)."""
    model = T5(cfg)
    hidden, cache = model.apply({"params": backbone}, token, enc, enc_mask, None, True, cache,
                                index, method=T5.decode)
    return model.apply({"params": backbone}, hidden, method=T5.logits)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def generate(cfg: T5Config, backbone, input_ids, attention_mask, max_new_tokens: int,
             plugin=None):
    """Greedy decoding with a key/value cache.

    Returns only the new tokens, [batch, max_new_tokens] int32: each row starts after the
    decoder start token, ends with EOS, and holds `pad_token_id` after it (as HF's greedy
    `generate` with `max_new_tokens`, padded to full length).

    Example:
      >>> batch = tokenizer(["Return the absolute value"], return_tensors="np")
      >>> ids = generate(cfg, backbone, batch["input_ids"], batch["attention_mask"],
      ...                max_new_tokens=16, plugin=(pcfg, plugin))
      >>> tokenizer.batch_decode(jax.device_get(ids), skip_special_tokens=True)
    """
    enc = encode(cfg, backbone, input_ids, attention_mask, plugin)
    batch, dt = input_ids.shape[0], jnp.dtype(cfg.dtype)
    # The whole cache up front, stacked over decoder layers: the cross-attention keys/values
    # of `enc`, and zeros for the self-attention slots; every step then sees one structure.
    kv = jnp.zeros((cfg.num_decoder_layers, batch, max_new_tokens, cfg.num_heads, cfg.d_kv), dt)
    cache = {"self": {"k": kv, "v": kv},
             "cross": T5(cfg).apply({"params": backbone}, enc, method=T5.cross_cache)}
    start = jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32)

    def step(carry, index):
        token, cache, done = carry
        logits, cache = _decode_step(cfg, backbone, token[:, None], enc, attention_mask, cache,
                                     index)
        nxt = jnp.where(done, cfg.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return (nxt, cache, done | (nxt == cfg.eos_token_id)), nxt

    _, tokens = jax.lax.scan(step, (start, cache, jnp.zeros((batch,), bool)),
                             jnp.arange(max_new_tokens))
    return tokens.T
