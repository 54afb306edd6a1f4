"""The Variator compression plugin (Xiao et al., Findings of EMNLP 2023), DESIGN.md §1.

Around each encoder layer's FFN, every k neighbouring hidden vectors are merged into one by
a learned softmax over the group's members; the frozen FFN runs on n/k vectors; the result
is copied back to the k positions and refined by a small bottleneck MLP that also sees each
position's own input:

    s_g = W_c concat(X_g) + b_c;  c_g = sum_j softmax(s_g)_j X_g[j]
    y_g = Dropout(FFN(c_g));      o_i = y_g(i) + W_o tanh(W_i [y_g(i); x_i] + b_i) + b_o

The plugin tree is `{"block_{i}": {"compress": {kernel [k*d, k], bias [k]},
"decompress": {"wi": {kernel [2d, r], bias [r]}, "wo": {kernel [r, d], bias [d]}}}}`
(Flax convention, kernel = [in, out]); files use PyTorch's [out, in] (see `save_plugin`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from variator_jax import compressors
from variator_jax.fileio import atomic_write, get_path, set_path, write_text
from variator_jax.t5 import NEG_INF, T5Config

PLUGIN_FILE = "plugin.safetensors"
CONFIG_FILE = "plugin_config.json"


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """Hyper-parameters of one plugin.

    Attributes:
      ratio: k, the number of neighbouring vectors merged into one (1 = no compression).
      bottleneck: r, the width of the decompression MLP (64 in the paper).
      mask_aware: padding never joins a group: pad members enter the scores as zero vectors
        and get score -inf, all-pad groups give 0; outputs for real tokens then do not
        depend on how much padding a batch has.
        False reproduces the authors' released code, where pad vectors merge unmasked.
      scope: "ffn", plugins around every encoder FFN (the paper's default).
      compressor: "variator", the learned plugin of §1; or a training-free baseline with no
        parameters at the same place, "mean_pool", "tome" or "strided" (compressors.py).
    """
    ratio: int
    bottleneck: int = 64
    mask_aware: bool = True
    scope: str = "ffn"
    compressor: str = "variator"

    def __post_init__(self):
        if not isinstance(self.ratio, (int, np.integer)) or self.ratio < 1:
            raise ValueError(f"plugin ratio must be an integer >= 1, got {self.ratio!r}")
        if not isinstance(self.bottleneck, (int, np.integer)) or self.bottleneck < 1:
            raise ValueError(f"plugin bottleneck must be an integer >= 1, got {self.bottleneck!r}")
        if self.scope != "ffn":
            raise ValueError(f"plugin scope {self.scope!r} is not supported; only 'ffn' "
                             "(compression around each encoder FFN, the paper's default)")
        if self.compressor not in compressors.NAMES:
            raise ValueError(f"plugin compressor {self.compressor!r} is unknown; known: "
                             f"{', '.join(compressors.NAMES)}")

    @property
    def trainable(self) -> bool:
        """False for the training-free compressors: their plugin tree holds no arrays."""
        return self.compressor == "variator"


# Static: plugin=(pcfg, params) keys the jit cache by pcfg and traces only the params, so
# switching between plugins of one ratio never recompiles.
jax.tree_util.register_static(PluginConfig)


def init_plugin(rng, cfg: T5Config, pcfg: PluginConfig):
    """A fresh plugin, float32, initialised as the released code does.

    W_c ~ N(0, 2/(k*d)); W_i, W_o ~ N(0, 0.01^2); biases 0 -- so a new plugin starts close
    to "copy the merged FFN output back", and the MLP learns the per-position correction.

    Example:
      >>> plugin = init_plugin(jax.random.key(0), cfg, PluginConfig(ratio=4))
    """
    k, d, r = pcfg.ratio, cfg.d_model, pcfg.bottleneck
    if not pcfg.trainable:
        return {f"block_{i}": {} for i in range(cfg.num_layers)}
    tree = {}
    for i, key in enumerate(jax.random.split(rng, cfg.num_layers)):
        kc, ki, ko = jax.random.split(key, 3)
        tree[f"block_{i}"] = {
            "compress": {"kernel": jax.random.normal(kc, (k * d, k)) * np.sqrt(2.0 / (k * d)),
                         "bias": jnp.zeros((k,))},
            "decompress": {"wi": {"kernel": jax.random.normal(ki, (2 * d, r)) * 0.01,
                                  "bias": jnp.zeros((r,))},
                           "wo": {"kernel": jax.random.normal(ko, (r, d)) * 0.01,
                                  "bias": jnp.zeros((d,))}}}
    return tree


def plugin_param_count(cfg: T5Config, pcfg: PluginConfig) -> int:
    """Exact count, §1: per layer k*k*d + k + 2*d*r + r + r*d + d.

    >>> plugin_param_count(T5Config.variant("t5-base"), PluginConfig(ratio=4))
    1926960
    """
    k, d, r = pcfg.ratio, cfg.d_model, pcfg.bottleneck
    if not pcfg.trainable:
        return 0
    return cfg.num_layers * (k * k * d + k + 2 * d * r + r + r * d + d)


# -- The math of §1 ---------------------------------------------------------------------------
def merge(x, mask, layer, pcfg: PluginConfig):
    """Compress: x [batch, n, d] (n a multiple of k), mask [batch, n] -> c [batch, n/k, d]."""
    b, n, d = x.shape
    k = pcfg.ratio
    groups = x.reshape(b, n // k, k, d)  # X_g; concat(X_g) is its [k*d] flattening, member-major.
    if pcfg.mask_aware:
        member = mask.reshape(b, n // k, k) > 0
        # A pad member enters concat(X_g) as a zero vector: every score reads the whole group,
        # so masking its score alone would still let its content move its neighbours' scores.
        groups = jnp.where(member[..., None], groups, 0)
    scores = (groups.reshape(b, n // k, k * d) @ layer["compress"]["kernel"].astype(x.dtype)
              + layer["compress"]["bias"].astype(x.dtype)).astype(jnp.float32)
    if pcfg.mask_aware:
        # Pad members get -inf; multiplying by `member` makes an all-pad group's weights 0.
        weights = jax.nn.softmax(jnp.where(member, scores, NEG_INF), axis=-1) * member
    else:
        weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bgk,bgkd->bgd", weights.astype(x.dtype), groups)


def expand(y, x, layer, pcfg: PluginConfig):
    """Decompress: y [batch, n/k, d] (FFN outputs), x [batch, n, d] -> o [batch, n, d].

    W_i [y^_i; x_i] splits into W_i^y y^_i + W_i^x x_i; the first term is the same for the k
    copies of a group, so it runs at the compressed length and is broadcast, like y itself.
    """
    b, n, d = x.shape
    k = pcfg.ratio
    dt = x.dtype
    wi, wo = layer["decompress"]["wi"], layer["decompress"]["wo"]
    wi_kernel = wi["kernel"].astype(dt)
    from_y = y @ wi_kernel[:d]  # [batch, n/k, r]
    pre = (x @ wi_kernel[d:]).reshape(b, n // k, k, -1) + from_y[:, :, None, :] + wi["bias"].astype(dt)
    out = jnp.tanh(pre) @ wo["kernel"].astype(dt) + wo["bias"].astype(dt)  # [batch, n/k, k, d]
    return (out + y[:, :, None, :]).reshape(b, n, d)


def compressed_ffn(x, mask, layer, pcfg: PluginConfig, ffn):
    """§1 for one encoder layer: x = RMSNorm(h) [batch, n, d] -> o [batch, n, d] (h + o is the
    block's output). `ffn` maps [batch, m, d] -> [batch, m, d] (the frozen FFN plus dropout).
    Any n works: x is padded to a multiple of k (pad members masked) and o sliced back."""
    b, n, d = x.shape
    _check_layer_shapes(layer, pcfg, d)
    mask = jnp.ones((b, n), jnp.int32) if mask is None else mask
    pad = (-n) % pcfg.ratio
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    if not pcfg.trainable:
        return compressors.compressed_ffn(x, mask, pcfg.ratio, pcfg.compressor, ffn,
                                          pcfg.mask_aware)[:, :n]
    y = ffn(merge(x, mask, layer, pcfg))
    return expand(y.astype(x.dtype), x, layer, pcfg)[:, :n]


def _check_layer_shapes(layer, pcfg, d_model):
    if not pcfg.trainable:
        if layer:
            raise ValueError(f"a {pcfg.compressor} compressor has no parameters, got {sorted(layer)}")
        return
    kernel = layer["compress"]["kernel"]
    if kernel.shape[0] // max(kernel.shape[1], 1) != d_model:
        raise ValueError(f"plugin d_model {kernel.shape[0] // kernel.shape[1]} != model d_model {d_model}")
    if kernel.shape[1] != pcfg.ratio:
        raise ValueError(f"plugin weights have ratio {kernel.shape[1]} != PluginConfig.ratio {pcfg.ratio}")


def check_compatible(cfg: T5Config, pcfg: PluginConfig, plugin) -> None:
    """Raises a one-line ValueError if `plugin` cannot run on a backbone with `cfg`."""
    d, layers = _plugin_dims(plugin)
    if d is not None and d != cfg.d_model:
        raise ValueError(f"plugin d_model {d} != model d_model {cfg.d_model}")
    if layers != cfg.num_layers:
        raise ValueError(f"plugin num_layers {layers} != model num_layers (encoder) {cfg.num_layers}")
    _check_layer_shapes(plugin["block_0"], pcfg, cfg.d_model)


def _plugin_dims(plugin) -> tuple[int | None, int]:
    """(d_model, layers) of a plugin tree; d_model None for a training-free one (no arrays)."""
    if not plugin["block_0"]:
        return None, len(plugin)
    return int(plugin["block_0"]["decompress"]["wo"]["kernel"].shape[1]), len(plugin)


# -- Backbone identity ------------------------------------------------------------------------
def backbone_fingerprint(backbone) -> str:
    """A short hash of a backbone's identity: every leaf's path and shape, the layer-norm
    weights and the first rows of the embedding. Cheap for an 11B model, and any fine-tuning
    run changes it."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(backbone)[0]:
        name = jax.tree_util.keystr(path)
        h.update(f"{name}{tuple(leaf.shape)}".encode())
        if "layer_norm" in name:
            h.update(np.asarray(leaf, np.float32).tobytes())
        elif name.endswith("['shared']['embedding']"):
            h.update(np.asarray(leaf[:16], np.float32).tobytes())
    return h.hexdigest()[:16]


def backbone_identity(cfg: T5Config, backbone) -> dict:
    """What `save_plugin(..., backbone_id=...)` records: name, sizes and fingerprint."""
    return {"name": cfg.name, "d_model": cfg.d_model, "num_layers": cfg.num_layers,
            "fingerprint": backbone_fingerprint(backbone)}


# -- Files --------------------------------------------------------------------------------------
def _file_rows(num_layers: int):
    """(file key, tree path, transposed) for every tensor, in the PyTorch Linear convention."""
    for i in range(num_layers):
        pre = f"encoder.block.{i}.plugin"
        for name, path in (("compress", ("compress",)), ("decompress.wi", ("decompress", "wi")),
                           ("decompress.wo", ("decompress", "wo"))):
            yield f"{pre}.{name}.weight", (f"block_{i}",) + path + ("kernel",), True
            yield f"{pre}.{name}.bias", (f"block_{i}",) + path + ("bias",), False


def save_plugin(directory, pcfg: PluginConfig, plugin, backbone_id: str | dict | None = None):
    """Writes `plugin.safetensors` + `plugin_config.json` into `directory`.

    `backbone_id`: a name, or `backbone_identity(cfg, backbone)` to have `load_plugin` warn
    when the plugin is used on a different backbone.

    Example:
      >>> pcfg = vj.PluginConfig(ratio=4)
      >>> plugin = vj.init_plugin(jax.random.key(0), cfg, pcfg)
      >>> vj.save_plugin("my_plugin", pcfg, plugin, vj.backbone_identity(cfg, backbone))
      >>> sorted(os.listdir("my_plugin"))
      ['plugin.safetensors', 'plugin_config.json']
    """
    from safetensors.numpy import save_file
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    d, layers = _plugin_dims(plugin)
    if d is None:  # A training-free compressor: the backbone's width, when it is known.
        d = (backbone_id or {}).get("d_model") if isinstance(backbone_id, dict) else None
    tensors = {}
    for key, path, transposed in _file_rows(layers if pcfg.trainable else 0):
        value = np.asarray(get_path(plugin, path), np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transposed else value)
    if isinstance(backbone_id, str):
        backbone_id = {"name": backbone_id}
    config = dict(dataclasses.asdict(pcfg), d_model=d, num_layers=layers, backbone=backbone_id,
                  format="variator_jax.plugin/1")
    atomic_write(directory, PLUGIN_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory, CONFIG_FILE,
                  lambda tmp: write_text(tmp, json.dumps(config, indent=2) + "\n"))



def load_plugin(directory, *, cfg: T5Config | None = None, backbone=None):
    """Reads a plugin directory -> (PluginConfig, plugin tree of float32 jax arrays).

    With `cfg`, checks that the plugin fits that backbone (d_model, layers) and raises a
    ValueError naming both numbers; with `backbone` too, warns if its fingerprint differs
    from the one the plugin was trained on.

    Example:
      >>> cfg, backbone = vj.load_hf_t5("demo_workdir/backbone_stage/backbone")
      >>> pcfg, plugin = vj.load_plugin("demo_workdir/plugin", cfg=cfg, backbone=backbone)
      >>> pcfg.ratio, pcfg.bottleneck
      (4, 64)
    """
    from safetensors.numpy import load_file
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, PLUGIN_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing (a plugin directory holds {PLUGIN_FILE} and {CONFIG_FILE})")
    try:
        with open(config_path) as f:
            config = json.load(f)
        # Fields added later (compressor) take their defaults: older files load unchanged.
        pcfg = PluginConfig(**{f.name: config[f.name] if f.default is dataclasses.MISSING
                               else config.get(f.name, f.default)
                               for f in dataclasses.fields(PluginConfig)})
        layers = int(config["num_layers"])
        d = None if config["d_model"] is None and not pcfg.trainable else int(config["d_model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a valid plugin config ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(weights_path)
    except Exception as e:
        raise ValueError(f"{weights_path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    tree = _tree_from_file(tensors, pcfg, d, layers, weights_path)
    if cfg is not None:
        check_compatible(cfg, pcfg, tree)
        trained_on = (config.get("backbone") or {}).get("fingerprint")
        if backbone is not None and trained_on and trained_on != backbone_fingerprint(backbone):
            warnings.warn(f"plugin {directory} was trained on backbone "
                          f"{config['backbone'].get('name') or trained_on}, not on this one "
                          "(fingerprints differ); its outputs may be poor", stacklevel=2)
    return pcfg, tree


def _tree_from_file(tensors, pcfg, d, layers, source):
    k, r = pcfg.ratio, pcfg.bottleneck
    if not pcfg.trainable:
        if tensors:
            raise ValueError(f"{source}: a {pcfg.compressor} compressor has no parameters, "
                             f"but the file holds {len(tensors)} tensors")
        return {f"block_{i}": {} for i in range(layers)}
    want = {"compress": ((k, k * d), (k,)), "decompress.wi": ((r, 2 * d), (r,)),
            "decompress.wo": ((d, r), (d,))}
    rows = list(_file_rows(layers))
    unexpected = sorted(set(tensors) - {key for key, _, _ in rows})
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    tree: dict = {}
    for key, path, transposed in rows:
        if key not in tensors:
            raise ValueError(f"{source}: missing key {key}")
        name = key.split(".plugin.")[1].rsplit(".", 1)[0]
        shape = want[name][0 if transposed else 1]
        if tensors[key].shape != shape:
            raise ValueError(f"{source}: {key} has shape {tensors[key].shape}, expected {shape}")
        value = tensors[key].T if transposed else tensors[key]
        set_path(tree, path, jnp.asarray(value, jnp.float32))
    return tree
