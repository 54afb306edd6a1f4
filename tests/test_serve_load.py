"""benchmarks.serve_load's trace and summary, on synthetic records (the HTTP path: test_server)."""
import os

import numpy as np
import pytest

import variator_jax as vj
from benchmarks import models, serve_load
from tests.test_utils import make_hf_dir
from variator_jax.errors import UserError
from variator_jax.simulation import Phase


def test_arrivals_follow_the_phase_rates_in_units_of_c1():
    load = serve_load.Load(["a"], ["x"], t0=0.02, c1=800.0, budget_s=0.08)
    phases = (Phase("steady", 1, 0.5, 0.5), Phase("burst", 1, 2.0, 2.0))
    times, phase = serve_load.arrivals(phases, load, per_request=16, seconds=40, seed=0)
    assert times.max() < 40 and np.all(np.diff(times) >= 0)
    # 20 s at 0.5 x 800 / 16 = 25 req/s, then 20 s at 100 req/s (Poisson: within 4 sigma).
    for p, rate in ((0, 25), (1, 100)):
        count = (phase == p).sum()
        assert abs(count - rate * 20) < 4 * np.sqrt(rate * 20), (p, count)
        assert np.all((times[phase == p] >= 20 * p) & (times[phase == p] < 20 * (p + 1)))


def test_summary_counts_sheds_as_missed_and_scores_answers():
    phases = (Phase("steady", 1, 0.5, 0.5),)

    def ok(t, lat, ratio, correct):
        return dict(t=t, status=200, latency=lat, ratio=ratio, ratios=[ratio] * 2,
                    correct=correct, inputs=2)

    records = [ok(0.0, 0.05, 1, 2), ok(1.0, 0.20, 4, 1), ok(2.0, 0.05, 4, 0),
               dict(t=3.0, status=503, latency=0.001, retry_after="1"),
               dict(t=3.5, status=-2, latency=None, error="TimeoutError")]
    row = serve_load.summarize(records, np.zeros(5, int), phases, budget_s=0.1)
    assert row["answered"] == 3 and row["shed_503"] == 1 and row["failed"] == 1
    assert row["within_budget"] == pytest.approx(2 / 5)
    assert row["accuracy"] == pytest.approx(3 / 6)
    assert row["mix"] == {"1": pytest.approx(1 / 3), "4": pytest.approx(2 / 3)}
    assert row["retry_after"] == ["1"] and row["p50_ms"] == pytest.approx(50)
    assert row["throughput_inputs_s"] == pytest.approx(6 / 2.05)


def test_random_models_are_servable_files_of_the_variant_widths(tmp_path):
    source = make_hf_dir(str(tmp_path / "source"))  # A tiny model with the byte tokenizer.
    backbone, plugins = models.random_models("t5-small", str(tmp_path / "random"), layers=1,
                                             ratios=(2, 4), tokenizer_from=source)
    cfg, params = vj.load_hf_t5(backbone)
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (512, 2048, 1, 1)
    assert cfg.vocab_size == vj.load_hf_t5(source)[0].vocab_size
    assert vj.load_tokenizer(None, backbone).encode("ab", add_special_tokens=False) == [
        100, 101]  # ByT5: byte + 3.
    ratios = [vj.load_plugin(d, cfg=cfg, backbone=params)[0].ratio for d in plugins.values()]
    assert ratios == [2, 4]  # Each plugin accepted by this backbone's fingerprint.


def test_models_command_writes_a_backbone_alone_and_never_over_a_directory(tmp_path, capsys):
    out = str(tmp_path / "init")
    written = models.main(["t5-small", out, "--layers", "1", "--ratios", ""])
    assert written["plugins"] == {} and sorted(os.listdir(out)) == ["backbone"]
    assert vj.load_hf_t5(written["backbone"])[0].d_model == 512
    before = os.path.getmtime(os.path.join(written["backbone"], "model.safetensors"))
    with pytest.raises(UserError, match="exists"):
        models.main(["t5-small", out, "--layers", "1"])
    assert os.path.getmtime(os.path.join(written["backbone"], "model.safetensors")) == before


def test_t5_init_draws_what_hf_t5_draws():
    """Each kernel's std as HF's own `_init_weights` draws it for the same widths."""
    import jax
    import transformers

    hf_cfg = transformers.T5Config(vocab_size=64, d_model=256, d_kv=32, d_ff=1024, num_heads=4,
                                   num_layers=1, num_decoder_layers=1)
    hf = transformers.T5ForConditionalGeneration(hf_cfg)
    pooled = {}
    for name, w in hf.named_parameters():
        module = name.split(".")[-2]
        pooled.setdefault(module, []).append(w.detach().numpy().ravel())
    expected = {m: np.concatenate(ws).std() for m, ws in pooled.items()}
    cfg = vj.T5Config(vocab_size=64, d_model=256, d_kv=32, d_ff=1024, num_heads=4, num_layers=1,
                      num_decoder_layers=1)
    ours = {}
    for path, x in jax.tree_util.tree_leaves_with_path(models.t5_init(
            vj.init_t5(jax.random.key(0), cfg), cfg, seed=1)):
        module = getattr(path[-2], "key", None)  # [.., 'q', 'kernel']
        ours.setdefault(module, []).append(np.asarray(x).ravel())
    for module in ("q", "k", "v", "o", "wi", "wo", "relative_attention_bias", "shared"):
        got = np.concatenate(ours[module]).std()
        assert got == pytest.approx(expected[module], rel=0.15), module
    assert expected["q"] < expected["k"] / 4  # The one that saturated attention at 0.05.
    assert np.all(np.concatenate(ours["layer_norm"]) == 1.0)
