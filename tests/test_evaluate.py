"""eval.py end to end on tiny models: the three outputs, the evaluators a config chooses, and
values a bug would change."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import variator_jax as vj
from tests import test_utils as tu
from variator_jax import evaluate, flops, progress
from variator_jax.errors import UserError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny backbone dir and two plugins of different ratios (random, not trained)."""
    root = tmp_path_factory.mktemp("eval")
    backbone = tu.make_hf_dir(str(root / "backbone"))
    cfg, tree = vj.load_hf_t5(backbone)
    dirs = []
    for k in (2, 4):
        pcfg = vj.PluginConfig(ratio=k, bottleneck=8)
        plugin = vj.init_plugin(jax.random.key(k), cfg, pcfg)
        dirs.append(str(root / f"k{k}"))
        vj.save_plugin(dirs[-1], pcfg, plugin, vj.backbone_identity(cfg, tree))
    return root, backbone, cfg, dirs


def test_eval_py_pretrain_writes_results_table_and_plot(run):
    root, backbone, cfg, dirs = run
    overrides = dict(tu.TINY_OVERRIDES, **{"data.eval": "builtin:pydoc",
                                           "data.eval_split": "train[98%:]",
                                           "eval.plugins": ",".join(dirs),
                                           "eval.speed_repeats": 2})
    workdir = str(root / "run")
    proc = subprocess.run(
        [sys.executable, os.path.join(tu.REPO, "eval.py"),
         "--config=configs/plugin.py:stage=pretrain", f"--config.backbone={backbone}",
         f"--workdir={workdir}", *tu.cli_flags(overrides)],
        cwd=tu.REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(os.path.join(workdir, "eval", "results.json")))
    teacher, k2, k4 = results["entries"]
    assert [e["ratio"] for e in results["entries"]] == [1, 2, 4]
    assert results["quality_metric"] == "agreement" and teacher["quality"] == 1.0
    assert teacher["speedup"] == 1.0 and teacher["flops_saving"] == 0.0
    assert teacher["speed_rounds"] == 2 and teacher["speedup_ceiling"] == 1.0
    for entry in (k2, k4):  # A fresh plugin is close to, not equal to, the teacher.
        assert 0.0 < entry["enc_mse"] and 0.0 <= entry["agreement"] <= 1.0
        assert entry["speedup"] > 0 and entry["examples_per_s"] > 0
        assert entry["speedup_q25"] <= entry["speedup"] <= entry["speedup_q75"]
        assert entry["speedup_ceiling"] == pytest.approx(
            teacher["flops_per_example"] / entry["flops_per_example"])
        compressed = flops.encoder_flops(cfg, 32, entry["ratio"], 8)["total"]
        want = 1 - compressed / flops.encoder_flops(cfg, 32)["total"]
        assert entry["encoder_flops_saving"] == pytest.approx(want)
        pcfg = vj.PluginConfig(entry["ratio"], 8)
        assert entry["plugin_params"] == vj.plugin_param_count(cfg, pcfg)
    assert 0 < k2["flops_saving"] < k4["flops_saving"] < 1
    table = open(os.path.join(workdir, "eval", "results.md")).read()
    assert table in proc.stdout  # The printed table is the saved one.
    assert table.count("\n| ") == 4 and "| teacher | 1 | 1.0000 |" in table
    assert "| k2 | 2 |" in table and "| k4 | 4 |" in table  # Rows named by their directories.
    assert "examples in " in proc.stdout  # Progress of each pass.
    with open(os.path.join(workdir, "eval", "speed_accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_classification_and_squad_quality(run):
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds
    root, backbone, _, dirs = run
    for task, metric in (("sst2", "accuracy"), ("squad", "f1")):
        config = tu.tiny_plugin_config(backbone, f"stage=adapt,task={task}",
                                       **{"eval__plugins": dirs[1], "eval__speed_repeats": 1,
                                          "max_target_length": 4})
        with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
            results = evaluate.evaluate(config, str(root / task))
        teacher, plugin = results["entries"]
        assert results["quality_metric"] == metric
        assert 0.0 <= teacher["quality"] <= (1.0 if metric == "accuracy" else 100.0)
        assert plugin["quality"] == plugin[metric]
        if task == "squad":  # Random models answer nonsense: EM and F1 near 0, not NaN.
            assert np.isfinite(plugin["exact_match"])
            assert teacher["flops_per_example"] > plugin["flops_per_example"]


def test_missing_plugin_dir_is_a_user_error(run):
    root, backbone, _, _ = run
    config = tu.tiny_plugin_config(backbone, **{"data__eval": "builtin:pydoc",
                                                "eval__plugins": str(root / "nope")})
    with pytest.raises(UserError, match="nope does not exist"):
        evaluate.evaluate(config, str(root / "run2"))


COST = {"flops_per_example", "encoder_flops_saving", "plugin_params", "plugin_params_pct",
        "flops_saving"}


def _pretrain_eval(run, workdir: str, **overrides) -> dict:
    root, backbone, _, dirs = run
    config = tu.tiny_plugin_config(backbone, **{"data__eval": "builtin:pydoc",
                                                "data__eval_split": "train[98%:]",
                                                "eval__plugins": dirs[1], **overrides})
    return evaluate.evaluate(config, str(root / workdir))


def test_a_config_choosing_evaluators_gets_exactly_their_metrics(run):
    root, _, cfg, _ = run
    results = _pretrain_eval(run, "cost_only", eval__evaluators="cost")
    teacher, k4 = results["entries"]
    assert set(teacher) == set(k4) == {"name", "ratio"} | COST
    assert teacher["flops_saving"] == 0.0 and k4["plugin_params"] == vj.plugin_param_count(
        cfg, vj.PluginConfig(4, 8))
    plugin_flops = flops.forward_flops(cfg, 32, 8, vj.PluginConfig(4, 8))  # n = 32, 8 targets.
    assert k4["flops_saving"] == pytest.approx(1 - plugin_flops / flops.forward_flops(cfg, 32, 8))
    out = root / "cost_only" / "eval"
    table = (out / "results.md").read_text()
    assert "| model | k | GFLOPs/example |" in table and "speedup" not in table.lower()
    assert "agreement" not in table and not (out / "speed_accuracy.png").exists()

    results = _pretrain_eval(run, "quality_only", eval__evaluators="classification")
    teacher, k4 = results["entries"]
    assert set(teacher) == {"name", "ratio", "ce", "agreement", "quality"}
    assert set(k4) == {"name", "ratio", "enc_mse", "dec_mse", "ce", "teacher_ce", "agreement",
                       "quality"}
    # Two evaluations of the teacher: its own CE pass, and the one inside the plugin's pass.
    assert k4["teacher_ce"] == pytest.approx(teacher["ce"], rel=1e-5)
    assert teacher["quality"] == 1.0 and k4["quality"] == k4["agreement"]
    assert 0.0 <= k4["agreement"] <= 1.0 and k4["enc_mse"] > 0.0
    assert "| model | k | agreement | vs teacher |" in (
        root / "quality_only" / "eval" / "results.md").read_text()


def test_an_unknown_or_unfit_evaluator_is_a_one_line_error_naming_it(run):
    root = run[0]
    with pytest.raises(UserError, match="^config.eval.evaluators: unknown evaluator 'bleu'; "
                                        "known: classification, cost, generation, speed$"):
        _pretrain_eval(run, "bad", eval__evaluators="classification,bleu")
    with pytest.raises(UserError, match="unknown evaluator 'clasification'; did you mean "
                                        "'classification'?"):
        _pretrain_eval(run, "bad", eval__evaluators="clasification")
    assert not (root / "bad").exists()  # Refused before anything was loaded or written.
    with pytest.raises(UserError, match="'generation' needs a generation task .* pretrain is "
                                        "pretrain"):
        _pretrain_eval(run, "bad", eval__evaluators="generation")


def test_speedup_spread_and_the_flops_ceiling():
    from variator_jax import timing
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # Per-round speedups 1..5 over a model at 1 s.
    stats = timing.speedup_stats(base, np.ones(5), ceiling=1.5)
    assert (stats["speedup"], stats["speedup_q25"], stats["speedup_q75"]) == (3.0, 2.0, 4.0)
    assert (stats["speedup_min"], stats["speedup_max"], stats["speed_rounds"]) == (1.0, 5.0, 5)
    assert stats["above_ceiling"]  # Even the lower quartile (2.0) is above 1.5: noise.
    assert not timing.speedup_stats(base, np.ones(5), ceiling=2.5)["above_ceiling"]  # Within it.
    assert timing.format_speedup(stats) == "n/a: 3.00x (2.00-4.00) exceeds the FLOPs ceiling 1.50x"
    ok = timing.speedup_stats(np.array([1.08, 1.12, 1.15]), np.ones(3), ceiling=1.2)
    assert timing.format_speedup(ok) == "1.12x (1.10-1.14)"


def test_interleaved_rounds_shuffle_the_order_and_time_each_call():
    import time as time_lib

    from variator_jax import timing
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time_lib.sleep(seconds)
            return np.zeros(())
        return fn

    times = timing.interleaved_times([sleeper("a", 0.02), sleeper("b", 0.005)], rounds=6, calls=2)
    assert times.shape == (2, 6)
    # One warm-up call each, then rounds of 2 calls of each, the first round in the order given.
    assert calls[:6] == ["a", "b", "a", "a", "b", "b"]
    rounds = [calls[2 + 4 * r:6 + 4 * r] for r in range(6)]
    assert all(sorted(r) == ["a", "a", "b", "b"] and r[0] == r[1] for r in rounds)
    assert {r[0] for r in rounds} == {"a", "b"}  # Later rounds change who goes first.
    assert np.all(times[0] >= 0.02) and np.all(times[1] >= 0.005) and np.all(times[1] < times[0])


def _fake_results(speedups, flagged):
    entries = []
    for i, (s, bad) in enumerate(zip(speedups, flagged, strict=True)):
        entries.append(dict(name="teacher" if i == 0 else f"run{i}", ratio=1 if i == 0 else 2 * i,
                            quality=1.0 - 0.01 * i, flops_per_example=1e9 * (1 - 0.1 * i),
                            flops_saving=0.1 * i, encoder_flops_saving=0.15 * i,
                            plugin_params=100 * i, plugin_params_pct=0.5 * i,
                            examples_per_s=10.0 * s,
                            speedup=s, speedup_q25=s - 0.05, speedup_q75=s + 0.05,
                            speedup_ceiling=1 / (1 - 0.1 * i), above_ceiling=bad, speed_rounds=10))
    return dict(task="pretrain", eval_data="builtin:pydoc", max_input_length=32, machine="test",
                quality_metric="agreement", entries=entries)


def test_table_flags_a_speedup_above_the_ceiling_and_names_rows_by_run(tmp_path):
    results = _fake_results([1.0, 2.69, 1.15], [False, True, False])
    table = evaluate.format_table(results)
    assert "| run1 | 2 |" in table and "| run2 | 4 |" in table
    assert "n/a: 2.69x (2.64-2.74) exceeds the FLOPs ceiling 1.11x" in table
    assert "| 1.15x (1.10-1.20) |" in table and "median over 10 interleaved rounds" in table
    evaluate.plot(results, str(tmp_path / "p.png"))  # Flagged points and error bars draw.
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert evaluate.run_name("runs/t5-base-sst2-k4/plugin") == "t5-base-sst2-k4"
    assert evaluate.run_name("plugins/k8/") == "k8"


def test_progress_counts_examples_and_gives_an_eta(monkeypatch, capsys):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)

    class Data:
        num_examples, references = 10, ["r"]

        def __iter__(self):
            return iter(range(3))

        def __len__(self):
            return 3

    data = progress.Progress(Data(), "k=4 run", batch_size=4)
    assert list(data) == [0, 1, 2] and data.references == ["r"] and len(data) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(",")[0] for ln in lines[:2]] == ["  k=4 run: 4/10 examples",
                                                      "  k=4 run: 8/10 examples"]
    assert "ETA 0:00:0" in lines[0] and lines[2].startswith("  k=4 run: 10 examples in ")
