"""The Flax T5 against HF transformers' PyTorch T5 on tiny random models of every variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import variator_jax as vj
from tests.hf_reference import VARIANTS, build_hf_t5, padded_batch, rel_diff, save_hf_dir
from variator_jax import t5


@pytest.fixture(scope="module", params=[(v, scan) for v in sorted(VARIANTS)
                                        for scan in ("scan", "unrolled")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    """(variant, HF model, our cfg, our backbone loaded from the HF directory), with the layers
    scanned (`nn.scan`, parameters stacked) or unrolled."""
    variant, layout = request.param
    hf = build_hf_t5(variant)
    path = save_hf_dir(hf, str(tmp_path_factory.mktemp(variant)), variant)
    cfg, backbone = vj.load_hf_t5(path, scan_layers=layout == "scan")
    return variant, hf, cfg, backbone


def test_config_reads_variant_conventions(pair):
    variant, hf, cfg, _ = pair
    assert cfg.feed_forward_proj == hf.config.feed_forward_proj
    assert cfg.scale_decoder_outputs == hf.config.scale_decoder_outputs
    assert cfg.num_decoder_layers == hf.config.num_decoder_layers
    # The head is separate exactly when HF loaded a separate one.
    assert cfg.tie_word_embeddings == (variant in ("v1_0", "v1_1_shared_head"))


def test_forward_matches_hf(pair):
    _, hf, cfg, backbone = pair
    ids, mask, dec = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long), output_hidden_states=True)
    out = vj.forward(cfg, backbone, ids, mask, dec)
    real = mask > 0  # Outputs at padded encoder positions are not defined by either model.
    assert rel_diff(out["encoder_hidden"][real], ref.encoder_last_hidden_state.numpy()[real]) < 1e-4
    assert rel_diff(out["decoder_hidden"], ref.decoder_hidden_states[-1].numpy()) < 1e-4
    assert rel_diff(out["logits"], ref.logits.numpy()) < 1e-4
    assert out["logits"].dtype == jnp.float32


def test_decoder_attention_mask_matches_hf(pair):
    _, hf, cfg, backbone = pair
    ids, mask, dec = padded_batch(cfg.vocab_size, seed=1)
    dec_mask = np.ones_like(dec)
    dec_mask[0, 5:] = 0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                 decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    out = vj.forward(cfg, backbone, ids, mask, dec, dec_mask)["logits"]
    assert rel_diff(np.asarray(out)[dec_mask > 0], ref[dec_mask > 0]) < 1e-4


def _hf_greedy(hf, ids, mask, max_new_tokens):
    # HF's cached generate breaks when the decoder is deeper than the encoder.
    use_cache = hf.config.num_decoder_layers <= hf.config.num_layers
    with torch.no_grad():
        seq = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, use_cache=use_cache).numpy()[:, 1:]
    return np.pad(seq, ((0, 0), (0, max_new_tokens - seq.shape[1])))  # HF stops when all end.


def test_generate_matches_hf_greedy(pair):
    _, hf, cfg, backbone = pair
    ids, mask, _ = padded_batch(cfg.vocab_size, seed=2)
    ours = np.asarray(vj.generate(cfg, backbone, ids, mask, 10))
    assert ours.shape == (2, 10) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, _hf_greedy(hf, ids, mask, 10))


def test_generate_pads_after_eos():
    """Boost the EOS output row until greedy decoding ends mid-sequence in some row."""
    hf = build_hf_t5("v1_1")
    ids, mask, _ = padded_batch(hf.config.vocab_size, seed=3, n=12)
    for boost in np.linspace(1.0, 6.0, 11):
        with torch.no_grad():
            hf.lm_head.weight[1] = boost * (hf.lm_head.weight[2:].mean(0) + 0.3)
        ref = _hf_greedy(hf, ids, mask, 12)
        eos_at = [list(row).index(1) if 1 in row else -1 for row in ref]
        if any(0 < e < 11 for e in eos_at):
            break
    else:
        pytest.fail("no boost made EOS appear mid-sequence; adjust the test")
    cfg = vj.T5Config.from_hf(hf.config.to_dict())
    from variator_jax.convert import tree_from_hf
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    backbone = tree_from_hf(cfg.replace(tie_word_embeddings=False), tensors)
    ours = np.asarray(vj.generate(cfg.replace(tie_word_embeddings=False), backbone, ids, mask, 12))
    np.testing.assert_array_equal(ours, ref)
    row = int(np.argmax([0 < e < 11 for e in eos_at]))
    assert (ours[row, eos_at[row] + 1:] == 0).all() and ours[row, eos_at[row]] == 1


def test_generate_cache_equals_teacher_forcing(pair):
    """Greedy tokens are the argmax of one cache-free forward on their own prefix (causal)."""
    _, _, cfg, backbone = pair
    ids, mask, _ = padded_batch(cfg.vocab_size, seed=4)
    tokens = np.asarray(vj.generate(cfg, backbone, ids, mask, 6))
    dec = np.concatenate([np.zeros((2, 1), np.int32), tokens[:, :-1]], axis=1)
    argmax = np.asarray(jnp.argmax(vj.forward(cfg, backbone, ids, mask, dec)["logits"], -1))
    ended = np.cumsum(tokens == cfg.eos_token_id, axis=1) - (tokens == cfg.eos_token_id) > 0
    np.testing.assert_array_equal(np.where(ended, cfg.pad_token_id, argmax), tokens)


@pytest.mark.parametrize("blocks", ["queries", "examples"])
def test_blocked_encoder_attention_matches_hf(pair, blocks):
    """Long inputs on CPU run encoder attention in blocks (T5Config.attention_block_bytes):
    forced here on a tiny model, both kinds of block (query rows, with padding to a multiple
    of the block; whole examples) must still give HF's encoder output."""
    _, hf, cfg, backbone = pair
    b, n, h = 3, 37, cfg.num_heads
    rng = np.random.default_rng(5)
    ids = rng.integers(2, cfg.vocab_size, (b, n)).astype(np.int32)
    mask = np.ones((b, n), np.int32)
    mask[1, 20:], mask[2, 3:] = 0, 0
    budget, expected = {"queries": (h * 16 * n * 4, (1, 16)),
                        "examples": (h * n * n * 4, (1, n))}[blocks]
    cfg = cfg.replace(attention="blocked", attention_block_bytes=budget)
    assert t5.attention_blocks(b, h, n, n, budget) == expected  # Not the single dense block.
    encode = jax.jit(lambda p, i, m: t5.T5(cfg).apply({"params": p}, i, m, method=t5.T5.encode))
    with torch.no_grad():
        ref = hf.get_encoder()(input_ids=torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask > 0
    assert rel_diff(np.asarray(encode(backbone, ids, mask))[real], ref[real]) < 1e-4


@pytest.mark.parametrize("attention", ["dense", "xla"])
def test_attention_implementations_match_hf_and_the_blocked_path(pair, attention):
    """`T5Config.attention`: the dense path and `jax.nn.dot_product_attention` (XLA; cuDNN
    needs a GPU) give HF's encoder output and the CPU default's (blocked), padding included."""
    _, hf, cfg, backbone = pair
    ids, mask, _ = padded_batch(cfg.vocab_size)

    def encode(c):
        return np.asarray(t5.T5(c).apply({"params": backbone}, ids, mask, method=t5.T5.encode))

    with torch.no_grad():
        ref = hf.get_encoder()(input_ids=torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask > 0
    got = encode(cfg.replace(attention=attention))
    assert rel_diff(got[real], ref[real]) < 1e-4
    assert rel_diff(got[real], encode(cfg.replace(attention="blocked"))[real]) < 1e-5


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="'flash' is not one of 'auto', 'dense', 'blocked'"):
        vj.T5Config(attention="flash")
    with pytest.raises(ValueError, match="'cudnn' needs dtype bfloat16 or float16"):
        vj.T5Config(attention="cudnn")


def test_relative_position_bucket_matches_hf():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional,
                                                        buckets, dist)
            ours = t5.relative_position_bucket(jnp.array(rel), bidirectional, buckets, dist)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_bfloat16_compute_close_to_float32(pair):
    _, _, cfg, backbone = pair
    ids, mask, dec = padded_batch(cfg.vocab_size)
    full = vj.forward(cfg, backbone, ids, mask, dec)["logits"]
    half = vj.forward(cfg.replace(dtype="bfloat16"), backbone, ids, mask, dec)["logits"]
    assert half.dtype == jnp.float32  # Logits come back in float32 whatever the compute dtype.
    assert 1e-4 < rel_diff(half, full) < 5e-2


def test_frozen_backbone_stored_in_bfloat16_gives_the_per_step_cast(pair):
    """Stored once in the compute dtype, the backbone gives what casting it on every call
    gives (the modules' casts are then no-ops), in half the bytes; norms and the position
    bias stay float32, as the arithmetic reads them."""
    _, _, cfg, backbone = pair
    cfg = cfg.replace(dtype="bfloat16")
    stored = t5.frozen_in_compute_dtype(cfg, backbone)
    dtypes = {jax.tree_util.keystr(p): x.dtype
              for p, x in jax.tree_util.tree_leaves_with_path(stored)}
    assert {d for k, d in dtypes.items() if "kernel" in k} == {jnp.dtype(jnp.bfloat16)}
    assert ({d for k, d in dtypes.items() if "layer_norm" in k or "relative" in k}
            == {jnp.dtype(jnp.float32)})
    ids, mask, dec = padded_batch(cfg.vocab_size)
    per_step, once = (vj.forward(cfg, b, ids, mask, dec) for b in (backbone, stored))
    for key in ("logits", "encoder_hidden", "decoder_hidden"):
        np.testing.assert_allclose(np.asarray(once[key], np.float32),
                                   np.asarray(per_step[key], np.float32), rtol=1e-2, atol=1e-2)
    assert rel_diff(once["logits"], per_step["logits"]) < 1e-3  # bf16's own error is ~1e-2.
    assert t5.frozen_in_compute_dtype(cfg.replace(dtype="float32"), backbone) is backbone


def test_dropout_is_seeded_and_active():
    cfg = vj.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                      dropout_rate=0.2)
    backbone = vj.init_t5(jax.random.key(0), cfg)
    ids, mask, dec = padded_batch(64)

    def run(seed):
        return vj.forward(cfg, backbone, ids, mask, dec, deterministic=False,
                          dropout_rng=jax.random.key(seed, impl="rbg"))["logits"]

    np.testing.assert_array_equal(run(1), run(1))
    assert rel_diff(run(1), run(2)) > 1e-3
    assert rel_diff(run(1), vj.forward(cfg, backbone, ids, mask, dec)["logits"]) > 1e-3


def test_fully_padded_row_gives_no_nan(pair):
    _, _, cfg, backbone = pair
    ids, mask, dec = padded_batch(cfg.vocab_size)
    mask[1] = 0
    out = vj.forward(cfg, backbone, ids, mask, dec)
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_init_tree_equals_loaded_tree(pair):
    _, _, cfg, backbone = pair
    fresh = jax.eval_shape(vj.init_t5, jax.random.key(0), cfg)

    def shapes(tree):
        return jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), tree)

    assert shapes(fresh) == shapes(backbone)
    axes = t5.logical_axes(cfg)
    # Every parameter is named for sharding, one logical name per dimension.
    specs = jax.tree_util.tree_leaves(
        axes, is_leaf=lambda s: s is not None and type(s).__name__ == "PartitionSpec")
    for leaf, spec in zip(jax.tree_util.tree_leaves(fresh), specs, strict=True):
        assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec)


def test_variant_table():
    base = vj.T5Config.variant("t5-base")
    assert (base.d_model, base.num_layers, base.num_heads, base.d_ff) == (768, 12, 12, 3072)
    assert base.tie_word_embeddings and base.scale_decoder_outputs
    flan = vj.T5Config.variant("google/flan-t5-large")
    assert (flan.d_model, flan.d_ff, flan.feed_forward_proj) == (1024, 2816, "gated-gelu")
    assert not flan.tie_word_embeddings and not flan.scale_decoder_outputs
    # T5-base parameter count as published (docs/DESIGN.md §1: 222,903,552).
    shapes = jax.eval_shape(vj.init_t5, jax.random.key(0), base)
    n = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert n == 222_903_552
    with pytest.raises(ValueError, match="unknown T5 variant 't5-huge'"):
        vj.T5Config.variant("t5-huge")


def test_from_hf_defaults_and_bad_activation():
    cfg = vj.T5Config.from_hf({"d_model": 64})
    assert (cfg.vocab_size, cfg.num_decoder_layers, cfg.feed_forward_proj) == (32128, 6, "relu")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        vj.T5Config.from_hf({"feed_forward_proj": "gelu-gated"})


def test_remat_policies_give_the_same_gradients():
    """`remat` changes what the backward pass recomputes, never the numbers; the layer is
    really checkpointed (a remat in the jaxpr), and an unknown policy name fails in one line."""
    cfg = vj.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    backbone = vj.init_t5(jax.random.key(0), cfg)
    pcfg = vj.PluginConfig(ratio=2, bottleneck=4)
    plugin = jax.tree.map(lambda x: x + 0.1, vj.init_plugin(jax.random.key(1), cfg, pcfg))
    ids, mask, dec = padded_batch(64)
    # A fixed random projection of the output, not its squared norm: the final RMSNorm makes
    # sum(h ** 2) nearly constant, and its gradient (~4e-5) is then mostly float32 rounding
    # that any change of XLA's fusions moves by percents (jax 0.12's XLA:CPU does).
    proj = jax.random.normal(jax.random.key(2), (*ids.shape, cfg.d_model))

    def grads(remat):
        c = cfg.replace(remat=remat)

        def loss(p):
            return jnp.sum(vj.forward(c, backbone, ids, mask, dec, plugin=(pcfg, p))
                           ["encoder_hidden"] * proj)

        return jax.grad(loss)(plugin), str(jax.make_jaxpr(jax.grad(loss))(plugin))

    want, jaxpr = grads("none")
    assert "remat" not in jaxpr and "checkpoint" not in jaxpr
    for policy in ("full", "dots_with_no_batch_dims_saveable"):
        got, jaxpr = grads(policy)
        assert "remat" in jaxpr or "checkpoint" in jaxpr
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max())), got, want)
    with pytest.raises(ValueError, match="T5Config.remat 'most' is not 'none', 'full' or one of"):
        cfg.replace(remat="most")
