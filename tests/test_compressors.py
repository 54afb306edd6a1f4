"""Training-free compressors (compressors.py) against naive NumPy restatements, and through
the model, the plugin files and the evaluation entry."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import variator_jax as vj
from tests.test_utils import tiny_t5
from variator_jax import compressors, evaluate


def _inputs(b=3, n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, n, d)).astype(np.float32)
    lengths = [n, n - 5, 3][:b]
    mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return x, mask


# -- NumPy restatements: loops over rows and groups, float64 ------------------------------------
def np_mean_pool(x, mask, k):
    b, n, d = x.shape
    out = np.zeros((b, n // k, d))
    for row in range(b):
        for g in range(n // k):
            members = [i for i in range(g * k, (g + 1) * k) if mask[row, i]]
            if members:
                out[row, g] = np.mean([x[row, i] for i in members], axis=0)
    return out


def np_tome(x, mask, k):
    """ToMe's bipartite soft matching written as lists of (sum, size, members)."""
    def unit(v):
        return v / max(np.linalg.norm(v), 1e-12)

    b, n, d = x.shape
    merged, assign = np.zeros((b, n // k, d)), np.zeros((b, n), int)
    for row in range(b):
        tokens = [(x[row, i].astype(np.float64) * mask[row, i], float(mask[row, i]), [i])
                  for i in range(n)]
        while len(tokens) > n // k:
            m = len(tokens)
            r = min(m // 2, m - n // k)
            a_set, b_set = tokens[0::2], tokens[1::2]
            best, partner = [], []
            for a_sum, a_size, _ in a_set:
                scores = [unit(a_sum) @ unit(b_sum) if b_size > 0 else -np.inf
                          for b_sum, b_size, _ in b_set]
                partner.append(int(np.argmax(scores)))
                best.append(np.inf if a_size == 0 else max(scores))
            order = sorted(range(len(a_set)), key=lambda i: -best[i])  # Stable: ties by index.
            src, unmerged = order[:r], order[r:]
            b_set = [list(t) for t in b_set]
            for i in src:
                j = partner[i]
                b_set[j] = [b_set[j][0] + a_set[i][0], b_set[j][1] + a_set[i][1],
                            b_set[j][2] + a_set[i][2]]
            tokens = [a_set[i] for i in unmerged] + [tuple(t) for t in b_set]
        for j, (total, size, members) in enumerate(tokens):
            merged[row, j] = total / size if size > 0 else 0
            for i in members:
                assign[row, i] = j
    return merged, assign


@pytest.mark.parametrize("k", [2, 4, 8])
def test_mean_pool_matches_numpy(k):
    x, mask = _inputs()
    merged, assign = compressors.mean_pool(jnp.asarray(x), jnp.asarray(mask), k)
    np.testing.assert_allclose(merged, np_mean_pool(x, mask, k), atol=1e-6)
    np.testing.assert_array_equal(assign, np.broadcast_to(np.arange(16) // k, (3, 16)))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_tome_matches_numpy_and_conserves_sizes(k):
    x, mask = _inputs()
    merged, assign = compressors.tome(jnp.asarray(x), jnp.asarray(mask), k)
    want, want_assign = np_tome(x, mask, k)
    np.testing.assert_array_equal(assign, want_assign)
    np.testing.assert_allclose(merged, want, atol=1e-5)
    merged, assign = np.asarray(merged), np.asarray(assign)
    for row in range(3):
        sizes = collections.Counter(int(assign[row, i]) for i in range(16) if mask[row, i])
        # Every real token lands in exactly one merged token, and a merged token is the plain
        # average of the real tokens it absorbed (size-weighted merging conserves sizes).
        assert sum(sizes.values()) == mask[row].sum()
        for j in range(16 // k):
            members = [i for i in range(16) if mask[row, i] and assign[row, i] == j]
            expected = np.mean(x[row, members], axis=0) if members else np.zeros(8)
            np.testing.assert_allclose(merged[row, j], expected, atol=1e-5)


def test_tome_merges_the_most_similar_pairs_first():
    # Tokens 0/1 and 2/3 are near-duplicates, 4/5 and 6/7 are orthogonal pairs: at k = 2 (r =
    # n/2, every A token merges) the duplicate pairs must merge with each other.
    e = np.eye(8, dtype=np.float32)
    x = np.stack([e[0], e[0] + 0.01, e[1], e[1] + 0.01, e[2], e[3], e[4], e[5]])[None]
    _, assign = compressors.tome(jnp.asarray(x), jnp.ones((1, 8), jnp.int32), 2)
    assert assign[0, 0] == assign[0, 1] and assign[0, 2] == assign[0, 3]
    assert assign[0, 0] != assign[0, 2]


@pytest.mark.parametrize("k", [2, 4])
def test_strided_keeps_the_first_member_of_each_group(k):
    x, mask = _inputs()
    merged, assign = compressors.strided(jnp.asarray(x), jnp.asarray(mask), k)
    kept = np.arange(0, 16, k)  # Positions 0, k, 2k, ...
    expected = x[:, kept] * mask[:, kept, None]
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_array_equal(assign, np.broadcast_to(np.arange(16) // k, (3, 16)))


def _model(seed=0):
    cfg = tiny_t5()
    return cfg, vj.init_t5(jax.random.key(seed), cfg)


def _batch(n=13):
    ids = jax.random.randint(jax.random.key(1), (2, n), 3, 300)
    mask = jnp.ones((2, n), jnp.int32).at[1, 9:].set(0)
    return ids * mask, mask, jnp.zeros((2, 3), jnp.int32)


@pytest.mark.parametrize("name", compressors.TRAINING_FREE)
def test_every_compressor_at_k1_is_the_teacher(name):
    cfg, backbone = _model()
    ids, mask, dec = _batch()
    teacher = vj.forward(cfg, backbone, ids, mask, dec)
    pcfg = vj.PluginConfig(ratio=1, compressor=name)
    out = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, vj.init_plugin(None, cfg, pcfg)))
    np.testing.assert_allclose(out["logits"], teacher["logits"], atol=1e-5)
    # At k = 4 it does compress: the outputs move.
    pcfg = vj.PluginConfig(ratio=4, compressor=name)
    out = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, vj.init_plugin(None, cfg, pcfg)))
    assert float(jnp.abs(out["encoder_hidden"] - teacher["encoder_hidden"]).max()) > 1e-2


def test_variator_at_k1_with_a_zero_expansion_is_the_teacher():
    cfg, backbone = _model()
    ids, mask, dec = _batch()
    pcfg = vj.PluginConfig(ratio=1)
    plugin = vj.init_plugin(jax.random.key(2), cfg, pcfg)
    plugin = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "wo" in jax.tree_util.keystr(p) else v, plugin)
    out = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, plugin))
    np.testing.assert_allclose(out["logits"], vj.forward(cfg, backbone, ids, mask, dec)["logits"],
                               atol=1e-5)


@pytest.mark.parametrize("name", compressors.TRAINING_FREE)
def test_compressor_is_independent_of_padding(name):
    cfg, backbone = _model()
    ids, mask, dec = _batch(n=12)
    pcfg = vj.PluginConfig(ratio=4, compressor=name)
    plugin = (pcfg, vj.init_plugin(None, cfg, pcfg))
    short = vj.forward(cfg, backbone, ids[1:, :9], mask[1:, :9], dec[1:], plugin=plugin)
    padded = vj.forward(cfg, backbone, ids[1:], mask[1:], dec[1:], plugin=plugin)
    np.testing.assert_allclose(padded["encoder_hidden"][:, :9], short["encoder_hidden"], atol=1e-5)


def test_compressor_plugin_files_round_trip(tmp_path):
    cfg, backbone = _model()
    pcfg = vj.PluginConfig(ratio=4, compressor="tome")
    vj.save_plugin(tmp_path / "tome", pcfg, vj.init_plugin(None, cfg, pcfg),
                   vj.backbone_identity(cfg, backbone))
    loaded_cfg, tree = vj.load_plugin(tmp_path / "tome", cfg=cfg, backbone=backbone)
    assert loaded_cfg == pcfg and tree == {}
    assert vj.plugin_param_count(cfg, pcfg) == 0


def test_unknown_compressor_is_one_clear_error():
    with pytest.raises(ValueError,
                       match="compressor 'avg'.*known: variator, mean_pool, tome, strided"):
        vj.PluginConfig(ratio=4, compressor="avg")


def test_eval_entries_name_compressors():
    assert evaluate.compressor_spec("tome:4") == vj.PluginConfig(ratio=4, compressor="tome")
    assert evaluate.compressor_spec("runs/k4/plugin") is None
    assert evaluate.compressor_spec("variator:4") is None  # Trained plugins come from files.


def test_a_compressor_serves_like_a_plugin():
    from variator_jax import serving
    cfg, backbone = _model()
    pcfg = vj.PluginConfig(ratio=4, compressor="tome")
    plugin = (pcfg, vj.init_plugin(None, cfg, pcfg))
    engine = serving.AdaptiveEngine(cfg, backbone, {4: plugin}, serving.bucket_grid([2], [16]))
    ids, mask, _ = _batch(n=12)
    served = engine.run(4, np.asarray(ids), np.asarray(mask))
    direct = vj.encode(cfg, backbone, ids, mask, plugin)
    real = np.asarray(mask)[..., None] > 0
    np.testing.assert_allclose(np.where(real, served, 0), np.where(real, direct, 0), atol=1e-5)


def test_attach_plugin_refuses_a_training_free_compressor(tmp_path):
    import transformers

    from variator_jax import torch_plugin
    cfg, backbone = _model()
    pcfg = vj.PluginConfig(ratio=4, compressor="mean_pool")
    vj.save_plugin(tmp_path / "mp", pcfg, vj.init_plugin(None, cfg, pcfg),
                   vj.backbone_identity(cfg, backbone))
    vj.save_hf_t5(tmp_path / "hf", cfg, jax.device_get(backbone))
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="training-free 'mean_pool' compressor"):
        torch_plugin.attach_plugin(model, tmp_path / "mp")
