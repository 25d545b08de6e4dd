"""Stacked, scanned layers (model.scan_layers, the default) against one module per layer: the same outputs for the
same parameters, the same training, checkpoints of either layout loading into both, and the per-layer rules
(weight decay, sharding, layer-wise lr decay) reading a stacked parameter as its layers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_overrides
from flax import nnx

from jaxretrieval import checkpoint, train
from jaxretrieval.config import load_config
from jaxretrieval.evaluate import restore_params
from jaxretrieval.models import abstract_model, init_params
from jaxretrieval.models.stacking import relayout
from jaxretrieval.sharding import make_mesh, path_name, spec_for

MODELS = {
    "clip": ["model.name=tiny", "model.image.layers=3", "model.text.layers=2"],
    "beit3": ["model.name=beit3_tiny", "model.multiway.layers=3", "model.drop_path=0.2"],
}


def both_layouts(name: str, *extra: str):
    scanned = load_config(None, [*MODELS[name], *extra])
    unrolled = load_config(None, [*MODELS[name], *extra, "model.scan_layers=false"])
    return scanned, unrolled


@pytest.mark.parametrize(("name", "unroll"), [("beit3", 1), ("clip", 1), ("clip", 2)])
def test_scanned_and_unrolled_towers_give_the_same_outputs(name, unroll):
    scanned, unrolled = both_layouts(name, f"model.scan_unroll={unroll}")
    graph_s, shapes_s = abstract_model(scanned)
    graph_u, shapes_u = abstract_model(unrolled)
    params_u = init_params(unrolled, seed=0, precision="fp32")
    params_s = relayout(params_u, shapes_s)
    assert jax.tree.structure(params_s) == jax.tree.structure(shapes_s)
    blocks = "transformer/blocks/" if name == "clip" else "beit3/layers/"
    stacked = {path_name(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params_s)
               if blocks in path_name(k)}
    depths = {3, 2} if name == "clip" else {3}  # image 3 and text 2 layers, or 3 multiway layers
    assert stacked and all(shape[0] in depths and not path.split(blocks)[1][0].isdigit()
                           for path, shape in stacked.items())
    rng = np.random.default_rng(0)
    size, text = scanned.model.image.image_size, scanned.model.text
    pixels = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    tokens = rng.integers(3, text.vocab_size - 1, (3, text.context_length)).astype(np.int32)
    tokens[:, -1] = text.vocab_size - 1

    def outputs(graphdef, params, key):
        model = nnx.merge(graphdef, params)
        return model.encode_image(pixels), model.encode_text(tokens), \
            model(pixels, tokens, rngs=nnx.Rngs(dropout=key))[0]

    key = jax.random.key(7)  # with drop path (beit3): the same draws per layer in both layouts
    for a, b in zip(jax.jit(outputs, static_argnums=0)(graph_s, params_s, key),
                    jax.jit(outputs, static_argnums=0)(graph_u, params_u, key), strict=True):
        assert float(np.abs(np.asarray(a)).max()) > 0.01
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    back = relayout(params_s, shapes_u)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), back, params_u)


def test_twenty_steps_train_the_same_in_both_layouts(demo_root, tmp_path):
    """The same initial parameters (an unrolled checkpoint as train.init_from of both) and 20 steps: the same loss
    curve and final parameters."""
    overrides = tiny_overrides(demo_root, **{"train.steps": 20, "train.checkpoint_every": 20, "train.log_every": 1,
                                             "model.image.layers": 2, "model.text.layers": 2})
    unrolled = load_config(None, [*overrides, "model.scan_layers=false"])
    start = tmp_path / "start"
    checkpoint.write_model(start, init_params(unrolled, seed=3, precision="fp32"), {"config": {}})
    runs = {}
    for layout in ("true", "false"):
        config = load_config(None, [*overrides, f"model.scan_layers={layout}", f"train.init_from={start}"])
        train.train(config, tmp_path / layout)
        records = [json.loads(line) for line in (tmp_path / layout / "metrics.jsonl").read_text().splitlines()]
        runs[layout] = [r["loss"] for r in records if "loss" in r]
    assert len(runs["true"]) == 20
    np.testing.assert_allclose(runs["true"], runs["false"], rtol=1e-5)
    assert runs["true"][-1] < runs["true"][0]


def test_checkpoints_of_either_layout_load_into_both(demo_root, tmp_path):
    """A run trained unrolled (as every checkpoint before scanned layers) evaluates and resumes, optimiser state
    included, in the scanned layout, and back."""
    overrides = tiny_overrides(demo_root, **{"train.steps": 2, "train.checkpoint_every": 2})
    unrolled = load_config(None, [*overrides, "model.scan_layers=false"])
    train.train(unrolled, tmp_path / "run")
    mesh = make_mesh(unrolled.mesh)
    _, params_u, _ = restore_params(unrolled, tmp_path / "run", mesh)
    scanned = load_config(None, [*overrides, "model.scan_layers=true", "train.steps=4"])
    _, params_s, _ = restore_params(scanned, tmp_path / "run", mesh)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 relayout(params_s, params_u), params_u)
    result = train.train(scanned, tmp_path / "run")  # resumes step 2 (parameters and Adam moments) stacked
    assert result["step"] == 4
    _, params_back, meta = restore_params(unrolled, tmp_path / "run", mesh)  # a stacked checkpoint, unrolled
    assert meta["step"] == 4 and "transformer" in params_back["visual"]


def test_per_layer_rules_read_a_stacked_parameter_as_its_layers():
    config = load_config(None, MODELS["clip"])
    _, shapes = abstract_model(config)
    qkv = shapes["visual"]["transformer"]["blocks"]["attn"]["qkv"]
    assert qkv["kernel"].shape[0] == 3 and qkv["bias"].ndim == 2
    name = "visual/transformer/blocks/attn/qkv/kernel"
    assert spec_for(name, qkv["kernel"].shape, [["kernel$", ["fsdp", None]]]) == jax.sharding.PartitionSpec(
        None, "fsdp", None)
    assert spec_for(name, (3, 32, 96), [[".*", "fsdp"]], {"fsdp": 3}) == jax.sharding.PartitionSpec(
        None, None, "fsdp")  # the layer axis divides by 3 too, but stays whole
