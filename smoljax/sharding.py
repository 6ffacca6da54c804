"""Parameter shardings from logical axis names.

Each parameter spec names its axes logically ("embed", "q_heads", "mlp", ...). A small rules table maps logical
names to mesh axes; the sharding of every parameter follows from its spec, so init, loading and sharding agree.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from smoljax.errors import ConfigError
from smoljax.params import ParamSpec, is_spec

# Logical axis -> mesh axis (or None: replicated). FSDP shards the embedding dimension over "fsdp"; tensor
# parallelism splits heads and the MLP over "tensor".
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "patch": None,       # flattened patch pixels (vision patch embedding, connector input)
    "positions": None,   # learned vision position embeddings
}


def partition_spec(spec: ParamSpec, mesh: Mesh, rules: Mapping[str, Any]) -> PartitionSpec:
    """The PartitionSpec of one parameter; mesh axes absent from `mesh` are dropped (replicated)."""
    used: set[str] = set()
    parts = []
    for dim, logical in zip(spec.shape, spec.axes):
        mesh_axes = rules.get(logical) if logical is not None else None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        for name in names:
            if name in used:
                raise ConfigError(f"sharding rules map two axes of shape {spec.shape} {spec.axes} onto mesh axis "
                                  f"{name!r}; give each logical axis of a parameter its own mesh axis")
            used.add(name)
        size = 1
        for name in names:
            size *= mesh.shape[name]
        if dim % size:
            raise ConfigError(f"axis {logical!r} of size {dim} (parameter shape {spec.shape}) does not divide "
                              f"over mesh axes {names} of size {size}; choose a mesh whose sizes divide it")
        parts.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*parts)


def param_shardings(specs: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A tree of NamedSharding matching the spec tree, for `jax.device_put` or jit's `out_shardings`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, partition_spec(s, mesh, rules)), specs, is_leaf=is_spec)


# ---- meshes for training ------------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over `devices` (default: all of them, across every host).

    data: replicas that each hold whole parameters; fsdp: shards parameters (and optimizer state) along "embed"
    and the batch too; tensor: splits heads, the MLP and the vocabulary. data * fsdp * tensor must equal the number
    of devices; -1 for one axis takes whatever is left.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh axis {name!r} must be a positive integer (or -1 for the rest), got {size!r}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill and len(devices) % fixed == 0:
        sizes[fill[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not fit the {len(devices)} "
                          "available devices; make the product equal the device count (-1 on one axis takes the rest)")
    grid = np.asarray(devices, dtype=object).reshape(sizes["data"], sizes["fsdp"], sizes["tensor"])
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over data and fsdp (every array of a batch has rows first); replicated over tensor."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def check_batch_divides(batch_size: int, mesh: Mesh, accum_steps: int = 1) -> None:
    """Raises ConfigError unless each micro-batch's rows split evenly over the data x fsdp devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % accum_steps or (batch_size // accum_steps) % shards:
        raise ConfigError(f"batch_size {batch_size} with accum_steps {accum_steps} gives micro-batches of "
                          f"{batch_size / accum_steps:g} rows, which do not split over data x fsdp = {shards} "
                          "devices; make batch_size a multiple of accum_steps * data * fsdp")


def optimizer_state_shardings(optimizer: Any, opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: the moments follow their parameters; counters and the like are replicated."""
    import optax

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _state, sharding: sharding, opt_state, params_shardings,
                                 transform_non_params=lambda _leaf: replicated)
