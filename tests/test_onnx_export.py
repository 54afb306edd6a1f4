"""variator_jax.onnx_export: the exported encoder (ONNX Runtime) and the PyTorch path it is
traced from, against JAX's `model.encode`, on tiny random models with padding, for every k."""
import os
import subprocess
import sys

import jax
import onnx
import pytest
import torch

import variator_jax as vj
from tests.test_utils import REPO, make_hf_dir, tiny_t5
from variator_jax import cli, onnx_export

VOCAB = 64
# (batch, n): one token; n < 4 and 8, batch 1; n a multiple of 2, 4 and 8 (nothing to pad to
# k) in rows padded to other lengths. All differ from the traced (2, 11) and checked (3, 37).
SHAPES = ((1, 1), (2, 3), (4, 24))


def _command(argv) -> int:
    """`python -m variator_jax.convert onnx ARGV` in this process: its exit status."""
    try:
        return cli.run_main(onnx_export.main, argv)
    except SystemExit as e:
        return e.code


def _cfg(**kw):
    return tiny_t5(**{**dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_heads=4,
                             dropout_rate=0.0), **kw})


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return make_hf_dir(str(tmp_path_factory.mktemp("backbone")), _cfg(), tokenizer=False)


def _plugin_dir(path, backbone_dir, k, seed=1):
    """A k plugin whose merge and decompression both move the output: random weights at a
    scale where W_c's softmax is far from uniform and the bottleneck MLP is not ~0."""
    cfg, backbone = vj.load_hf_t5(backbone_dir)
    pcfg = vj.PluginConfig(ratio=k, bottleneck=8)
    plugin = vj.init_plugin(jax.random.key(seed), cfg, pcfg)
    leaves, tree = jax.tree.flatten(plugin)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    plugin = jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(key, x.shape)
                                       for x, key in zip(leaves, keys, strict=True)])
    vj.save_plugin(path, pcfg, plugin, vj.backbone_identity(cfg, backbone))
    return str(path)


def _relative(x, reference):
    return onnx_export.relative_difference(x, reference)


@pytest.mark.parametrize("k", [None, 2, 4, 8])
def test_onnx_and_pytorch_equal_jax_encoder_with_padding(k, backbone_dir, tmp_path, capsys):
    plugin_dir = None if k is None else _plugin_dir(tmp_path / "plugin", backbone_dir, k)
    out = str(tmp_path / "encoder.onnx")
    argv = [backbone_dir, out] + ([] if k is None else ["--plugin", plugin_dir])
    assert _command(argv) == 0
    printed = capsys.readouterr().out
    assert "relative difference to JAX" in printed and "ONNX Runtime" in printed
    if k is None:  # An existing file is kept unless asked.
        assert _command(argv) == 1
        assert "exists; pass --overwrite" in capsys.readouterr().err

    # The graph's interface: names as documented, batch and length symbolic.
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, value.name  # not fixed numbers

    reference = onnx_export.jax_encoder(backbone_dir, plugin_dir)
    plain = onnx_export.jax_encoder(backbone_dir)
    model = onnx_export.hf_encoder(backbone_dir, plugin_dir)
    quiet = onnx_export.onnx_runner(out, threads=1, spinning=False)  # As the benchmark runs it.
    for batch, n in SHAPES:
        ids, mask = onnx_export.check_batch(VOCAB, batch, n, seed=batch * 100 + n)
        expected = reference(ids, mask)
        got = onnx_export.run_onnx(out, ids, mask)
        assert got.shape == (batch, n, 16)
        assert _relative(got, expected) < 1e-4, (batch, n)
        assert _relative(quiet(ids, mask), expected) < 1e-4, (batch, n)
        with torch.no_grad():
            got_torch = model(input_ids=torch.from_numpy(ids),
                              attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        assert _relative(got_torch, expected) < 1e-4, (batch, n)
        if k is not None and n > 1:  # The plugin is in the graph: it changes the output.
            assert _relative(got, plain(ids, mask)) > 1e-2, (batch, n)


def test_refuses_a_plugin_of_another_backbone(backbone_dir, tmp_path, capsys):
    other = make_hf_dir(str(tmp_path / "other"), _cfg(), seed=7, tokenizer=False)
    plugin_dir = _plugin_dir(tmp_path / "plugin", other, 4)  # Same sizes, other weights.
    out = tmp_path / "out" / "encoder.onnx"
    assert _command([backbone_dir, str(out), "--plugin", plugin_dir]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not on this one" in err and err.count("\n") == 1
    wider = make_hf_dir(str(tmp_path / "wider"), _cfg(d_model=24), tokenizer=False)
    assert _command([wider, str(out), "--plugin", plugin_dir]) == 1
    assert "another backbone (d_model 16, this backbone has 24)" in capsys.readouterr().err
    assert not out.exists()


def test_the_command_refuses_to_write_above_the_tolerance(backbone_dir, tmp_path):
    out = tmp_path / "encoder.onnx"
    # A tolerance no graph meets (0 could pass when both agree to the last bit).
    run = subprocess.run([sys.executable, "-m", "variator_jax.convert", "onnx", backbone_dir,
                          str(out), "--tolerance", "-1"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1, run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("error: onnx output differs from JAX's encoder by ")
    assert error.endswith("not written")
    assert os.listdir(tmp_path) == []  # Neither the file nor the scratch directory.


def test_missing_exporter_packages_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert _command([str(tmp_path / "no-backbone"), str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err == ("error: the ONNX export needs onnxscript: pip install "
                                       "'variator_jax[onnx]'\n")
