"""The plugin (docs/DESIGN.md §1) against an independent NumPy restatement and the PyTorch
export."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

import variator_jax as vj
from tests import plugin_reference as ref
from tests.hf_reference import build_hf_t5, padded_batch, rel_diff, save_hf_dir
from variator_jax import plugins, t5, torch_plugin

D, R = 12, 5  # r differs from d and 2d, so a transposed weight cannot pass unnoticed.


def _file_layer_to_tree(layer):
    """Reference weights (file convention, [out, in]) -> one layer of the JAX plugin tree."""
    def lin(name):
        return {"kernel": jnp.asarray(layer[f"{name}.weight"].T, jnp.float32),
                "bias": jnp.asarray(layer[f"{name}.bias"], jnp.float32)}

    return {"compress": lin("compress"),
            "decompress": {"wi": lin("decompress.wi"), "wo": lin("decompress.wo")}}


def random_plugin(cfg, pcfg, seed=0, scale=0.3, per_layer=False):
    """Plugin params with non-trivial weights (the init is near zero and would hide bugs),
    stacked over layers as `init_plugin` makes them, or `per_layer` ({"block_i": ...})."""
    rng = np.random.default_rng(seed)
    layers = {f"block_{i}": _file_layer_to_tree(
                  ref.random_plugin_layer(rng, cfg.d_model, pcfg.ratio, pcfg.bottleneck, scale))
              for i in range(cfg.num_layers)}
    return layers if per_layer else plugins.as_plugin((pcfg, layers)).params


def _layer(params, i):
    return jax.tree.map(lambda x: x[i], params)


@pytest.mark.parametrize("k,n,mask_aware", [(1, 5, True), (2, 7, True), (3, 8, True),
                                            (4, 9, True), (4, 9, False), (3, 6, False)])
def test_ffn_block_matches_reference(k, n, mask_aware):
    rng = np.random.default_rng(k * 10 + n)
    h = rng.normal(size=(2, n, D))
    mask = np.ones((2, n), np.int32)
    mask[1, 2:] = 0  # Row 2: groups that mix real and pad members, and all-pad groups.
    wi, wo, norm_w = (rng.normal(size=(20, D)) * 0.3, rng.normal(size=(D, 20)) * 0.3,
                      rng.normal(size=D))
    layer = ref.random_plugin_layer(rng, D, k, R)
    want = ref.reference_ffn_block(h, mask, ref.reference_relu_ffn(wi, wo), norm_w, 1e-6, layer, k,
                                   mask_aware)
    pcfg = vj.PluginConfig(ratio=k, bottleneck=R, mask_aware=mask_aware)
    x = t5.RMSNorm(1e-6, jnp.float32).apply({"params": {"weight": jnp.asarray(norm_w)}},
                                            jnp.asarray(h))

    def ffn(c):
        return jax.nn.relu(c @ wi.T.astype(np.float32)) @ wo.T.astype(np.float32)

    got = h + plugins.compressed_ffn(x, jnp.asarray(mask), _file_layer_to_tree(layer), pcfg, ffn)
    assert rel_diff(got, want) < 1e-5


def test_ratio_one_with_zero_output_mlp_is_the_teacher():
    """k = 1 merges nothing; with W_o = b_o = 0 the block is exactly T5's FFN block."""
    cfg = vj.T5Config(vocab_size=40, d_model=D, d_kv=4, d_ff=20, num_layers=2, num_heads=3)
    backbone = vj.init_t5(jax.random.key(0), cfg)
    pcfg = vj.PluginConfig(ratio=1, bottleneck=R)
    plugin = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "wo" in jax.tree_util.keystr(path) else x,
        random_plugin(cfg, pcfg))
    ids, mask, dec = padded_batch(40)
    student = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, plugin))
    teacher = vj.forward(cfg, backbone, ids, mask, dec)
    assert rel_diff(student["logits"], teacher["logits"]) < 1e-6


@pytest.mark.parametrize("variant,k", [("v1_0", 2), ("flan_v4", 4), ("v1_1", 3)])
def test_jax_matches_pytorch_attach_plugin(variant, k, tmp_path):
    hf = build_hf_t5(variant)
    cfg, backbone = vj.load_hf_t5(save_hf_dir(hf, str(tmp_path / "backbone"), variant))
    pcfg = vj.PluginConfig(ratio=k, bottleneck=R)
    plugin = random_plugin(cfg, pcfg, seed=k)
    vj.save_plugin(tmp_path / "plugin", pcfg, plugin, vj.backbone_identity(cfg, backbone))
    ids, mask, dec = padded_batch(cfg.vocab_size)
    torch_plugin.attach_plugin(hf, str(tmp_path / "plugin"))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  decoder_input_ids=torch.tensor(dec, dtype=torch.long))
    got = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, plugin))
    real = mask > 0
    want_hidden = want.encoder_last_hidden_state.numpy()
    assert rel_diff(got["encoder_hidden"][real], want_hidden[real]) < 1e-4
    assert rel_diff(got["logits"], want.logits.numpy()) < 1e-4
    # ... and the plugin changes the model: a no-op plugin could not pass this.
    assert rel_diff(got["logits"], vj.forward(cfg, backbone, ids, mask, dec)["logits"]) > 0.05


def _tiny():
    cfg = vj.T5Config(vocab_size=40, d_model=D, d_kv=4, d_ff=20, num_layers=2, num_heads=3)
    return cfg, vj.init_t5(jax.random.key(0), cfg)


@pytest.mark.parametrize("mask_aware", [True, False])
def test_padding_invariance(mask_aware):
    cfg, backbone = _tiny()
    pcfg = vj.PluginConfig(ratio=4, bottleneck=R, mask_aware=mask_aware)
    plugin = random_plugin(cfg, pcfg)
    ids = np.random.default_rng(0).integers(2, 40, (1, 6)).astype(np.int32)
    alone = vj.encode(cfg, backbone, ids, np.ones_like(ids), (pcfg, plugin))
    padded_ids = np.pad(ids, ((0, 0), (0, 7)))
    padded_mask = np.pad(np.ones_like(ids), ((0, 0), (0, 7)))
    padded = vj.encode(cfg, backbone, padded_ids, padded_mask, (pcfg, plugin))[:, :6]
    if mask_aware:
        assert rel_diff(padded, alone) < 1e-5
    else:  # The released behaviour: pad vectors join the last real group.
        assert rel_diff(padded, alone) > 1e-3


def test_all_pad_groups_give_zero_and_fully_padded_rows_no_nan():
    pcfg = vj.PluginConfig(ratio=2, bottleneck=R)
    layer = random_plugin(vj.T5Config(d_model=D, num_layers=1), pcfg, per_layer=True)["block_0"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, D)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    merged = plugins.merge(x, mask, layer, pcfg)
    assert float(jnp.abs(merged[0, 2:]).max()) == 0.0 and float(jnp.abs(merged[1]).max()) == 0.0
    assert float(jnp.abs(merged[0, 1] - x[0, 2]).max()) < 1e-6  # One real member: weight 1.
    cfg, backbone = _tiny()
    ids, mask, dec = padded_batch(40)
    mask[1] = 0
    out = vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, random_plugin(cfg, pcfg)))
    assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_mask_modes_agree_without_padding():
    cfg, backbone = _tiny()
    ids = np.random.default_rng(1).integers(2, 40, (2, 8)).astype(np.int32)
    outs = [vj.encode(cfg, backbone, ids, np.ones_like(ids),
                      (vj.PluginConfig(4, R, aware), random_plugin(cfg, vj.PluginConfig(4, R))))
            for aware in (True, False)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_gradients_reach_only_the_plugin():
    cfg, backbone = _tiny()
    pcfg = vj.PluginConfig(ratio=2, bottleneck=R)
    plugin = vj.init_plugin(jax.random.key(1), cfg, pcfg)
    ids, mask, dec = padded_batch(40)
    teacher = vj.forward(cfg, backbone, ids, mask, dec)

    def loss(plugin, backbone):
        out = vj.forward(cfg, jax.lax.stop_gradient(backbone), ids, mask, dec,
                         plugin=(pcfg, plugin))
        return jnp.mean((out["encoder_hidden"] - teacher["encoder_hidden"]) ** 2)

    g_plugin, g_backbone = jax.grad(loss, argnums=(0, 1))(plugin, backbone)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g_plugin))
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(g_backbone))


def test_init_follows_the_released_code():
    cfg = vj.T5Config(d_model=64, num_layers=2, vocab_size=10)
    pcfg = vj.PluginConfig(ratio=4)
    layer = _layer(vj.init_plugin(jax.random.key(0), cfg, pcfg), 1)
    assert layer["compress"]["kernel"].shape == (4 * 64, 4)
    assert abs(float(jnp.std(layer["compress"]["kernel"])) / np.sqrt(2 / (4 * 64)) - 1) < 0.1
    for w in (layer["decompress"]["wi"]["kernel"], layer["decompress"]["wo"]["kernel"]):
        assert abs(float(jnp.std(w)) / 0.01 - 1) < 0.1
    assert all(float(jnp.abs(b).max()) == 0 for b in (layer["compress"]["bias"],
                                                     layer["decompress"]["wi"]["bias"],
                                                     layer["decompress"]["wo"]["bias"]))


def test_param_count_formula():
    base = vj.T5Config.variant("t5-base")
    assert vj.plugin_param_count(base, vj.PluginConfig(ratio=4)) == 1_926_960
    # docs/DESIGN.md §1 quotes 0.82 / 0.86 / 1.06 %; the formula gives 0.815 / 0.864 / 1.063 %.
    for k, share in ((2, 0.82), (4, 0.86), (8, 1.06)):
        count = vj.plugin_param_count(base, vj.PluginConfig(ratio=k))
        assert abs(100 * count / 222_903_552 - share) < 0.01
    cfg = vj.T5Config(d_model=D, num_layers=3, vocab_size=10)
    for k, r in ((2, 7), (3, 64)):
        pcfg = vj.PluginConfig(ratio=k, bottleneck=r)
        tree = jax.eval_shape(vj.init_plugin, jax.random.key(0), cfg, pcfg)
        count = sum(x.size for x in jax.tree_util.tree_leaves(tree))
        assert count == vj.plugin_param_count(cfg, pcfg)


def test_plugin_file_round_trip_and_layout(tmp_path):
    cfg, backbone = _tiny()
    pcfg = vj.PluginConfig(ratio=4, bottleneck=R, mask_aware=False)
    plugin = random_plugin(cfg, pcfg)
    vj.save_plugin(tmp_path, pcfg, plugin, vj.backbone_identity(cfg, backbone))
    tensors = safetensors.numpy.load_file(str(tmp_path / "plugin.safetensors"))
    assert tensors["encoder.block.1.plugin.compress.weight"].shape == (4, 4 * D)
    assert tensors["encoder.block.0.plugin.decompress.wi.weight"].shape == (R, 2 * D)
    assert tensors["encoder.block.0.plugin.decompress.wo.weight"].shape == (D, R)
    assert len(tensors) == 6 * cfg.num_layers
    config = json.loads((tmp_path / "plugin_config.json").read_text())
    assert (config["ratio"], config["bottleneck"], config["mask_aware"], config["d_model"],
            config["num_layers"]) == (4, R, False, D, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Same backbone: no fingerprint warning.
        pcfg2, plugin2 = vj.load_plugin(tmp_path, cfg=cfg, backbone=backbone)
    assert pcfg2 == pcfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, plugin, plugin2)
    other = vj.init_t5(jax.random.key(7), cfg)
    with pytest.warns(UserWarning, match="fingerprints differ"):
        vj.load_plugin(tmp_path, cfg=cfg, backbone=other)


DATA = os.path.join(os.path.dirname(__file__), "data", "pre_scan")


@pytest.mark.parametrize("scan", [True, False])
def test_plugin_saved_before_layers_were_stacked(scan):
    """tests/data/pre_scan: a backbone, a plugin and their outputs written by the code before
    scanned layers (per-layer trees, commit def7a97). They load unchanged, the fingerprint
    matches (no warning), and the model gives the same outputs, scanned or not."""
    cfg, backbone = vj.load_hf_t5(f"{DATA}/backbone", scan_layers=scan)
    assert ("layers" in backbone["encoder"]) == scan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcfg, plugin = vj.load_plugin(f"{DATA}/plugin", cfg=cfg, backbone=backbone)
    config = json.loads(open(f"{DATA}/plugin/plugin_config.json").read())
    # Its identity has no fingerprint_version: it is compared the way it was computed.
    assert "fingerprint_version" not in config["backbone"]
    assert plugins.fingerprint_of(config["backbone"], backbone) == config["backbone"]["fingerprint"]
    assert plugins.backbone_fingerprint(backbone) != config["backbone"]["fingerprint"]
    want = np.load(f"{DATA}/expected.npz")
    ids, mask = want["input_ids"], want["attention_mask"]
    for form in ((pcfg, plugin), plugins.Plugin(pcfg, plugin)):
        got = vj.encode(cfg, backbone, ids, mask, form)
        assert rel_diff(np.asarray(got)[mask > 0], want["encoder_hidden"][mask > 0]) < 1e-5
    np.testing.assert_array_equal(vj.generate(cfg, backbone, ids, mask, 5), want["generated"])


def test_per_layer_params_are_accepted():
    """Params in the per-layer layout of earlier versions run as their stacked form does."""
    cfg, backbone = _tiny()
    pcfg = vj.PluginConfig(ratio=2, bottleneck=R)
    ids = np.random.default_rng(2).integers(2, 40, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    outs = [vj.encode(cfg, backbone, ids, mask, (pcfg, random_plugin(cfg, pcfg, per_layer=p)))
            for p in (True, False)]
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="not a PluginConfig"):
        plugins.as_plugin(({}, {}))


def test_plugin_file_errors(tmp_path):
    cfg, backbone = _tiny()
    pcfg = vj.PluginConfig(ratio=2, bottleneck=R)
    vj.save_plugin(tmp_path / "p", pcfg, random_plugin(cfg, pcfg))
    with pytest.raises(ValueError, match=f"plugin d_model {D} != model d_model 16"):
        vj.load_plugin(tmp_path / "p", cfg=cfg.replace(d_model=16))
    with pytest.raises(ValueError, match="plugin num_layers 2 != model num_layers"):
        vj.load_plugin(tmp_path / "p", cfg=cfg.replace(num_layers=3))
    with pytest.raises(ValueError, match=f"plugin d_model {D} != model d_model 16"):
        wide = cfg.replace(d_model=16)
        vj.encode(wide, vj.init_t5(jax.random.key(0), wide), np.ones((1, 4), np.int32),
                  np.ones((1, 4), np.int32), (pcfg, random_plugin(cfg, pcfg)))
    tensors = safetensors.numpy.load_file(str(tmp_path / "p" / "plugin.safetensors"))
    for edit, message in (
            (lambda t: t.pop("encoder.block.1.plugin.decompress.wo.bias"),
             "missing key encoder.block.1.plugin.decompress.wo.bias"),
            (lambda t: t.update({"encoder.block.0.plugin.extra.weight": np.zeros(2, np.float32)}),
             "unexpected key encoder.block.0.plugin.extra.weight"),
            (lambda t: t.update({"encoder.block.0.plugin.compress.weight":
                                 np.zeros((2, 5), np.float32)}),
             r"encoder.block.0.plugin.compress.weight has shape \(2, 5\), expected \(2, 24\)")):
        changed = dict(tensors)
        edit(changed)
        (tmp_path / "q").mkdir(exist_ok=True)
        config = (tmp_path / "p" / "plugin_config.json").read_text()
        (tmp_path / "q" / "plugin_config.json").write_text(config)
        safetensors.numpy.save_file(changed, str(tmp_path / "q" / "plugin.safetensors"))
        with pytest.raises(ValueError, match=message):
            vj.load_plugin(tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="nowhere/plugin_config.json: missing"):
        vj.load_plugin(tmp_path / "nowhere")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="ratio must be an integer >= 1"):
            vj.PluginConfig(ratio=bad)
    with pytest.raises(ValueError, match="scope 'layer' is not supported"):
        vj.PluginConfig(ratio=2, scope="layer")


def test_switching_plugins_compiles_once_per_ratio():
    cfg, backbone = _tiny()
    ids, mask, dec = padded_batch(40, n=23)  # A shape no other test compiled.
    bank = {k: [random_plugin(cfg, vj.PluginConfig(k, R), seed=s) for s in range(2)]
            for k in (2, 4)}

    def run(plugin):
        return vj.forward(cfg, backbone, ids, mask, dec, plugin=plugin)["logits"]

    before = vj.forward._cache_size()
    outs = [run(None)]
    for k in (2, 4):
        outs.append(run((vj.PluginConfig(k, R), bank[k][0])))
    assert vj.forward._cache_size() == before + 3  # Off, k = 2, k = 4.
    for _ in range(2):  # Switch back and forth between every plugin of the bank, and off.
        for k in (4, 2):
            for plugin in bank[k]:
                outs.append(run((vj.PluginConfig(k, R), plugin)))
        outs.append(run(None))
    assert vj.forward._cache_size() == before + 3
    # Different plugins of one ratio give different outputs: parameters really are arguments.
    assert rel_diff(outs[3], outs[4]) > 1e-3


def test_bfloat16_student_close_to_float32():
    """bf16 compute on the scanned model with a plugin: within 5e-2 relative of float32
    (bf16 keeps 8 bits of mantissa, ~4e-3 per rounding; two layers of rounding stay well
    inside), and not equal to it (the compute really ran in bf16)."""
    cfg, backbone = _tiny()
    assert cfg.scan_layers
    pcfg = vj.PluginConfig(ratio=2, bottleneck=R)
    plugin = (pcfg, random_plugin(cfg, pcfg))
    ids, mask, dec = padded_batch(40)
    full = vj.forward(cfg, backbone, ids, mask, dec, plugin=plugin)
    half = vj.forward(cfg.replace(dtype="bfloat16"), backbone, ids, mask, dec, plugin=plugin)
    real = mask > 0
    for key in ("encoder_hidden", "decoder_hidden", "logits"):
        a, b = np.asarray(half[key], np.float32), np.asarray(full[key])
        a, b = (a[real], b[real]) if key == "encoder_hidden" else (a, b)
        assert 1e-4 < rel_diff(a, b) < 5e-2, key
