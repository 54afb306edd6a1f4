"""eval.py end to end on tiny models: the three outputs, and values a bug would change."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import variator_jax as vj
from variator_jax import evaluate, flops
from tests import test_utils as tu


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
        [sys.executable, os.path.join(tu.REPO, "eval.py"), "--config=configs/plugin.py:stage=pretrain",
         f"--config.backbone={backbone}", f"--workdir={workdir}", *tu.cli_flags(overrides)],
        cwd=tu.REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(os.path.join(workdir, "eval", "results.json")))
    teacher, k2, k4 = results["entries"]
    assert [e["ratio"] for e in results["entries"]] == [1, 2, 4]
    assert results["quality_metric"] == "agreement" and teacher["quality"] == 1.0
    assert teacher["speedup"] == 1.0 and teacher["flops_saving"] == 0.0
    for entry in (k2, k4):  # A fresh plugin is close to, not equal to, the teacher.
        assert 0.0 < entry["enc_mse"] and 0.0 <= entry["agreement"] <= 1.0
        assert entry["speedup"] > 0 and entry["examples_per_s"] > 0
        want = 1 - flops.encoder_flops(cfg, 32, entry["ratio"], 8)["total"] / flops.encoder_flops(cfg, 32)["total"]
        assert entry["encoder_flops_saving"] == pytest.approx(want)
        assert entry["plugin_params"] == vj.plugin_param_count(cfg, vj.PluginConfig(entry["ratio"], 8))
    assert 0 < k2["flops_saving"] < k4["flops_saving"] < 1
    table = open(os.path.join(workdir, "eval", "results.md")).read()
    assert table in proc.stdout  # The printed table is the saved one.
    assert table.count("\n| ") == 4 and "| teacher | 1 | 1.0000 |" in table
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
            assert np.isfinite(plugin["exact_match"]) and teacher["flops_per_example"] > plugin["flops_per_example"]


def test_missing_plugin_dir_is_a_user_error(run):
    root, backbone, _, _ = run
    config = tu.tiny_plugin_config(backbone, **{"data__eval": "builtin:pydoc",
                                                "eval__plugins": str(root / "nope")})
    with pytest.raises(evaluate.UserError, match="nope does not exist"):
        evaluate.evaluate(config, str(root / "run2"))
