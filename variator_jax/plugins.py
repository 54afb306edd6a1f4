"""The Variator compression plugin (Xiao et al., Findings of EMNLP 2023), docs/DESIGN.md §1.

Around each encoder layer's FFN, every k neighbouring hidden vectors are merged into one by
a learned softmax over the group's members; the frozen FFN runs on n/k vectors; the result
is copied back to the k positions and refined by a small bottleneck MLP that also sees each
position's own input:

    s_g = W_c concat(X_g) + b_c;  c_g = sum_j softmax(s_g)_j X_g[j]
    y_g = Dropout(FFN(c_g));      o_i = y_g(i) + W_o tanh(W_i [y_g(i); x_i] + b_i) + b_o

In memory the plugin's params are stacked over the encoder's layers (as a scanned backbone's
are): `{"compress": {kernel [L, k*d, k], bias [L, k]}, "decompress": {"wi": {kernel
[L, 2d, r], bias [L, r]}, "wo": {kernel [L, r, d], bias [L, d]}}}` (Flax convention, kernel =
[in, out]). Files stay per layer, in PyTorch's [out, in] (docs/DESIGN.md §4, see `save_plugin`).
`Plugin` pairs the params with their static `PluginConfig`; the model also takes the
`(pcfg, params)` tuple of the public API, and per-layer `{"block_{i}": ...}` params.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from variator_jax import compressors, integrity, plugin_file, stacking
from variator_jax.fileio import atomic_write, get_path, set_path, write_json

if TYPE_CHECKING:  # t5.py imports this module; only the annotations name its config.
    from variator_jax.t5 import T5Config

# Large negative instead of -inf: a fully padded row then softmaxes to uniform, never NaN (as HF).
NEG_INF = -1e10

PLUGIN_FILE = plugin_file.PLUGIN_FILE
CONFIG_FILE = plugin_file.CONFIG_FILE


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


@flax.struct.dataclass
class Plugin:
    """A plugin as one pytree: its static `config` and its array `params`, stacked over the
    encoder's layers (leading axis [num_layers]). What the model runs internally; `as_plugin`
    makes one from the public `(pcfg, params)` tuple.

    Example:
      >>> plugin = Plugin(PluginConfig(ratio=4), init_plugin(rng, cfg, PluginConfig(ratio=4)))
      >>> out = forward(cfg, backbone, ids, mask, dec, plugin=plugin)
    """
    config: PluginConfig = flax.struct.field(pytree_node=False)
    params: Any

    @property
    def num_layers(self) -> int | None:
        """Encoder layers the params are for; None for a training-free compressor (any)."""
        return _plugin_dims(self.params)[1]

    # Unpacks and indexes as the `(pcfg, params)` tuple it replaces: `pcfg, params = plugin`.
    def __iter__(self):
        return iter((self.config, self.params))

    def __getitem__(self, i):
        return (self.config, self.params)[i]


def as_plugin(plugin) -> Plugin | None:
    """None, a `Plugin`, or `(PluginConfig, params)` -> `Plugin` (or None). Per-layer params
    (`{"block_0": ..., "block_1": ...}`, the layout before layers were stacked) are stacked."""
    if plugin is None or isinstance(plugin, Plugin):
        return plugin
    try:
        pcfg, params = plugin
    except (TypeError, ValueError):
        raise TypeError(f"plugin must be None, a Plugin or a (PluginConfig, params) tuple, got "
                        f"{type(plugin).__name__}") from None
    if not isinstance(pcfg, PluginConfig):
        raise TypeError(f"plugin tuple starts with {type(pcfg).__name__}, not a PluginConfig")
    if isinstance(params, dict) and "block_0" in params:
        params = stacking.stack_layers([params[f"block_{i}"] for i in range(len(params))],
                                       jnp.stack)
    return Plugin(pcfg, params)


def init_plugin(rng, cfg: T5Config, pcfg: PluginConfig):
    """A fresh plugin, float32, initialised as the released code does.

    W_c ~ N(0, 2/(k*d)); W_i, W_o ~ N(0, 0.01^2); biases 0 -- so a new plugin starts close
    to "copy the merged FFN output back", and the MLP learns the per-position correction.
    Returns the params stacked over layers (leaves [cfg.num_layers, ...], see the module doc).

    Example:
      >>> plugin = init_plugin(jax.random.key(0), cfg, PluginConfig(ratio=4))
    """
    k, d, r = pcfg.ratio, cfg.d_model, pcfg.bottleneck
    if not pcfg.trainable:  # A training-free compressor: nothing to learn, in any layer.
        return {}
    layers = []
    for key in jax.random.split(rng, cfg.num_layers):
        kc, ki, ko = jax.random.split(key, 3)
        layers.append({
            "compress": {"kernel": jax.random.normal(kc, (k * d, k)) * np.sqrt(2.0 / (k * d)),
                         "bias": jnp.zeros((k,))},
            "decompress": {"wi": {"kernel": jax.random.normal(ki, (2 * d, r)) * 0.01,
                                  "bias": jnp.zeros((r,))},
                           "wo": {"kernel": jax.random.normal(ko, (r, d)) * 0.01,
                                  "bias": jnp.zeros((d,))}}})
    return stacking.stack_layers(layers, jnp.stack)  # Leaves [num_layers, ...].


def logical_axes(params):
    """Logical axis names of stacked plugin params (`sharding.py` resolves them): `layers`,
    and `embed` for every dim that is d_model or k*d / 2d of them, so that FSDP rules shard a
    plugin and its optimizer state as they shard the backbone; by default it is replicated."""
    from jax.sharding import PartitionSpec as P
    names = {("compress", "kernel"): P("layers", "embed", None),
             ("compress", "bias"): P("layers", None),
             ("decompress", "wi", "kernel"): P("layers", "embed", None),
             ("decompress", "wi", "bias"): P("layers", None),
             ("decompress", "wo", "kernel"): P("layers", None, "embed"),
             ("decompress", "wo", "bias"): P("layers", "embed")}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: names[tuple(k.key for k in path)], params)


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
    from_x = (x @ wi_kernel[d:]).reshape(b, n // k, k, -1)  # [batch, n/k, k, r]
    pre = from_x + from_y[:, :, None, :] + wi["bias"].astype(dt)
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
    """One layer's params, or all layers' stacked: the compress kernel is [..., k*d, k]."""
    if not pcfg.trainable:
        if layer:
            raise ValueError(f"a {pcfg.compressor} compressor has no parameters, "
                             f"got {sorted(layer)}")
        return
    kernel = layer["compress"]["kernel"]
    if kernel.shape[-2] // max(kernel.shape[-1], 1) != d_model:
        raise ValueError(f"plugin d_model {kernel.shape[-2] // kernel.shape[-1]} != model "
                         f"d_model {d_model}")
    if kernel.shape[-1] != pcfg.ratio:
        raise ValueError(f"plugin weights have ratio {kernel.shape[-1]} != PluginConfig.ratio "
                         f"{pcfg.ratio}")


def check_compatible(cfg: T5Config, pcfg: PluginConfig, plugin) -> None:
    """Raises a one-line ValueError if `plugin` (its params) cannot run on a backbone with `cfg`."""
    plugin = as_plugin((pcfg, plugin)).params
    d, layers = _plugin_dims(plugin)
    if d is not None and d != cfg.d_model:
        raise ValueError(f"plugin d_model {d} != model d_model {cfg.d_model}")
    if layers is not None and layers != cfg.num_layers:
        raise ValueError(f"plugin num_layers {layers} != model num_layers (encoder) "
                         f"{cfg.num_layers}")
    _check_layer_shapes(plugin, pcfg, cfg.d_model)


def _plugin_dims(params) -> tuple[int | None, int | None]:
    """Stacked params -> (d_model, num_layers); (None, None) for a training-free compressor,
    whose empty tree fits any backbone."""
    if not params:
        return None, None
    kernel = params["decompress"]["wo"]["kernel"]  # [layers, r, d]
    return int(kernel.shape[-1]), int(kernel.shape[0])


# -- Backbone identity ------------------------------------------------------------------------
FINGERPRINT_VERSION = 2


def backbone_fingerprint(backbone) -> str:
    """A short hash of a backbone's identity: SHA-256 over every tensor's path, shape and
    float32 bytes (`integrity.tensor_digest`), so any changed weight changes it. Cost: one
    pass over the weights, ~27 s for t5-11b on one core (1.66 GB/s), split over all cores.
    Read in the per-layer layout (`stacking.to_per_layer`), so a scanned and an unrolled copy
    of one backbone agree."""
    return integrity.tensor_digest(stacking.to_per_layer(backbone, take=_LayerSlice))[:16]


def _legacy_fingerprint(backbone) -> str:
    """The fingerprint before version 2 (layer norms and 16 embedding rows only), kept to
    compare plugin files and workdirs that recorded it against the same backbone; also read
    in the per-layer layout, as plugins saved before layers were stacked were."""
    h = hashlib.sha256()
    per_layer = stacking.to_per_layer(backbone, take=_LayerSlice)
    for path, leaf in jax.tree_util.tree_flatten_with_path(per_layer)[0]:
        name = jax.tree_util.keystr(path)
        h.update(f"{name}{tuple(leaf.shape)}".encode())
        if "layer_norm" in name:
            h.update(np.asarray(leaf, np.float32).tobytes())
        elif name.endswith("['shared']['embedding']"):
            h.update(np.asarray(leaf[:16], np.float32).tobytes())
    return h.hexdigest()[:16]


class _LayerSlice:
    """Layer `i` of a stacked leaf, sliced only if read (a fingerprint reads few leaves)."""

    def __init__(self, stacked, i):
        self.stacked, self.i = stacked, i

    @property
    def shape(self):
        return tuple(self.stacked.shape[1:])

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.stacked[self.i], dtype)


def backbone_identity(cfg: T5Config, backbone) -> dict:
    """What `save_plugin(..., backbone_id=...)` records: name, sizes and fingerprint."""
    return {"name": cfg.name, "d_model": cfg.d_model, "num_layers": cfg.num_layers,
            "fingerprint": backbone_fingerprint(backbone),
            "fingerprint_version": FINGERPRINT_VERSION}


def fingerprint_of(identity: dict, backbone) -> str:
    """`backbone`'s fingerprint computed the way `identity` (a recorded backbone identity)
    computed its own: identities without `fingerprint_version` used the legacy method."""
    if identity.get("fingerprint_version", 1) == 1:
        return _legacy_fingerprint(backbone)
    return backbone_fingerprint(backbone)


# -- Files --------------------------------------------------------------------------------------
def _file_rows(num_layers: int):
    """(file key, layer, path in the stacked tree, transposed) for every tensor of the file, in
    the PyTorch Linear convention: one stacked entry is the same key of every layer."""
    for i in range(num_layers):
        pre = f"encoder.block.{i}.plugin"
        for name, path in (("compress", ("compress",)), ("decompress.wi", ("decompress", "wi")),
                           ("decompress.wo", ("decompress", "wo"))):
            yield f"{pre}.{name}.weight", i, path + ("kernel",), True
            yield f"{pre}.{name}.bias", i, path + ("bias",), False


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
    plugin = as_plugin((pcfg, plugin)).params
    d, layers = _plugin_dims(plugin)
    if d is None:  # A training-free compressor: the backbone's sizes, when they are known.
        known = backbone_id if isinstance(backbone_id, dict) else {}
        d, layers = known.get("d_model"), known.get("num_layers")
    tensors = {}
    for key, i, path, transposed in _file_rows(layers if pcfg.trainable else 0):
        value = np.asarray(get_path(plugin, path)[i], np.float32)
        tensors[key] = np.ascontiguousarray(value.T if transposed else value)
    if isinstance(backbone_id, str):
        backbone_id = {"name": backbone_id}
    config = dict(dataclasses.asdict(pcfg), d_model=d, num_layers=layers, backbone=backbone_id,
                  format="variator_jax.plugin/1")
    atomic_write(directory, PLUGIN_FILE, lambda tmp: save_file(tensors, tmp))
    write_json(directory, CONFIG_FILE, config)



def load_plugin(directory, *, cfg: T5Config | None = None, backbone=None):
    """Reads a plugin directory -> (PluginConfig, params: float32 jax arrays stacked over layers).

    With `cfg`, checks that the plugin fits that backbone (d_model, layers) and raises a
    ValueError naming both numbers; with `backbone` too, warns if its fingerprint differs
    from the one the plugin was trained on.

    Example:
      >>> cfg, backbone = vj.load_hf_t5("demo_workdir/finetune/backbone")
      >>> pcfg, plugin = vj.load_plugin("demo_workdir/adapt-k4/plugin", cfg=cfg, backbone=backbone)
      >>> pcfg.ratio, pcfg.bottleneck
      (4, 16)
    """
    directory = os.fspath(directory)
    weights_path = os.path.join(directory, PLUGIN_FILE)
    config, tensors = plugin_file.read_plugin_dir(directory)  # Types, dtypes, finiteness.
    # Fields added later (compressor) take their defaults: older files load unchanged.
    pcfg = PluginConfig(**{f.name: config[f.name] if f.default is dataclasses.MISSING
                           else config.get(f.name, f.default)
                           for f in dataclasses.fields(PluginConfig)})
    d, layers = config["d_model"], config["num_layers"]
    tree = _tree_from_file(tensors, pcfg, d, layers, weights_path)
    if cfg is not None:
        check_compatible(cfg, pcfg, tree)
        recorded = config.get("backbone") or {}
        trained_on = recorded.get("fingerprint")
        if (backbone is not None and trained_on
                and trained_on != fingerprint_of(recorded, backbone)):
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
        return {}
    want = {"compress": ((k, k * d), (k,)), "decompress.wi": ((r, 2 * d), (r,)),
            "decompress.wo": ((d, r), (d,))}
    rows = list(_file_rows(layers))
    unexpected = sorted(set(tensors) - {row[0] for row in rows})
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    layer_trees: list[dict] = [{} for _ in range(layers)]
    for key, i, path, transposed in rows:
        if key not in tensors:
            raise ValueError(f"{source}: missing key {key}")
        name = key.split(".plugin.")[1].rsplit(".", 1)[0]
        shape = want[name][0 if transposed else 1]
        if tensors[key].shape != shape:
            raise ValueError(f"{source}: {key} has shape {tensors[key].shape}, expected {shape}")
        value = tensors[key].T if transposed else tensors[key]
        set_path(layer_trees[i], path, np.asarray(value, np.float32))
    return stacking.stack_layers(layer_trees, lambda xs: jnp.asarray(np.stack(xs)))
