"""Random models at a T5 variant's widths, as files: a backbone and one plugin per k.

    python -m benchmarks.models t5-small DIR --tokenizer-from demo_workdir/finetune/backbone

The benchmarks measure costs at real widths without a model hub: `benchmarks.runtimes` and
`benchmarks.serve_load --random-variant` write theirs with `random_models`. With
`--ratios "" --init t5` the backbone alone is a random init for `python -m
variator_jax.stages --backbone DIR/backbone` to fine-tune: the trained model at t5-small
widths that `serve_load` measures (benchmarks/README.md, "variator-serve under load").
"""
from __future__ import annotations

import argparse
import os


def t5_init(params, cfg, seed: int = 0):
    """`params` redrawn as HF's `T5PreTrainedModel._init_weights` draws a T5 (factor 1; the
    mesh-tf init): each kernel's std from the widths it reads (q: (d_model d_kv)^-1/2, k, v, wi,
    relative biases: d_model^-1/2, o: (heads d_kv)^-1/2, wo: d_ff^-1/2), embeddings and head
    N(0, 1), layer norms ones. `init_t5`'s fixed N(0, 0.05) trains at the miniature's d_model
    128, but at 512 its attention logits start with a std near 10, saturated: a backbone
    fine-tuned from it there stayed at the majority class."""
    import jax
    import numpy as np
    std = {"q": (cfg.d_model * cfg.d_kv) ** -0.5, "k": cfg.d_model ** -0.5,
           "v": cfg.d_model ** -0.5, "o": (cfg.num_heads * cfg.d_kv) ** -0.5,
           "wi": cfg.d_model ** -0.5, "wi_0": cfg.d_model ** -0.5, "wi_1": cfg.d_model ** -0.5,
           "wo": cfg.d_ff ** -0.5, "relative_attention_bias": cfg.d_model ** -0.5,
           "shared": 1.0, "lm_head": 1.0}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, x in leaves:
        module = getattr(path[-2], "key", None)  # [.., 'q', 'kernel'], [.., 'shared', 'embedding']
        if module in std:
            out.append(np.asarray(rng.normal(0.0, std[module], x.shape), x.dtype))
        else:
            out.append(x)  # Layer norms: ones, as T5's.
    return jax.tree_util.tree_unflatten(treedef, out)


def random_models(variant: str, directory: str, *, layers: int = 4, ratios=(4, 8),
                  bottleneck: int = 64, seed: int = 0, tokenizer_from: str | None = None,
                  spread: float = 0.0, init: str = "init_t5") -> tuple[str, dict[int, str]]:
    """A random backbone at `variant`'s widths (`layers` encoder layers, one decoder layer)
    and one random plugin per ratio, written under `directory` -> (backbone dir, {k: plugin
    dir}). `tokenizer_from`: an HF directory whose vocabulary size and tokenizer the backbone
    takes (else the variant's vocabulary, no tokenizer). `spread` adds N(0, spread) noise to the
    plugins' weights: at their init the merge is a mean and the expansion a copy, and a runtime
    that wired a plugin wrongly could still agree. `init`: "init_t5" (its N(0, 0.05): costs
    and runtimes) or "t5" (`t5_init`, to train from)."""
    import jax

    import variator_jax as vj
    vocab = {}
    tokenizer = None
    if tokenizer_from:
        vocab = dict(vocab_size=vj.load_hf_t5(tokenizer_from)[0].vocab_size)
        tokenizer = vj.load_tokenizer(None, tokenizer_from)
    cfg = vj.T5Config.variant(variant, num_layers=layers, num_decoder_layers=1, **vocab)
    backbone = vj.init_t5(jax.random.key(seed), cfg)
    if init == "t5":
        backbone = t5_init(backbone, cfg, seed)
    elif init != "init_t5":
        raise ValueError(f"init {init!r}: 'init_t5' or 't5'")
    backbone_dir = os.path.join(directory, "backbone")
    vj.save_hf_t5(backbone_dir, cfg, backbone, tokenizer=tokenizer)
    identity = vj.backbone_identity(cfg, backbone)
    plugin_dirs = {}
    for k in ratios:
        pcfg = vj.PluginConfig(ratio=k, bottleneck=bottleneck)
        params = vj.init_plugin(jax.random.key(seed + k), cfg, pcfg)
        if spread:
            params = jax.tree.map(
                lambda x, k=k: x + spread * jax.random.normal(jax.random.key(k), x.shape), params)
        plugin_dirs[k] = os.path.join(directory, f"plugin-k{k}")
        vj.save_plugin(plugin_dirs[k], pcfg, params, identity)
    return backbone_dir, plugin_dirs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", help="widths from T5Config.variant (t5-small, t5-base, ...)")
    p.add_argument("directory", help="written: DIR/backbone and DIR/plugin-k<k>")
    p.add_argument("--layers", type=int, default=4, help="encoder layers")
    p.add_argument("--ratios", default="4,8", help="one random plugin per k ('' for none)")
    p.add_argument("--bottleneck", type=int, default=64, help="plugin bottleneck r")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=("init_t5", "t5"), default="init_t5", help="the "
                   "backbone's weights: init_t5's N(0, 0.05), or T5's own init (HF's "
                   "_init_weights), which a wide backbone needs to train from")
    p.add_argument("--tokenizer-from", default="", help="an HF directory: its vocabulary size "
                   "and tokenizer (default: the variant's vocabulary, no tokenizer)")
    args = p.parse_args(argv)
    if os.path.exists(args.directory):
        from variator_jax.errors import UserError
        raise UserError(f"{args.directory} exists: give a directory that does not")
    backbone, plugins = random_models(
        args.variant, args.directory, layers=args.layers,
        ratios=[int(k) for k in args.ratios.split(",") if k], bottleneck=args.bottleneck,
        seed=args.seed, tokenizer_from=args.tokenizer_from or None, init=args.init)
    print(f"wrote {backbone}" + "".join(f", {d}" for d in plugins.values()))
    return dict(backbone=backbone, plugins=plugins)


if __name__ == "__main__":
    from variator_jax import cli
    cli.run_main(main)
