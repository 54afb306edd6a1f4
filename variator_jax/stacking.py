"""Layer stacks <-> per-layer trees: the three layouts a T5 backbone tree can have.

- **scanned** (`T5Config.scan_layers`, the default): each stack holds `layers`, one subtree
  whose leaves carry a leading `[num_layers]` axis (`nn.scan`, logical axis `layers`), and
  its `relative_attention_bias` (owned by the stack, not by a layer);
- **unrolled** (`scan_layers=False`): `block_0 .. block_{L-1}` and the stack's
  `relative_attention_bias`;
- **per-layer** (`to_per_layer`): the layout that mirrors HF's key names one to one, with
  the bias inside the first layer's self-attention (`block_0/layer_0/SelfAttention/
  relative_attention_bias`). This is what conversion tables and backbone fingerprints read,
  so neither depends on how the model is laid out in memory (MaxText maps one scanned entry
  to the list of per-layer HF keys it stacks; here that list is `block_0 .. block_{L-1}`).

Pure dict manipulation, no model code: convert.py and plugins.py both use it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

STACKS = ("encoder", "decoder")
BIAS = "relative_attention_bias"
_BIAS_IN_LAYER = ("layer_0", "SelfAttention", BIAS)  # Where HF keeps it, in block 0.


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def num_layers(stack: dict) -> int:
    """The number of layers of one stack's subtree, in any layout."""
    if "layers" in stack:
        return int(next(_leaves(stack["layers"])).shape[0])
    return sum(1 for k in stack if k.startswith("block_"))


def layer(stack: dict, i: int, take: Callable[[Any, int], Any] = lambda x, i: x[i]) -> dict:
    """Layer `i` of a stack's subtree (scanned or unrolled): `{layer_0: ..., layer_1: ...}`."""
    if "layers" in stack:
        return _map(lambda x: take(x, i), stack["layers"])
    return stack[f"block_{i}"]


def to_per_layer(tree: dict, take: Callable[[Any, int], Any] = lambda x, i: x[i]) -> dict:
    """Any layout -> the per-layer (HF-mirroring) layout. `take(leaf, i)` slices layer i of a
    stacked leaf (default `leaf[i]`; pass a lazy one to avoid copying a big model)."""
    out = dict(tree)
    for name in STACKS:
        if name not in tree:
            continue
        stack = dict(tree[name])
        if BIAS not in stack:  # Already per-layer.
            continue
        bias = stack.pop(BIAS)
        n = num_layers(stack)
        blocks = {f"block_{i}": layer(stack, i, take) for i in range(n)}
        stack.pop("layers", None)
        for i in range(n):
            stack.pop(f"block_{i}", None)
        first = _copy_path(blocks["block_0"], _BIAS_IN_LAYER[:-1])
        _get(first, _BIAS_IN_LAYER[:-1])[BIAS] = bias
        blocks["block_0"] = first
        out[name] = {**blocks, **stack}
    return out


def from_per_layer(tree: dict, scan: bool, stack_fn: Callable[[list], Any]) -> dict:
    """The per-layer layout -> scanned (`scan`) or unrolled. `stack_fn(list of leaves)` stacks
    the same leaf of every layer (e.g. `np.stack`)."""
    out = dict(tree)
    for name in STACKS:
        if name not in tree:
            continue
        stack = dict(tree[name])
        n = num_layers(stack)
        blocks = [stack.pop(f"block_{i}") for i in range(n)]
        first = _copy_path(blocks[0], _BIAS_IN_LAYER[:-1])
        stack[BIAS] = _get(first, _BIAS_IN_LAYER[:-1]).pop(BIAS)
        blocks[0] = first
        if scan:
            stack["layers"] = _zip(blocks, stack_fn)
        else:
            stack.update({f"block_{i}": b for i, b in enumerate(blocks)})
        out[name] = stack
    return out


def stack_layers(layers: list[dict], stack_fn: Callable[[list], Any]) -> dict:
    """Trees of one structure -> one tree whose leaves stack theirs (layer-major)."""
    return _zip(layers, stack_fn)


def _zip(trees, stack_fn):
    first = trees[0]
    if isinstance(first, dict):
        keys = set(first)
        for t in trees[1:]:
            if not isinstance(t, dict) or set(t) != keys:
                raise ValueError(f"layers differ in structure: {sorted(keys)} vs "
                                 f"{sorted(t) if isinstance(t, dict) else type(t).__name__}")
        return {k: _zip([t[k] for t in trees], stack_fn) for k in first}
    return stack_fn(trees)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _copy_path(tree: dict, path) -> dict:
    """A copy of `tree` whose dicts along `path` are fresh (so they can be edited)."""
    out = dict(tree)
    node = out
    for p in path:
        node[p] = dict(node[p])
        node = node[p]
    return out


def relayout(tree: dict, like: dict, stack_fn: Callable[[list], Any]) -> dict:
    """`tree` (nested dicts; a backbone, a plugin, or a train state holding them, in any of
    the layouts) in the layout of `like`, a tree of the same model and the structure wanted
    (leaves are not read). Resuming a checkpoint saved with the other `scan_layers`, or
    before layers were scanned, goes through here.

    Where a node's keys differ from `like`'s, it is a layer layout and is converted:
    a T5 stack (`block_i` or `layers`, with the bias in the stack or in block 0) via the
    per-layer layout; a plugin's `{block_i: layer}` (before scanning) -> its stacked tree.
    `stack_fn` stacks a list of leaves (e.g. `np.stack`). Raises ValueError naming the first
    node that is no layout of `like`'s.
    """
    return _relayout(tree, like, stack_fn, ())


def _block_keys(node: dict) -> list[str]:
    return [k for k in node if isinstance(k, str) and k.startswith("block_")]


def _relayout(tree, like, stack_fn, path):
    if not isinstance(like, dict):
        return tree
    if not isinstance(tree, dict):
        raise ValueError(f"{'/'.join(map(str, path)) or 'the tree'} is a leaf where a subtree "
                         "is expected")
    if set(tree) != set(like):
        tree = _relayout_node(tree, like, stack_fn, path)
    return {k: _relayout(tree[k], like[k], stack_fn, path + (k,)) for k in like}


def _relayout_node(node: dict, like: dict, stack_fn, path) -> dict:
    where = "/".join(map(str, path)) or "the tree"
    blocks, like_blocks = _block_keys(node), _block_keys(like)
    if (blocks or "layers" in node) and (like_blocks or "layers" in like) and BIAS in like:
        # A T5 stack: through the per-layer (HF) layout, then stacked or unrolled as `like`.
        per_layer = to_per_layer({"encoder": node})["encoder"]
        out = from_per_layer({"encoder": per_layer}, scan="layers" in like, stack_fn=stack_fn)
        out = out["encoder"]
    elif blocks and len(blocks) == len(node) and not like_blocks:  # Plugin: per layer -> stacked.
        out = stack_layers([node[f"block_{i}"] for i in range(len(blocks))], stack_fn)
    else:
        out = node
    if set(out) != set(like):
        raise ValueError(f"{where} has {sorted(map(str, node))}, not a layer layout of "
                         f"{sorted(map(str, like))}")
    return out

