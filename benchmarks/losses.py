"""Cross-device contrastive losses: per-device memory and time of loss + gradients, local / gathered / ring.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/losses.py --batches 1024 4096 16384

Each row: one loss variant at one global batch over every device of a (devices, 1, 1) mesh, value and gradients
with respect to both feature matrices (what the train step takes). Memory is XLA's compiled temp allocation per
device (the logits and their gradient dominate it); time is the median of --rounds calls after a warm-up.
On a CPU the "devices" share the host's cores, so only the memory column says something about accelerators.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxretrieval.config import MeshConfig
from jaxretrieval.losses import training_loss
from jaxretrieval.sharding import BATCH_AXES, make_mesh


def measure(kind: str, variant: str, batch: int, dim: int, mesh, rounds: int) -> tuple[float, float]:
    loss = training_loss(kind, variant, mesh)
    scalars = (jnp.float32(10.0),) if kind == "contrastive" else (jnp.float32(10.0), jnp.float32(-10.0))

    def value_and_grads(image, text, ids):
        return jax.value_and_grad(lambda i, t: loss(i, t, scalars, ids), argnums=(0, 1))(image, text)

    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    image, text = (jax.device_put(unit(rng.normal(size=(batch, dim))).astype(np.float32), rows) for _ in range(2))
    ids = jax.device_put(np.arange(batch, dtype=np.int32), rows)
    compiled = jax.jit(value_and_grads).lower(image, text, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(image, text, ids))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(image, text, ids))
        times.append(time.perf_counter() - start)
    return temp / 2**20, statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", nargs="+", default=["contrastive", "sigmoid"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    mesh = make_mesh(MeshConfig(data=-1))
    devices = mesh.devices.size
    print(f"{devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}, feature dim {args.dim}")
    print("| loss | global batch | variant | temp MiB / device | ms / call |")
    print("|---|---|---|---|---|")
    for kind in args.kinds:
        for batch in args.batches:
            for variant in ("local", "gathered", "ring"):
                memory, ms = measure(kind, variant, batch, args.dim, mesh, args.rounds)
                print(f"| {kind} | {batch} | {variant} | {memory:.1f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
