"""AdamW with warmup + cosine, decay masked to matrices, global-norm clipping before the update, layer-wise lr decay:
the schedule against its formula, the decay mask against a hand-written list of names, whole runs against
torch.optim.AdamW / Adam driven step by step with per-parameter-group learning rates."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxretrieval.config import TrainConfig, load_config
from jaxretrieval.models import abstract_model
from jaxretrieval.optim import decay_mask, learning_rate, make_optimizer
from jaxretrieval.sharding import path_name


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


# The tiny CLIP's parameters that weight decay reaches, written out (open_clip's rule: no biases, norm gains, class
# token or logit scale; matrices, embedding tables, positional tables and projections decay).
TINY_CLIP_DECAYED = {
    "text/positional_embedding", "text/text_projection", "text/token_embedding/embedding",
    "visual/patch_embed/kernel", "visual/positional_embedding", "visual/proj",
} | {f"{tower}/transformer/blocks/{layer}/kernel" for tower in ("text", "visual")
     for layer in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")}  # stacked: (layers, in, out), decayed; biases
# and norm gains, (layers, width), are vectors per layer: not decayed


@pytest.mark.parametrize(("no_decay", "excluded"), [
    ([], set()),
    (["positional_embedding$", "^text/token_embedding"],
     {"text/positional_embedding", "visual/positional_embedding", "text/token_embedding/embedding"}),
])
def test_decay_mask_on_model_parameters(no_decay: list[str], excluded: set[str]) -> None:
    config = load_config(None, ["model.name=tiny", "model.image.layers=1", "model.text.layers=1"])
    _, params = abstract_model(config.model)
    mask = decay_mask(params, no_decay)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flags = {path_name(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(mask)}
    assert len(flags) == 38 and all(isinstance(flag, bool) for flag in flags.values())
    assert {name for name, flag in flags.items() if flag} == TINY_CLIP_DECAYED - excluded


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


# ---------------------------------------------------------------------------------------------------------
# Whole runs against PyTorch: torch.optim.AdamW (or Adam), one parameter group per tensor, each group's lr set
# before every step from the schedule's formula (times the layer's lr scale), clip_grad_norm_ before the step.

SHAPES = {"embed/embedding": (6, 3), "block/kernel": (3, 4), "block/bias": (4,), "norm/scale": (4,),
          "norm/bias": (4,), "head/kernel": (4, 2), "logit_scale": ()}
DECAYED = {"embed/embedding", "block/kernel", "head/kernel"}  # by hand: matrices and the embedding table
DEPTH = {"embed": 0, "block": 1, "norm": 1, "head": 2, "logit_scale": 2}  # layer-wise decay: depth, top 2


def nested(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def flat_leaves(tree: dict) -> dict[str, np.ndarray]:
    return {path_name(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def gradient_sequence(steps: int, huge_at: int | None, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    grads = []
    for step in range(steps):
        size = 1e3 if step == huge_at else 0.1
        grads.append({name: (size * rng.normal(size=shape)).astype(np.float32) for name, shape in SHAPES.items()})
    return grads


def torch_run(cfg: TrainConfig, start: dict[str, np.ndarray], grads_seq: list[dict[str, np.ndarray]],
              excluded: set[str] = frozenset(), clip: bool = True) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    params = {name: torch.nn.Parameter(torch.from_numpy(np.array(value, np.float32))) for name, value in start.items()}
    groups = []
    for name, p in params.items():
        if cfg.optimizer == "adam":  # torch.optim.Adam: L2 decay on every parameter
            decay = cfg.weight_decay
        else:
            decay = cfg.weight_decay if name in DECAYED - excluded else 0.0
        scale = cfg.layer_decay ** (2 - DEPTH[name.split("/")[0]])
        groups.append({"params": [p], "weight_decay": decay, "lr_scale": scale})
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = kind(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    for step, grads in enumerate(grads_seq):
        for group in optimizer.param_groups:
            group["lr"] = expected_lr(step, cfg) * group["lr_scale"]
        for name, p in params.items():
            p.grad = torch.from_numpy(np.array(grads[name], np.float32))
        if clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        optimizer.step()
    return {name: p.detach().numpy() for name, p in params.items()}


RUNS = {  # name -> (config overrides, the step with a huge gradient, regexes kept out of decay)
    "adamw-clipped": ({"grad_clip": 1.0}, 1, []),
    "adamw-unclipped": ({"grad_clip": 0.0}, 1, []),
    "adamw-no_decay": ({"grad_clip": 1.0}, None, ["^embed/"]),
    "adamw-layer_decay": ({"grad_clip": 1.0, "layer_decay": 0.5}, 2, []),
    "adam-l2": ({"grad_clip": 1.0, "optimizer": "adam", "weight_decay": 0.01}, 1, []),
}


@pytest.mark.parametrize("case", sorted(RUNS))
def test_run_matches_torch(case: str) -> None:
    overrides, huge_at, no_decay = RUNS[case]
    cfg = TrainConfig(**{"steps": 8, "warmup_steps": 3, "lr": 0.05, "end_lr": 0.005, "weight_decay": 0.3,
                         "b1": 0.8, "b2": 0.95, "eps": 1e-6, "no_decay": no_decay, **overrides})
    rng = np.random.default_rng(0)
    start = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads_seq = gradient_sequence(10, huge_at)  # past `steps`: the schedule holds end_lr
    excluded = {name for name in SHAPES if any(re.search(pattern, name) for pattern in no_decay)}
    want = torch_run(cfg, start, grads_seq, excluded)

    depth = (lambda name: DEPTH[name.split("/")[0]], 2) if cfg.layer_decay < 1 else None
    tx = make_optimizer(cfg, depth)

    @jax.jit
    def step(params: dict, state, grads: dict):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = nested(start)
    state = tx.init(params)
    for grads in grads_seq:  # one compiled step, called per step as a training loop does
        params, state = step(params, state, nested(grads))
    ours = flat_leaves(params)
    assert ours.keys() == want.keys()
    print(f"{case}: max |ours - torch| {max(np.abs(ours[name] - want[name]).max() for name in want):.1e}")
    for name in want:
        np.testing.assert_allclose(ours[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
        assert np.abs(want[name] - start[name]).max() > 1e-2, name  # every parameter moved
    if huge_at is not None and cfg.grad_clip > 0:  # the comparison tells clipping apart from no clipping
        unclipped = torch_run(cfg, start, grads_seq, excluded, clip=False)
        assert max(np.abs(unclipped[name] - want[name]).max() for name in want) > 1e-3
