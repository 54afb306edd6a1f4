"""The device mesh, logical axis rules, and trees -> `NamedSharding`s (docs/DESIGN.md §5).

Parameters carry logical axis names (`t5.logical_axes`: `embed`, `mlp`, `heads`, `kv`,
`vocab`, `relpos_buckets`); batches carry `batch`. A short rule list from the config maps
each logical name to a mesh axis (`"data"`, `"model"`) or to None (replicated). This module
is the only place that resolves them, so changing how a model is laid out is a config edit.

Example:
  >>> mesh = make_mesh(data=-1, model=2)                 # 8 devices -> 4 x 2
  >>> shardings = tree_shardings(mesh, t5.logical_axes(cfg), shapes, DEFAULT_RULES)
  >>> batch = global_batch(mesh, local_numpy_batch, DEFAULT_RULES)
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model")

# t5x-style: batch over data; the wide dims of the backbone (FFN, heads, vocabulary) over
# model (Megatron-style tensor parallelism). Rules are tried in order for each logical name;
# a mesh axis is used at most once per array. For models that do not fit one device's
# memory replicated along `data`, `mesh.fsdp` puts ("embed", "data") first (`with_fsdp`).
# `layers` is the stacking axis of scanned parameters: never sharded, so that a scan step
# slices one layer locally and gathers only that layer's shards.
DEFAULT_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("embed", None),
    ("relpos_buckets", None),
    ("length", None),
    ("layers", None),
)


def with_fsdp(rules):
    """`rules` with parameters' `embed` dims fully sharded over `data` (FSDP, ZeRO-3): each
    device holds 1/data of every weight and all-gathers one layer's weights inside the scan
    when it runs that layer. Activations keep `batch` on `data` (a mesh axis is used once per
    array, and `batch` comes first in activations' names), so their `embed` stays whole."""
    rules = tuple(tuple(r) for r in rules)
    if ("embed", "data") in rules:
        return rules
    return (("embed", "data"),) + rules


# -- Activations ---------------------------------------------------------------------------------
# The mesh and rules a step is being traced for, so that model code can constrain activations
# by logical names (`constrain`) without knowing the mesh. Set by `activation_sharding` around
# the traced function's body; outside it, constraints are no-ops (single device, eager use).
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing inside this context, `constrain` and `batch_shards` use `mesh`/`rules`."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, tuple(tuple(r) for r in rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def constrain(x, logical: Sequence[str | None]):
    """`with_sharding_constraint` by logical names (t5x / MaxText on the residual stream);
    `logical` names x's leading dims. A no-op outside `activation_sharding`."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    spec = mesh_spec(tuple(logical) + (None,) * (x.ndim - len(logical)), rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_shards(batch: int) -> int:
    """Over how many devices a batch of `batch` rows is split in the step being traced (1
    outside `activation_sharding`): CPU attention blocks are sized per device from it."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return 1
    mesh, rules = active
    spec = mesh_spec(("batch",), rules, (batch,), mesh)
    return mesh.shape[spec[0]] if len(spec) and spec[0] is not None else 1


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A `("data", "model")` mesh; one size may be -1 (= all remaining devices).

    Explicit sizes whose product is below the device count use the first devices (a
    single-process run only: every process must own part of a multi-process mesh), so
    `data=1, model=1` runs on one device of many.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(model)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive, with at most one -1; got "
                         f"mesh.data={data}, mesh.model={model}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh.data={data} x "
                             f"mesh.model={model}")
        sizes[sizes.index(-1)] = len(devices) // known
    need = math.prod(sizes)
    if need > len(devices):
        raise ValueError(f"mesh {sizes[0]} x {sizes[1]} needs {need} devices, only "
                         f"{len(devices)} available")
    if need < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh {sizes[0]} x {sizes[1]} uses {need} of {len(devices)} "
                             "devices; a multi-process mesh must use all of them")
        devices = devices[:need]
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def mesh_spec(logical: P | Sequence[str | None], rules, shape: Sequence[int] | None = None,
              mesh: Mesh | None = None) -> P:
    """Logical names -> a `PartitionSpec` over mesh axes.

    With `shape` and `mesh`, a dimension that the chosen mesh axis does not divide stays
    replicated (tiny test models, a vocabulary of 32128 over 3 devices): jit needs even
    shards, and replicating one awkward dimension is cheaper than failing.
    """
    rules = _rule_table(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(tuple(logical)):
        axis = None
        for candidate in rules.get(name, ()) if name is not None else ():
            if candidate is None or candidate in used:
                continue
            if shape is not None and mesh is not None and shape[i] % mesh.shape[candidate]:
                continue
            axis = candidate
            break
        if axis is not None:
            used.add(axis)
        out.append(axis)
    while out and out[-1] is None:  # P("data", None) == P("data"); keep specs short.
        out.pop()
    return P(*out)


def _rule_table(rules) -> dict[str, list[str | None]]:
    table: dict[str, list[str | None]] = {}
    for rule in rules:
        name, axis = tuple(rule)
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"sharding rule ({name!r}, {axis!r}): mesh axis must be one of "
                             f"{MESH_AXES} or None")
        table.setdefault(name, []).append(axis)
    return table


def tree_shardings(mesh: Mesh, logical_tree, shapes_tree, rules):
    """A tree of `NamedSharding`s: logical specs (e.g. `t5.logical_axes(cfg)`) resolved by
    `rules`, with each leaf's shape (arrays or `jax.ShapeDtypeStruct`s) for divisibility."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, mesh_spec(spec, rules, x.shape, mesh)),
        logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Leading dim by the `batch` rule, the rest (lengths) by `length`."""
    return NamedSharding(mesh, mesh_spec(("batch",) + ("length",) * (ndim - 1), rules))


def data_shard(mesh: Mesh, rules=DEFAULT_RULES) -> tuple[int, int]:
    """(index, count): this process feeds block `index` of `count` equal blocks of each
    global batch (what `pipeline.train_batches(process_index=, process_count=)` takes).

    A process's devices must cover one contiguous block of the batch axis; processes that
    share a block (a model axis spanning hosts) both read it.
    """
    axis = mesh_spec(("batch",), rules)
    axis = axis[0] if len(axis) else None
    if axis is None:  # Batch replicated: every process reads the whole batch.
        return 0, 1
    dim = MESH_AXES.index(axis)
    mine = sorted({idx[dim] for idx, d in np.ndenumerate(mesh.devices)
                   if d.process_index == jax.process_index()})
    size, first = len(mine), mine[0]
    if mine != list(range(first, first + size)) or first % size or mesh.shape[axis] % size:
        raise ValueError(f"process {jax.process_index()} holds batch shards {mine} of "
                         f"{mesh.shape[axis]}: not one aligned contiguous block")
    return first // size, mesh.shape[axis] // size


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], rules) -> dict[str, jax.Array]:
    """This process's numpy rows -> global arrays sharded over the batch axis.

    Each value is [local_batch, ...]; the global shape multiplies the leading dim by the
    number of distinct data blocks (`data_shard`).
    """
    _, count = data_shard(mesh, rules)
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (value.shape[0] * count,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, rules, value.ndim), value, shape)
    return out


def put_global(tree, shardings):
    """Host numpy values (identical on every process) -> global arrays with `shardings`.

    `make_array_from_callback` asks each process only for its own shards, so this works
    multi-process, unlike a `device_put` of a value that is not fully addressable.
    """
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings)
