"""HF checkpoint directories in and out: exact round trips, every file layout, clear errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import variator_jax as vj
from tests.hf_reference import build_hf_t5, padded_batch, rel_diff, save_hf_dir
from variator_jax import convert


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = build_hf_t5("flan_v4")
    return model, save_hf_dir(model, str(tmp_path_factory.mktemp("flan")), "flan_v4")


@pytest.mark.parametrize("variant", ["v1_0", "flan_v4"])
def test_save_then_from_pretrained_is_exact(variant, tmp_path):
    model = build_hf_t5(variant)
    cfg, backbone = vj.load_hf_t5(save_hf_dir(model, str(tmp_path / "in"), variant))
    vj.save_hf_t5(tmp_path / "out", cfg, backbone)
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    want, got = model.state_dict(), again.state_dict()
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert again.config.scale_decoder_outputs == model.config.scale_decoder_outputs
    ids, mask, dec = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        ref = again(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    assert rel_diff(vj.forward(cfg, backbone, ids, mask, dec)["logits"], ref) < 1e-4


def test_random_backbone_saves_loadable(tmp_path):
    cfg = vj.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                      num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
    backbone = vj.init_t5(jax.random.key(0), cfg)
    vj.save_hf_t5(tmp_path, cfg, backbone)
    cfg2, backbone2 = vj.load_hf_t5(tmp_path)
    assert cfg2.replace(name="") == cfg.replace(name="")
    jax.tree_util.tree_map(np.testing.assert_array_equal, backbone, backbone2)


def test_sharded_safetensors_and_torch_bin(hf_dir, tmp_path):
    model, path = hf_dir
    _, reference = vj.load_hf_t5(path)
    state = {k: v.contiguous().numpy() for k, v in model.state_dict().items()}
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(path, "config.json"), sharded)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        safetensors.numpy.save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(path, "config.json"), binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for directory in (sharded, binary):
        _, loaded = vj.load_hf_t5(directory)
        jax.tree_util.tree_map(np.testing.assert_array_equal, reference, loaded)


def test_bfloat16_checkpoint_loads_as_float32(hf_dir, tmp_path):
    model, path = hf_dir
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.to(torch.float32)
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    _, backbone = vj.load_hf_t5(tmp_path)
    leaf = backbone["shared"]["embedding"]
    assert leaf.dtype == np.float32
    np.testing.assert_array_equal(
        leaf, model.shared.weight.detach().to(torch.bfloat16).float().numpy())


def _copy(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_errors_name_the_problem(hf_dir, tmp_path):
    _, path = hf_dir
    with pytest.raises(vj.CheckpointError, match="no such checkpoint directory"):
        vj.load_hf_t5(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vj.load_hf_t5(tmp_path / "empty")
    broken = _copy(path, tmp_path)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # Truncated.
    with pytest.raises(vj.CheckpointError, match="model.safetensors: cannot read safetensors"):
        vj.load_hf_t5(broken)
    weights.write_bytes(b"\x00" * 64)  # Garbage header.
    with pytest.raises(vj.CheckpointError, match="cannot read safetensors"):
        vj.load_hf_t5(broken)


def test_other_architecture_and_mismatched_config(hf_dir, tmp_path):
    _, path = hf_dir
    other = _copy(path, tmp_path)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ValueError, match="model_type is 'bert', not a T5"):
        vj.load_hf_t5(other)
    (other / "config.json").write_text(json.dumps(dict(config, d_ff=48)))
    with pytest.raises(vj.CheckpointError, match=r"DenseReluDense.wi_0.weight has shape "
                                                 r"\(40, 24\), expected \(48, 24\)"):
        vj.load_hf_t5(other)
    (other / "config.json").write_text(json.dumps(dict(config, num_layers=3)))
    with pytest.raises(vj.CheckpointError, match=r"missing keys \(\d+\): encoder.block.2"):
        vj.load_hf_t5(other)
    (other / "config.json").write_text(json.dumps(dict(config, num_layers=1)))
    with pytest.raises(vj.CheckpointError, match=r"unexpected keys \(\d+\): encoder.block.1"):
        vj.load_hf_t5(other)


def test_key_table_covers_hf_state_dict():
    """The declarative table names exactly the parameters HF's own model has."""
    for variant in ("v1_0", "flan_v4"):
        model = build_hf_t5(variant)
        cfg = vj.T5Config.from_hf(model.config.to_dict(),
                                  tie_word_embeddings=variant == "v1_0")
        table = {row.hf_key for row in convert.key_table(cfg)}
        # The tied head is the same tensor as `shared`.
        tied_head = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        assert table == set(model.state_dict()) - convert._IGNORED - tied_head


def test_written_files_get_the_umask_mode_not_private(tmp_path):
    cfg = vj.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    old = os.umask(0o022)
    try:
        vj.save_hf_t5(tmp_path, cfg, vj.init_t5(jax.random.key(0), cfg))
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_save_hf_t5_with_a_tokenizer_is_a_complete_hf_directory(tmp_path):
    from tests import test_utils as tu
    cfg = tu.tiny_t5()
    backbone = jax.device_get(vj.init_t5(jax.random.key(0), cfg))
    vj.save_hf_t5(tmp_path / "out", cfg, backbone, tokenizer="byte")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    text = "Return the absolute value of x."
    assert tok(text)["input_ids"] == transformers.ByT5Tokenizer()(text)["input_ids"]
    assert tok(text)["input_ids"][:3] == [ord("R") + 3, ord("e") + 3, ord("t") + 3]  # Bytes + 3.
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.config.vocab_size == 384
    assert len(vj.load_tokenizer(None, str(tmp_path / "out"))) == len(tok)
    small = cfg.replace(vocab_size=100)  # ByT5's 384 tokens cannot fit: nothing is written.
    with pytest.raises(ValueError, match="384 tokens, more than the model's vocab_size 100"):
        vj.save_hf_t5(tmp_path / "small", small, vj.init_t5(jax.random.key(0), small),
                      tokenizer=tok)
    assert not os.path.exists(tmp_path / "small")
