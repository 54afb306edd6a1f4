"""The authors' released plugins (thunlp/Compression-Plugin) on an HF T5 backbone.

The released `plugin-t5_base-mux_4.pkl` / `plugin-t5_large-mux_4.pkl` were saved by BMTrain
(`bmt.save(model)`) from a `MuxT5` built on ModelCenter's T5: a flat state dict, fp16, whose
plugin tensors are, for encoder layer i (`variator/model/muxT5.py`, `AdapterLayer.py`):

    mux_layer.{i}.mux_layer.weight [k, k*d]  .bias [k]     scores s_g = W_c concat(X_g) + b_c
    mux_layer.{i}.demux_adapter.w_in.weight  [r, 2d]  .bias [r]    W_i on concat(y^_i, x_i)
    mux_layer.{i}.demux_adapter.w_out.weight [d, r]   .bias [d]    W_o

beside, possibly, the backbone's own `t5.*` keys. ModelCenter's `Linear` (default
`length_scale=False`) is a plain `x W^T + b`, so these are docs/DESIGN.md §1's W_c, b_c, W_i, b_i,
W_o, b_o in the plugin-file layout, computed exactly as §1 says (member-major concat, softmax
over the k members, y^ before x, tanh) -- but on a differently scaled backbone.

Why the weights change on an HF backbone (the derivation)
---------------------------------------------------------
ModelCenter's `transfer/hugT5_bmtrainT5.py` (and `hugT5v1_1_bmtrainT5v1_1.py`, `hugMT5_...`)
converts HF T5 with s = 100: `shared` / s, every attention `o` / s, the FFN's `wi` (v1.0) or
`wi_1` (gated, v1.1) / sqrt(s) and `wo` / sqrt(s); q, k, v and all layer norms are copied.
(`hugFLANT5_bmtrainFLANT5.py` uses s = 1.) Induction over the layers, with h the HF residual
stream and h' ModelCenter's:

- the embedding gives h' = h / s;
- every sublayer reads RMSNorm(h') = RMSNorm(h) = x (the norm drops a global factor; see eps
  below), so attention scores and values are HF's and only `o` scales: Attn'(x) = Attn(x) / s;
- relu and the linear half of the gate are positively homogeneous, so
  FFN'(x) = wo/sqrt(s) . relu(wi/sqrt(s) . x) = FFN(x) / s (gated: gelu(wi_0 x) * wi_1 x / s);
- hence h' = h / s after every block, and the final layer norm gives HF's encoder states.

The released plugin, trained inside that model, sees in layer l: the normed x (unscaled),
y' = FFN'(c) = y / s, and adds its output to h' = h / s:

    h'_new = h/s + y^/s + W_o tanh(W_i^y y^/s + W_i^x x + b_i) + b_o

Multiplying by s gives the same block on the HF scale:

    h_new  = h + y^ + (s W_o) tanh((W_i^y / s) y^ + W_i^x x + b_i) + s b_o

So, exactly and for every k: W_c, b_c, W_i^x (the x half, columns d..2d of w_in), b_i are
copied; W_i^y (columns 0..d) is divided by s; W_o and b_o are multiplied by s. An importer that
copies the weights as they are feeds the adapter a y^ s times too large and adds its output
s times too small. tests/test_released.py checks both claims against a rescaled PyTorch copy.

Two differences of the backbones themselves, which no plugin mapping can remove (they touch
the teacher as much as the student): ModelCenter's RMSNorm adds eps = 1e-6 to the mean square
of the 1/s-scaled stream, i.e. eps * s^2 = 1e-2 in HF units where HF adds 1e-6 (negligible
when mean(h^2) >> 1e-2); and ModelCenter's encoder masks padded *queries* (their attention
output is 0) where HF masks only keys, so pad positions carry other vectors.

Padding. The released code pads to a fixed length and merges pad vectors unmasked.
`mask_aware=True` (the default here, docs/DESIGN.md §1) keeps pads out of every group: identical to
the released computation wherever a batch has no padding. `mask_aware=False` runs the released
plugin computation exactly (pads join groups); with padding its outputs still differ from a
ModelCenter run by the pad vectors themselves (above).

Loading never runs code: `torch.load(..., weights_only=True)` only.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from variator_jax.convert import load_hf_t5, torch_load_weights_only
from variator_jax.errors import CheckpointError
from variator_jax.plugins import (
    CONFIG_FILE,
    PLUGIN_FILE,
    PluginConfig,
    as_plugin,
    backbone_identity,
    plugin_param_count,
    save_plugin,
)
from variator_jax.t5 import T5Config

MODELCENTER_SCALE = 100.0  # `scale` of ModelCenter's T5 / T5-v1.1 / mT5 transfer scripts.

# The released module names -> ours (docs/DESIGN.md §4 file keys without
# `encoder.block.{i}.plugin.`).
_NAMES = {"mux_layer": "compress", "demux_adapter.w_in": "decompress.wi",
          "demux_adapter.w_out": "decompress.wo"}
_KEY = re.compile(r"^(?P<prefix>.*?)mux_layer\.(?P<layer>\d+)\.(?P<name>"
                  + "|".join(re.escape(n) for n in _NAMES) + r")\.(?P<kind>weight|bias)$")
_EMBEDDING = "t5.input_embedding.weight"  # present when BMTrain saved the whole MuxT5


def import_released_plugin(path, cfg: T5Config, *, mask_aware: bool = True,
                           modelcenter_scale: float = MODELCENTER_SCALE, backbone=None):
    """Reads a released BMTrain plugin file -> (PluginConfig, plugin tree for an HF backbone).

    Args:
      path: e.g. `plugin-t5_base-mux_4.pkl` (read with `torch.load(..., weights_only=True)`).
      cfg: the HF backbone's config; the plugin's width and depth must match it.
      mask_aware: True (default) keeps padding out of the groups; False reproduces the
        released code, which merges pad vectors unmasked.
      modelcenter_scale: s of the ModelCenter conversion the plugin was trained on: 100 for
        T5 / T5-v1.1 / mT5 (the released plugins), 1 for FLAN-T5.
      backbone: optional HF backbone tree; when the file also holds ModelCenter's embedding,
        warns if it is not this backbone's divided by `modelcenter_scale`.

    Returns:
      (PluginConfig(ratio=k, bottleneck=r, mask_aware=...), plugin tree of float32 arrays),
      k and r inferred from the shapes; ready for `forward(..., plugin=(pcfg, plugin))`
      and `save_plugin`.

    Example:
      >>> cfg, backbone = vj.load_hf_t5("/models/t5-base")
      >>> pcfg, plugin = import_released_plugin("plugin-t5_base-mux_4.pkl", cfg)
    """
    return _convert(_read_released(path, cfg), mask_aware, modelcenter_scale, backbone)


class _Released(NamedTuple):
    """A released file, read and checked against a backbone config."""
    path: str
    layers: list  # per layer {docs/DESIGN.md §4 file name: float32 array}, ModelCenter scale
    k: int
    d: int
    r: int
    embedding: object  # ModelCenter's `t5.input_embedding.weight` (a torch tensor) or None


def _read_released(path, cfg: T5Config) -> _Released:
    path = os.fspath(path)
    state = torch_load_weights_only(path)
    layers, prefix = _released_layers(state, path)
    k, d, r = _infer_dims(layers, path)
    if d != cfg.d_model or len(layers) != cfg.num_layers:
        raise CheckpointError(
            f"{path}: the released plugin is for d_model {d} with {len(layers)} encoder layers, "
            f"the backbone has d_model {cfg.d_model} with {cfg.num_layers} encoder layers")
    return _Released(path, layers, k, d, r, state.get(prefix + _EMBEDDING))


def _convert(released: _Released, mask_aware, modelcenter_scale, backbone):
    """-> (PluginConfig, plugin tree on the HF scale)."""
    if not np.isfinite(modelcenter_scale) or modelcenter_scale <= 0:
        raise ValueError(f"modelcenter_scale must be a positive number, got {modelcenter_scale!r}")
    if backbone is not None and released.embedding is not None:
        _check_scale(released.embedding, backbone, modelcenter_scale, released.path)
    pcfg = PluginConfig(ratio=released.k, bottleneck=released.r, mask_aware=mask_aware)
    per_layer = {f"block_{i}": _to_hf_scale(layer, released.d, float(modelcenter_scale))
                 for i, layer in enumerate(released.layers)}
    return pcfg, as_plugin((pcfg, per_layer)).params  # Stacked over layers, as load_plugin's.


def _released_layers(state, source) -> tuple[list[dict], str]:
    """The file's `mux_layer.*` tensors -> per layer {our file name: float32 array}, and the
    key prefix they carry (empty for `bmt.save(model)`)."""
    matches = {key: _KEY.match(key) for key in state}
    found = {key: m for key, m in matches.items() if m}
    if not found:
        stray = [key for key in state if "mux_layer" in key]
        raise CheckpointError(
            f"{source}: not a released Variator plugin: no mux_layer.* keys"
            + (f" of the released layout (found {stray[0]})" if stray else
               f" ({len(state)} keys, e.g. {', '.join(sorted(state)[:3]) or 'none'})"))
    prefixes = sorted({m["prefix"] for m in found.values()})
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: mux_layer.* keys under several prefixes {prefixes}")
    prefix = prefixes[0]
    stray = sorted(key for key in state
                   if key.startswith(prefix + "mux_layer.") and key not in found)
    if stray:
        raise CheckpointError(f"{source}: unexpected key {stray[0]} in the released plugin")
    by_layer: dict[int, dict] = {}
    for key, m in found.items():
        value = state[key].float().numpy()
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{source}: {key} holds NaN or inf")
        by_layer.setdefault(int(m["layer"]), {})[(m["name"], m["kind"])] = value
    want = {(name, kind) for name in _NAMES for kind in ("weight", "bias")}
    for i in range(max(by_layer) + 1):
        missing = sorted(want - set(by_layer.get(i, {})))
        if missing:
            keys = ", ".join(f"{prefix}mux_layer.{i}.{name}.{kind}" for name, kind in missing)
            raise CheckpointError(f"{source}: released plugin lacks {keys}")
    return [{f"{_NAMES[name]}.{kind}": v for (name, kind), v in by_layer[i].items()}
            for i in range(len(by_layer))], prefix


def _infer_dims(layers, source) -> tuple[int, int, int]:
    """k, d, r from layer 0 (W_c [k, k*d], W_i [r, 2d]); every layer must agree."""
    k, kd = layers[0]["compress.weight"].shape
    r = layers[0]["decompress.wi.weight"].shape[0]
    d = kd // k
    shapes = {"compress.weight": (k, k * d), "compress.bias": (k,),
              "decompress.wi.weight": (r, 2 * d), "decompress.wi.bias": (r,),
              "decompress.wo.weight": (d, r), "decompress.wo.bias": (d,)}
    released = {v: k_ for k_, v in _NAMES.items()}
    for i, layer in enumerate(layers):
        for name, shape in shapes.items():
            if layer[name].shape != shape:
                module, kind = name.rsplit(".", 1)
                raise CheckpointError(
                    f"{source}: mux_layer.{i}.{released[module]}.{kind} has shape "
                    f"{layer[name].shape}, expected {shape} (k={k}, d_model={d}, bottleneck={r} "
                    "from mux_layer.0)")
    return k, d, r


def _to_hf_scale(layer, d: int, s: float):
    """One released layer (ModelCenter scale) -> our plugin tree on the HF scale (derivation
    in the module docstring): W_i^y / s, W_o * s, b_o * s; the rest copied."""
    wi = layer["decompress.wi.weight"].copy()  # [r, 2d]: columns 0..d read y^, d..2d read x
    wi[:, :d] /= s
    return {"compress": {"kernel": jnp.asarray(layer["compress.weight"].T),
                         "bias": jnp.asarray(layer["compress.bias"])},
            "decompress": {"wi": {"kernel": jnp.asarray(wi.T),
                                  "bias": jnp.asarray(layer["decompress.wi.bias"])},
                           "wo": {"kernel": jnp.asarray(layer["decompress.wo.weight"].T * s),
                                  "bias": jnp.asarray(layer["decompress.wo.bias"] * s)}}}


def _check_scale(embedding, backbone, s, source):
    """Warns unless ModelCenter's embedding is this backbone's divided by s (least squares)."""
    mc = embedding.float().numpy().astype(np.float64)
    hf = np.asarray(backbone["shared"]["embedding"], np.float64)
    if mc.shape != hf.shape or not np.any(mc):
        return
    ratio = float(np.sum(hf * mc) / np.sum(mc * mc))
    if abs(ratio / s - 1) > 0.05:
        warnings.warn(f"{source}: its ModelCenter embedding is this backbone's divided by "
                      f"{ratio:.4g}, not by modelcenter_scale={s:g}: another backbone, or pass "
                      f"modelcenter_scale={ratio:.3g}", stacklevel=4)


# -- Command line -------------------------------------------------------------------------------
def main(argv=None) -> int:
    """`python -m variator_jax.convert released SRC OUT_DIR --backbone HF_DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m variator_jax.convert released",
        description="Import a plugin released with thunlp/Compression-Plugin (BMTrain .pkl) "
                    "onto an HF T5 and write a plugin directory (plugin.safetensors + "
                    "plugin_config.json) that load_plugin and torch_plugin.attach_plugin read.")
    parser.add_argument("src", help="the released file, e.g. plugin-t5_base-mux_4.pkl")
    parser.add_argument("out_dir", help="plugin directory to write")
    parser.add_argument("--backbone", required=True,
                        help="HF T5 directory the plugin will run on (e.g. t5-base)")
    parser.add_argument("--mask_aware", choices=("true", "false"), default="true",
                        help="false: merge padding unmasked, as the released code does")
    parser.add_argument("--modelcenter_scale", type=float, default=MODELCENTER_SCALE,
                        help="ModelCenter's conversion scale: 100 for T5/T5-v1.1/mT5, "
                             "1 for FLAN-T5")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a plugin already in OUT_DIR")
    args = parser.parse_args(argv)  # Errors: one line from the boundary (`convert`'s main).
    for name in (PLUGIN_FILE, CONFIG_FILE):
        if not args.overwrite and os.path.exists(os.path.join(args.out_dir, name)):
            raise FileExistsError(f"{args.out_dir} already holds {name}; "
                                  "pass --overwrite to replace it")
    # config.json first: a file that does not fit fails before gigabytes of weights load.
    released = _read_released(args.src, T5Config.from_hf(args.backbone))
    cfg, backbone = load_hf_t5(args.backbone)
    pcfg, plugin = _convert(released, args.mask_aware == "true", args.modelcenter_scale,
                            backbone)
    save_plugin(args.out_dir, pcfg, plugin, backbone_identity(cfg, backbone))
    print(f"{args.out_dir}: k={pcfg.ratio}, bottleneck={pcfg.bottleneck}, "
          f"{cfg.num_layers} layers, d_model={cfg.d_model}, "
          f"{plugin_param_count(cfg, pcfg):,} parameters, mask_aware={pcfg.mask_aware}, "
          f"from {args.src} (ModelCenter scale {args.modelcenter_scale:g})")
    return 0
