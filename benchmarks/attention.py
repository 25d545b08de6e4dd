"""Attention kernels side by side: cuDNN's fused attention against XLA's, the same bf16 inputs, forward and backward.

`python benchmarks/attention.py [--steps 20]`

For each shape the towers use (ViT-B/16 at 224, BEiT-3 large at 384, BEiT-3 text with trailing padding, CLIP's
causal text), it prints the largest difference of outputs and input gradients between the two (both against an
f32 XLA reference, so bf16 rounding is seen for what it is) and the median time of a jitted forward + backward.
Without a GPU the cuDNN rows say why they cannot run (`attention_implementation` gives the reason).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxretrieval.errors import ConfigError
from jaxretrieval.models.layers import attend, attention_implementation

# (name, batch, length, heads, head_dim, causal, padded)
SHAPES = [
    ("vit_b16 224", 256, 197, 12, 64, False, False),
    ("beit3_large 384 image", 32, 577, 16, 64, False, False),
    ("beit3_large text, padded", 32, 64, 16, 64, False, True),
    ("clip text, causal", 256, 77, 8, 64, True, False),
]


def loss_and_grads(implementation: str, causal: bool):
    def loss(q, k, v, keep):
        y = attend(q, k, v, causal=causal, keep=keep, implementation=implementation)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def median_seconds(fn, args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=1.0, help="batch multiplier (e.g. 0.05 for a quick CPU run)")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0].device_kind}")
    print("| shape | kernel | max |out diff| vs f32 | max |grad diff| vs f32 | fwd+bwd (ms) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, batch, length, heads, dim, causal, padded in SHAPES:
        batch = max(1, int(batch * args.scale))
        q, k, v = (rng.standard_normal((batch, length, heads, dim)).astype(np.float32) for _ in range(3))
        keep = None
        if padded:
            lengths = rng.integers(2, length + 1, batch)
            keep = jnp.asarray(np.arange(length)[None] < lengths[:, None])
        (_, reference), ref_grads = loss_and_grads("xla", causal)(*map(jnp.asarray, (q, k, v)), keep)
        half = tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        for kernel in ("xla", "cudnn"):
            try:
                attention_implementation(kernel, jnp.bfloat16, dim)
            except ConfigError as e:
                why = str(e).split(": ", 1)[1].split(" (auto")[0]
                print(f"| {name} | {kernel} | - | - | not run: {why} |")
                continue
            fn = loss_and_grads(kernel, causal)
            (_, out), grads = fn(*half, keep)
            out_diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference)))
            grad_diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) for g, r in zip(grads, ref_grads,
                                                                                              strict=True))
            ms = median_seconds(fn, (*half, keep), args.steps) * 1e3
            print(f"| {name} | {kernel} | {out_diff:.2e} | {grad_diff:.2e} | {ms:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
