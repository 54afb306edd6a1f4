"""Analytic FLOPs: hand-computed counts, the §1 plugin shapes, and the t5-base table."""
import types

import numpy as np
import pytest

from variator_jax import flops
from variator_jax.t5 import T5Config

# d = 8, 2 heads x d_kv 4 (inner 8), d_ff 16, 2 encoder / 3 decoder layers, vocab 32.
TINY = T5Config(d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=2, num_decoder_layers=3,
                vocab_size=32, feed_forward_proj="relu")


def test_encoder_uncompressed_by_hand():
    # n = 6, per layer, in multiply-adds (MACs): q,k,v,o 4 * 6 * (8*8) = 1536; scores
    # q@k^T and a@v 2 * 6*6*8 = 576; FFN wi, wo 2 * 6 * (8*16) = 1536. FLOPs = 2 * MACs.
    f = flops.encoder_flops(TINY, 6)
    assert f == dict(attention_proj=2 * 2 * 1536, attention_scores=2 * 2 * 576,
                     ffn=2 * 2 * 1536, plugin=0, total=2 * 2 * (1536 + 576 + 1536))
    assert f["total"] == 14592


def test_encoder_compressed_by_hand():
    # n = 6, k = 4, r = 3: padded to 8 -> 2 groups. Per layer in MACs: attention as above
    # (1536 + 576, full length); FFN on 2 vectors 2 * 2 * 128 = 512; compress scores
    # W_c [4, 32] per group 2 * 128 = 256, weighted sum 2 * 4 * 8 = 64; decompress
    # W_i [3, 16] + W_o [8, 3] = 72 per padded position, * 8 = 576.
    f = flops.encoder_flops(TINY, 6, ratio=4, bottleneck=3)
    assert f["attention_proj"] == 2 * 2 * 1536
    assert f["attention_scores"] == 2 * 2 * 576
    assert f["ffn"] == 2 * 2 * 512
    assert f["plugin"] == 2 * 2 * (256 + 64 + 576)
    assert f["total"] == 14080
    assert flops.plugin_flops(TINY, 6, 4, 3) == dict(compress=640, decompress=1152, total=1792)


def test_gated_ffn_has_three_matmuls():
    gated = TINY.replace(feed_forward_proj="gated-gelu")
    # wi_0, wi_1, wo: 3 * 6 * 128 MACs per layer, 2 layers.
    assert flops.encoder_flops(gated, 6)["ffn"] == 2 * 2 * 3 * 6 * 128
    assert flops.encoder_flops(gated, 6, 2, 3)["ffn"] == 2 * 2 * 3 * 3 * 128


def test_decoder_and_forward_by_hand():
    # m = 3 targets, n_enc = 6, per layer in MACs: self q,k,v,o 4 * 3 * 64 = 768; self
    # scores 2 * 3*3*8 = 144; cross q,o on 3 and k,v on 6: (2*3 + 2*6) * 64 = 1152; cross
    # scores 2 * 3*6*8 = 288; FFN 3 * 256 = 768. lm_head 3 * 8 * 32 = 768 MACs, once.
    f = flops.decoder_flops(TINY, 6, 3)
    assert f == dict(self_attention_proj=3 * 2 * 768, self_attention_scores=3 * 2 * 144,
                     cross_attention_proj=3 * 2 * 1152, cross_attention_scores=3 * 2 * 288,
                     ffn=3 * 2 * 768, lm_head=2 * 768, total=20256)
    assert flops.forward_flops(TINY, 6, 3) == 14592 + 20256
    # The plugin changes only the encoder part.
    assert flops.forward_flops(TINY, 6, 3, 4, 3) == 14080 + 20256


def test_plugin_term_matches_section1_parameter_shapes():
    cfg = T5Config.variant("t5-base")
    d, r = cfg.d_model, 64
    for k in (2, 4, 8):
        # §1 per-layer parameters, split into weights applied per group / per position.
        params = k * k * d + k + 2 * d * r + r + r * d + d
        w_c, w_io, biases = k * k * d, 2 * d * r + r * d, k + r + d
        assert params == w_c + w_io + biases
        if k == 4:
            assert params == 160_580  # docs/DESIGN.md §1's figure.
        n = 64 * k  # 64 groups.
        p = flops.plugin_flops(cfg, n, k, r)
        # Each weight is one MAC per use: W_c once per group, W_i and W_o once per position;
        # the weighted sum is k*d MACs per group.
        assert p["compress"] == 2 * (64 * w_c + 64 * k * d)
        assert p["decompress"] == 2 * n * w_io
        assert flops.encoder_flops(cfg, n, k, r)["plugin"] == cfg.num_layers * p["total"]


def test_saving_grows_with_ratio():
    cfg = T5Config.variant("t5-base")
    for n in (128, 256, 512):
        totals = [flops.encoder_flops(cfg, n, k)["total"] for k in (2, 4, 8, 16)]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
        # k = 1 only adds the plugin: no saving.
        assert flops.encoder_flops(cfg, n, 1)["total"] > flops.encoder_flops(cfg, n)["total"]


def test_t5_base_k4_saving_is_plausible():
    cfg = T5Config.variant("t5-base")
    row, = flops.flops_table(cfg, lengths=(512,), ratios=(4,))
    # Ceiling: the FFN's share (2/3 of the per-token linear FLOPs, less with attention
    # scores at n = 512) times 3/4; the plugin costs a few per cent back.
    base = flops.encoder_flops(cfg, 512)
    ceiling = base["ffn"] / base["total"] * 3 / 4
    assert 0.40 < row["saving"] < ceiling < 0.5
    assert row["saving"] == pytest.approx(0.4308, abs=1e-4)


def _closed_form_ratio(cfg, n, k, r):
    """Compressed / uncompressed encoder FLOPs per token, for n a multiple of k."""
    d, inner = cfg.d_model, cfg.inner_dim
    attn = 8 * d * inner + 4 * n * inner  # Projections + scores, per token.
    ffn = 4 * d * cfg.d_ff
    plugin = 2 * k * d + 2 * d + 6 * d * r  # Scores + weighted sum + W_i, W_o.
    return (attn + ffn / k + plugin) / (attn + ffn)


def test_large_n_approaches_closed_form():
    cfg = T5Config.variant("t5-base")

    def ratio(n, k):
        return flops.encoder_flops(cfg, n, k)["total"] / flops.encoder_flops(cfg, n)["total"]

    assert ratio(4096, 4) == pytest.approx(_closed_form_ratio(cfg, 4096, 4, 64), rel=1e-12)
    # Off a multiple of k, padding costs O(k/n): gone for large n, visible for small n.
    small, large = 4 * 8 + 1, 4 * 4096 + 1
    assert abs(ratio(small, 4) / _closed_form_ratio(cfg, small, 4, 64) - 1) > 1e-2
    assert ratio(large, 4) == pytest.approx(_closed_form_ratio(cfg, large, 4, 64), rel=1e-4)
    # Attention scores grow as n^2 and the plugin leaves them alone: the saving fades.
    assert 1 - ratio(2 ** 20, 4) < 0.01


def test_accepts_plugin_config_like_objects():
    pcfg = types.SimpleNamespace(ratio=4, bottleneck=3, mask_aware=True, scope="ffn")
    assert flops.encoder_flops(TINY, 6, pcfg)["total"] == 14080
    with pytest.raises(NotImplementedError):
        flops.encoder_flops(TINY, 6, types.SimpleNamespace(ratio=4, bottleneck=3, scope="layer"))
    with pytest.raises(ValueError):
        flops.encoder_flops(TINY, 6, 0)


def test_elementwise_is_a_separate_small_term():
    cfg = T5Config.variant("t5-small")
    plain = flops.forward_flops(cfg, 512, 32, 4)
    full = flops.forward_flops(cfg, 512, 32, 4, elementwise=True)
    assert 0 < full - plain < 0.01 * plain
    assert "elementwise" not in flops.encoder_flops(cfg, 512)
    e = flops.encoder_flops(cfg, 512, elementwise=True)
    assert e["total"] == sum(v for key, v in e.items() if key != "total")


def test_table_and_command(capsys):
    rows = flops.flops_table(T5Config.variant("t5-base"))
    assert [(row["n"], row["ratio"]) for row in rows] == [
        (n, k) for n in (128, 256, 512) for k in (2, 4, 8)]
    for row in rows:
        assert row["saving"] == pytest.approx(1 - row["compressed"] / row["uncompressed"])
    table = flops.format_table(rows)
    assert table.splitlines()[0] == "| n | uncompressed GFLOPs | k = 2 | k = 4 | k = 8 |"
    assert "| 512 | 96.64 |" in table and "55.01 (-43.1 %)" in table
    flops.main(["--variant", "t5-base"])
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("ratio", [None, 4])
def test_analytic_count_agrees_with_xla(ratio):
    """The count agrees with XLA's own cost analysis of the compiled forward (issue: 10 %).
    Layers unrolled: XLA's cost analysis counts the body of a scan's loop once, not per layer."""
    import jax

    import variator_jax as vj
    cfg = vj.T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4,
                      scan_layers=False)
    n, m = 128, 16
    backbone = jax.eval_shape(vj.init_t5, jax.random.key(0), cfg)
    ids, dec = jax.ShapeDtypeStruct((1, n), np.int32), jax.ShapeDtypeStruct((1, m), np.int32)
    plugin = None
    if ratio:
        pcfg = vj.PluginConfig(ratio)
        plugin = (pcfg, jax.eval_shape(vj.init_plugin, jax.random.key(0), cfg, pcfg))
    cost = vj.forward.lower(cfg, backbone, ids, ids, dec, plugin=plugin).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    for elementwise in (False, True):
        count = flops.forward_flops(cfg, n, m, ratio=ratio, elementwise=elementwise)
        assert abs(count / xla - 1) < 0.1
