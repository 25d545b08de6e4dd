"""Micro-batched gradients: gradient caching equals the full-batch gradient, mean accumulation equals the mean
of the micro-batches' own gradients; on one device and on 8 simulated devices."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jaxretrieval.config import load_config
from jaxretrieval.gradients import make_grad_fn, split_micro_batches
from jaxretrieval.models import abstract_model, init_params

MODELS = {
    "clip": ["model.name=tiny", "model.image.layers=2", "model.text.layers=1"],
    "beit3": ["model.name=beit3_tiny", "model.multiway.layers=2"],
}


def setup(name: str, batch: int = 16):
    config = load_config(None, MODELS[name])
    graphdef, _ = abstract_model(config.model)
    params = init_params(config.model, seed=0, precision="fp32")
    rng = np.random.default_rng(0)
    size, text = config.model.image.image_size, config.model.text
    data = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "text": rng.integers(1, text.vocab_size, (batch, text.context_length)).astype(np.int32),
            "group": np.asarray([0, 0, 1, 2, 3, 3, 3, *range(4, batch - 3)], np.int32)}
    return graphdef, params, {k: jnp.asarray(v) for k, v in data.items()}


def assert_trees_close(a, b, atol: float) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradient_cache_equals_the_full_batch_gradient(name):
    graphdef, params, batch = setup(name)
    key = jax.random.key(0)
    loss, scale, grads = jax.jit(make_grad_fn(graphdef))(params, batch, key)
    for micro in (2, 4):
        cached_loss, cached_scale, cached = jax.jit(make_grad_fn(graphdef, micro, "cache"))(params, batch, key)
        assert float(cached_loss) == pytest.approx(float(loss), abs=1e-5)
        assert float(cached_scale[0]) == pytest.approx(float(scale[0]))
        assert_trees_close(cached, grads, atol=1e-5)


def test_mean_accumulation_is_the_mean_of_micro_batch_gradients():
    graphdef, params, batch = setup("clip")
    key = jax.random.key(0)
    whole = jax.jit(make_grad_fn(graphdef))
    chunks = split_micro_batches(batch, 4)
    keys = jax.random.split(key, 4)
    parts = [whole(params, {k: v[m] for k, v in chunks.items()}, keys[m]) for m in range(4)]
    loss, _, grads = jax.jit(make_grad_fn(graphdef, 4, "mean"))(params, batch, key)
    assert float(loss) == pytest.approx(float(np.mean([p[0] for p in parts])), abs=1e-6)
    assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / 4, *[p[2] for p in parts]), atol=1e-6)
    # Micro-batch m holds rows m, m + 4, ...: spread over the devices that hold the batch in blocks.
    np.testing.assert_array_equal(np.asarray(chunks["group"][1]), np.asarray(batch["group"][1::4]))


def test_gradient_cache_on_eight_devices_equals_one_device_full_batch():
    run_python(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from test_gradients import setup, assert_trees_close
from jaxretrieval.gradients import make_grad_fn
from jaxretrieval.config import MeshConfig
from jaxretrieval.sharding import make_mesh, BATCH_AXES
graphdef, params, batch = setup("clip", batch=32)
key = jax.random.key(0)
loss, _, grads = jax.jit(make_grad_fn(graphdef))(params, batch, key)
mesh = make_mesh(MeshConfig(data=4, fsdp=2))
sharded = jax.device_put(batch, NamedSharding(mesh, P(BATCH_AXES)))
cached_loss, _, cached = jax.jit(make_grad_fn(graphdef, 2, "cache"))(params, sharded, key)
assert abs(float(cached_loss) - float(loss)) < 1e-5, (cached_loss, loss)
assert_trees_close(cached, grads, atol=1e-5)
print("ok")
""", devices=8)


def test_train_step_with_micro_batches_takes_the_full_batch_step():
    from jaxretrieval.sharding import make_mesh
    from jaxretrieval.train import setup_training

    _, _, batch = setup("clip")
    results = []
    for micro in (1, 4):
        config = load_config(None, [*MODELS["clip"], "train.batch_size=16", f"train.micro_batches={micro}"])
        _, params, opt_state, step_fn = setup_training(config, make_mesh(config.mesh))
        params, _, metrics = step_fn(params, opt_state, batch, np.int32(1))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), params))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-4)
    assert_trees_close(results[1][2], results[0][2], atol=1e-6)
