"""PyTorch export path: run a Variator plugin inside an HF `T5ForConditionalGeneration`.

`attach_plugin` replaces every encoder FFN block (`encoder.block[i].layer[-1]`,
an HF `T5LayerFF`) by `VariatorT5LayerFF`, which computes docs/DESIGN.md §1 from the
files `save_plugin` writes; `detach_plugin` puts the original blocks back. The
frozen FFN inside the patched block is HF's own `DenseReluDense` module, so
relu (T5 v1.0) and gated-gelu (v1.1, flan) backbones both work, and dropout
falls where HF puts it (at the compressed level, per §1).

Merging is mask-aware like the JAX side: a forward pre-hook on `model.encoder`
captures the encoder's `attention_mask` (from `model(...)`, `model.encoder(...)`
and `model.generate(...)` alike) where the patched blocks read it.

Example (JAX-trained backbone and plugin -> PyTorch compressed model):

    import transformers
    import variator_jax as vj
    from variator_jax import torch_plugin

    vj.save_hf_t5("out/backbone", cfg, backbone)
    vj.save_plugin("out/plugin_k4", pcfg, plugin, backbone_id="out/backbone")

    model = transformers.T5ForConditionalGeneration.from_pretrained("out/backbone").eval()
    torch_plugin.attach_plugin(model, "out/plugin_k4")   # encoder FFNs now run on n/4
    ids = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32)
    torch_plugin.detach_plugin(model)                    # back to the plain backbone

Only `safetensors` and JSON are read: loading a plugin never runs code.
"""
import dataclasses

import torch
from torch import nn

from variator_jax import plugin_file

PLUGIN_WEIGHTS = plugin_file.PLUGIN_FILE
PLUGIN_CONFIG = plugin_file.CONFIG_FILE
_STATE_ATTR = "_variator_plugin"  # where an attached model keeps what detach needs


# ---------------------------------------------------------------------------
# The plugin modules (docs/DESIGN.md §1).
# ---------------------------------------------------------------------------


class VariatorDecompressor(nn.Module):
    """o_i = y^_i + W_o tanh(W_i concat(y^_i, x_i) + b_i) + b_o, on [batch, n, d]."""

    def __init__(self, d_model, bottleneck):
        super().__init__()
        self.wi = nn.Linear(2 * d_model, bottleneck)
        self.wo = nn.Linear(bottleneck, d_model)

    def forward(self, y_hat, x):
        z = torch.cat([y_hat, x.to(y_hat.dtype)], dim=-1)  # y^ first, then x (§1)
        z = torch.tanh(self.wi(z.to(self.wi.weight.dtype)))
        return y_hat + self.wo(z.to(self.wo.weight.dtype))


class VariatorPlugin(nn.Module):
    """One encoder layer's plugin: `compress` scores group members, `decompress` expands."""

    def __init__(self, d_model, ratio, bottleneck):
        super().__init__()
        self.ratio = ratio
        self.compress = nn.Linear(ratio * d_model, ratio)
        self.decompress = VariatorDecompressor(d_model, bottleneck)

    def merge(self, x, real):
        """Softmax-weighted sum of k neighbours.

        Args:
          x: [batch, m, d] normed hidden states, m a multiple of k.
          real: [batch, m] bool (False: pad member, zeroed and scored -inf) or
            None (no masking).

        Returns:
          [batch, m/k, d]; a group without a real member gives 0.
        """
        batch, m, d = x.shape
        groups = x.reshape(batch, m // self.ratio, self.ratio, d)
        if real is not None:
            real = real.reshape(batch, m // self.ratio, self.ratio)
            # Every score sees all k members, so pad members enter as zero
            # vectors (like the pad-to-k zeros); -inf scores alone would let
            # a pad token's content move the real members' weights.
            groups = groups * real[..., None].to(groups.dtype)
        flat = groups.reshape(batch, m // self.ratio, -1)  # [batch, m/k, k*d]
        scores = self.compress(flat.to(self.compress.weight.dtype))
        # Softmax in at least float32, as HF does for attention under fp16/bf16.
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if real is not None:
            # finfo.min rather than -inf: exp underflows to exactly 0 next to a
            # real member, and an all-pad group (c = 0 already, its members are
            # zeroed) gets uniform weights that the product with `real` zeroes
            # -- no NaN in the forward or backward.
            scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1) * real
        else:
            weights = torch.softmax(scores, dim=-1)
        return torch.einsum("bgk,bgkd->bgd", weights.to(x.dtype), groups)

    def expand(self, y, x):
        """Copy y_g back to its k positions and decompress:
        y [b, m/k, d], x [b, m, d] -> [b, m, d]."""
        y_hat = torch.repeat_interleave(y, self.ratio, dim=1)  # y^_i = y_{floor(i/k)}
        return self.decompress(y_hat, x)


class _MaskBox:
    """The encoder call's 2-D attention mask, shared by the hook and all patched blocks."""

    mask = None


class VariatorT5LayerFF(nn.Module):
    """Drop-in for HF `T5LayerFF` with the FFN run on merged groups (docs/DESIGN.md §1).

    Reuses the original block's `layer_norm`, `DenseReluDense` and `dropout`
    modules (same objects, same state-dict names), and adds `plugin`.
    """

    def __init__(self, layer_ff, plugin, mask_box, mask_aware):
        super().__init__()
        self.layer_norm = layer_ff.layer_norm
        self.DenseReluDense = layer_ff.DenseReluDense  # pylint: disable=invalid-name
        self.dropout = layer_ff.dropout
        self.plugin = plugin
        self.mask_aware = mask_aware
        self._mask_box = mask_box

    def extra_repr(self):
        return f"ratio={self.plugin.ratio}, mask_aware={self.mask_aware}"

    def _real_members(self, batch, n, n_pad, device):
        """[batch, n_pad] bool (False for pad members), or None when nothing is masked."""
        if not self.mask_aware:
            return None  # released behaviour: even the zero pad-to-k vectors join groups
        mask = self._mask_box.mask
        if mask is None and n_pad == n:
            return None
        if mask is None:
            real = torch.ones(batch, n, dtype=torch.bool, device=device)
        elif mask.dim() != 2 or tuple(mask.shape) != (batch, n):
            raise ValueError(
                f"the plugin needs the encoder's 2-D attention_mask [batch={batch}, n={n}], "
                f"got shape {tuple(mask.shape)}")
        else:
            real = mask.to(device) != 0
        return nn.functional.pad(real, (0, n_pad - n), value=False)

    def forward(self, hidden_states):
        """[batch, n, d] -> [batch, n, d]: h + o, with the FFN on n/k merged vectors."""
        batch, n, _ = hidden_states.shape
        k = self.plugin.ratio
        # (n + k - 1) // k, not -(-n // k): exported to ONNX, whose integer Div truncates
        # toward zero, the negated form rounds the padding down.
        n_pad = (n + k - 1) // k * k
        x = self.layer_norm(hidden_states)
        real = self._real_members(batch, n, n_pad, x.device)
        x = nn.functional.pad(x, (0, 0, 0, n_pad - n))  # zero vectors up to a multiple of k
        c = self.plugin.merge(x, real)
        y = self.dropout(self.DenseReluDense(c))  # y_g = Dropout(FFN(c_g))
        o = self.plugin.expand(y, x)[:, :n]
        return hidden_states + o


# ---------------------------------------------------------------------------
# Reading and checking plugin files.
# ---------------------------------------------------------------------------


def _layer_shapes(d_model, ratio, bottleneck):
    return {
        "compress.weight": (ratio, ratio * d_model), "compress.bias": (ratio,),
        "decompress.wi.weight": (bottleneck, 2 * d_model), "decompress.wi.bias": (bottleneck,),
        "decompress.wo.weight": (d_model, bottleneck), "decompress.wo.bias": (d_model,),
    }


def _read_config(plugin_dir):
    config = plugin_file.read_config(plugin_dir)  # Exact types: "false" is not False.
    if config["scope"] != "ffn":
        raise ValueError(f"plugin scope {config['scope']!r} is not supported by the PyTorch "
                         "export path; only scope 'ffn' (docs/DESIGN.md §1)")
    if config.get("compressor", "variator") != "variator":
        raise ValueError(f"{plugin_dir} holds the training-free {config['compressor']!r} "
                         "compressor: attach_plugin runs Variator plugins only (the baselines "
                         "run in JAX)")
    return config


def _check_against_model(config, hf_model):
    model_d, model_layers = hf_model.config.d_model, len(hf_model.encoder.block)
    if config["d_model"] != model_d:
        raise ValueError(f"plugin d_model {config['d_model']} != model d_model {model_d}")
    if config["num_layers"] != model_layers:
        raise ValueError(f"plugin num_layers {config['num_layers']} != model encoder "
                         f"num_layers {model_layers}")


def _read_layers(plugin_dir, config):
    """plugin.safetensors -> per-layer {name: tensor}, strict about keys and shapes."""
    # float32 and finite, or a one-line error naming the path and the key.
    tensors = {k: torch.from_numpy(v) for k, v in plugin_file.read_tensors(plugin_dir).items()}
    shapes = _layer_shapes(config["d_model"], config["ratio"], config["bottleneck"])
    expected = {f"encoder.block.{i}.plugin.{name}": shape
                for i in range(config["num_layers"]) for name, shape in shapes.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{PLUGIN_WEIGHTS} keys do not match the config: "
                         f"missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{PLUGIN_WEIGHTS}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"expected {shape}")
    return [{name: tensors[f"encoder.block.{i}.plugin.{name}"] for name in shapes}
            for i in range(config["num_layers"])]


# ---------------------------------------------------------------------------
# Attaching and detaching.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Attached:
    """What detach_plugin needs; kept as a plain attribute, invisible to state_dict."""

    plugin_dir: str
    config: dict
    originals: list
    hooks: list
    mask_box: _MaskBox


class _MaskHook:
    """Forward pre-/post-hook on the encoder that holds its call's attention_mask.

    A callable object rather than a closure, so that `copy.deepcopy` of an
    attached model gives the copy's hooks the copy's `_MaskBox`.
    """

    def __init__(self, mask_box):
        self.mask_box = mask_box

    def capture(self, module, args, kwargs):
        del module
        # T5Stack.forward(input_ids, attention_mask, ...): keyword or second positional.
        self.mask_box.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def release(self, module, args, kwargs, output):
        del args, kwargs, output
        # Under training with gradients, keep it: gradient checkpointing re-runs
        # the blocks during backward, after the encoder call has returned.
        if not (module.training and torch.is_grad_enabled()):
            self.mask_box.mask = None


def _mask_hooks(encoder, mask_box):
    hook = _MaskHook(mask_box)
    return [encoder.register_forward_pre_hook(hook.capture, with_kwargs=True),
            encoder.register_forward_hook(hook.release, with_kwargs=True, always_call=True)]


def attach_plugin(hf_model, plugin_dir, *, mask_aware=None):
    """Patches the encoder FFN blocks of an HF T5 so that they compute docs/DESIGN.md §1.

    Args:
      hf_model: a `transformers.T5ForConditionalGeneration` (anything with a T5
        `encoder` stack works, e.g. `T5EncoderModel`).
      plugin_dir: a directory with `plugin.safetensors` and `plugin_config.json`.
      mask_aware: overrides the file's `mask_aware` when not None.

    Returns:
      The plugin config (dict from `plugin_config.json`, checked by `plugin_file`,
      `mask_aware` as used).

    Raises:
      ValueError: d_model / num_layers differ from the model's, keys are
        missing, unexpected or mis-shaped, or the scope is not "ffn".
      RuntimeError: a plugin is already attached (call `detach_plugin` first).

    The plugin weights are `nn.Module` parameters of the patched blocks
    (`encoder.block.{i}.layer.{-1}.plugin.*`), created on the model's device and
    dtype, so `hf_model.to(...)` moves them too.
    """
    attached = getattr(hf_model, _STATE_ATTR, None)
    if attached is not None:
        raise RuntimeError(f"a plugin is already attached (from {attached.plugin_dir}); "
                           "call detach_plugin(model) before attaching another")
    config = _read_config(plugin_dir)
    _check_against_model(config, hf_model)
    layers = _read_layers(plugin_dir, config)
    if mask_aware is not None:
        config = dict(config, mask_aware=bool(mask_aware))
    mask_aware = bool(config["mask_aware"])

    mask_box = _MaskBox()
    originals = []
    for block, weights in zip(hf_model.encoder.block, layers, strict=True):
        layer_ff = block.layer[-1]
        like = layer_ff.layer_norm.weight
        plugin = VariatorPlugin(config["d_model"], config["ratio"], config["bottleneck"])
        plugin.load_state_dict(weights, strict=True)  # copies, converting dtype
        plugin.to(device=like.device, dtype=like.dtype)
        originals.append(layer_ff)
        block.layer[-1] = VariatorT5LayerFF(layer_ff, plugin, mask_box, mask_aware)
    hooks = _mask_hooks(hf_model.encoder, mask_box)
    setattr(hf_model, _STATE_ATTR,
            _Attached(str(plugin_dir), config, originals, hooks, mask_box))
    return config


def detach_plugin(hf_model):
    """Undoes `attach_plugin`: the original `T5LayerFF` objects come back, hooks go.

    Afterwards the model computes exactly what it did before attaching.
    """
    state = getattr(hf_model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("no plugin is attached to this model")
    for hook in state.hooks:
        hook.remove()
    for block, layer_ff in zip(hf_model.encoder.block, state.originals, strict=True):
        block.layer[-1] = layer_ff
    delattr(hf_model, _STATE_ATTR)


def attached_plugin_config(hf_model):
    """The config of the attached plugin (`mask_aware` as used), or None."""
    state = getattr(hf_model, _STATE_ATTR, None)
    return None if state is None else dict(state.config)
