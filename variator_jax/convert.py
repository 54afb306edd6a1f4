"""HF T5 checkpoint directory <-> Flax backbone tree.

A declarative table maps each HF key to a Flax path of the per-layer layout and a small
transform (`stacking.py`: a scanned model's `layers` entry is the same path of `block_0 ..
block_{L-1}` stacked, and the stack's position bias sits in block 0 as in HF); loading checks
that the key sets match and every shape fits, and names the offending keys when they do not.
Nothing is half-loaded: the tree is returned only once every tensor has been read and checked.
Reading never runs code: safetensors, or `torch.load(..., weights_only=True)` for .bin.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from variator_jax import stacking
from variator_jax.errors import CheckpointError
from variator_jax.fileio import atomic_write, get_path, set_path, write_json
from variator_jax.t5 import T5Config, init_t5


class _Row(NamedTuple):
    hf_key: str
    path: tuple[str, ...]
    kind: str  # How the tensor is laid out in HF; see _TO_FLAX.


# HF Linear weights are [out, in]; Flax kernels are [in, out], q/k/v/o split heads.
def _to_flax(kind: str, x: np.ndarray, cfg: T5Config) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":  # [heads*d_kv, d] -> [d, heads, d_kv]
        return x.T.reshape(cfg.d_model, cfg.num_heads, cfg.d_kv)
    if kind == "o":  # [d, heads*d_kv] -> [heads, d_kv, d]
        return x.T.reshape(cfg.num_heads, cfg.d_kv, cfg.d_model)
    raise AssertionError(kind)


def _to_hf(kind: str, x: np.ndarray, cfg: T5Config) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "linear":
        return x.T
    if kind == "qkv":
        return x.reshape(cfg.d_model, cfg.inner_dim).T
    if kind == "o":
        return x.reshape(cfg.inner_dim, cfg.d_model).T
    raise AssertionError(kind)


def key_table(cfg: T5Config) -> list[_Row]:
    """Every HF key of a T5ForConditionalGeneration with `cfg`, with its Flax path in the
    per-layer layout (`stacking.to_per_layer`)."""
    rows = [_Row("shared.weight", ("shared", "embedding"), "copy")]
    ffn = ["wi_0", "wi_1", "wo"] if cfg.is_gated else ["wi", "wo"]
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        attentions = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
        for i in range(n_layers):
            block = (stack, f"block_{i}")
            for j, att in enumerate(attentions):
                pre, path = f"{stack}.block.{i}.layer.{j}", block + (f"layer_{j}",)
                rows += [_Row(f"{pre}.{att}.{p}.weight", path + (att, p, "kernel"),
                              "o" if p == "o" else "qkv") for p in "qkvo"]
                if i == 0 and j == 0:  # The first layer owns the relative position bias.
                    rows.append(_Row(f"{pre}.{att}.relative_attention_bias.weight",
                                     path + (att, "relative_attention_bias", "embedding"), "copy"))
                rows.append(_Row(f"{pre}.layer_norm.weight", path + ("layer_norm", "weight"),
                                 "copy"))
            j = len(attentions)
            pre, path = f"{stack}.block.{i}.layer.{j}", block + (f"layer_{j}",)
            rows += [_Row(f"{pre}.DenseReluDense.{w}.weight",
                          path + ("DenseReluDense", w, "kernel"), "linear") for w in ffn]
            rows.append(_Row(f"{pre}.layer_norm.weight", path + ("layer_norm", "weight"), "copy"))
        rows.append(_Row(f"{stack}.final_layer_norm.weight", (stack, "final_layer_norm", "weight"),
                         "copy"))
    if not cfg.tie_word_embeddings:
        rows.append(_Row("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return rows


# Keys HF writes or accepts that carry no information of their own.
_IGNORED = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}


# -- Reading tensors ---------------------------------------------------------------------------
def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    try:
        out = {}
        with safe_open(file, framework="flax") as f:  # flax/jax handles bfloat16.
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        return out
    except Exception as e:  # safetensors raises its own error types for corrupt files.
        raise CheckpointError(f"{file}: cannot read safetensors file "
                              f"({type(e).__name__}: {e})") from None


def _read_torch_bin(file: str) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in torch_load_weights_only(file).items()}


def torch_load_weights_only(file: str) -> dict:
    """`torch.load(file, weights_only=True)` -> its dict of CPU tensors, with one-line errors.

    Never unpickles anything but tensors and plain containers: a pickle that needs any other
    global is refused before a line of it runs, and the error says so and names the global.
    """
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{file}: reading PyTorch checkpoints needs torch "
                              "(pip install 'variator_jax[torch]'), or convert it to "
                              "safetensors") from None
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file")
    with open(file, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol opcode 0x80).
    # Anything else is not a checkpoint at all, and torch.load's error would misname it.
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{file}: not a PyTorch checkpoint (neither a zip archive nor a "
                              f"pickle; it begins with {head!r}): truncated, corrupt or another "
                              "format")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(f"{file}: truncated or corrupt PyTorch checkpoint "
                                  f"({e})") from None
        raise CheckpointError(f"{file}: {_torch_load_problem(e)}") from None
    except PermissionError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror})") from None
    except Exception as e:  # zip and pickle readers raise RuntimeError, EOFError, KeyError, ...
        detail = str(e).split(". ")[0].strip()
        raise CheckpointError(f"{file}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}"
                              + (f": {detail})" if detail else ")")) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict (a flat mapping from names to tensors)")
    return state


def _torch_load_problem(e: BaseException) -> str:
    """One plain line for torch.load's error: its messages run over many lines, some with
    ANSI colour codes, and the reason of a weights-only refusal sits in the middle."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "weights only load failed" in text.lower():
        reason = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln),
                      lines[-1] if lines else type(e).__name__)
        return (f"refused: it holds pickled Python objects, not only tensors ({reason.rstrip('.')})"
                ": not weights-only loadable, and nothing in it was run (unpickling it could run "
                "code). Use a safetensors copy of this checkpoint, or re-save it as a plain state "
                "dict of tensors")
    return f"cannot read PyTorch checkpoint ({type(e).__name__}: {lines[0] if lines else ''})"


def _checkpoint_files(path: str) -> tuple[list[str], Callable[[str], dict]]:
    """The weight files of an HF directory, in the order HF prefers them."""
    for index, reader in (("model.safetensors.index.json", _read_safetensors),
                          ("pytorch_model.bin.index.json", _read_torch_bin)):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a valid shard index ({e})") from None
            return [os.path.join(path, s) for s in sorted(set(weight_map.values()))], reader
    for single, reader in (("model.safetensors", _read_safetensors),
                           ("pytorch_model.bin", _read_torch_bin)):
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)], reader
    raise CheckpointError(f"{path}: no model.safetensors, sharded safetensors index or "
                          "pytorch_model.bin found")


def _read_all(path: str) -> dict[str, np.ndarray]:
    files, reader = _checkpoint_files(path)
    tensors = {}
    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in the shard index but missing")
        tensors.update(reader(file))
    return tensors


# -- Public API ---------------------------------------------------------------------------------
def load_hf_t5(path: str | os.PathLike, dtype: str = "float32", **overrides):
    """Reads an HF T5 directory (config.json + weights) -> (T5Config, backbone tree, float32).

    `overrides`: runtime fields of the config (`scan_layers=False`, `remat=...`; see
    `t5.RUNTIME_FIELDS`); the tree's layout follows `scan_layers`.

    The output embedding follows what the file holds, as HF does: an `lm_head.weight` that
    differs from `shared.weight` is a separate head; a missing or identical one is tied.

    Example:
      >>> cfg, backbone = load_hf_t5("/models/flan-t5-base")
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg = T5Config.from_hf(path, dtype=dtype, **overrides)
    tensors = _read_all(path)
    head = tensors.pop("lm_head.weight", None)
    untied = head is not None and ("shared.weight" not in tensors
                                   or not np.array_equal(head, tensors["shared.weight"]))
    cfg = cfg.replace(tie_word_embeddings=not untied)
    if untied:
        tensors["lm_head.weight"] = head
    return cfg, tree_from_hf(cfg, tensors, source=path)


def tree_from_hf(cfg: T5Config, tensors: dict[str, np.ndarray], source: str = "checkpoint"):
    """HF state dict (numpy) -> backbone tree (scanned if `cfg.scan_layers`), with strict key
    and shape checks."""
    rows = key_table(cfg)
    expected = {r.hf_key for r in rows}
    present = set(tensors) - _IGNORED
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        msg = [f"{source}: checkpoint does not match a T5 with this config.json"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {', '.join(missing[:6])}"
                       + (", ..." if len(missing) > 6 else ""))
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:6])}"
                       + (", ..." if len(unexpected) > 6 else ""))
        raise CheckpointError("; ".join(msg))
    shapes = stacking.to_per_layer(jax.eval_shape(lambda: init_t5(jax.random.key(0), cfg)),
                                   take=lambda x, i: jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    tree: dict = {}
    for row in rows:
        want = get_path(shapes, row.path).shape
        try:
            value = _to_flax(row.kind, tensors[row.hf_key], cfg)
        except ValueError:
            value = None  # A reshape that does not fit: reported below with the HF shape.
        if value is None or value.shape != want:
            raise CheckpointError(
                f"{source}: {row.hf_key} has shape {tuple(tensors[row.hf_key].shape)}, "
                f"expected {tuple(_to_hf(row.kind, np.zeros(want, np.float32), cfg).shape)}")
        set_path(tree, row.path, np.ascontiguousarray(value, np.float32))
    return stacking.from_per_layer(tree, cfg.scan_layers, np.stack)


def tree_to_hf(cfg: T5Config, backbone) -> dict[str, np.ndarray]:
    """Backbone tree (any layout) -> HF state dict (numpy float32, contiguous)."""
    backbone = stacking.to_per_layer(backbone, take=lambda x, i: np.asarray(x[i], np.float32))
    return {row.hf_key: np.ascontiguousarray(
                _to_hf(row.kind, np.asarray(get_path(backbone, row.path), np.float32), cfg))
            for row in key_table(cfg)}


def save_hf_t5(path: str | os.PathLike, cfg: T5Config, backbone, tokenizer=None) -> None:
    """Writes config.json + model.safetensors that `T5ForConditionalGeneration.from_pretrained`
    loads. Files are written to temporaries and renamed, so a failure leaves the old ones.

    `tokenizer` (an HF tokenizer, or what `load_tokenizer` takes: "byte" or a directory) is
    saved beside the weights, so that the directory is complete: `AutoTokenizer` and
    `from_pretrained` both load it, and `load_hf_t5` + `load_tokenizer(None, path)` read it back.

    Example:
      >>> vj.save_hf_t5("export/backbone", cfg, backbone, tokenizer="byte")
      >>> model = transformers.T5ForConditionalGeneration.from_pretrained("export/backbone")
      >>> tok = transformers.AutoTokenizer.from_pretrained("export/backbone")
    """
    from safetensors.numpy import save_file
    path = os.fspath(path)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from variator_jax.data import load_tokenizer
            tokenizer = load_tokenizer(os.fspath(tokenizer))
        if len(tokenizer) > cfg.vocab_size:  # Checked before anything is written.
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the "
                             f"model's vocab_size {cfg.vocab_size}")
    os.makedirs(path, exist_ok=True)
    tensors = tree_to_hf(cfg, backbone)
    atomic_write(path, "model.safetensors",
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = cfg.to_hf()
    write_json(path, "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# -- Command line: python -m variator_jax.convert COMMAND ... ------------------------------------
# command -> module with main(argv) -> int
_COMMANDS = {"released": "variator_jax.released", "onnx": "variator_jax.onnx_export"}

# `python -m variator_jax.convert` runs this module while the package has imported it already;
# runpy warns that it then exists twice. Harmless here: `main` only dispatches, and the
# commands use the imported `variator_jax.convert`, never `__main__`'s copies.
warnings.filterwarnings("ignore", message=r"'variator_jax\.convert' found in sys\.modules",
                        category=RuntimeWarning)


def main(argv=None) -> int:
    """Dispatches `python -m variator_jax.convert COMMAND ARGS...` to the command's module."""
    import importlib
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: python -m variator_jax.convert {{{','.join(_COMMANDS)}}} ... "
              "(--help after a command for its options)", file=sys.stderr)
        return 2
    return importlib.import_module(_COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    from variator_jax import cli
    raise SystemExit(cli.run_main(main))  # Errors, Ctrl-C, a closed pipe: one line (boundary.py).
