"""Swin Transformer vision tower as timm's `timm.models.swin_transformer.SwinTransformer` computes it.

Read in timm 1.0.31 (`timm/models/swin_transformer.py`, `timm/layers/patch_embed.py`, `timm/layers/drop.py`):
- every LayerNorm has eps 1e-5 (nn.LayerNorm); Linear layers carry biases except PatchMerging's reduction.
- patch embedding: a stride-p convolution with bias, then LayerNorm; the features stay NHWC from there on. The input
  must be the configured size (strict_img_size).
- stage i has width embed_dim * 2^i. Stage 0 has no downsample; stage i > 0 *starts* with PatchMerging (timm 1.0;
  the original Microsoft checkpoints end stage i - 1 with it, which checkpoint_filter_fn renames, as `flat_from_timm`
  does): pad H and W to even, reshape (B, H/2, 2, W/2, 2, C), permute (0, 1, 3, 4, 2, 5), flatten, so the 4C vector
  is ordered (dw, dh, c): x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]; LayerNorm(4C); a bias-free
  Linear 4C -> 2C. A merged stage's resolution is (r + 1) // 2.
- blocks: x += drop_path(attn(norm1(x))); x += drop_path(mlp(norm2(x))); the MLP is fc1 -> exact-erf GELU -> fc2,
  mlp_ratio wide. Block i of a stage shifts its windows by window // 2 when i is odd.
- window and shift per stage (_calc_window_shift, always_partition=False): the window is clamped to the stage's
  resolution per axis (min), and an axis whose resolution is <= the window is not shifted; a stage whose shift is 0
  on both axes neither rolls nor masks.
- window attention: norm1's output is rolled by (-sh, -sw), zero-padded at the bottom and right to a multiple of the
  window, and cut into windows (windows row-major, tokens row-major within). qkv has a bias; its 3C output splits as
  (3, heads, head_dim); q is scaled by head_dim^-0.5 before q k^T. Added to the logits: a ((2Wh-1)(2Ww-1), heads)
  table gathered by index (dy + Wh - 1)(2Ww - 1) + dx + Ww - 1, and in shifted blocks a mask: the padded map is
  labelled in 3 x 3 regions cut per axis by the slices [0:-W], [-W:-s], [-s:], and pairs of tokens of one window in
  different regions get -100 (not -inf). Softmax, proj, windows merged, padding cropped, roll undone. Padded tokens are
  zeros going into qkv and are attended to, not masked.
- output: forward_features is the final LayerNorm over the last stage's (B, H, W, C); the "avg" head pools the mean
  over H and W. A classifier (`head.fc`) is not part of the tower.
- drop path: calculate_drop_path_rates(rate, depths, stagewise=True) is torch.linspace(0, rate, sum(depths)) split
  per stage, so the rate rises linearly over all blocks; per sample, survivors scaled by 1 / (1 - rate).
- init: trunc_normal(std 0.02) Linear weights and tables, zero biases; here normal(0.02).

Layout: each stage's blocks share every parameter shape, so with `scan` (the default) they are one stack,
`stages/<s>/blocks/<leaf>` with a leading axis of the stage's depth (layer i = timm's `layers.<s>.blocks.<i>`), run by
one scan per stage. The alternating shift is chosen per step: a per-layer 0/1 flag multiplies the roll amounts (a
dynamic jnp.roll) and the mask (x 0: adds exactly 0), so any depth, odd too, scans. `scan=False` holds one module per
block, `stages/<s>/blocks/<i>/<leaf>`, with static shifts; `stacking.relayout` moves trees between the two.

Attention is a plain fp32-softmax einsum over (batch, windows, tokens): `layers.attend` takes a bias only
broadcastable to (batch, heads, queries, keys), which would materialise the per-window mask for every image.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxretrieval.models.beit2 import MLP
from jaxretrieval.models.beit3 import drop_path
from jaxretrieval.models.layers import dense
from jaxretrieval.models.stacking import relayout, rematerialised, scan_stack, stack_modules
from jaxretrieval.sharding import constrain

EPS = 1e-5
MASKED = -100.0
Pair = tuple[int, int]
# timm's registered towers (swin_{base,large}_patch4_window7_224): patch 4, window 7, mlp ratio 4.
SWIN_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "patch_size": 4, "window_size": 7}
SWIN_L = {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "patch_size": 4, "window_size": 7}


def _pair(value: int | Sequence[int]) -> Pair:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _norm(width: int, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    # two-pass variance, as torch computes it
    return nnx.LayerNorm(width, epsilon=EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                         rngs=rngs)


def window_and_shift(resolution: Pair, window: Pair) -> tuple[Pair, Pair]:
    """A stage's (window, shift) at `resolution` for the configured `window`: clamped, and no shift on an axis that
    one window covers."""
    size = tuple(min(r, w) for r, w in zip(resolution, window, strict=True))
    shift = tuple(0 if r <= w else w // 2 for r, w in zip(resolution, window, strict=True))
    return size, shift


def padded(resolution: Pair, window: Pair) -> Pair:
    return tuple(-(-r // w) * w for r, w in zip(resolution, window, strict=True))


def window_partition(x: Any, window: Pair) -> Any:
    """(B, H, W, C) -> (B, windows, Wh * Ww, C), numpy or jax."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: jax.Array, window: Pair, size: Pair) -> jax.Array:
    """(B, windows, Wh * Ww, C) -> (B, H, W, C), the inverse of window_partition."""
    b, c = windows.shape[0], windows.shape[-1]
    (wh, ww), (h, w) = window, size
    x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=64)
def relative_position_index(window: Pair) -> np.ndarray:
    """(N, N) table row for each (query, key) pair of a window's N = Wh * Ww row-major tokens."""
    wh, ww = window
    ys, xs = (c.reshape(-1) for c in np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij"))
    index = ((ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + xs[:, None] - xs[None, :] + ww - 1).astype(np.int32)
    index.flags.writeable = False
    return index


@functools.lru_cache(maxsize=64)
def shift_mask(resolution: Pair, window: Pair, shift: Pair) -> np.ndarray:
    """(windows, N, N) float32: -100 between tokens of a window from different regions of the rolled map, else 0."""
    labels = np.zeros(padded(resolution, window), np.float32)
    cuts = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift, strict=True)]
    for k, ((h0, h1), (w0, w1)) in enumerate((h, w) for h in cuts[0] for w in cuts[1]):
        labels[h0:h1, w0:w1] = k  # python slice semantics, as timm's (a zero shift gives -0 = 0)
    regions = window_partition(labels[None, :, :, None], window)[0, ..., 0]
    mask = np.where(regions[:, :, None] != regions[:, None, :], MASKED, 0.0).astype(np.float32)
    mask.flags.writeable = False
    return mask


class WindowAttention(nnx.Module):
    def __init__(self, width: int, heads: int, window: Pair, *, qkv_bias: bool, rngs: nnx.Rngs, dtype: Any):
        self.heads = heads
        self.window = window
        self.qkv = dense(width, 3 * width, rngs=rngs, std=0.02, dtype=dtype, use_bias=qkv_bias)
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nnx.Param(0.02 * jax.random.normal(rngs.params(), (rows, heads)))
        self.proj = dense(width, width, rngs=rngs, std=0.02, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x: (B, windows, N, C); mask: (windows, N, N) added to the logits, or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, self.heads, c // self.heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q * (c // self.heads) ** -0.5, k).astype(jnp.float32)
        table = self.relative_position_bias_table[...]
        logits = logits + jnp.transpose(table[relative_position_index(self.window)], (2, 0, 1))
        if mask is not None:
            logits = logits + mask[:, None]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bwhqk,bwkhd->bwqhd", probs, v).reshape(b, nw, n, c))


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, *, resolution: Pair, window: Pair, shift: Pair,
                 qkv_bias: bool, rngs: nnx.Rngs, dtype: Any):
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = _norm(width, rngs, dtype)
        self.attn = WindowAttention(width, heads, window, qkv_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.norm2 = _norm(width, rngs, dtype)
        self.mlp = MLP(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, shifted: bool | jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
        """x: (B, H * W, C). shifted: whether this block shifts (a bool, or a traced 0/1 in a scan); rate, key: its
        drop path (key None: none)."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = constrain(x + drop_path(self.windowed(self.norm1(x), shifted), rate, keys[0]), "batch", None, None)
        return constrain(x + drop_path(self.mlp(self.norm2(x)), rate, keys[1]), "batch", None, None)

    def windowed(self, x: jax.Array, shifted: bool | jax.Array) -> jax.Array:
        b, _, c = x.shape
        (h, w), window = self.resolution, self.window
        x = x.reshape(b, h, w, c)
        moving = any(self.shift) and shifted is not False
        mask = None
        if moving:
            x = jnp.roll(x, (-self.shift[0] * shifted, -self.shift[1] * shifted), axis=(1, 2))
            mask = jnp.asarray(shift_mask(self.resolution, window, self.shift))
            if not isinstance(shifted, bool):
                mask = mask * shifted.astype(mask.dtype)
        hp, wp = padded(self.resolution, window)
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        y = window_reverse(self.attn(window_partition(x, window), mask), window, (hp, wp))[:, :h, :w]
        if moving:
            y = jnp.roll(y, (self.shift[0] * shifted, self.shift[1] * shifted), axis=(1, 2))
        return y.reshape(b, h * w, c)


class PatchMerging(nnx.Module):
    def __init__(self, width: int, out: int, *, rngs: nnx.Rngs, dtype: Any):
        self.norm = _norm(4 * width, rngs, dtype)
        self.reduction = dense(4 * width, out, rngs=rngs, std=0.02, dtype=dtype, use_bias=False)

    def __call__(self, x: jax.Array, resolution: Pair) -> jax.Array:
        """(B, H * W, C) -> (B, ceil(H / 2) * ceil(W / 2), out)."""
        (h, w), c = resolution, x.shape[-1]
        x = jnp.pad(x.reshape(-1, h, w, c), ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        return self.reduction(self.norm(rearrange(x, "b (h dh) (w dw) c -> b (h w) (dw dh c)", dh=2, dw=2)))


class PatchEmbed(nnx.Module):
    def __init__(self, patch_size: int, in_chans: int, width: int, *, rngs: nnx.Rngs, dtype: Any):
        self.patch_size = patch_size
        # The stride-p convolution as a matmul over flattened (ph, pw, c) patches.
        self.proj = dense(patch_size * patch_size * in_chans, width, rngs=rngs, std=0.02, dtype=dtype)
        self.norm = _norm(width, rngs, dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        p = self.patch_size
        return self.norm(self.proj(rearrange(pixels, "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=p, pw=p)))


class Stage(nnx.Module):
    """An optional PatchMerging, then `depth` blocks alternating unshifted / shifted windows."""

    def __init__(self, width_in: int, width: int, depth: int, heads: int, *, resolution: Pair, window: Pair,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, rngs: nnx.Rngs, dtype: Any, remat: str,
                 scan: bool, unroll: int):
        self.input_resolution = resolution
        self.resolution = tuple((r + 1) // 2 for r in resolution) if downsample else resolution
        self.window, self.shift = window_and_shift(self.resolution, window)
        self.downsample = PatchMerging(width_in, width, rngs=rngs, dtype=dtype) if downsample else None

        def make(block_rngs: nnx.Rngs) -> Block:
            return Block(width, heads, mlp_ratio, resolution=self.resolution, window=self.window, shift=self.shift,
                         qkv_bias=qkv_bias, rngs=block_rngs, dtype=dtype)

        self.blocks = stack_modules(make, depth, rngs) if scan else nnx.List([make(rngs) for _ in range(depth)])
        self.depth, self.remat, self.scan, self.unroll = depth, remat, scan, unroll

    def __call__(self, x: jax.Array, rates: jax.Array, keys: jax.Array | None) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x, self.input_resolution)
        if self.scan:
            flags = jnp.arange(self.depth, dtype=jnp.int32) % 2
            if keys is None:
                return scan_stack(self.blocks, x, lambda block, y, s, r: block(y, s, r, None), self.remat, flags,
                                  rates, unroll=self.unroll)
            return scan_stack(self.blocks, x, lambda block, y, s, r, k: block(y, s, r, k), self.remat, flags, rates,
                              keys, unroll=self.unroll)
        for i, block in enumerate(self.blocks):
            run = rematerialised(lambda b, y, r, k, s=bool(i % 2): b(y, s, r, k), self.remat)
            x = run(block, x, rates[i], None if keys is None else keys[i])
        return x


class SwinTransformer(nnx.Module):
    """The tower (see the module docstring). Returns (tokens, pooled): the final-norm features of the last stage,
    (batch, h * w, width) in row-major order, and their mean (batch, width), timm's forward_features and avg head."""

    def __init__(self, *, image_size: int | Sequence[int] = 224, patch_size: int = 4, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int | Sequence[int] = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, in_chans: int = 3, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 remat: str = "none", scan: bool = True, unroll: int = 1):
        if len(depths) != len(num_heads):
            raise ValueError(f"{len(depths)} stage depths but {len(num_heads)} head counts")
        size = _pair(image_size)
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"image size {size[0]}x{size[1]} is not a multiple of the patch {patch_size}")
        self.image_size, self.dtype = size, dtype
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, rngs=rngs, dtype=dtype)
        widths = [embed_dim * 2**i for i in range(len(depths))]
        resolution = (size[0] // patch_size, size[1] // patch_size)
        stages = []
        for s, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            stages.append(Stage(widths[max(s - 1, 0)], widths[s], depth, heads, resolution=resolution,
                                window=_pair(window_size), downsample=s > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                rngs=rngs, dtype=dtype, remat=remat, scan=scan, unroll=unroll))
            resolution = stages[-1].resolution
        self.stages = nnx.List(stages)
        self.resolution = resolution
        self.width = widths[-1]
        self.norm = _norm(widths[-1], rngs, dtype)
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths)))

    def __call__(self, pixels: jax.Array, *, rngs: nnx.Rngs | None = None, masked: jax.Array | None = None,
                 mask_token: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """pixels: (batch, height, width, channels), normalised, at `image_size`. Dropping paths needs rngs (None:
        the deterministic, evaluation forward). SimMIM: `masked` (batch or 1, patch rows, patch columns), 1 where the
        patch embedding is replaced by `mask_token` (embed_dim,) before the first stage."""
        if tuple(pixels.shape[1:3]) != self.image_size:
            raise ValueError(f"image size {pixels.shape[1]}x{pixels.shape[2]} is not the model's "
                             f"{self.image_size[0]}x{self.image_size[1]}")
        x = self.patch_embed(pixels.astype(self.dtype))
        if masked is not None:
            w = masked.reshape(masked.shape[0], -1, 1).astype(x.dtype)
            x = x * (1 - w) + mask_token.astype(x.dtype) * w
        rates = jnp.asarray(self.drop_path_rates, jnp.float32)
        dropping = rngs is not None and max(self.drop_path_rates) > 0
        keys = jax.random.split(rngs.dropout(), len(rates)) if dropping else None
        start = 0
        for stage in self.stages:
            end = start + stage.depth
            x = stage(x, rates[start:end], None if keys is None else keys[start:end])
            start = end
        tokens = self.norm(x)
        return tokens, jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)


# ---- timm state dicts -> our parameters ------------------------------------------------------------------------------
# (our path, timm key, kind); merging entries are relative to `stages/<s>/` and `layers.<s>.`, block entries to
# `stages/<s>/blocks/<i>/` and `layers.<s>.blocks.<i>.`.
_TOP = [("patch_embed/proj/kernel", "patch_embed.proj.weight", "conv"),
        ("patch_embed/proj/bias", "patch_embed.proj.bias", ""),
        ("patch_embed/norm/scale", "patch_embed.norm.weight", ""),
        ("patch_embed/norm/bias", "patch_embed.norm.bias", ""),
        ("norm/scale", "norm.weight", ""), ("norm/bias", "norm.bias", "")]
_MERGING = [("downsample/norm/scale", "downsample.norm.weight", ""),
            ("downsample/norm/bias", "downsample.norm.bias", ""),
            ("downsample/reduction/kernel", "downsample.reduction.weight", "linear")]
_BLOCK = [("norm1/scale", "norm1.weight", ""), ("norm1/bias", "norm1.bias", ""),
          ("attn/qkv/kernel", "attn.qkv.weight", "linear"), ("attn/qkv/bias", "attn.qkv.bias", ""),
          ("attn/relative_position_bias_table", "attn.relative_position_bias_table", ""),
          ("attn/proj/kernel", "attn.proj.weight", "linear"), ("attn/proj/bias", "attn.proj.bias", ""),
          ("norm2/scale", "norm2.weight", ""), ("norm2/bias", "norm2.bias", ""),
          ("mlp/fc1/kernel", "mlp.fc1.weight", "linear"), ("mlp/fc1/bias", "mlp.fc1.bias", ""),
          ("mlp/fc2/kernel", "mlp.fc2.weight", "linear"), ("mlp/fc2/bias", "mlp.fc2.bias", "")]
# In a state dict but not parameters here: index and mask buffers, the classifier.
_IGNORED = re.compile(r"(^|\.)(relative_position_index|attn_mask)$|^head\.")
_OPTIONAL = re.compile(r"\.attn\.qkv\.bias$")  # qkv_bias=False towers have none


def _entries(depths: Sequence[int]) -> list[tuple[str, str, str]]:
    entries = list(_TOP)
    for s, depth in enumerate(depths):
        if s:
            entries += [(f"stages/{s}/{ours}", f"layers.{s}.{theirs}", kind) for ours, theirs, kind in _MERGING]
        entries += [(f"stages/{s}/blocks/{i}/{ours}", f"layers.{s}.blocks.{i}.{theirs}", kind)
                    for i in range(depth) for ours, theirs, kind in _BLOCK]
    return entries


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return value.T
    if kind == "conv":  # (out, c, ph, pw) -> rows in the (ph, pw, c) order PatchEmbed flattens patches in
        return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
    return value


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; half precision widened (numpy has no bfloat16)
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() and value.element_size() < 4 else value).numpy()
    return np.asarray(value)


def depths_of(keys: Any) -> tuple[int, ...]:
    """Each stage's block count in timm state-dict keys (`layers.<s>.blocks.<i>.`)."""
    found: dict[int, int] = {}
    for key in keys:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key):
            found[int(m.group(1))] = max(found.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    return tuple(found.get(s, 0) for s in range(max(found) + 1)) if found else ()


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")


def flat_from_timm(state_dict: Mapping[str, Any], prefix: str = "",
                   depths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """timm SwinTransformer state dict (numpy arrays or torch tensors) -> {our per-layer path: array}, e.g.
    `stages/2/blocks/5/attn/qkv/kernel`. `prefix`: where the tower sits in the dict. `depths`: the stage depths
    expected (default: those the keys show). The original Microsoft layout (`layers.0.downsample.*`) is renamed as
    timm's checkpoint_filter_fn does. Index/mask buffers and `head.*` are skipped; a missing or unplaced key is a
    ValueError listing them."""
    sd = {k[len(prefix):]: _numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
    if "layers.0.downsample.reduction.weight" in sd:  # downsample at the end of the previous stage
        sd = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
              for k, v in sd.items()}
    entries = _entries(depths_of(sd) if depths is None else tuple(depths))
    missing = [theirs for _, theirs, _ in entries if theirs not in sd and not _OPTIONAL.search(theirs)]
    flat = {ours: _to_ours(sd.pop(theirs), kind) for ours, theirs, kind in entries if theirs in sd}
    extra = sorted(k for k in sd if not _IGNORED.search(k))
    if missing or extra:
        raise ValueError("timm Swin state dict does not fit: "
                         + "; ".join(f"{what} keys: {_listed(keys)}" for what, keys in
                                     (("missing", missing), ("unplaced", extra)) if keys))
    return flat


def params_from_timm(state_dict: Mapping[str, Any], template: Any, prefix: str = "") -> Any:
    """The state dict in `template`'s structure (stacked `blocks/x` or per-layer `blocks/<i>/x`), e.g.
    `nnx.to_pure_dict(nnx.state(model))`."""
    return relayout(flat_from_timm(state_dict, prefix), template)
