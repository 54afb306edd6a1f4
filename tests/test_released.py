"""Importing the authors' released plugins (thunlp/Compression-Plugin) onto an HF T5.

The oracle is built here, from the released sources, not from variator_jax: a tiny random HF
T5 is copied and rescaled the way ModelCenter's `transfer/hugT5_bmtrainT5.py` converts HF T5
(the model the released plugins were trained in), and its encoder FFN blocks are patched with
a line-by-line port of the released `MuxLayer.mux` / `demux` / `ffn_forward`
(`variator/model/muxT5.py`, `AdapterLayer.py`) running the file's raw weights. The imported
plugin on the plain, unscaled HF model must give the same final encoder states.
"""
import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from torch import nn

import variator_jax as vj
from tests.hf_reference import build_hf_t5, rel_diff, save_hf_dir
from variator_jax import cli, convert, released, torch_plugin

S = 100.0  # ModelCenter's `scale` for T5 / T5-v1.1
K, R = 4, 16  # r = 16, not the default 64: the importer must infer it from the shapes
N = 16  # the released code needs n to be a multiple of k (it pads to 224, 256, ...)


# -- The released side, restated from the released sources -----------------------------------
def _command(argv) -> int:
    """`python -m variator_jax.convert ARGV` in this process: its exit status."""
    try:
        return cli.run_main(convert.main, argv)
    except SystemExit as e:
        return e.code


def modelcenter_copy(model, s=S):
    """An HF T5 with ModelCenter's rescaled weights (hugT5_bmtrainT5.py, hugT5v1_1_...):
    shared / s, attention `o` / s, FFN wi (v1.0) or wi_1 (gated) / sqrt(s), wo / sqrt(s).

    The layer-norm eps is divided by s^2 too: ModelCenter keeps 1e-6 on its 1/s-scaled stream,
    an eps of 1e-2 in HF units, a backbone difference that no plugin mapping can touch (it
    moves the teacher as well; released.py's docstring). Scaling it isolates the plugin.
    """
    mc = copy.deepcopy(model)
    with torch.no_grad():
        mc.shared.weight /= s
        for stack in (mc.encoder, mc.decoder):
            for block in stack.block:
                for layer in block.layer[:-1]:
                    attention = getattr(layer, "SelfAttention", None) or layer.EncDecAttention
                    attention.o.weight /= s
                ffn = block.layer[-1].DenseReluDense
                (ffn.wi_1 if hasattr(ffn, "wi_1") else ffn.wi).weight /= s ** 0.5
                ffn.wo.weight /= s ** 0.5
        for module in mc.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon /= s ** 2
    return mc


class MuxLayerPort(nn.Module):
    """`MuxLayer` of muxT5.py with `Adapter` of AdapterLayer.py; same names, so same keys."""

    def __init__(self, dim_model, mux_num, dim_mid=R):
        super().__init__()
        self.mux_num = mux_num
        self.mux_layer = nn.Linear(dim_model * mux_num, mux_num)
        self.demux_adapter = nn.Module()
        self.demux_adapter.w_in = nn.Linear(dim_model * 2, dim_mid)
        self.demux_adapter.w_out = nn.Linear(dim_mid, dim_model)

    def mux(self, hidden_states):
        bs, n, hs = hidden_states.size()
        mux_score = hidden_states.view(bs, -1, self.mux_num * hs)
        mux_score = self.mux_layer(mux_score).unsqueeze(2)
        mux_score = torch.softmax(mux_score, dim=-1)
        x = hidden_states.view(bs, -1, self.mux_num, hs)
        return torch.matmul(mux_score, x).squeeze(-2)

    def demux(self, hidden_states, ori_hidden):
        bs, _, hs = hidden_states.size()
        x = hidden_states.unsqueeze(2).repeat(1, 1, self.mux_num, 1).view(bs, -1, hs)
        tmp = torch.cat((x, ori_hidden), dim=-1)
        adapter = self.demux_adapter
        return x + adapter.w_out(torch.tanh(adapter.w_in(tmp)))


class ReleasedFile(nn.Module):
    """What `bmt.save(MuxT5Pretrain)` holds: `t5.*` (ModelCenter's backbone, here only its
    embedding) beside `mux_layer.{i}.*`."""

    def __init__(self, mc, num_layers, d, raw):
        super().__init__()
        self.t5 = nn.Module()
        self.t5.input_embedding = nn.Embedding.from_pretrained(mc.shared.weight.detach().clone())
        self.mux_layer = nn.ModuleList(MuxLayerPort(d, K) for _ in range(num_layers))
        self.mux_layer.load_state_dict(raw)


def run_released(mc, mux_layers, ids, mask):
    """ModelCenter's encoder with the released `ffn_forward` patched into every FFN block."""
    def ffn_forward(layer_ff, mux, hidden_states):
        x = layer_ff.layer_norm(hidden_states)
        x_before = x
        x = mux.mux(x)
        x = layer_ff.dropout(layer_ff.DenseReluDense(x))
        return hidden_states + mux.demux(x, x_before)

    mc = copy.deepcopy(mc)
    # `mux_layers` is one per block, or [] for ModelCenter's plain encoder (nothing patched).
    for block, mux in zip(mc.encoder.block, mux_layers, strict=bool(mux_layers)):
        layer_ff = block.layer[-1]
        layer_ff.forward = lambda h, layer_ff=layer_ff, mux=mux: ffn_forward(layer_ff, mux, h)
    with torch.no_grad():
        return mc.encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def raw_weights(d, num_layers, regime, seed=0):
    """Raw released weights, all far from zero in the units they act in.

    "uniform": every tensor N(0, 0.3^2) as stored. "trained": N(0, 0.3^2) on the HF scale,
    stored the way training inside ModelCenter would leave them (the y^ half of w_in s times
    larger, w_out s times smaller), so the merge, the y^ path and the adapter all move the
    output by comparable amounts and any one wrong factor shows.
    """
    rng = np.random.default_rng(seed)
    raw = {}
    for i in range(num_layers):
        shapes = {"mux_layer.weight": (K, K * d), "mux_layer.bias": (K,),
                  "demux_adapter.w_in.weight": (R, 2 * d), "demux_adapter.w_in.bias": (R,),
                  "demux_adapter.w_out.weight": (d, R), "demux_adapter.w_out.bias": (d,)}
        layer = {name: 0.3 * rng.standard_normal(shape) for name, shape in shapes.items()}
        if regime == "trained":
            layer["demux_adapter.w_in.weight"][:, :d] *= S
            layer["demux_adapter.w_out.weight"] /= S
            layer["demux_adapter.w_out.bias"] /= S
        raw.update({f"{i}.{name}": torch.tensor(v, dtype=torch.float32)
                    for name, v in layer.items()})
    return raw


def write_released(path, mc, raw, d, num_layers):
    """Saves like BMTrain: a flat fp16 state dict (with `_metadata`); returns the module whose
    fp16-rounded weights the released math then runs with."""
    module = ReleasedFile(mc, num_layers, d, raw).half()
    state = module.state_dict()
    assert hasattr(state, "_metadata")
    torch.save(state, path)
    return module.float().mux_layer


# -- Fixtures -----------------------------------------------------------------------------------
def batch(vocab, pad_row=False, seed=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (2, N)).astype(np.int32)
    mask = np.ones((2, N), np.int32)
    if pad_row:  # row 1: 9 real tokens, then padding (groups 2 and 3 hold pads)
        mask[1, 9:] = 0
        ids[1, 9:] = 0
    return ids, mask


def _setup(variant, tmp_path_factory):
    """A random HF T5, its ModelCenter copy, the HF dir and JAX backbone."""
    model = build_hf_t5(variant, seed=1)
    hf_dir = save_hf_dir(model, str(tmp_path_factory.mktemp(variant)), variant)
    cfg, backbone = vj.load_hf_t5(hf_dir)
    return dict(variant=variant, model=model, mc=modelcenter_copy(model), hf_dir=hf_dir,
                cfg=cfg, backbone=backbone, tmp=tmp_path_factory.mktemp(variant + "-files"))


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def setup(request, tmp_path_factory):
    """Both FFN kinds (ModelCenter rescales relu and gated FFNs differently)."""
    return _setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """T5 v1.0 (relu, tied), the backbone of the released plugins."""
    return _setup("v1_0", tmp_path_factory)


def released_file(setup, regime="trained"):
    cfg = setup["cfg"]
    path = str(setup["tmp"] / f"plugin-{regime}-mux_{K}.pkl")
    mux = write_released(path, setup["mc"], raw_weights(cfg.d_model, cfg.num_layers, regime),
                         cfg.d_model, cfg.num_layers)
    return path, mux


def encoder_states(setup, pcfg, plugin, ids, mask):
    return np.asarray(vj.encode(setup["cfg"], setup["backbone"], ids, mask, plugin=(pcfg, plugin)))


# -- Item 2: the numerics -------------------------------------------------------------------------
@pytest.mark.parametrize("regime", ["trained", "uniform"])
def test_imported_plugin_on_hf_equals_released_plugin_on_modelcenter(setup, regime):
    cfg = setup["cfg"]
    path, mux = released_file(setup, regime)
    ids, mask = batch(cfg.vocab_size)
    want = run_released(setup["mc"], mux, ids, mask)
    # The ModelCenter copy without a plugin is the HF model: final states agree exactly.
    with torch.no_grad():
        hf_plain = setup["model"].encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                                          attention_mask=torch.tensor(mask)).last_hidden_state
    assert rel_diff(run_released(setup["mc"], [], ids, mask), hf_plain.numpy()) < 1e-5

    pcfg, plugin = released.import_released_plugin(path, cfg)
    assert (pcfg.ratio, pcfg.bottleneck, pcfg.mask_aware) == (K, R, True)
    got = encoder_states(setup, pcfg, plugin, ids, mask)
    assert rel_diff(got, want) < 2e-5, rel_diff(got, want)
    # The plugin changes the output: the comparison above is not the backbone's alone.
    assert rel_diff(hf_plain.numpy(), want) > 0.05

    # An importer that copies the weights as they are (ModelCenter scale taken as 1) fails.
    _, naive = released.import_released_plugin(path, cfg, modelcenter_scale=1.0)
    assert rel_diff(encoder_states(setup, pcfg, naive, ids, mask), want) > 1e-2
    # So does one that gets any single factor wrong.
    d = cfg.d_model
    for wrong in ("y_half", "w_out", "b_out"):
        wi, wo = plugin["decompress"]["wi"], plugin["decompress"]["wo"]  # Stacked: [layers, ...].
        bad = {"compress": plugin["compress"], "decompress": {
            "wi": {"kernel": wi["kernel"].at[:, :d].multiply(S if wrong == "y_half" else 1.0),
                   "bias": wi["bias"]},
            "wo": {"kernel": wo["kernel"] / (S if wrong == "w_out" else 1.0),
                   "bias": wo["bias"] / (S if wrong == "b_out" else 1.0)}}}
        assert rel_diff(encoder_states(setup, pcfg, bad, ids, mask), want) > 1e-3, wrong


def test_padding_default_masks_it_option_reproduces_released(t5):
    cfg = t5["cfg"]
    path, mux = released_file(t5)
    ids, mask = batch(cfg.vocab_size, pad_row=True)
    # The port runs on the HF-masked copy, so pad vectors are the ones the HF backbone makes.
    want = run_released(t5["mc"], mux, ids, mask)

    pcfg, plugin = released.import_released_plugin(path, cfg, mask_aware=False)
    assert not pcfg.mask_aware
    got = encoder_states(t5, pcfg, plugin, ids, mask)
    assert rel_diff(got, want) < 2e-5  # pads merged unmasked, exactly as released

    pcfg, plugin = released.import_released_plugin(path, cfg)  # default: mask-aware
    got = encoder_states(t5, pcfg, plugin, ids, mask)
    assert rel_diff(got[0], want[0]) < 2e-5  # no padding in row 0: identical
    assert rel_diff(got[1, :9], want[1, :9]) > 1e-3  # row 1's real tokens no longer see pads


# -- The round trip: CLI -> plugin dir -> load_plugin (JAX) and attach_plugin (PyTorch) ----------
def test_cli_writes_plugin_that_torch_and_jax_run_alike(t5, tmp_path):
    cfg, backbone = t5["cfg"], t5["backbone"]
    path, _ = released_file(t5)
    out = str(tmp_path / "plugin")
    assert _command(["released", path, out, "--backbone", t5["hf_dir"]]) == 0
    with open(os.path.join(out, "plugin_config.json")) as f:
        config = json.load(f)
    assert config["backbone"] == vj.backbone_identity(cfg, backbone)
    assert (config["ratio"], config["bottleneck"], config["mask_aware"]) == (K, R, True)

    pcfg, plugin = vj.load_plugin(out, cfg=cfg, backbone=backbone)
    _, direct = released.import_released_plugin(path, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plugin, direct)

    ids, mask = batch(cfg.vocab_size, pad_row=True)
    dec = np.array([[0, 5, 9, 3], [0, 7, 2, 4]], np.int32)
    logits = np.asarray(vj.forward(cfg, backbone, ids, mask, dec, plugin=(pcfg, plugin))["logits"])
    model = transformers.T5ForConditionalGeneration.from_pretrained(t5["hf_dir"]).eval()
    torch_plugin.attach_plugin(model, out)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    assert rel_diff(logits, ref) < 1e-4, rel_diff(logits, ref)
    teacher = np.asarray(vj.forward(cfg, backbone, ids, mask, dec)["logits"])
    assert rel_diff(teacher, ref) > 1e-2  # the plugin is really attached on both sides

    # Nothing saved is lost: an existing plugin directory is not overwritten unasked.
    assert _command(["released", path, out, "--backbone", t5["hf_dir"]]) == 1
    assert _command(["released", path, out, "--backbone", t5["hf_dir"],
                         "--mask_aware", "false", "--overwrite"]) == 0
    assert vj.load_plugin(out)[0].mask_aware is False


def test_scale_check_against_the_files_backbone(t5):
    path, _ = released_file(t5)
    with pytest.warns(UserWarning, match=r"divided by 100\b.*modelcenter_scale=1\b"):
        released.import_released_plugin(path, t5["cfg"], modelcenter_scale=1.0,
                                       backbone=t5["backbone"])


# -- Item 4: bad input, one clear line each --------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_get_one_clear_line(t5, tmp_path):
    cfg = t5["cfg"]
    path, _ = released_file(t5)

    def error(file, cfg=cfg):
        with pytest.raises(vj.CheckpointError) as info:
            released.import_released_plugin(file, cfg)
        assert "\n" not in str(info.value)
        return str(info.value)

    # An HF checkpoint is not a released plugin.
    hf_bin = str(tmp_path / "pytorch_model.bin")
    torch.save(t5["model"].state_dict(), hf_bin)
    assert "not a released Variator plugin: no mux_layer.* keys" in error(hf_bin)

    # Width and depth: both numbers named.
    msg = error(path, cfg.replace(num_layers=3))
    assert "d_model 24 with 2 encoder layers" in msg and "d_model 24 with 3 encoder layers" in msg
    msg = error(path, cfg.replace(d_model=32))
    assert "d_model 24 with 2" in msg and "d_model 32 with 2" in msg

    # A pickle that needs more than tensors is refused, and none of it runs.
    marker = tmp_path / "code-ran"
    evil = str(tmp_path / "evil.pkl")
    torch.save({"mux_layer.0.mux_layer.weight": _RunsCode(marker)}, evil)
    assert "not weights-only loadable" in error(evil)
    assert not marker.exists()

    # A truncated file.
    truncated = str(tmp_path / "truncated.pkl")
    with open(path, "rb") as src, open(truncated, "wb") as dst:
        data = src.read()
        dst.write(data[: len(data) // 2])
    assert "truncated or corrupt" in error(truncated)

    # A layer missing one tensor; a layer of another shape.
    state = torch.load(path, weights_only=True)
    del state["mux_layer.1.demux_adapter.w_out.bias"]
    torch.save(state, tmp_path / "missing.pkl")
    assert "lacks mux_layer.1.demux_adapter.w_out.bias" in error(str(tmp_path / "missing.pkl"))
    state = torch.load(path, weights_only=True)
    w_in = "mux_layer.1.demux_adapter.w_in.weight"
    state[w_in] = state[w_in][:8]
    torch.save(state, tmp_path / "shape.pkl")
    assert f"{w_in} has shape (8, 48)" in error(str(tmp_path / "shape.pkl"))


def test_cli_bad_input_is_one_line_and_writes_nothing(t5, tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "variator_jax.convert", "released", str(truncated), str(out),
         "--backbone", t5["hf_dir"]],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ,
                 PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "truncated or corrupt" in lines[0], proc.stderr
    assert not out.exists()
