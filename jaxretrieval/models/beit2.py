"""BEiT / BEiT-2 vision transformer as timm's `timm.models.beit.Beit` computes it, with X2-VLM's pooled output.

Read in timm 1.0.31 (`timm/models/beit.py`, `timm/layers/pos_embed_rel.py`) and X2-VLM (github:zengyan-97/X2-VLM,
`models/beit2.py`, `models/xvlm.py`):
- a stride-p patch convolution with bias, a CLS token in front, absolute positions optional (BEiT-2 in X2-VLM:
  none; `build_vision_encoder` passes use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
  qkv_bias=True, drop_path_rate=0.1, use_mean_pooling=True; `beit_base_patch16` LayerNorm eps 1e-6).
- pre-LN blocks: x += gamma_1 * attn(norm1(x)); x += gamma_2 * mlp(norm2(x)); gamma (layer scale) starts at
  init_values; the MLP is exact-erf GELU, 4x wide.
- attention: one qkv matmul without bias, then learned q_bias and v_bias (k's is zero); each block holds its own
  relative position bias table, (2Gh-1)(2Gw-1) patch offsets + 3 rows (cls->patch, patch->cls, cls->cls), gathered
  by `relative_position_index` and added to the logits.
- drop path rising linearly from 0 (first block) to drop_path_rate (last).
- output (`pooling`):
  "x2vlm" X2-VLM's VisionTransformer.forward: the CLS token is dropped, fc_norm is applied to every patch token and
          their mean is put in front. XVLM.get_features projects tokens[:, 0] (vision_proj) for ITC, and the
          cross-attention layers attend to all of `tokens` (get_image_embeds: image_atts all ones).
  "avg"   timm global_pool="avg": tokens = the last block's output, CLS included, no norm; pooled = fc_norm(mean of
          the patch tokens).
  "cls"   timm global_pool="token" (BEiT-1 style): norm on every token, pooled = the CLS token.
- a checkpoint at another image size: `resize_rel_pos_bias_table` (X2-VLM beit2.interpolate_pos_embed /
  load_pretrained_beit2, timm resize_rel_pos_bias_table). X2-VLM also copies a shared table
  (`rel_pos_bias.relative_position_bias_table`, BEiT-2 pre-training) into every block; `flat_from_timm` does too.

Attention goes through `layers.attend` with the relative position bias.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxretrieval.models.beit3 import drop_path
from jaxretrieval.models.layers import attend, attention_implementation, dense
from jaxretrieval.models.stacking import relayout, rematerialised, scan_stack, stack_modules
from jaxretrieval.sharding import constrain, is_stacked, path_name

EPS = 1e-6
EXTRA_ROWS = 3  # after the patch offsets: cls->patch, patch->cls, cls->cls
POOLINGS = ("x2vlm", "avg", "cls")


def _norm(width: int, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def table_rows(grid: tuple[int, int]) -> int:
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + EXTRA_ROWS


@functools.lru_cache(maxsize=32)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """(patches + 1, patches + 1) table row for each (query, key) pair, CLS first; patches in row-major order."""
    gh, gw = grid
    rows, cols = (c.reshape(-1) for c in np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij"))
    offsets = (rows[:, None] - rows[None, :] + gh - 1) * (2 * gw - 1) + cols[:, None] - cols[None, :] + gw - 1
    first = table_rows(grid) - EXTRA_ROWS
    index = np.empty((gh * gw + 1,) * 2, np.int32)
    index[1:, 1:] = offsets
    index[0, :] = first  # the CLS query
    index[:, 0] = first + 1  # the CLS key
    index[0, 0] = first + 2
    index.flags.writeable = False
    return index


class Attention(nnx.Module):
    def __init__(self, width: int, heads: int, *, window: tuple[int, int] | None, qkv_bias: bool, rngs: nnx.Rngs,
                 dtype: Any, attention: str = "xla"):
        self.heads = heads
        self.implementation = attention_implementation(attention, dtype, width // heads)
        self.qkv = dense(width, 3 * width, rngs=rngs, std=0.02, dtype=dtype, use_bias=False)
        self.q_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias else None
        self.v_bias = nnx.Param(jnp.zeros((width,))) if qkv_bias else None
        self.relative_position_bias_table = nnx.Param(jnp.zeros((table_rows(window), heads))) if window else None
        self.proj = dense(width, width, rngs=rngs, std=0.02, dtype=dtype)

    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        batch, length, width = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            q_bias = self.q_bias[...]
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]]).astype(qkv.dtype)
        q, k, v = (constrain(t, "batch", None, "heads", None)
                   for t in jnp.split(qkv.reshape(batch, length, 3 * self.heads, -1), 3, axis=2))
        bias = None
        if self.relative_position_bias_table is not None:
            table = self.relative_position_bias_table[...]
            if table.shape[0] != table_rows(grid):
                raise ValueError(f"relative position table of {table.shape[0]} rows is for another image size than "
                                 f"a {grid[0]}x{grid[1]} patch grid ({table_rows(grid)} rows); resize it with "
                                 f"resize_rel_pos_bias_table")
            bias = jnp.transpose(table[relative_position_index(grid)], (2, 0, 1))[None].astype(x.dtype)
        y = attend(q, k, v, bias=bias, implementation=self.implementation)
        return self.proj(y.reshape(batch, length, width))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any):
        self.fc1 = dense(width, hidden, rngs=rngs, std=0.02, dtype=dtype)
        self.fc2 = dense(hidden, width, rngs=rngs, std=0.02, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x).astype(jnp.float32), approximate=False).astype(x.dtype)
        return self.fc2(constrain(h, "batch", None, "mlp"))


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, *, window: tuple[int, int] | None, qkv_bias: bool,
                 init_values: float | None, rngs: nnx.Rngs, dtype: Any, attention: str = "xla"):
        self.norm1 = _norm(width, rngs, dtype)
        self.attn = Attention(width, heads, window=window, qkv_bias=qkv_bias, rngs=rngs, dtype=dtype,
                              attention=attention)
        self.norm2 = _norm(width, rngs, dtype)
        self.mlp = MLP(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)
        scaled = bool(init_values)
        self.gamma_1 = nnx.Param(jnp.full((width,), init_values, jnp.float32)) if scaled else None
        self.gamma_2 = nnx.Param(jnp.full((width,), init_values, jnp.float32)) if scaled else None

    def __call__(self, x: jax.Array, grid: tuple[int, int], rate: jax.Array, key: jax.Array | None) -> jax.Array:
        """rate: this block's drop-path rate; key: its randomness (None: no dropping)."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        y = self.attn(self.norm1(x), grid)
        if self.gamma_1 is not None:
            y = y * self.gamma_1[...].astype(y.dtype)
        x = constrain(x + drop_path(y, rate, keys[0]), "batch", None, None)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = y * self.gamma_2[...].astype(y.dtype)
        return constrain(x + drop_path(y, rate, keys[1]), "batch", None, None)


class Beit2(nnx.Module):
    """The vision tower (see the module docstring). Returns (tokens, pooled); both depend on `pooling`."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, init_values: float | None = 0.1, qkv_bias: bool = True,
                 rel_pos_bias: bool = True, abs_pos_emb: bool = False, pooling: str = "x2vlm",
                 drop_path_rate: float = 0.0, rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: str = "none",
                 scan: bool = True, unroll: int = 1, attention: str = "xla"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.patch_size = patch_size
        self.pooling = pooling
        self.dtype = dtype
        grid = (image_size // patch_size,) * 2
        # The stride-p patch convolution as a matmul over flattened (ph, pw, c) patches.
        self.patch_embed = dense(patch_size * patch_size * 3, width, rngs=rngs, std=0.02, dtype=dtype)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,)))
        self.pos_embed = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (grid[0] * grid[1] + 1, width)))
                          if abs_pos_emb else None)
        self.drop_path_rates = tuple(float(rate) for rate in np.linspace(0.0, drop_path_rate, layers))

        def make(block_rngs: nnx.Rngs) -> Block:
            return Block(width, heads, mlp_ratio, window=grid if rel_pos_bias else None, qkv_bias=qkv_bias,
                         init_values=init_values, rngs=block_rngs, dtype=dtype, attention=attention)

        self.blocks = stack_modules(make, layers, rngs) if scan else nnx.List([make(rngs) for _ in range(layers)])
        # BEiT's fix_init_weight: block i's attn.proj and mlp.fc2 weights divided by sqrt(2 (i + 1)).
        factors = 1.0 / np.sqrt(2.0 * np.arange(1, layers + 1))
        for i, block in enumerate([self.blocks] if scan else self.blocks):
            factor = factors[:, None, None] if scan else factors[i]
            for kernel in (block.attn.proj.kernel, block.mlp.fc2.kernel):
                kernel[...] = kernel[...] * factor
        self.norm = _norm(width, rngs, dtype) if pooling == "cls" else None
        self.fc_norm = None if pooling == "cls" else _norm(width, rngs, dtype)
        self.remat = remat
        self.scan = scan
        self.unroll = unroll

    def embed(self, pixels: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """pixels (batch, height, width, 3) -> [cls, patches] (+ absolute positions) and the patch grid."""
        p = self.patch_size
        if pixels.shape[1] % p or pixels.shape[2] % p:
            raise ValueError(f"image size {pixels.shape[1]}x{pixels.shape[2]} is not a multiple of the patch {p}")
        grid = (pixels.shape[1] // p, pixels.shape[2] // p)
        x = self.patch_embed(rearrange(pixels.astype(self.dtype), "b (h ph) (w pw) c -> b (h w) (ph pw c)",
                                       ph=p, pw=p))
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embed is not None:
            if self.pos_embed.shape[0] != x.shape[1]:
                raise ValueError(f"{self.pos_embed.shape[0]} absolute positions for {x.shape[1]} tokens")
            x = x + self.pos_embed[...].astype(x.dtype)
        return x, grid

    def __call__(self, pixels: jax.Array, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """pixels: (batch, height, width, 3), normalised. Dropping paths needs rngs (None: the deterministic,
        evaluation forward). Returns tokens (batch, 1 + patches, width) and pooled (batch, width)."""
        x, grid = self.embed(pixels)
        rates = jnp.asarray(self.drop_path_rates, jnp.float32)
        dropping = rngs is not None and self.drop_path_rates[-1] > 0
        keys = jax.random.split(rngs.dropout(), len(rates)) if dropping else None
        if self.scan:
            if keys is None:
                x = scan_stack(self.blocks, x, lambda block, y, r: block(y, grid, r, None), self.remat, rates,
                               unroll=self.unroll)
            else:
                x = scan_stack(self.blocks, x, lambda block, y, r, k: block(y, grid, r, k), self.remat, rates, keys,
                               unroll=self.unroll)
        else:
            run = rematerialised(lambda block, y, r, k: block(y, grid, r, k), self.remat)
            for i, block in enumerate(self.blocks):
                x = run(block, x, rates[i], None if keys is None else keys[i])
        return self.pool(x)

    def pool(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The last block's output -> (tokens, pooled) as `pooling` says."""
        if self.pooling == "cls":
            x = self.norm(x)
            return x, x[:, 0]
        if self.pooling == "avg":
            return x, self.fc_norm(jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(x.dtype))
        patches = self.fc_norm(x[:, 1:])
        pooled = jnp.mean(patches.astype(jnp.float32), axis=1).astype(patches.dtype)
        return jnp.concatenate([pooled[:, None], patches], axis=1), pooled


# ---- timm / X2-VLM state dicts <-> our parameters -------------------------------------------------------------------
# (our path, timm key, kind); block entries are relative to `blocks/<i>/` and `blocks.<i>.`.
_TOP = [("patch_embed/kernel", "patch_embed.proj.weight", "conv"), ("patch_embed/bias", "patch_embed.proj.bias", ""),
        ("cls_token", "cls_token", "cls"), ("pos_embed", "pos_embed", "pos"),
        ("norm/scale", "norm.weight", ""), ("norm/bias", "norm.bias", ""),
        ("fc_norm/scale", "fc_norm.weight", ""), ("fc_norm/bias", "fc_norm.bias", "")]
_BLOCK = [("norm1/scale", "norm1.weight", ""), ("norm1/bias", "norm1.bias", ""),
          ("attn/qkv/kernel", "attn.qkv.weight", "linear"), ("attn/q_bias", "attn.q_bias", ""),
          ("attn/v_bias", "attn.v_bias", ""),
          ("attn/relative_position_bias_table", "attn.relative_position_bias_table", ""),
          ("attn/proj/kernel", "attn.proj.weight", "linear"), ("attn/proj/bias", "attn.proj.bias", ""),
          ("gamma_1", "gamma_1", ""), ("gamma_2", "gamma_2", ""),
          ("norm2/scale", "norm2.weight", ""), ("norm2/bias", "norm2.bias", ""),
          ("mlp/fc1/kernel", "mlp.fc1.weight", "linear"), ("mlp/fc1/bias", "mlp.fc1.bias", ""),
          ("mlp/fc2/kernel", "mlp.fc2.weight", "linear"), ("mlp/fc2/bias", "mlp.fc2.bias", "")]
# In a state dict but not parameters here: index buffers, a classifier head, timm's zero k_bias buffer.
_IGNORED = re.compile(r"(^|\.)(relative_position_index|k_bias)$|^head\.")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def _entries(layers: int) -> list[tuple[str, str, str]]:
    return _TOP + [(f"blocks/{i}/{ours}", f"blocks.{i}.{theirs}", kind)
                   for i in range(layers) for ours, theirs, kind in _BLOCK]


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return value.T
    if kind == "conv":  # (out, c, ph, pw) -> rows in the (ph, pw, c) order `embed` flattens patches in
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    if kind == "cls":  # (1, 1, width)
        return value.reshape(-1)
    return value.reshape(value.shape[-2:]) if kind == "pos" else value  # pos: (1, tokens, width)


def _to_timm(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return value.T
    if kind == "conv":
        p = math.isqrt(value.shape[0] // 3)
        return value.reshape(p, p, 3, -1).transpose(3, 2, 0, 1)
    return value.reshape(1, -1, value.shape[-1]) if kind in ("cls", "pos") else value


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; half-precision ones widened, as numpy has no bfloat16
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() and value.element_size() < 4 else value).numpy()
    return np.asarray(value)


def _layer_count(keys: Any) -> int:
    found = {int(m.group(1)) for key in keys if (m := re.match(r"blocks\.(\d+)\.", key))}
    return max(found) + 1 if found else 0


def flat_from_timm(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """timm Beit / X2-VLM vision encoder state dict (torch tensors or numpy) -> {our per-layer path: array}, e.g.
    `blocks/3/attn/qkv/kernel`. `prefix` is where the encoder sits (X2-VLM: "vision_encoder."). A key that maps to
    nothing here is an error; index buffers, `head.*` and a zero k_bias are skipped."""
    sd = {k[len(prefix):]: _numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
    layers = _layer_count(sd)
    if _SHARED_TABLE in sd:
        shared = sd.pop(_SHARED_TABLE)
        for i in range(layers):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared)
    flat = {ours: _to_ours(sd.pop(theirs), kind) for ours, theirs, kind in _entries(layers) if theirs in sd}
    left = sorted(k for k in sd if not _IGNORED.search(k))
    if left:
        raise ValueError(f"state dict keys with no place in Beit2: {left[:8]}{' ...' if len(left) > 8 else ''}")
    return flat


def params_from_timm(state_dict: Mapping[str, Any], template: Any, prefix: str = "") -> Any:
    """The state dict in `template`'s structure (stacked `blocks/x` or per-layer `blocks/<i>/x`), e.g.
    `nnx.to_pure_dict(nnx.state(model))`."""
    return relayout(flat_from_timm(state_dict, prefix), template)


def timm_from_params(params: Any, prefix: str = "", with_index: bool = False) -> dict[str, np.ndarray]:
    """Our parameters (either layout, or flat per-layer paths) -> timm / X2-VLM state dict arrays. `with_index`
    also writes each block's relative_position_index buffer (X2-VLM's checkpoints hold it, timm's do not)."""
    flat: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name, value = path_name(path), np.asarray(leaf)
        if is_stacked(name):
            head, tail = name.split("blocks/", 1)
            flat.update({f"{head}blocks/{i}/{tail}": value[i] for i in range(value.shape[0])})
        else:
            flat[name] = value
    layers = _layer_count(k.replace("/", ".") for k in flat)
    sd = {f"{prefix}{theirs}": _to_timm(flat.pop(ours), kind) for ours, theirs, kind in _entries(layers)
          if ours in flat}
    if flat:
        raise ValueError(f"parameters with no timm name: {sorted(flat)[:8]}")
    if with_index:
        for i in range(layers):
            table = sd.get(f"{prefix}blocks.{i}.attn.relative_position_bias_table")
            if table is not None:
                side = (math.isqrt(table.shape[0] - EXTRA_ROWS) + 1) // 2
                sd[f"{prefix}blocks.{i}.attn.relative_position_index"] = \
                    relative_position_index((side, side)).astype(np.int64)
    return sd


# ---- relative position tables at another image size -----------------------------------------------------------------

def _source_offsets(src: int, dst: int) -> np.ndarray:
    """Where BEiT's resize places the `src` (odd) source offsets among the `dst` target ones (-dst//2 .. dst//2):
    spaced by a growing ratio q, found by bisection so that sum_{i<src//2} q^i just reaches dst//2."""
    half, reach = src // 2, dst // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if (1.0 - q**half) / (1.0 - q) > reach:
            high = q
        else:
            low = q
    steps = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)]) if half else np.zeros(0)
    return np.concatenate([-steps[::-1], [0.0], steps])


def _linear_weights(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(len(t), len(x)): piecewise-linear interpolation through (x, y) at t, held constant beyond the ends."""
    return np.stack([np.interp(t, x, column) for column in np.eye(len(x))], axis=1)


def _cubic_weights(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(len(t), len(x)): the not-a-knot cubic spline through (x, y) at t clamped to [x0, x_n-1], the interpolating
    spline FITPACK fits with s=0 (scipy interp2d kind="cubic" on a grid, RectBivariateSpline)."""
    n = len(x)
    if n < 4:
        raise ValueError(f"cubic interpolation needs at least 4 source offsets, got {n}")
    h = np.diff(x)
    lhs, rhs = np.zeros((n, n)), np.zeros((n, n))  # lhs @ second derivatives = rhs @ y
    for i in range(1, n - 1):
        lhs[i, i - 1:i + 2] = h[i - 1], 2.0 * (h[i - 1] + h[i]), h[i]
        rhs[i, i - 1:i + 2] = 6.0 / h[i - 1], -6.0 / h[i - 1] - 6.0 / h[i], 6.0 / h[i]
    lhs[0, :3] = h[1], -(h[0] + h[1]), h[0]  # third derivative continuous at x1 and x_n-2
    lhs[-1, -3:] = h[-1], -(h[-2] + h[-1]), h[-2]
    second = np.linalg.solve(lhs, rhs)
    t = np.clip(t, x[0], x[-1])
    i = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    width, a, b = h[i], x[i + 1] - t, t - x[i]
    weights = ((a**3 / width - width * a) / 6.0)[:, None] * second[i] + \
        ((b**3 / width - width * b) / 6.0)[:, None] * second[i + 1]
    rows = np.arange(len(t))
    weights[rows, i] += a / width
    weights[rows, i + 1] += b / width
    return weights


def resize_rel_pos_bias_table(table: Any, new_window: int | tuple[int, int], *,
                              old_window: int | tuple[int, int] | None = None, method: str = "cubic") -> np.ndarray:
    """A (rows, heads) relative position table for a `new_window` patch grid (BEiT's checkpoint loading): the
    (2W-1)^2 offset grid resampled per head, the 3 CLS rows kept. Source offsets are spaced geometrically so the
    old grid spans the new one. method "cubic": X2-VLM's / BEiT's loader (scipy interp2d, bicubic spline);
    "linear": timm's resize_rel_pos_bias_table without scipy (bilinear). `old_window` defaults to the square the
    table fits."""
    table = np.asarray(table)
    rows, heads = table.shape
    new = (new_window, new_window) if isinstance(new_window, int) else tuple(new_window)
    if old_window is None:
        side = math.isqrt(rows - EXTRA_ROWS)
        if side * side != rows - EXTRA_ROWS:
            raise ValueError(f"a table of {rows} rows is not square; give old_window")
        src = (side, side)
    else:
        old = (old_window, old_window) if isinstance(old_window, int) else tuple(old_window)
        src = (2 * old[0] - 1, 2 * old[1] - 1)
        if rows != src[0] * src[1] + EXTRA_ROWS:
            raise ValueError(f"a table of {rows} rows is not for a {old[0]}x{old[1]} window")
    dst = (2 * new[0] - 1, 2 * new[1] - 1)
    if src == dst:
        return table.copy()
    weights = {"linear": _linear_weights, "cubic": _cubic_weights}.get(method)
    if weights is None:
        raise ValueError(f"method must be cubic or linear, got {method!r}")
    along = [weights(_source_offsets(s, d), np.arange(d, dtype=np.float64) - d // 2) for s, d in zip(src, dst,
                                                                                                      strict=True)]
    grid = table[:-EXTRA_ROWS].astype(np.float64).reshape(src[0], src[1], heads)
    resized = np.einsum("ys,xt,sth->yxh", along[0], along[1], grid).reshape(-1, heads)
    return np.concatenate([resized, table[-EXTRA_ROWS:]]).astype(table.dtype)
