"""Device mesh with logical axes named once, partition rules, and host batches made global arrays."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    from jaxretrieval.config import DistributedConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Logical activation axes -> mesh axes, for `constrain`.
ACTIVATION_AXES: dict[str, Any] = {"batch": BATCH_AXES, "heads": "tensor", "mlp": "tensor"}

# Named partition rule sets: `sharding: fsdp` in a config stands for the list. A spec "fsdp" shards a parameter's
# largest dimension that divides by the fsdp axis (replicated if none does), big_vision's FSDP strategy. Tensor
# parallelism splits the MLP and BEiT-3's separate q/k/v projections by output column (whole heads) and the
# output projections by input row (Megatron's split); CLIP's fused qkv is left to FSDP, whose column blocks
# would straddle q, k and v.
_TENSOR_COLUMNS = r"(mlp/fc|fc1|(q|k|v)_proj/[AB])/"
_TENSOR_ROWS = r"(mlp/proj|fc2|attn/out|out_proj/[AB])/kernel$"
RULE_SETS: dict[str, list[list[Any]]] = {
    "replicated": [],
    "fsdp": [[".*", "fsdp"]],
    "fsdp_tensor": [[_TENSOR_COLUMNS + "kernel$", ["fsdp", "tensor"]], [_TENSOR_COLUMNS + "bias$", ["tensor"]],
                    [_TENSOR_ROWS, ["tensor", "fsdp"]], [".*", "fsdp"]],
}


def initialize_distributed(config: DistributedConfig) -> bool:
    """Starts jax.distributed (one process per host) when the config or the environment asks for it; True if it
    did. Call before anything else touches jax."""
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if config.initialize == "never" or (config.initialize == "auto" and not address):
        return False
    kwargs: dict[str, Any] = {}
    if address:
        kwargs["coordinator_address"] = address
    num_processes = config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
    if num_processes:
        kwargs["num_processes"] = num_processes
    process_id = config.process_id if config.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    for axis, size in zip(MESH_AXES, sizes, strict=True):
        if size != -1 and size < 1:
            raise ValueError(f"mesh.{axis} must be -1 (the devices left over) or >= 1, got {size}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                         f"found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def path_name(path: tuple) -> str:
    """'visual/transformer/blocks/0/attn/qkv/kernel' for a pytree key path."""
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return "/".join(parts)


def partition_rules(sharding: str | list[list[Any]]) -> list[list[Any]]:
    """The (regex, spec) list a config's `sharding` names or gives."""
    if isinstance(sharding, str):
        if sharding not in RULE_SETS:
            raise ValueError(f"unknown sharding rule set {sharding!r}; choose from {', '.join(RULE_SETS)} or give "
                             f"a list of [regex, spec] rules")
        return RULE_SETS[sharding]
    return sharding


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis: str = "fsdp") -> PartitionSpec:
    """`axis` on the largest dimension that divides by its size; replicated when none does (or size 1)."""
    if axis_size > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % axis_size == 0:
                return PartitionSpec(*[axis if d == dim else None for d in range(len(shape))])
    return PartitionSpec()


# A layer stack (models/stacking.py) holds `.../blocks/<leaf>` with a leading layer axis where one module per layer
# holds `.../blocks/<i>/<leaf>`.
STACK_NAMES = ("blocks", "layers")
INDEXED_LAYER = re.compile(rf"(^|/)({'|'.join(STACK_NAMES)})/(\d+)/")
STACKED_LAYER = re.compile(rf"(^|/)({'|'.join(STACK_NAMES)})/(?!\d+/)")


def is_stacked(path: str) -> bool:
    """Whether a "/"-joined parameter path lies in a layer stack (its first axis counts the layers)."""
    return bool(STACKED_LAYER.search(path)) and not INDEXED_LAYER.search(path)


def spec_for(name: str, shape: tuple[int, ...], rules: list[list[Any]],
             mesh_shape: dict[str, int] | None = None) -> PartitionSpec:
    """The first matching rule's spec. On a stacked layer parameter the rules describe one layer: the layer axis
    stays whole (a spec one axis short gets a leading None; fsdp picks among the other dimensions)."""
    stacked = is_stacked(name) and len(shape) > 0
    for pattern, spec in rules:
        if re.search(pattern, name):
            if spec == "fsdp":
                inner = fsdp_spec(shape[1:] if stacked else shape, (mesh_shape or {}).get("fsdp", 1))
                return PartitionSpec(None, *inner, *[None] * (len(shape) - 1 - len(inner))) if stacked else inner
            spec = tuple(spec or ())
            if stacked and len(spec) == len(shape) - 1:
                spec = (None, *spec)
            if len(spec) > len(shape):
                raise ValueError(f"sharding rule '{pattern}' gives {len(spec)} axes to {name} of rank {len(shape)}")
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, sharding: str | list[list[Any]]) -> Any:
    """A NamedSharding per leaf from the first (regex, spec) rule that matches its path."""
    rules = partition_rules(sharding)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_name(path), np.shape(leaf), rules, dict(mesh.shape))),
        tree)


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Pins an activation's sharding by logical axis names (ACTIVATION_AXES) when traced under a mesh (see
    `under_mesh`); a no-op elsewhere, so models run unchanged outside the sharded train and eval steps."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(ACTIVATION_AXES.get(n) if n else None
                                                               for n in logical)))


def under_mesh(fn: Any, mesh: Mesh) -> Any:
    """fn traced with `mesh` as the ambient mesh, which turns on the models' activation constraints."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local.items()}


def replicated_host_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from data every process holds in full (each process places its own shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
