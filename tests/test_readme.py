"""The README's examples run as written: its Python blocks, and its commands' config flags;
the documents name only make targets and modules that exist."""
import ast
import builtins
import importlib.util
import os
import re
import shlex

import jax

import variator_jax as vj
from tests import test_utils as tu
from variator_jax import cli, stages, vocab

with open(os.path.join(tu.REPO, "README.md")) as f:
    README = f.read()
with open(os.path.join(tu.REPO, "benchmarks", "README.md")) as f:
    BENCHMARKS_README = f.read()



def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    # What the blocks read, where `make demo` (variator_jax.stages --preset=demo) leaves it:
    # a fine-tuned backbone with its subword tokenizer beside it, and a k = 4 plugin. Here: a
    # tiny random T5, a vocabulary trained on a few sentences, a random plugin.
    text = "Return the absolute value of the argument."
    tokenizer = vocab.train_tokenizer([text, "Log a message with severity ERROR."] * 20, 180,
                                      str(tmp_path / "vocab"))
    cfg = tu.tiny_t5(vocab_size=len(tokenizer))
    backbone_dir = str(tmp_path / "demo_workdir" / "finetune" / "backbone")
    backbone = jax.device_get(vj.init_t5(jax.random.key(0), cfg))
    vj.save_hf_t5(backbone_dir, cfg, backbone, tokenizer=tokenizer)
    pcfg = vj.PluginConfig(ratio=4, bottleneck=8)
    vj.save_plugin(tmp_path / "demo_workdir" / "adapt-k4" / "plugin", pcfg,
                   vj.init_plugin(jax.random.key(1), cfg, pcfg),
                   vj.backbone_identity(cfg, backbone))
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    # A block that needs files the demo does not make (a real T5) says so on its first line;
    # it is compiled, and its names are checked, but not run.
    runnable = [b for b in blocks if not b.startswith("# Needs:")]
    assert len(runnable) >= 2
    for i, block in enumerate(blocks):  # Each block on its own: a fresh namespace.
        code = compile(block, f"README.md python block {i + 1}", "exec")
        if block in runnable:
            exec(code, {"__name__": "__main__"})
        else:  # Every name it reads is one it assigns or imports (no `ids` from nowhere).
            tree = ast.parse(block)
            bound = {a.asname or a.name.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
            bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                      and isinstance(n.ctx, ast.Store)}
            read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
            assert read <= bound | set(dir(builtins)), (block, read - bound)
    out = capsys.readouterr().out
    n = len(tokenizer(text)["input_ids"])  # The first text is the longest.
    m = max(len(tokenizer(w)["input_ids"]) for w in ("value", "logging"))
    # logits [2, m, V], hidden [2, n, d]
    assert f"(2, {m}, {len(tokenizer)}) (2, {n}, 32)" in out, out
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
        elif names := [m for m in ("variator_jax.stages", "benchmarks.quality") if m in argv]:
            stages._parse(argv[argv.index(names[0]) + 1:])  # argparse exits on an unknown flag.
            checked += 1
    assert checked >= 6


def test_documents_name_real_make_targets_and_modules():
    with open(os.path.join(tu.REPO, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    text = README + BENCHMARKS_README
    made = set(re.findall(r"(?:`|^)make ([a-z]+)", text, re.M))  # `make x`, or a command line.
    assert {"demo", "test", "serve"} <= made, made  # Not vacuous: the two commands are named.
    assert made <= targets, f"make targets the Makefile lacks: {sorted(made - targets)}"
    modules = set(re.findall(r"python -m ((?:benchmarks|variator_jax)(?:\.\w+)+)", text))
    assert len(modules) >= 8, modules
    missing = [m for m in sorted(modules)
               if m.endswith(".") or not importlib.util.find_spec(m)]
    assert not missing, f"modules named by `python -m` that do not exist: {missing}"
