"""Device mesh with logical axes named once, partition rules, and host batches made global arrays."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.config import DistributedConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


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


def spec_for(name: str, ndim: int, rules: list[list[Any]]) -> PartitionSpec:
    for pattern, spec in rules:
        if re.search(pattern, name):
            spec = tuple(spec or ())
            if len(spec) > ndim:
                raise ValueError(f"sharding rule '{pattern}' gives {len(spec)} axes to {name} of rank {ndim}")
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, rules: list[list[Any]]) -> Any:
    """A NamedSharding per leaf from the first (regex, spec) rule that matches its path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_name(path), np.ndim(leaf), rules)), tree)


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
