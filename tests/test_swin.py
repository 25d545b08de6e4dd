"""models.swin against timm's SwinTransformer with every parameter random, fp32: token features (forward_features)
and the avg-pooled feature for tiny towers that shift windows, pad them, clamp them to the resolution and merge odd
resolutions, in the scanned and unrolled layouts; the relative position index and shift mask; the state-dict mapping
and its errors; drop path (training only) with gradients through both layouts; and Swin-B at 224 px."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.models import swin
from jaxretrieval.models.stacking import relayout
from jaxretrieval.models.swin import SwinTransformer, flat_from_timm, params_from_timm

torch = pytest.importorskip("torch")
timm_swin = pytest.importorskip("timm.models.swin_transformer")

TOL = 1e-5
BATCH = 2
# name -> (config, each stage's (resolution, window, shift) as timm sets them up)
TINY = {
    # 16x16 and 8x8 patches, window 4: every odd block shifts by 2
    "shifted": ({"image_size": 64, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4},
                [((16, 16), (4, 4), (2, 2)), ((8, 8), (4, 4), (2, 2))]),
    # window 10: 16x16 padded to 20x20 and shifted by 5; at 8x8 the window is clamped to 8 and nothing shifts
    "clamped": ({"image_size": 64, "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4), "window_size": 10},
                [((16, 16), (10, 10), (5, 5)), ((8, 8), (8, 8), (0, 0))]),
    # 14x14 padded to 16 for the windows, an odd depth, 7x7 merged by padding to 8, a last stage of one window
    "padded": ({"image_size": 56, "embed_dim": 16, "depths": (3, 1, 2), "num_heads": (2, 2, 4), "window_size": 4},
               [((14, 14), (4, 4), (2, 2)), ((7, 7), (4, 4), (2, 2)), ((4, 4), (4, 4), (0, 0))]),
}


def randomise(model):
    """Every parameter random (tables std 1, so a wrong index or mask shows); activations stay about unit-sized."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position" in name:
                p.copy_(torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model.eval()


def timm_model(config: dict, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    args = {("img_size" if k == "image_size" else k): v for k, v in config.items()}
    return randomise(timm_swin.SwinTransformer(num_classes=0, patch_size=4, **args, **kwargs))


def state_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ours(state: dict, config: dict, **kwargs) -> SwinTransformer:
    model = SwinTransformer(patch_size=4, **config, rngs=nnx.Rngs(0), **kwargs)
    nnx.update(model, params_from_timm(state, nnx.to_pure_dict(nnx.state(model))))
    return model


def pixels(size: int, batch: int = BATCH, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def run_timm(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))  # (B, H, W, C)
        pooled = model.forward_head(features, pre_logits=True)
    return features.reshape(features.shape[0], -1, features.shape[-1]).numpy(), pooled.numpy()


@nnx.jit
def forward(model: SwinTransformer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model(x)


@nnx.jit
def train_forward(model: SwinTransformer, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model(x, rngs=nnx.Rngs(dropout=key))


def close(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module", params=list(TINY))
def reference(request):
    """(name, config, timm model, state, pixels, timm tokens, timm pooled) for one tiny tower."""
    config, _ = TINY[request.param]
    model = timm_model(config)
    x = pixels(config["image_size"])
    return (request.param, config, model, state_of(model), x, *run_timm(model, x))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_tokens_and_pooled_match_timm(reference, scan):
    name, config, model, state, x, want_tokens, want_pooled = reference
    stages = TINY[name][1]
    mine = ours(state, config, scan=scan)
    assert [(s.resolution, s.window, s.shift) for s in mine.stages] == stages
    tokens, pooled = forward(mine, jnp.asarray(x))
    final = stages[-1][0]
    assert tokens.shape == (BATCH, final[0] * final[1], 2 ** (len(stages) - 1) * config["embed_dim"])
    assert pooled.shape == (BATCH, tokens.shape[-1])
    assert np.abs(want_tokens).max() > 0.5 and np.abs(want_pooled).max() > 0.1
    assert close(tokens, want_tokens) < TOL, close(tokens, want_tokens)
    assert close(pooled, want_pooled) < TOL, close(pooled, want_pooled)


@pytest.mark.parametrize("window", [(4, 4), (3, 5), (7, 7)])
def test_relative_position_index_is_timms(window):
    want = timm_swin.get_relative_position_index(*window).numpy()
    np.testing.assert_array_equal(swin.relative_position_index(window), want)


def test_windows_shifts_and_masks_are_timms():
    for config, _ in TINY.values():
        for stage in timm_model(config).layers:
            window, shift = swin.window_and_shift(stage.output_resolution, (config["window_size"],) * 2)
            for i, block in enumerate(stage.blocks):
                assert block.window_size == window
                assert block.shift_size == (shift if i % 2 else (0, 0))
                if i % 2 and any(shift):
                    np.testing.assert_array_equal(swin.shift_mask(stage.output_resolution, window, shift),
                                                  block.attn_mask.numpy())
                else:
                    assert block.attn_mask is None


def test_mapping_layouts_and_errors():
    config, _ = TINY["padded"]
    state = state_of(timm_model(config))
    flat = flat_from_timm(state)
    np.testing.assert_array_equal(flat["stages/2/blocks/1/attn/qkv/kernel"],
                                  state["layers.2.blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(flat["stages/1/downsample/reduction/kernel"],
                                  state["layers.1.downsample.reduction.weight"].T)
    assert "stages/0/downsample/norm/scale" not in flat
    scanned = nnx.to_pure_dict(nnx.state(ours(state, config, scan=True)))
    table = scanned["stages"][0]["blocks"]["attn"]["relative_position_bias_table"]
    assert table.shape == (3, 7 * 7, 2)  # one stack per stage, leading axis the stage's depth
    np.testing.assert_array_equal(table[2], state["layers.0.blocks.2.attn.relative_position_bias_table"])
    unrolled = nnx.to_pure_dict(nnx.state(ours(state, config, scan=False)))
    jax.tree.map(np.testing.assert_array_equal, relayout(scanned, unrolled), unrolled)
    # the original Microsoft layout: each merging at the end of the stage before
    microsoft = {k.replace(f"layers.{s}.downsample", f"layers.{s - 1}.downsample"): v
                 for k, v in state.items() for s in [int(k.split(".")[1]) if k.startswith("layers.") else 0]}
    assert "layers.0.downsample.reduction.weight" in microsoft
    again = flat_from_timm({f"visual.{k}": v for k, v in microsoft.items()}, prefix="visual.")
    assert again.keys() == flat.keys() and all(np.array_equal(again[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match=r"missing keys: layers\.1\.blocks\.0\.norm2\.bias"):
        flat_from_timm({k: v for k, v in state.items() if k != "layers.1.blocks.0.norm2.bias"})
    with pytest.raises(ValueError, match=r"unplaced keys: layers\.0\.blocks\.0\.attn\.gamma"):
        flat_from_timm({**state, "layers.0.blocks.0.attn.gamma": np.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys: layers\.0\.blocks\.3\.norm1\.weight"):
        flat_from_timm(state, depths=(4, 1, 2))


def test_drop_path_only_in_training_and_gradients_in_both_layouts():
    config, _ = TINY["shifted"]
    reference = timm_model(config, drop_path_rate=0.5)
    x = pixels(config["image_size"], batch=4)
    want_tokens, _ = run_timm(reference, x)
    state = state_of(reference)
    scanned = ours(state, config, scan=True, remat="full", drop_path_rate=0.5)
    unrolled = ours(state, config, scan=False, drop_path_rate=0.5)
    timm_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for stage in reference.layers for b in stage.blocks]
    np.testing.assert_allclose(scanned.drop_path_rates, timm_rates, rtol=1e-6)
    x = jnp.asarray(x)
    assert close(forward(scanned, x)[0], want_tokens) < TOL  # no rngs: the evaluation forward
    dropped = train_forward(scanned, x, jax.random.key(1))[0]
    assert close(dropped, want_tokens) > 1e-2
    assert close(dropped, train_forward(scanned, x, jax.random.key(2))[0]) > 1e-2
    np.testing.assert_array_equal(np.asarray(dropped), np.asarray(train_forward(scanned, x, jax.random.key(1))[0]))

    def loss(model, key):
        tokens, pooled = model(x, rngs=nnx.Rngs(dropout=key))
        return jnp.sum(tokens * jnp.sin(tokens)) + jnp.sum(pooled), tokens

    step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    key = jax.random.key(1)  # the same per-layer draws in both layouts
    (value_s, tokens_s), grads_s = step(scanned, key)
    (value_u, tokens_u), grads_u = step(unrolled, key)
    assert close(tokens_s, dropped) < 1e-6 and close(tokens_u, dropped) < 1e-5
    np.testing.assert_allclose(float(value_s), float(value_u), rtol=1e-5)
    grads_u = nnx.to_pure_dict(grads_u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 relayout(nnx.to_pure_dict(grads_s), grads_u), grads_u)
    leaves = jax.tree.leaves(grads_u)
    assert all(bool(np.all(np.isfinite(g))) for g in leaves)
    assert float(np.abs(grads_u["stages"][1]["blocks"][1]["attn"]["relative_position_bias_table"]).max()) > 0


def test_swin_b_224_matches_timm():
    """The real Swin-B shapes (88M parameters) at batch 1, scanned; our tower built abstractly, then filled."""
    torch.manual_seed(0)
    reference = randomise(timm_swin.SwinTransformer(img_size=224, num_classes=0, **swin.SWIN_B))
    x = pixels(224, batch=1)
    want_tokens, want_pooled = run_timm(reference, x)
    state = state_of(reference)
    del reference
    model = nnx.eval_shape(lambda: SwinTransformer(image_size=224, **swin.SWIN_B, rngs=nnx.Rngs(0)))
    params = params_from_timm(state, nnx.to_pure_dict(nnx.state(model)))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    assert [(s.window, s.shift) for s in model.stages] == [((7, 7), (3, 3))] * 3 + [((7, 7), (0, 0))]
    tokens, pooled = forward(model, jnp.asarray(x))
    assert tokens.shape == (1, 49, 1024) and pooled.shape == (1, 1024)
    assert close(tokens, want_tokens) < TOL, close(tokens, want_tokens)  # measured 3.7e-6 (CPU)
    assert close(pooled, want_pooled) < TOL, close(pooled, want_pooled)
