"""benchmarks/runtimes.py --quick: every runtime runs the same weights and plugins. Timings
are not asserted (benchmarks, not timed tests); what is asserted are values a wrong wiring
would change: each runtime's output against JAX's on a padded batch, and the FLOPs ceilings."""
import json
import os

import variator_jax as vj
from benchmarks import runtimes
from variator_jax.flops import encoder_flops


def test_quick_run_covers_every_runtime_with_jax_equal_outputs(tmp_path):
    payload = runtimes.main(["--quick", "--batches", "2", "--ratios", "4", "--rounds", "1",
                             "--out", str(tmp_path), "--name", "t"])
    rows = payload["rows"]
    assert payload["args"]["scan_layers"] is False  # JAX runs per-layer weights by default.
    assert [r["runtime"] for r in rows] == ["jax", "torch", "torch.compile", "onnx"]
    assert all((r["batch"], r["n"]) == (2, 16) for r in rows)
    # Outputs (with the k = 4 plugin and without) equal JAX's on a padded batch.
    assert rows[0]["max_rel_diff"] == 0 and all(r["max_rel_diff"] < 1e-4 for r in rows)
    cfg = vj.T5Config.variant("t5-small", num_layers=1, num_decoder_layers=1)
    ceiling = encoder_flops(cfg, 16)["total"] / encoder_flops(cfg, 16, ratio=4)["total"]
    for r in rows:
        assert r["k=4"]["speedup_ceiling"] == ceiling and r["k=4"]["speed_rounds"] == 1
        assert r["k=4"]["fraction"] == r["k=4"]["speedup"] / ceiling and r["off_ms"] > 0
    with open(os.path.join(tmp_path, "runtimes-t.json")) as f:
        assert len(json.load(f)["rows"]) == 4
    with open(os.path.join(tmp_path, "runtimes-t.md")) as f:
        assert "| 2 | 16 | torch.compile |" in f.read()
