"""`train.py --dry_run` (variator_jax/fit.py): the real step compiled against abstract params."""
import json
import os
import re

import jax
import jax.numpy as jnp

from tests import test_utils as tu
from variator_jax import fit, t5


def _tiny_dir(tmp_path):
    # d_model, d_ff, vocab and heads*d_kv all divide by 8: every `embed` dim shards evenly.
    return tu.make_hf_dir(str(tmp_path / "backbone"), tu.tiny_t5(), tokenizer=False)


def test_dry_run_on_8_devices_shards_params_under_fsdp(tmp_path):
    """The CLI, as a user runs it: no weights are read (the directory's safetensors file is
    removed), and FSDP leaves each of 8 devices 1/8 of the parameters."""
    backbone = _tiny_dir(tmp_path)
    os.remove(os.path.join(backbone, "model.safetensors"))
    flags = dict(tu.TINY_OVERRIDES, **{"mesh.data": -1, "mesh.fsdp": True, "remat": "full",
                                       "batch_size": 16})
    proc = tu.train_py(["--config=configs/plugin.py:stage=pretrain",
                        f"--config.backbone={backbone}", f"--workdir={tmp_path / 'run'}",
                        "--dry_run", *tu.cli_flags(flags)],
                       devices=8)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "params" in out and "GiB per device" in out
    report = json.loads((tmp_path / "run" / "fit.json").read_text())
    assert report["devices"]["count"] == 8 and report["attention"] == "dense"
    assert report["fsdp"] and report["remat"] == "full" and report["scan_layers"]
    b = report["bytes_per_device"]
    assert b["total"] == b["params"] + b["optimizer"] + b["temp"] and b["temp"] > 0
    assert report["compile_seconds"] > 0 and report["flops_per_step"] > 0
    # Only arrays without an embed dim stay replicated: the position-bias tables [buckets,
    # heads] and the plugin's biases of sizes k (4) and r (8) in each layer.
    cfg = tu.tiny_t5()
    replicated = 4 * (2 * cfg.relative_attention_num_buckets * cfg.num_heads
                      + cfg.num_layers * (4 + tu.TINY_OVERRIDES["plugin.bottleneck"]))
    total = report["params_total_bytes"]
    assert b["params"] == (total - replicated) // 8 + replicated
    assert not (tmp_path / "run" / "checkpoints").exists()  # Nothing trained.


def test_bfloat16_places_the_frozen_backbone_in_half_the_bytes(tmp_path):
    """fit.json's parameter bytes under --config.dtype=bfloat16: the frozen backbone's
    kernels and embeddings in bf16, the plugin and its optimizer state in float32."""
    config = tu.tiny_plugin_config(_tiny_dir(tmp_path))
    parts = {dtype: fit.lower_train_step(tu.override(config, {"dtype": dtype}))[1]
             for dtype in ("float32", "bfloat16")}
    full, half = (fit.total_bytes(parts[d]["backbone"]) for d in ("float32", "bfloat16"))
    cfg = parts["bfloat16"]["cfg"]
    # Only the layer norms' scales and the two position-bias tables stay 4 bytes wide.
    norms = cfg.d_model * (2 * cfg.num_layers + 3 * cfg.num_decoder_layers + 2)
    tables = 2 * cfg.relative_attention_num_buckets * cfg.num_heads
    assert half == (full + 4 * (norms + tables)) // 2
    for tree in (parts["bfloat16"]["state"].params, parts["bfloat16"]["state"].opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {jnp.dtype(jnp.float32)}


def _count_all_gathers(attention_block_bytes, tmp_path):
    config = tu.tiny_plugin_config(_tiny_dir(tmp_path), mesh__data=-1, batch_size=16,
                                   max_input_length=32)
    lowered, _ = fit.lower_train_step(config, attention="blocked",
                                      attention_block_bytes=attention_block_bytes)
    return len(re.findall(r"= \S+ all-gather(-start)?\(", lowered.compile().as_text()))


def test_data_parallel_step_never_gathers_activations(tmp_path):
    """CPU attention blocks are sized per device and split the batch so that every block
    stays sharded: a data-parallel step on 8 devices holds no all-gather at all (params and
    plugin are replicated; gradients are all-reduced). One example's scores per block (2
    blocks per device) and 16 queries per block (one example per device per block)."""
    cfg = tu.tiny_t5()
    assert t5.attention_blocks(2, cfg.num_heads, 32, 32, cfg.num_heads * 32 * 32 * 4) == (1, 32)
    assert _count_all_gathers(cfg.num_heads * 32 * 32 * 4, tmp_path) == 0
    assert t5.attention_blocks(2, cfg.num_heads, 32, 32, cfg.num_heads * 16 * 32 * 4) == (1, 16)
    assert _count_all_gathers(cfg.num_heads * 16 * 32 * 4, tmp_path) == 0
