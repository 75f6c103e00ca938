"""Meshes, logical-axis rules and shardings.

Parameters and activations carry *logical* axis names ("embed", "mlp", "heads", "layers", "batch", ...). A config
supplies the mesh shape and the rules that map each logical name to a mesh axis (or to several, or to none =
replicated); nothing here holds global state, the mesh and rules are passed explicitly.

Example rules for an (fsdp, tensor) mesh:
    (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
     ("act_mlp", "tensor"), ("act_heads", "tensor"))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
    """Mesh from (name, size) pairs; one size may be -1 to take the remaining devices.

    `jax.make_mesh` orders the devices by the chips' topology on TPU and GPU (on CPU it keeps jax.devices()'
    order), splitting a physical axis where a mesh axis needs it. The axes are `Auto`: the compiler propagates
    shardings from the annotated parameters and batches."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = axis_sizes(axes, len(devices))
    axis_types = (AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A mesh axis that is no product of the slice's physical axes (fsdp 64 x tensor 4 on v6e-256's 16x16 torus):
        # split physical axes into contiguous groups, as MaxText's `allow_split_physical_axes` does, not refuse.
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=axis_types)


def axis_sizes(axes: Sequence[tuple[str, int]], device_count: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(names, sizes) of the mesh axes `(name, size)` over `device_count` devices, the -1 axis resolved."""
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{device_count} devices do not divide into mesh axes {dict(axes)}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {device_count}")
    return names, tuple(sizes)


def abstract_mesh(axes: Sequence[tuple[str, int]], device_count: int) -> AbstractMesh:
    """The mesh `make_mesh` would build over `device_count` devices, without devices: enough for `logical_to_spec`,
    `param_shardings` and abstract (`jax.eval_shape`) tracing of a slice this machine does not have."""
    names, sizes = axis_sizes(axes, device_count)
    return AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))


def normalise_rules(rules) -> Rules:
    """Accepts a sequence of pairs (tuples or lists, as ml_collections may store them)."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh, shape=None) -> PartitionSpec:
    """PartitionSpec for a value whose axes have logical `names`.

    A logical name maps to the mesh axes of its first rule. A mesh axis is used at most once per value, mesh axes of
    size 1 are dropped, and where `shape` is given a dimension that the mesh axes do not divide stays replicated
    (small tensors such as norm scales then need no special case).
    """
    lookup = {}
    for logical, mesh_axes in rules:
        lookup.setdefault(logical, mesh_axes)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        mesh_axes = lookup.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or (shape is not None and shape[dim] % size):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(state, mesh: Mesh, rules: Rules):
    """Pure-dict tree of NamedShardings for an nnx State (abstract or concrete), from each Variable's logical names."""

    tree: dict = {}
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = NamedSharding(mesh, logical_to_spec(names, rules, mesh, variable.shape))
    return tree


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Callable `(x, logical names) -> x` that pins an activation's sharding on the mesh (a no-op on one device)."""

    mesh: Mesh
    rules: Rules

    def __call__(self, x, names):
        if self.mesh.size == 1:
            return x
        spec = logical_to_spec(names, self.rules, self.mesh, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of input batches: the leading axis over the mesh axes of the logical `batch` axis."""
    return NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0]))


# A peer that stops answering for this long is declared dead: every other process then exits with the coordination
# service's error instead of waiting forever in its next collective. jax's default (100 s) plus the time to notice
# it would leave a job with a dead host hanging for minutes; a healthy host answers within milliseconds.
HEARTBEAT_TIMEOUT_S = 30
# How long a process waits for all the others to join at start-up (jax's default: 300 s).
JOIN_TIMEOUT_S = 120


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    join_timeout_s: int = JOIN_TIMEOUT_S,
) -> None:
    """Joins this process to a multi-process JAX cluster (call before any other JAX work).

    On a TPU slice every argument may stay None (jax detects the cluster). On CPU the processes' collectives run over
    gloo. When a process dies, the others exit within about `heartbeat_timeout_s` (plus the coordination service's
    polling) with an error that names the failed task, rather than hanging in a collective.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # read by the CPU backend only
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=int(join_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
    )
