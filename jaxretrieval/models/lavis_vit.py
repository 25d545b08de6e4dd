"""BLIP-2's CLIP ViT-L/14 image encoder (LAVIS `vit_model: clip_L`, as `pretrain_vitL` uses) on our CLIP image tower.

LAVIS (`lavis/models/clip_vit.py`, `create_clip_vit_L`) builds ViT-L/14 with `layers=23` where OpenAI's has 24, and
its forward stops after the blocks: patch conv, class token, positional embedding, `ln_pre`, the 23 residual blocks
(QuickGELU), then every token, class token first, with no `ln_post` and no projection (it loads its CLIP weights
with `load_state_dict(strict=False)`, so keys beyond these are dropped). BLIP-2 then applies its own `ln_vision`
LayerNorm to the tokens; that norm has weights of its own in the BLIP-2 checkpoint and belongs to the Q-Former side.
LAVIS runs this encoder in fp16 for `pretrain_vitL` (`vit_precision`); here the tower's `dtype` sets compute.

Our `VisionTransformer` runs all its blocks, so `vision_tokens` repeats its embedding steps and runs a prefix of its
blocks (sliced from the stacked parameters when the tower scans its layers). A 24-block tower holding a converted
CLIP checkpoint unchanged runs its first 23; or `truncate_layers` cuts the parameters to a 23-block tower.
For another image size (BLIP-2's retrieval configs use 364 px), LAVIS resizes the position grid once, when it loads
the CLIP weights: `lavis_resize_positions` is that resize (bicubic, corners aligned, no antialiasing), which differs
from the antialiased resize open_clip and `convert clip --image-size` use.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxretrieval.models.presets import MODEL_PRESETS
from jaxretrieval.models.stacking import rematerialised, scan_stack
from jaxretrieval.models.vit import VisionTransformer
from jaxretrieval.sharding import INDEXED_LAYER, is_stacked, path_name

__all__ = ["LavisViT", "clip_vit_l", "depth", "lavis_resize_positions", "truncate_layers", "vision_tokens"]


def depth(vit: VisionTransformer) -> int:
    """How many blocks the tower holds, stacked or one module each."""
    blocks = vit.transformer.blocks
    if vit.transformer.scan:
        return int(jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0])
    return len(blocks)


def vision_tokens(vit: VisionTransformer, pixels: jax.Array, layers: int | None = None) -> jax.Array:
    """LAVIS's CLIP ViT forward on our tower: every token after the first `layers` blocks (default: all but the
    last, LAVIS's 23 of ViT-L/14's 24), without ln_post or projection.

    pixels: (batch, height, width, 3), normalised as for CLIP, height and width those the tower was built for.
    Returns (batch, 1 + grid * grid, width), the class token first, in the tower's compute dtype."""
    total = depth(vit)
    layers = total - 1 if layers is None else layers
    if not 0 <= layers <= total:
        raise ValueError(f"cannot run {layers} blocks of a tower of {total}")
    # The steps of VisionTransformer.__call__ before its blocks, unchanged.
    p = vit.patch_size
    patches = rearrange(pixels.astype(vit.dtype), "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=p, pw=p)
    x = vit.patch_embed(patches)
    cls = jnp.broadcast_to(vit.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + vit.positional_embedding[...].astype(x.dtype)
    x = vit.ln_pre(x)
    stack = vit.transformer
    if layers == total:
        return stack(x)
    if layers == 0:
        return x
    if stack.scan:  # the first `layers` slices of every stacked parameter, as a stack of its own
        graphdef, state = nnx.split(stack.blocks)
        prefix = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[:layers], state))
        return scan_stack(prefix, x, lambda block, y: block(y), stack.remat, unroll=stack.unroll)
    run = rematerialised(lambda block, y: block(y), stack.remat)
    for block in list(stack.blocks)[:layers]:
        x = run(block, x)
    return x


class LavisViT(nnx.Module):
    """LAVIS's `clip_L` visual encoder: `visual` (our CLIP image tower) run for its first `layers` blocks (default:
    all but the last), returning every token. `num_features` is the token width, as LAVIS names it."""

    def __init__(self, visual: VisionTransformer, layers: int | None = None):
        total = depth(visual)
        self.visual = visual
        self.layers = total - 1 if layers is None else layers
        if not 0 <= self.layers <= total:
            raise ValueError(f"cannot run {self.layers} blocks of a tower of {total}")
        self.num_features = int(visual.class_embedding[...].shape[0])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return vision_tokens(self.visual, pixels, self.layers)


def clip_vit_l(image_size: int = 224, *, rngs: nnx.Rngs, dtype=jnp.float32, truncated: bool = False,
               **tower: Any) -> LavisViT:
    """BLIP-2's clip_L encoder at `image_size` (a multiple of 14): the `vit_l14` preset's image tower, QuickGELU,
    run for 23 blocks. It holds all 24 blocks, ln_post and proj (unused), so a converted ViT-L/14's `visual`
    parameters load unchanged; `truncated` builds only 23 blocks, for parameters cut by `truncate_layers(..., 23)`.
    `tower`: VisionTransformer's remaining options (remat, scan, unroll, attention)."""
    image = MODEL_PRESETS["vit_l14"]["image"]
    if image_size % image["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {image['patch_size']}")
    keep = image["layers"] - 1
    visual = VisionTransformer(image_size=image_size, patch_size=image["patch_size"], width=image["width"],
                               layers=keep if truncated else image["layers"], heads=image["heads"], mlp_ratio=4.0,
                               embed_dim=MODEL_PRESETS["vit_l14"]["embed_dim"], activation="quick_gelu", rngs=rngs,
                               dtype=dtype, **tower)
    return LavisViT(visual, keep)


def truncate_layers(params: Any, layers: int) -> Any:
    """A tower's parameter tree (pure dict or State; stacked `blocks/<leaf>` or indexed `blocks/<i>/...`) with only
    its first `layers` blocks: what a tower built with `layers` blocks loads."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)

    def cut(path: tuple, leaf: Any) -> Any:
        return leaf[:layers] if is_stacked(path_name(path)) else leaf

    tree = jax.tree_util.tree_map_with_path(cut, params)

    def prune(node: Any, name: str) -> Any:
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            child = f"{name}{key}/"
            found = INDEXED_LAYER.search(child)
            if found and found.end() == len(child) and int(found.group(3)) >= layers:
                continue  # an indexed block past the kept ones
            out[key] = prune(value, child)
        return out

    return prune(tree, "")


def _cubic(distance: float, a: float = -0.75) -> float:
    """PyTorch's bicubic convolution kernel at a tap `distance` (0 <= distance < 2) from the source position."""
    if distance <= 1:
        return ((a + 2) * distance - (a + 3)) * distance * distance + 1
    return ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a


def _cubic_weights(old: int, new: int) -> np.ndarray:
    """(new, old) matrix of PyTorch's bicubic resampling with align_corners=True and no antialiasing: output i
    reads source position i * (old - 1) / (new - 1) from four taps, indices clamped at the edges. The position is
    computed in float32 as PyTorch computes it for float32 tables (in float64 it moves outputs by up to ~5e-6)."""
    scale = np.float32(old - 1) / np.float32(new - 1) if new > 1 else np.float32(0)
    weights = np.zeros((new, old))
    for i in range(new):
        source = np.float32(scale * np.float32(i))
        base = math.floor(source)
        t = float(source - np.float32(base))
        for k, distance in enumerate((t + 1, t, 1 - t, 2 - t)):
            weights[i, min(max(base - 1 + k, 0), old - 1)] += _cubic(distance)
    return weights


def lavis_resize_positions(table: np.ndarray, grid: int) -> np.ndarray:
    """The image positional embedding (class row + square grid, row-major) resampled to grid x grid, class row kept,
    as LAVIS's `interpolate_pos_embed` in clip_vit.py does when BLIP-2 builds clip_L at another image size
    (`F.interpolate(..., mode="bicubic", align_corners=True)`). Computed in float64, returned in table's dtype."""
    table = np.asarray(table)
    old = math.isqrt(table.shape[0] - 1)
    if old * old + 1 != table.shape[0]:
        raise ValueError(f"a positional embedding of {table.shape[0]} rows is not a class row and a square grid")
    if grid == old:
        return table
    weights = _cubic_weights(old, grid)
    cells = table[1:].astype(np.float64).reshape(old, old, -1)
    cells = np.einsum("ai,bj,ijc->abc", weights, weights, cells).reshape(grid * grid, -1)
    return np.concatenate([table[:1], cells.astype(table.dtype)])
