"""benchmarks/speed.py on a one-layer t5-small: the tables it reports are built from the right
programs. Timings are not asserted (benchmarks, not timed tests); what is asserted are values a
wrong wiring would change."""
import json
import math
import os

import jax
import numpy as np

import variator_jax as vj
from benchmarks import speed


def test_speed_benchmark_tables(tmp_path):
    payload = speed.main(["--variant", "t5-small", "--layers", "1", "--lengths", "12",
                          "--ratios", "2,4", "--repeats", "1", "--out", str(tmp_path),
                          "--name", "t", "--no-keep-freed-memory"])
    # The JAX and PyTorch encoders saw the same weights.
    assert payload["frameworks"][0]["max_abs_diff"] < 1e-4
    cfg = vj.T5Config.variant("t5-small", num_layers=1)
    for row in payload["compression"]:
        k, n, d, ff, h = row["ratio"], 12, cfg.d_model, cfg.d_ff, cfg.inner_dim
        g = math.ceil(n / k)
        # Written out from docs/DESIGN.md §1, not from flops.py: attention 4 projections + 2 score
        # products; FFN two matmuls on g merged vectors; plugin W_c, weighted sum, W_i, W_o.
        attn = 2 * (4 * n * d * h) + 2 * (2 * n * n * h)
        base = attn + 2 * 2 * n * d * ff
        comp = (attn + 2 * 2 * g * d * ff + 2 * g * k * k * d + 2 * g * k * d
                + 2 * g * k * 3 * d * 64)
        assert math.isclose(row["ceiling"], base / comp, rel_tol=1e-12)
    # Table 4: the FFN alone at n and ceil(n/k) rows; the plugin's time only where k > 1.
    costs = payload["plugin_costs"]
    assert [(c["ratio"], c["rows"]) for c in costs] == [(1, 12), (2, 6), (4, 3)]
    assert "plugin_ms" not in costs[0] and all("plugin_ms" in c for c in costs[1:])
    assert all(c["jax_rate_vs_full"] > 0 and c["torch_gflops_per_s"] > 0 for c in costs)
    # Table 5: the plugin's x @ W_i^x, FLOPs of [n, d] x [d, r] with r = 64.
    block = payload["blocks"][0]
    for name in ("x @ W_i^x", "torch x @ W_i^x"):
        assert math.isclose(block[name]["gflops_per_s"] * block[name]["ms"] * 1e6,
                            2 * 12 * cfg.d_model * 64, rel_tol=1e-9)
    with open(os.path.join(tmp_path, "speed-t.json")) as f:
        assert json.load(f)["plugin_costs"][2]["rows"] == 3
    with open(os.path.join(tmp_path, "speed-t.md")) as f:
        assert "The frozen FFN alone" in f.read()


def test_ffn_alone_runs_layer_0_ffn_in_both_frameworks():
    """The PyTorch FFN timed in table 4 is the same layer, with the same weights, as JAX's."""
    cfg = vj.T5Config.variant("t5-small", num_layers=2, num_decoder_layers=1)
    backbone = vj.init_t5(jax.random.key(0), cfg)
    factory, _ = speed.torch_encoder(cfg, backbone, threads=1, device="cpu")
    plugins = {2: (vj.PluginConfig(ratio=2), vj.init_plugin(jax.random.key(1), cfg,
                                                            vj.PluginConfig(ratio=2)))}
    fns, flops = speed.layer_blocks(cfg, backbone, plugins, 10, 1, factory.ffn)
    for rows in (10, 5):
        jax_out = np.asarray(fns[f"ffn alone {rows}"]())
        torch_out = fns[f"torch ffn alone {rows}"]().numpy()
        assert jax_out.shape == (1, rows, cfg.d_model)
        np.testing.assert_allclose(torch_out, jax_out, rtol=1e-4, atol=1e-5)
        assert flops[f"ffn alone {rows}"] == 2 * 2 * rows * cfg.d_model * cfg.d_ff
