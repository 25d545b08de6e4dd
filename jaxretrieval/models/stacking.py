"""Layer stacks: a tower's repeated layers as one module whose parameters carry a leading layer axis, created by one
vmapped init and run by one scanned layer, so compile and init time do not grow with depth.

Parameter paths: a stacked tower holds `.../blocks/<leaf>` (or `.../layers/<leaf>`) of shape (layers, ...) where an
unrolled one holds `.../blocks/<i>/<leaf>`. `relayout` moves any tree between the two (parameters, optimiser state,
converted or older checkpoints), matching leaves by path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxretrieval.sharding import INDEXED_LAYER, STACKED_LAYER, is_stacked, path_name

# Rematerialisation per tower (config `remat`): none keeps every activation for the backward pass; full keeps
# only each block's input and recomputes the rest; dots also keeps the matmul outputs.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def rematerialised(fn: Callable, remat: str) -> Callable:
    """fn(module, *args) run under jax.checkpoint with the named policy (fn itself for "none")."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    return fn if remat == "none" else nnx.remat(fn, policy=REMAT_POLICIES[remat])


def stack_modules(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers make(rngs) as one module with every variable stacked along a leading axis; each layer draws
    its own initial values."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make(layer_rngs)

    return create(rngs)


def scan_stack(stack: nnx.Module, x: Any, fn: Callable[..., Any], remat: str = "none", *per_layer: Any,
               unroll: int = 1) -> Any:
    """x through every layer of `stack` in order: x = fn(layer, x, *slices of per_layer), rematerialised per layer
    with the named policy (see layers.REMAT_POLICIES); `unroll` layers per loop iteration (>= the depth: none)."""
    body = rematerialised(fn, remat)

    @nnx.scan(in_axes=(0, nnx.Carry, *[0] * len(per_layer)), out_axes=nnx.Carry, unroll=unroll)
    def step(layer: nnx.Module, carry: Any, *xs: Any) -> Any:
        return body(layer, carry, *xs)

    return step(stack, x, *per_layer)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def needs_relayout(tree: Any, template: Any) -> bool:
    """Whether `tree` and `template` lay out some layers differently (one stacked, the other indexed)."""
    return _leaves_by_path(tree).keys() != _leaves_by_path(template).keys()


def _stack_arrays(parts: list[Any]) -> Any:
    return (jnp.stack if any(isinstance(p, jax.Array) for p in parts) else np.stack)(parts)


def relayout(tree: Any, template: Any, *, take: Callable[[Any, int], Any] = lambda stacked, i: stacked[i],
             stack: Callable[[list[Any]], Any] = _stack_arrays) -> Any:
    """`tree`'s values in `template`'s structure: stacked leaves gathered from indexed ones (`blocks/0/x`,
    `blocks/1/x`, ... -> `blocks/x`, by `stack`) or taken from them (layer i by `take`). A leaf of the template
    that `tree` cannot supply is a KeyError naming it."""
    values = _leaves_by_path(tree)

    def pick(path: tuple, like: Any) -> Any:
        name = path_name(path)
        if name in values:
            return values[name]
        indexed = INDEXED_LAYER.search(name)
        if indexed:  # the template holds layer i where the tree holds the stack
            stacked = name[:indexed.start(2)] + indexed.group(2) + "/" + name[indexed.end():]
            if stacked in values:
                return take(values[stacked], int(indexed.group(3)))
        if is_stacked(name):  # the template holds the stack where the tree holds the layers
            found = STACKED_LAYER.search(name)
            head, tail = name[:found.end()], name[found.end():]
            parts = [values.get(f"{head}{i}/{tail}") for i in range(tuple(like.shape)[0])]
            if all(part is not None for part in parts):
                return stack(parts)
        raise KeyError(f"no value for parameter '{name}' (stacked or per layer)")

    return jax.tree_util.tree_map_with_path(pick, template)
