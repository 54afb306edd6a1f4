"""The entry points a new user meets first: config lookup, one-line errors, --show_config."""
import os
import subprocess
import sys

import pytest

import test_utils as tu
from variator_jax import cli

# A user's own config file that chains stage 0 before a plugin stage (`backbone_stage`).
CHAINED = os.path.join(tu.REPO, "tests", "data", "chained_config.py")


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=tu.REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_config_names_resolve_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Away from the checkout's configs/ link.
    packaged = os.path.join(tu.REPO, "variator_jax", "configs", "plugin.py")
    for spec in ("plugin", "plugin.py", "configs/plugin.py"):
        assert cli.resolve_config(spec + ":stage=adapt") == packaged + ":stage=adapt"
    mine = tmp_path / "mine.py"
    mine.write_text("def get_config(arg=None):\n    return arg\n")
    assert cli.resolve_config("mine.py:x") == "mine.py:x"  # An existing file wins.
    assert cli.load_config("mine.py:x") == "x"
    with pytest.raises(ValueError, match="'nope.py' not found; packaged configs: finetune, plugin"):
        cli.resolve_config("nope.py")
    assert cli.load_config("plugin:ratio=8").plugin.ratio == 8
    assert cli.load_config(CHAINED).backbone_stage.model_overrides.d_model == 128


def test_override_typos_name_the_dotted_field_and_the_suggestion():
    config = tu.load_config("plugin", "stage=pretrain")
    with pytest.raises(ValueError) as e:
        cli.check_overrides(config, ["--config.plugin.bottlenek=3"])
    assert str(e.value) == "no config field 'plugin.bottlenek'; did you mean 'plugin.bottleneck'?"
    with pytest.raises(ValueError, match="^no config field 'lrr'; did you mean 'lr'\\?$"):
        cli.check_overrides(config, ["--config.lr=1", "--config.lrr", "1"])
    with pytest.raises(ValueError, match="^no config field 'zzz'$"):
        cli.check_overrides(config, ["--config.zzz=1"])
    with pytest.raises(ValueError, match="'plugin.ratio' holds a int"):
        cli.check_overrides(config, ["--config.plugin.ratio.x=1"])
    cli.check_overrides(config, ["--config.mesh.model=2", "--noconfig.dropout", "--workdir=x"])


def test_every_entry_point_reports_bad_input_in_one_line(tmp_path):
    """A typo'd field, a bad preset, a bad variant: `error: ...`, one line, exit 1 or 2."""
    cases = {
        "no config field 'plugin.bottlenek'; did you mean 'plugin.bottleneck'?":
            ["eval.py", "--config=configs/plugin.py:stage=pretrain", "--workdir=w",
             "--config.plugin.bottlenek=8"],
        "no config field 'lrr'; did you mean 'lr'?":
            ["-m", "variator_jax.train", "--config=finetune", "--workdir=w", "--config.lrr=1"],
        "config preset 'sage=adapt': expected KEY=VALUE with KEY one of stage, task, size, ratio":
            ["-m", "variator_jax.evaluate", "--config=plugin:sage=adapt", "--workdir=w"],
        "stage='bogus'; use stage=pretrain or stage=adapt":
            ["train.py", "--config=configs/plugin.py:stage=bogus", "--workdir=w"],
        "config file 'nope.py' not found":
            ["train.py", "--config=nope.py", "--workdir=w"],
        "config.eval.evaluators: unknown evaluator 'bleu'; known: classification, cost, "
        "generation, speed": ["eval.py", "--config=plugin", "--workdir=w",
                              "--config.eval.evaluators=bleu"],
        "flag --config.lr=abc: could not convert string to float: 'abc'":
            ["eval.py", "--config=plugin", "--workdir=w", "--config.lr=abc"],
        "--workdir is required": ["train.py", "--config=plugin"],
        "unknown T5 variant 't5-bse'; did you mean 't5-base'?":
            ["-m", "variator_jax.flops", "--variant", "t5-bse"],
        "config.variant: unknown T5 variant 't5-smal'; did you mean 't5-small'?":
            ["train.py", "--config=finetune:task=pretrain,size=smal", "--config.tokenizer=byte",
             f"--workdir={tmp_path}/w"],
        "unknown T5 variant 'flan-t5-bas'; did you mean 'flan-t5-base'?":
            ["-m", "benchmarks.speed", "--variant", "flan-t5-bas", "--lengths", "32"],
    }
    procs = {want: _run([os.path.join(tu.REPO, args[0]) if args[0].endswith(".py") else args[0],
                         *args[1:]], cwd=tu.REPO) for want, args in cases.items()}
    for want, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode in (1, 2), (want, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (want, err)
    assert not os.path.exists(tmp_path / "w")  # Refused before anything was written.


def test_show_config_prints_each_field_with_the_comment_of_the_line_that_set_it(tmp_path):
    proc = _run(["-m", "variator_jax.train", f"--config={CHAINED}", "--show_config",
                 "--config.lr=0.5"], cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = {ln.split(" = ")[0]: ln for ln in out.splitlines()}
    # The file's own line set lr (and its comment), over plugin.py's; the override shows.
    assert lines["lr"].split() == ["lr", "=", "0.5", "#", "Peak", "AdamW", "learning", "rate."]
    # backbone_stage is a finetune.py config: its stage comment is finetune.py's, not plugin.py's.
    assert lines["backbone_stage.stage"].split("#")[1].strip() == \
        "Stage 0: every backbone weight is trained."
    assert lines["plugin.ratio"].split("#")[1].strip() == "k: neighbouring vectors merged into one."
    assert lines["backbone_stage.model_overrides.d_model"] == \
        "backbone_stage.model_overrides.d_model = 128"
    assert not os.listdir(tmp_path)  # Showing a config writes nothing.


def test_help_names_the_packaged_configs_and_with_a_config_its_fields():
    plain = _run([os.path.join(tu.REPO, "train.py"), "--help"], cwd=tu.REPO)
    with_config = _run(["-m", "variator_jax.evaluate", "--config=plugin:ratio=8", "--help"],
                       cwd=tu.REPO)
    out, _ = plain.communicate(timeout=120)
    assert plain.returncode == 0 and "packaged one (finetune, plugin)" in out, out
    assert "--workdir: Directory for checkpoints" in out and "--show_config" in out, out
    out, _ = with_config.communicate(timeout=120)
    assert with_config.returncode == 0 and "--workdir: The run's directory" in out, out
    assert "plugin.ratio = 8" in out and "# k: neighbouring vectors merged into one." in out, out
