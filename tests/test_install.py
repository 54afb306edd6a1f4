"""A plain (non-editable) install works: wheel -> fresh venv -> console scripts train a plugin,
without TensorFlow (the venv cannot import it).

Offline: the wheel is built without build isolation, and the fresh venv sees this
environment's packages (jax, flax, ...) through a path file, so nothing is downloaded. The
venv's own site-packages comes first, so `variator_jax` is the installed copy, not the checkout.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import test_utils as tu


def _check(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def test_wheel_installs_into_a_fresh_venv_and_its_cli_trains(tmp_path):
    # 1. The wheel, built from a copy of what setup.py packages (the checkout stays clean).
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(tu.REPO, "setup.py"), src)
    shutil.copytree(os.path.join(tu.REPO, "variator_jax"), src / "variator_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)])
    wheel, = glob.glob(str(tmp_path / "dist" / "variator_jax-*.whl"))

    # 2. A fresh venv that borrows this environment's dependencies, then the wheel.
    venv = tmp_path / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = _check([python, "-c",
                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    with open(os.path.join(site, "borrowed_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    with open(os.path.join(site, "no_tensorflow.pth"), "w") as f:  # TF is opt-in ([tfds]).
        f.write("import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    _check([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel], env=env)
    run_dir = tmp_path / "elsewhere"  # No checkout, no configs/ here.
    run_dir.mkdir()
    where = _check([python, "-c", "import variator_jax; print(variator_jax.__file__)"],
                   cwd=run_dir, env=env)
    assert where.startswith(site), where

    # 3. The console scripts: --help, then one training step on a packaged config.
    help_text = _check([str(venv / "bin" / "variator-train"), "--help"], cwd=run_dir, env=env)
    assert "--show_config" in help_text and "packaged one (finetune, plugin)" in help_text
    _check([str(venv / "bin" / "variator-eval"), "--help"], cwd=run_dir, env=env)
    # The stage chain (`make demo`) is the library's too: no checkout needed.
    stages_help = _check([python, "-m", "variator_jax.stages", "--help"], cwd=run_dir, env=env)
    assert "--preset {mini,demo,tiny,paper}" in stages_help, stages_help
    hf_dir = tu.make_hf_dir(str(tmp_path / "tiny_t5"))
    overrides = {**tu.TINY_OVERRIDES, **tu.TINY_CORPUS, "total_steps": 1, "warmup_steps": 1,
                 "log_every": 1, "checkpoint_every": 1}
    _check([str(venv / "bin" / "variator-train"), "--config=plugin:stage=pretrain",
            f"--config.backbone={hf_dir}", "--workdir=run", *tu.cli_flags(overrides)],
           cwd=run_dir, env=env)
    with open(run_dir / "run" / "plugin" / "plugin_config.json") as f:
        assert json.load(f)["ratio"] == 4
    assert [m["step"] for m in tu.read_metrics(str(run_dir / "run")) if "loss" in m] == [1]
