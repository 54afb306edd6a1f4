"""The README's examples run as written: its Python blocks, and its commands' config flags."""
import os
import re
import shlex

import jax

import variator_jax as vj
from variator_jax import cli
from tests import test_utils as tu

with open(os.path.join(tu.REPO, "README.md")) as f:
    README = f.read()


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    # What the blocks read, where `make demo` leaves it: a (tiny, random) backbone with its
    # ByT5 tokenizer, and a k = 4 plugin trained on it.
    backbone_dir = tu.make_hf_dir(str(tmp_path / "demo_workdir" / "backbone_stage" / "backbone"))
    cfg, backbone = vj.load_hf_t5(backbone_dir)
    pcfg = vj.PluginConfig(ratio=4, bottleneck=8)
    vj.save_plugin(tmp_path / "demo_workdir" / "plugin", pcfg,
                   vj.init_plugin(jax.random.key(1), cfg, pcfg), vj.backbone_identity(cfg, backbone))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):  # Each block on its own: a fresh namespace.
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    # The tokenisation shown: ByT5 ids are bytes + 3 ("Return" -> 85 104 119 120 117 113).
    assert "[ 85 104 119 120 117 113]" in out, out
    assert "(2, 6, 384) (2, 43, 32)" in out, out  # Logits [2, m, vocab], hidden [2, n, d].
    assert sorted(os.listdir("my_plugin")) == ["plugin.safetensors", "plugin_config.json"]
    assert os.path.isfile("export/backbone/tokenizer_config.json")


def _commands(language="sh"):
    """The README's shell commands, continuation lines joined."""
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield shlex.split(line)


def test_readme_commands_name_real_configs_and_fields():
    checked = 0
    for argv in _commands():
        specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
        if specs:
            cli.check_overrides(cli.load_config(specs[0]), argv)  # Raises on a typo'd field.
            checked += 1
    assert checked >= 6
