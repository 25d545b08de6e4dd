"""BLIP-2's clip_L image encoder (jaxretrieval.models.lavis_vit) against LAVIS's forward written over open_clip's
modules: every token after all but the last block, no ln_post or projection, and LAVIS's position-grid resize."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import torch.nn.functional as F  # noqa: E402
from open_clip.model import QuickGELU  # noqa: E402
from open_clip.transformer import VisionTransformer as TorchViT  # noqa: E402

from convert.clip_layout import OPENAI  # noqa: E402
from jaxretrieval.models.lavis_vit import (  # noqa: E402
    LavisViT,
    clip_vit_l,
    depth,
    lavis_resize_positions,
    truncate_layers,
    vision_tokens,
)
from jaxretrieval.models.stacking import relayout  # noqa: E402
from jaxretrieval.models.vit import VisionTransformer  # noqa: E402

IMAGE, PATCH, WIDTH, LAYERS, HEAD_WIDTH = 32, 8, 64, 4, 16


def torch_tower(image: int = IMAGE) -> TorchViT:
    """open_clip's ViT in OpenAI's form (QuickGELU), every tensor random so no mapping error hides."""
    model = TorchViT(image_size=image, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=WIDTH // HEAD_WIDTH,
                     mlp_ratio=4.0, output_dim=32, act_layer=QuickGELU)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def lavis_reference(model: TorchViT, pixels: np.ndarray, blocks: int) -> np.ndarray:
    """LAVIS clip_vit.VisionTransformer.forward (a model built with `blocks` layers): conv1, class token (added to
    zeros), positional embedding, ln_pre, the blocks, every token out; no ln_post, no proj."""
    with torch.no_grad():
        x = model.conv1(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = model.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
        x = model.ln_pre(x)
        batch_first = getattr(model.transformer, "batch_first", True)
        x = x if batch_first else x.permute(1, 0, 2)
        for block in model.transformer.resblocks[:blocks]:
            x = block(x)
        return (x if batch_first else x.permute(1, 0, 2)).numpy()


def lavis_interpolate(table: np.ndarray, grid: int) -> np.ndarray:
    """LAVIS clip_vit.interpolate_pos_embed on one table (its model supplies only the new grid size)."""
    old = torch.from_numpy(table)
    if grid * grid + 1 == old.shape[0]:
        return table
    tok, img = old[:1], old[1:]
    side = int(math.sqrt(len(img)))
    img = img.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=True)
    img = img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)[0]
    return torch.cat([tok, img], dim=0).numpy()


def our_tower(model: TorchViT, *, scan: bool, layers: int = LAYERS, image: int = IMAGE) -> VisionTransformer:
    """Our tower holding `model`'s weights, mapped by the CLIP converter's OpenAI-layout rules."""
    state = {f"visual.{key}": value.detach().numpy() for key, value in model.state_dict().items()}
    flat = {rule.ours.removeprefix("visual/"): rule.transform.to_ours([state[key] for key in rule.theirs])
            for rule in OPENAI.rules(LAYERS, 0) if rule.ours.startswith("visual/")}
    options = {"image_size": image, "patch_size": PATCH, "width": WIDTH, "heads": WIDTH // HEAD_WIDTH,
               "mlp_ratio": 4.0, "embed_dim": 32, "activation": "quick_gelu"}
    per_layer = VisionTransformer(layers=LAYERS, scan=False, rngs=nnx.Rngs(1), **options)
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: np.asarray(flat["/".join(str(k.key) for k in path)], np.float32),
        nnx.to_pure_dict(nnx.state(per_layer, nnx.Param)))
    vit = VisionTransformer(layers=layers, scan=scan, rngs=nnx.Rngs(2), **options)
    template = nnx.to_pure_dict(nnx.state(vit, nnx.Param))
    params = relayout(truncate_layers(params, layers), template) if scan else truncate_layers(params, layers)
    state_ours = nnx.state(vit, nnx.Param)
    nnx.replace_by_pure_dict(state_ours, params)
    nnx.update(vit, state_ours)
    return vit


@pytest.fixture(scope="module")
def reference() -> TorchViT:
    return torch_tower()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


def assert_close(ours: jax.Array, theirs: np.ndarray, tol: float = 1e-5) -> None:
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    assert np.abs(theirs).max() > 0.1, "a degenerate comparison"
    diff = np.abs(ours - theirs).max()
    assert diff <= tol, f"max abs diff {diff}"


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "per-layer"])
def test_tokens_match_lavis_forward(reference, pixels, scan: bool) -> None:
    vit = our_tower(reference, scan=scan)
    assert depth(vit) == LAYERS
    tokens = vision_tokens(vit, pixels)  # LAVIS: all but the last block
    assert tokens.shape == (2, (IMAGE // PATCH) ** 2 + 1, WIDTH)
    assert_close(tokens, lavis_reference(reference, pixels, LAYERS - 1))
    assert_close(vision_tokens(vit, pixels, 1), lavis_reference(reference, pixels, 1))
    assert_close(vision_tokens(vit, pixels, LAYERS), lavis_reference(reference, pixels, LAYERS))
    # The blocks left out matter: the full tower's tokens differ from LAVIS's.
    assert np.abs(lavis_reference(reference, pixels, LAYERS) - np.asarray(tokens)).max() > 1e-2


def test_truncated_tower_and_module_agree(reference, pixels) -> None:
    expected = lavis_reference(reference, pixels, LAYERS - 1)
    for scan in (True, False):
        short = our_tower(reference, scan=scan, layers=LAYERS - 1)
        wrapped = LavisViT(short, layers=LAYERS - 1)
        assert (depth(short), wrapped.num_features) == (LAYERS - 1, WIDTH)
        assert_close(nnx.jit(lambda m, x: m(x))(wrapped, pixels), expected)
    full = LavisViT(our_tower(reference, scan=True))
    assert full.layers == LAYERS - 1
    assert_close(full(pixels), expected)
    with pytest.raises(ValueError):
        LavisViT(full.visual, layers=LAYERS + 1)


def test_gradients_reach_only_the_kept_blocks(reference, pixels) -> None:
    model = LavisViT(our_tower(reference, scan=True))
    grads = nnx.grad(lambda m: jnp.sum(m(pixels) ** 2))(model)
    blocks = nnx.to_pure_dict(grads)["visual"]["transformer"]["blocks"]
    per_layer = np.abs(np.asarray(blocks["mlp"]["fc"]["kernel"])).sum(axis=(1, 2))
    assert np.all(per_layer[:-1] > 0) and per_layer[-1] == 0


@pytest.mark.parametrize("old,new", [(16, 26), (4, 6), (6, 3), (5, 5), (3, 1)])
def test_resize_positions_match_lavis(old: int, new: int) -> None:
    table = np.random.default_rng(old).normal(size=(old * old + 1, 24)).astype(np.float32)
    ours = lavis_resize_positions(table, new)
    assert ours.shape == (new * new + 1, 24) and ours.dtype == np.float32
    # PyTorch sums the taps in float32, we in float64: a few float32 ulps apart on values up to ~4.
    np.testing.assert_allclose(ours, lavis_interpolate(table, new), rtol=0, atol=4e-6)


def test_larger_images_as_lavis_builds_them(reference) -> None:
    """LAVIS at another size (BLIP-2's 364 px for ViT-L/14): the 224 table resized once, then the same forward."""
    image = 48  # grid 4 -> 6, as 16 -> 26
    table = reference.positional_embedding.detach().numpy()
    big = torch_tower(image)
    state = reference.state_dict()
    state["positional_embedding"] = torch.from_numpy(lavis_interpolate(table, image // PATCH))
    big.load_state_dict(state)
    vit = our_tower(big, scan=True, image=image)
    vit.positional_embedding[...] = jnp.asarray(lavis_resize_positions(table, image // PATCH))  # ours, not torch's
    pixels = np.random.default_rng(1).normal(size=(1, image, image, 3)).astype(np.float32)
    assert_close(vision_tokens(vit, pixels), lavis_reference(big, pixels, LAYERS - 1))


def test_vit_l14_shapes() -> None:
    """BLIP-2's sizes, by shape alone: 23 of ViT-L/14's 24 blocks, 257 tokens at 224 px, 677 at 364 (grid 26)."""
    model = nnx.eval_shape(lambda: clip_vit_l(rngs=nnx.Rngs(0)))
    assert (depth(model.visual), model.layers, model.num_features) == (24, 23, 1024)
    big = nnx.eval_shape(lambda: clip_vit_l(364, rngs=nnx.Rngs(0), truncated=True))
    assert (depth(big.visual), big.layers, big.visual.positional_embedding.shape) == (23, 23, (677, 1024))
    for m, size, tokens in ((model, 224, 257), (big, 364, 677)):
        out = nnx.eval_shape(lambda m, x: m(x), m, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        assert (out.shape, out.dtype) == ((1, tokens, 1024), jnp.float32)


@pytest.mark.slow
def test_vit_l14_runs() -> None:
    """The real size once with random weights at batch 1 (about 17 s on two idle CPU cores, 30 s under load)."""
    model = clip_vit_l(rngs=nnx.Rngs(0))
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
    tokens = nnx.jit(lambda m, x: m(x))(model, pixels)
    assert tokens.shape == (1, 257, 1024) and bool(jnp.all(jnp.isfinite(tokens)))
