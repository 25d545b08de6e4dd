"""The one train step across arrangements of 8 simulated devices: data parallel, FSDP, FSDP + tensor parallel, and
the local / gathered / ring losses (InfoNCE; sigmoid local and ring) give the same losses step after step, while
parameters and optimizer state really are split as the rules say. The gathered sigmoid loss's value and gradients
are checked against the full batch in test_distributed_losses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_python

from jaxretrieval.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # 8 simulated devices in fresh interpreters

STEPS = 12  # data parallel against FSDP (+ tensor)
VARIANT_STEPS = 6  # the loss variants, each also checked alone in test_distributed_losses

RUNS = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_gradients import MODELS
from jaxretrieval.config import load_config
from jaxretrieval.sharding import global_batch, make_mesh, path_name
from jaxretrieval.train import setup_training

SIGMOID = ["train.loss=sigmoid", "model.init_logit_scale=2.3026", "model.init_logit_bias=-10"]
RUNS = {{
    "clip/dp": ("clip", ["mesh.data=8"]),
    "clip/fsdp": ("clip", ["mesh.data=2", "mesh.fsdp=4", "sharding=fsdp"]),
    "clip/fsdp_tensor": ("clip", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding=fsdp_tensor"]),
    "clip/gathered": ("clip", ["mesh.data=8", "train.loss_variant=gathered"]),
    "clip/ring": ("clip", ["mesh.data=2", "mesh.fsdp=4", "sharding=fsdp", "train.loss_variant=ring"]),
    "clip/ring_cache": ("clip", ["mesh.data=8", "train.loss_variant=ring", "train.micro_batches=2"]),
    "sigmoid/dp": ("clip", ["mesh.data=8", *SIGMOID]),
    "sigmoid/ring": ("clip", ["mesh.data=2", "mesh.fsdp=4", "sharding=fsdp", "train.loss_variant=ring", *SIGMOID]),
    "beit3/dp": ("beit3", ["mesh.data=8"]),
    "beit3/fsdp_tensor": ("beit3", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sharding=fsdp_tensor"]),
}}
out = {{}}
for name, (model, overrides) in RUNS.items():
    if {only!r} and not name.startswith({only!r}):
        continue
    steps = {steps} if name.endswith(("dp", "fsdp", "fsdp_tensor")) else {variant_steps}  # of one schedule
    config = load_config(None, [*MODELS[model], "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=2",
                                "train.steps={steps}", *overrides])
    mesh = make_mesh(config.mesh)
    _, params, opt_state, step_fn = setup_training(config, mesh)
    size, text = config.model.image.image_size, config.model.text
    losses, biases = [], []
    for step in range(1, steps + 1):
        rng = np.random.default_rng(step)
        batch = {{"image": rng.normal(size=(32, size, size, 3)).astype(np.float32),
                 "text": rng.integers(1, text.vocab_size, (32, text.context_length)).astype(np.int32),
                 "group": np.repeat(np.arange(16, dtype=np.int32), 2)}}
        params, opt_state, metrics = step_fn(params, opt_state, global_batch(batch, mesh), np.int32(step))
        losses.append(float(metrics["loss"]))
        biases.append(float(metrics.get("logit_bias", np.nan)))
    shards = {{path_name(p): [list(x.shape), list(x.addressable_shards[0].data.shape)]
              for p, x in jax.tree_util.tree_leaves_with_path(params)}}
    out[name] = {{"losses": losses, "biases": biases, "shards": shards}}
print("RESULT " + json.dumps(out))
"""


def run_arrangements(only: str = "") -> dict:
    result = run_python(RUNS.format(tests=str(Path(__file__).parent), steps=STEPS, variant_steps=VARIANT_STEPS,
                                    only=only), devices=8,
                        timeout=900)
    return json.loads([x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_arrangements()


@pytest.mark.parametrize("name, reference", [
    ("clip/fsdp", "clip/dp"), ("clip/fsdp_tensor", "clip/dp"), ("clip/gathered", "clip/dp"), ("clip/ring", "clip/dp"),
    ("clip/ring_cache", "clip/dp"), ("sigmoid/ring", "sigmoid/dp"), ("beit3/fsdp_tensor", "beit3/dp"),
])
def test_same_losses_step_by_step(runs, name, reference) -> None:
    losses = np.asarray(runs[name]["losses"])
    expected = np.asarray(runs[reference]["losses"])
    assert len(losses) == (STEPS if "fsdp" in name and "ring" not in name else VARIANT_STEPS)
    assert expected[STEPS - 1] < expected[0] - 0.1  # it trains: the comparison is not between constants
    np.testing.assert_allclose(losses, expected[:len(losses)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs[name]["biases"], runs[reference]["biases"][:len(losses)], rtol=1e-5, atol=1e-5)


def test_sigmoid_loss_learns_its_bias(runs) -> None:
    biases = runs["sigmoid/dp"]["biases"]
    assert biases[0] == -10.0 and abs(biases[-1] + 10.0) > 1e-3  # logged before each update
    assert np.isnan(runs["clip/dp"]["biases"]).all()  # InfoNCE models have none


def test_fsdp_splits_every_large_parameter(runs) -> None:
    shards = runs["clip/fsdp"]["shards"]
    kernel = shards["visual/transformer/blocks/mlp/fc/kernel"]  # stacked: (layers, 32, 128)
    assert kernel[1] == [kernel[0][0], kernel[0][1], kernel[0][2] // 4]  # columns over fsdp=4, layers whole
    assert shards["logit_scale"] == [[], []]
    split = [name for name, (shape, local) in shards.items() if shape != local]
    assert len(split) > 0.7 * len(shards)  # everything with a dimension divisible by 4
    assert all(shape == local for shape, local in runs["clip/dp"]["shards"].values())


def test_fsdp_tensor_splits_mlp_by_column_and_row(runs) -> None:
    shards = runs["beit3/fsdp_tensor"]["shards"]
    fc1, fc2 = (shards[f"beit3/layers/ffn/A/{name}/kernel"] for name in ("fc1", "fc2"))  # stacked layers
    assert fc1[1] == [fc1[0][0], fc1[0][1] // 2, fc1[0][2] // 2]  # (layers whole, fsdp, tensor)
    assert fc2[1] == [fc2[0][0], fc2[0][1] // 2, fc2[0][2] // 2]  # (layers whole, tensor, fsdp)
    q = shards["beit3/layers/self_attn/q_proj/B/kernel"]
    assert q[1] == [q[0][0], q[0][1] // 2, q[0][2] // 2]


def test_loss_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="train.loss=sigmoid needs model.init_logit_bias"):
        load_config(None, ["model.name=tiny", "train.loss=sigmoid"])
    with pytest.raises(ConfigError, match="only it has a logit bias"):
        load_config(None, ["model.name=tiny", "model.init_logit_bias=-10"])
    with pytest.raises(ConfigError, match="train.loss_variant must be local, gathered or ring"):
        load_config(None, ["model.name=tiny", "train.loss_variant=chunked"])
    with pytest.raises(ConfigError, match="unknown rule set 'fdsp'"):
        load_config(None, ["model.name=tiny", "sharding=fdsp"])
    with pytest.raises(ConfigError, match="must be \\[regex"):
        load_config(None, ["model.name=tiny", "sharding=[[kernel, data]]"])
