"""Parameter shardings from logical axis names.

Each parameter spec names its axes logically ("embed", "q_heads", "mlp", ...). A small rules table maps logical
names to mesh axes; the sharding of every parameter follows from its spec, so init, loading and sharding agree.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
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
