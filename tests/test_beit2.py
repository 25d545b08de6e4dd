"""models.beit2 against timm's BEiT in the BEiT-2 arrangement (relative position bias per block, layer scale, q/v
biases, no absolute positions) with every parameter random, fp32: tokens and pooled features for each pooling,
scanned and unrolled layouts with drop path and remat, the state-dict mapping both ways, relative-position-table
resizing (against timm, and the bicubic spline against scipy's FITPACK), and a bf16 forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.models import beit2
from jaxretrieval.models.beit2 import Beit2, flat_from_timm, resize_rel_pos_bias_table, timm_from_params
from jaxretrieval.models.stacking import relayout

torch = pytest.importorskip("torch")
timm_beit = pytest.importorskip("timm.models.beit")

SIZE, PATCH, WIDTH, LAYERS, HEADS = 64, 16, 32, 2, 4
TOL = 1e-5


def timm_model(*, size: int = SIZE, pool: str = "avg", abs_pos: bool = False, seed: int = 0, patch: int = PATCH,
               width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS):
    """A tiny timm Beit with every parameter random: tables (std 1, so a wrong index shows), gammas, q/v biases,
    norms, cls token, positions."""
    torch.manual_seed(seed)
    model = timm_beit.Beit(img_size=size, patch_size=patch, num_classes=0, global_pool=pool, embed_dim=width,
                           depth=layers, num_heads=heads, use_abs_pos_emb=abs_pos, use_rel_pos_bias=True,
                           init_values=0.1).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position" in name:
                p.copy_(torch.randn_like(p))
            elif p.ndim > 1 and name != "cls_token":  # activations stay about unit-sized
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def state_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def template(model: Beit2):
    return nnx.to_pure_dict(nnx.state(model))


def ours(state: dict, *, pooling: str, size: int = SIZE, abs_pos: bool = False, prefix: str = "",
         **kwargs) -> Beit2:
    model = Beit2(image_size=size, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS, pooling=pooling,
                  abs_pos_emb=abs_pos, rngs=nnx.Rngs(0), **kwargs)
    nnx.update(model, beit2.params_from_timm(state, template(model), prefix))
    return model


def pixels(size: int = SIZE, batch: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def run_timm(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        return tokens.numpy(), model.forward_head(tokens, pre_logits=True).numpy()


@nnx.jit
def forward(model: Beit2, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model(x)


def close(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize(("pool", "pooling", "abs_pos"), [("avg", "avg", False), ("token", "cls", False),
                                                         ("avg", "avg", True)])
def test_tokens_and_pooled_match_timm(pool, pooling, abs_pos):
    reference = timm_model(pool=pool, abs_pos=abs_pos)
    x = pixels()
    want_tokens, want_pooled = run_timm(reference, x)
    tokens, pooled = forward(ours(state_of(reference), pooling=pooling, abs_pos=abs_pos), jnp.asarray(x))
    assert tokens.shape == (3, 1 + (SIZE // PATCH) ** 2, WIDTH) and pooled.shape == (3, WIDTH)
    assert np.abs(want_pooled).max() > 0.1
    assert close(tokens, want_tokens) < TOL
    assert close(pooled, want_pooled) < TOL


def test_x2vlm_pooling_normalises_patches_then_prepends_their_mean():
    """X2-VLM's VisionTransformer.forward (use_mean_pooling): CLS dropped, fc_norm per patch token, mean in front."""
    reference = timm_model()
    x = pixels()
    with torch.no_grad():
        hidden = reference.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
        patches = reference.fc_norm(hidden[:, 1:])
        want = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1).numpy()
    tokens, pooled = forward(ours(state_of(reference), pooling="x2vlm"), jnp.asarray(x))
    assert close(tokens, want) < TOL
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(tokens[:, 0]))
    assert close(pooled, run_timm(reference, x)[1]) > 1e-2  # not timm's fc_norm(mean)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_relative_position_index_is_timms(grid):
    want = timm_beit.gen_relative_position_index(grid).numpy()
    np.testing.assert_array_equal(beit2.relative_position_index(grid), want)


def test_scanned_and_unrolled_give_the_same_outputs_drops_and_gradients():
    state = state_of(timm_model())
    kwargs = {"pooling": "x2vlm", "drop_path_rate": 0.5}
    scanned = ours(state, scan=True, remat="full", **kwargs)
    unrolled = ours(state, scan=False, **kwargs)
    stacked = template(scanned)["blocks"]["attn"]["relative_position_bias_table"]
    assert stacked.shape == (LAYERS, 7 * 7 + 3, HEADS)
    x = jnp.asarray(pixels())

    def loss(model, key):
        tokens, pooled = model(x, rngs=nnx.Rngs(dropout=key))
        return jnp.sum(tokens**2) + jnp.sum(pooled), (tokens, pooled)

    step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    key = jax.random.key(3)  # the same per-layer draws in both layouts
    (value_s, out_s), grads_s = step(scanned, key)
    (value_u, out_u), grads_u = step(unrolled, key)
    assert close(out_s[0], out_u[0]) < 1e-6 and close(out_s[1], out_u[1]) < 1e-6
    assert close(out_s[0], forward(scanned, x)[0]) > 1e-2  # paths were dropped
    np.testing.assert_allclose(float(value_s), float(value_u), rtol=1e-6)
    grads_u = nnx.to_pure_dict(grads_u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 relayout(nnx.to_pure_dict(grads_s), grads_u), grads_u)
    assert float(jnp.abs(grads_u["blocks"][0]["attn"]["relative_position_bias_table"]).max()) > 0


def test_mapping_is_exact_both_ways_in_either_layout():
    reference = timm_model()
    state = state_of(reference)
    for scan in (True, False):
        model = ours(state, pooling="avg", scan=scan)
        back = timm_from_params(template(model))
        assert back.keys() == state.keys()
        for key, value in back.items():
            np.testing.assert_array_equal(value, state[key], err_msg=key)
    # X2-VLM's checkpoint: under vision_encoder., with persistent index buffers
    flat = flat_from_timm(state)
    x2vlm = timm_from_params(flat, prefix="vision_encoder.", with_index=True)
    index = x2vlm["vision_encoder.blocks.1.attn.relative_position_index"]
    np.testing.assert_array_equal(index, reference.blocks[1].attn.relative_position_index.numpy())
    assert index.dtype == np.int64
    again = flat_from_timm({**x2vlm, "text_encoder.x": np.zeros(1)}, prefix="vision_encoder.")
    assert again.keys() == flat.keys() and all(np.array_equal(again[k], flat[k]) for k in flat)
    np.testing.assert_array_equal(flat["blocks/1/attn/qkv/kernel"], state["blocks.1.attn.qkv.weight"].T)
    with pytest.raises(ValueError, match="no place"):
        flat_from_timm({**state, "blocks.0.attn.k_proj.weight": np.zeros(1)})


def test_a_shared_table_is_copied_into_every_block():
    """BEiT-2 pre-training checkpoints hold one shared table; X2-VLM's load_pretrained_beit2 gives each block a copy."""
    state = state_of(timm_model())
    shared = state["blocks.0.attn.relative_position_bias_table"]
    state = {k: v for k, v in state.items() if "relative_position_bias_table" not in k}
    flat = flat_from_timm({**state, "rel_pos_bias.relative_position_bias_table": shared})
    for i in range(LAYERS):
        np.testing.assert_array_equal(flat[f"blocks/{i}/attn/relative_position_bias_table"], shared)


@pytest.mark.parametrize("scan", [True, False])
def test_initial_values_follow_beit(scan):
    params = template(Beit2(image_size=SIZE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS,
                            rngs=nnx.Rngs(0), scan=scan))
    per_layer = relayout(params, {k: 0 for k in flat_from_timm(state_of(timm_model()))})
    for i in range(LAYERS):
        np.testing.assert_array_equal(per_layer[f"blocks/{i}/gamma_1"], np.full(WIDTH, 0.1, np.float32))
        for zero in ("attn/q_bias", "attn/v_bias", "attn/relative_position_bias_table"):
            assert not np.any(per_layer[f"blocks/{i}/{zero}"])
        for rescaled in ("attn/proj/kernel", "mlp/fc2/kernel"):  # fix_init_weight: / sqrt(2 (i + 1))
            std = float(np.std(per_layer[f"blocks/{i}/{rescaled}"]))
            assert std == pytest.approx(0.02 / np.sqrt(2 * (i + 1)), rel=0.12), (i, rescaled)
    assert "fc_norm" in params and "norm" not in params and "pos_embed" not in params


def test_linear_resize_is_timms_and_keeps_the_cls_rows():
    table = np.random.default_rng(0).standard_normal((7 * 7 + 3, HEADS)).astype(np.float32)
    want = timm_beit.resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=(6, 6),
                                               new_bias_shape=(11 * 11 + 3, HEADS)).numpy()
    got = resize_rel_pos_bias_table(table, 6, method="linear")
    assert got.shape == want.shape and got.dtype == np.float32
    assert close(got, want) < 1e-6
    np.testing.assert_array_equal(got[-3:], table[-3:])
    np.testing.assert_array_equal(resize_rel_pos_bias_table(table, 4, old_window=4), table)
    smaller = timm_beit.resize_rel_pos_bias_table(torch.from_numpy(table), new_window_size=(3, 3),
                                                  new_bias_shape=(5 * 5 + 3, HEADS)).numpy()
    assert close(resize_rel_pos_bias_table(table, (3, 3), old_window=(4, 4), method="linear"), smaller) < 1e-6


def test_cubic_resize_is_fitpacks_interpolating_spline():
    """X2-VLM's loader calls scipy's interp2d(kind="cubic") (gone since scipy 1.14); on a grid it fitted FITPACK's
    s=0 bicubic spline, which RectBivariateSpline(s=0) fits too (both evaluate clamped to the data range)."""
    interpolate = pytest.importorskip("scipy.interpolate")
    table = np.random.default_rng(1).standard_normal((7 * 7 + 3, HEADS)).astype(np.float32)
    got = resize_rel_pos_bias_table(table, 6)
    source, target = beit2._source_offsets(7, 11), np.arange(-5.0, 6.0)
    assert source[-1] == pytest.approx(4.75)  # the ratio stops at 1.5 (1 + 1.5 + 1.5^2): +-5 lie beyond, clamped
    assert beit2._source_offsets(27, 47)[-1] == pytest.approx(23.0, abs=1e-4)  # 224 -> 384 px: spread over +-23
    for head in range(HEADS):
        spline = interpolate.RectBivariateSpline(source, source, table[:-3, head].reshape(7, 7), kx=3, ky=3, s=0)
        assert close(got[:-3, head].reshape(11, 11), spline(target, target)) < 1e-5
    assert close(got, resize_rel_pos_bias_table(table, 6, method="linear")) > 1e-3


def test_a_resized_model_matches_timm_at_96_px():
    reference = timm_model()
    state = state_of(reference)
    reference.set_input_size(img_size=96)  # timm resizes each block's table (bilinear)
    x = pixels(96)
    want_tokens, want_pooled = run_timm(reference, x)
    resized = {k: resize_rel_pos_bias_table(v, 6, method="linear") if k.endswith("bias_table") else v
               for k, v in state.items()}
    tokens, pooled = forward(ours(resized, pooling="avg", size=96), jnp.asarray(x))
    assert close(tokens, want_tokens) < TOL and close(pooled, want_pooled) < TOL
    with pytest.raises(ValueError, match="resize it"):
        ours(state, pooling="avg")(jnp.asarray(x))


def test_bf16_compute_stays_near_fp32():
    state = state_of(timm_model())
    x = jnp.asarray(pixels())
    tokens32, pooled32 = forward(ours(state, pooling="x2vlm"), x)
    tokens16, pooled16 = forward(ours(state, pooling="x2vlm", dtype=jnp.bfloat16), x)
    assert tokens16.dtype == jnp.bfloat16 and pooled16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(tokens16.astype(jnp.float32))))
    scale = float(jnp.abs(tokens32).max())
    assert 0 < close(tokens16, tokens32) < 0.05 * scale
    assert close(pooled16, pooled32) < 0.05 * float(jnp.abs(pooled32).max())
