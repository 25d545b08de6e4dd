"""AdamW with warmup + cosine, decay masked to matrices, global-norm clipping before the update."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxretrieval.config import TrainConfig, load_config
from jaxretrieval.models import abstract_model
from jaxretrieval.optim import decay_mask, learning_rate, make_optimizer


def expected_lr(step: int, cfg: TrainConfig) -> float:
    """Linear 0 -> lr over warmup_steps, then cosine lr -> end_lr reaching end_lr at step `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    t = min(step - cfg.warmup_steps, cfg.steps - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
    return cfg.end_lr + (cfg.lr - cfg.end_lr) * 0.5 * (1 + math.cos(math.pi * t))


def lr_values(schedule, n: int) -> np.ndarray:
    """schedule(0), ..., schedule(n - 1), in one jitted call (eager optax dispatch is slow on CPU)."""
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)), np.float64)


@pytest.mark.parametrize(("steps", "warmup", "lr", "end_lr"), [(100, 10, 1e-3, 1e-5), (50, 7, 0.5, 0.0)])
def test_learning_rate_schedule(steps, warmup, lr, end_lr) -> None:
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=lr, end_lr=end_lr)
    schedule = learning_rate(cfg)
    values = lr_values(schedule, steps + 1)
    assert values[0] == 0.0
    assert values[warmup] == pytest.approx(lr, rel=1e-6)
    assert values[steps] == pytest.approx(end_lr, rel=1e-5, abs=1e-9)
    assert values.max() == pytest.approx(lr, rel=1e-6)
    np.testing.assert_allclose(values, [expected_lr(i, cfg) for i in range(steps + 1)], rtol=1e-5, atol=1e-9)
    assert np.all(np.diff(values[: warmup + 1]) > 0)  # warmup rises strictly
    assert np.all(np.diff(values[warmup:]) <= 1e-9)  # then never rises
    assert np.all(values[warmup:] >= end_lr - 1e-9)
    # halfway through the decay: the cosine midpoint
    mid = warmup + (steps - warmup) // 2
    if (steps - warmup) % 2 == 0:
        assert values[mid] == pytest.approx(0.5 * (lr + end_lr), rel=1e-5)
    assert lr_values(schedule, steps + 50)[-1] == pytest.approx(end_lr, abs=1e-9)  # stays at the end


def test_learning_rate_without_warmup_starts_at_peak() -> None:
    values = lr_values(learning_rate(TrainConfig(steps=20, warmup_steps=0, lr=0.1, end_lr=0.0)), 21)
    assert values[0] == pytest.approx(0.1)
    assert values[20] == pytest.approx(0.0, abs=1e-9)
    assert values[10] == pytest.approx(0.05, rel=1e-5)


def test_learning_rate_warmup_longer_than_training() -> None:
    schedule = learning_rate(TrainConfig(steps=10, warmup_steps=50, lr=0.1))
    values = lr_values(schedule, 11)
    assert values[0] == 0.0
    assert np.all(np.isfinite(values)) and values.max() <= 0.1 * (1 + 1e-6)
    assert np.all(np.diff(values) > 0)  # still warming up linearly, capped at the training length
    assert values[10] == pytest.approx(0.1, rel=1e-5)


def test_decay_mask_on_model_parameters() -> None:
    config = load_config(None, ["model.name=tiny", "model.image.layers=1", "model.text.layers=1"])
    _, params = abstract_model(config.model)
    mask = decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for (path, leaf), flag in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask), strict=True):
        assert flag == (len(leaf.shape) >= 2), jax.tree_util.keystr(path)
    assert mask["logit_scale"] is False
    assert mask["visual"]["class_embedding"] is False
    assert mask["visual"]["ln_pre"]["scale"] is False
    assert mask["visual"]["transformer"]["blocks"][0]["attn"]["qkv"]["bias"] is False
    assert mask["visual"]["transformer"]["blocks"][0]["attn"]["qkv"]["kernel"] is True
    assert mask["visual"]["patch_embed"]["kernel"] is True
    assert mask["text"]["token_embedding"]["embedding"] is True
    assert mask["text"]["text_projection"] is True


def small_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "s": np.float32(1.5),
    }


def test_weight_decay_reaches_matrices_only() -> None:
    # Zero gradients: Adam's step is 0, so the whole update is decoupled weight decay -lr * wd * p.
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.1, weight_decay=0.5, grad_clip=1.0)
    tx = make_optimizer(cfg)
    params = small_params()
    _, (updates,) = run(tx, params, [jax.tree.map(np.zeros_like, params)])
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], 0.0)
    np.testing.assert_array_equal(updates["s"], 0.0)


def test_adamw_hyperparameters_are_passed_through() -> None:
    # One step by hand: m = (1-b1) g, v = (1-b2) g^2, bias-corrected, eps outside the root, decay on w only.
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.01, b1=0.8, b2=0.9, eps=0.3, weight_decay=0.1, grad_clip=0.0)
    tx = make_optimizer(cfg)
    params = small_params()
    grads = jax.tree.map(lambda p: np.full_like(p, 0.1), params)
    _, (updates,) = run(tx, params, [grads])
    adam = 0.1 / (0.1 + 0.3)  # m_hat = g, sqrt(v_hat) = |g|
    np.testing.assert_allclose(updates["w"], -0.01 * (adam + 0.1 * params["w"]), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -0.01 * adam * np.ones(4), rtol=1e-5)


def run(tx, params, grads_seq):
    """Applies the optimiser over a sequence of gradients, in one jitted call; final params and the updates."""

    @jax.jit
    def steps(params, grads_seq):
        state = tx.init(params)
        out = []
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append(updates)
        return params, out

    return steps(params, grads_seq)


def test_gradient_clipping_happens_before_adamw() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.01, weight_decay=0.1, grad_clip=1.0)
    params = small_params()
    rng = np.random.default_rng(1)
    huge = jax.tree.map(lambda p: (1e4 * rng.normal(size=np.shape(p))).astype(np.float32), params)
    small = jax.tree.map(lambda p: (1e-2 * rng.normal(size=np.shape(p))).astype(np.float32), params)

    def norm(g):
        return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(g))))

    assert norm(huge) > 1e4 and norm(small) < cfg.grad_clip
    grads_seq = [huge, small, small]

    def clip(g):  # by hand: scale the whole tree to global norm grad_clip when it is larger
        return jax.tree.map(lambda x: (x * min(1.0, cfg.grad_clip / norm(g))).astype(np.float32), g)

    plain_adamw = optax.adamw(
        learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    ours, ours_updates = run(make_optimizer(cfg), params, grads_seq)
    manual, manual_updates = run(plain_adamw, params, [clip(g) for g in grads_seq])
    unclipped, _ = run(plain_adamw, params, grads_seq)
    for a, b in zip(jax.tree.leaves(ours_updates), jax.tree.leaves(manual_updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # The check can tell: without clipping the huge step dominates Adam's second moment, and the later steps differ.
    diff = max(
        float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(unclipped), strict=True)
    )
    assert diff > 1e-4


def test_grad_clip_zero_disables_clipping() -> None:
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.01, grad_clip=0.0)
    params = small_params()
    huge = jax.tree.map(lambda p: np.full_like(p, 1e4), params)
    small = jax.tree.map(lambda p: np.full_like(p, 1e-2), params)
    plain_adamw = optax.adamw(
        learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    ours, _ = run(make_optimizer(cfg), params, [huge, small])
    expected, _ = run(plain_adamw, params, [huge, small])
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_optimizer_follows_the_schedule() -> None:
    # Zero gradients again: the update is -lr(step) * wd * p, so it traces the schedule step by step.
    cfg = TrainConfig(steps=8, warmup_steps=3, lr=0.2, end_lr=0.02, weight_decay=1.0, grad_clip=1.0)
    tx = make_optimizer(cfg)
    params = {"w": np.ones((2, 2), np.float32)}
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)  # params held fixed, so each update is exactly -lr(step) * p
    for step in range(cfg.steps):
        updates, state = update({"w": np.zeros((2, 2), np.float32)}, state, params)
        np.testing.assert_allclose(updates["w"], -expected_lr(step, cfg) * np.ones((2, 2)), rtol=1e-5, atol=1e-9)
