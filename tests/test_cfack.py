"""CFACK (system cfack): its ITC against a torch reference written from the formula, the momentum update, the train
step on 8 devices against 1, exact resume with the momentum state, and the evaluator's ITM re-ranking against a dense
computation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_python
from flax import nnx

from jaxretrieval import evaluate, train
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import load_config, to_dict
from jaxretrieval.data.pedes_demo import write_pedes_demo
from jaxretrieval.data.pipeline import caption_source, data_root, eval_inputs, make_tokenizer
from jaxretrieval.errors import ConfigError
from jaxretrieval.models import abstract_model, init_params
from jaxretrieval.retrieval.metrics import ranking_metrics
from jaxretrieval.retrieval.rerank import RerankSpec
from jaxretrieval.sharding import make_mesh
from jaxretrieval.systems import get_system
from jaxretrieval.systems.cfack import cfack_itc

torch = pytest.importorskip("torch")
F = torch.nn.functional
CONFIG = REPO / "configs" / "demo" / "cfack_tiny.yaml"


@pytest.fixture(scope="module")
def pedes_root(tmp_path_factory) -> Path:
    return write_pedes_demo(tmp_path_factory.mktemp("pedes") / "data", num_train_ids=8, num_val_ids=0, num_test_ids=4)


def cfack_config(root: Path, **extra):
    values = {"data.root": str(root), "train.batch_size": 16, "train.steps": 8, "train.checkpoint_every": 4,
              "train.eval_every": 8,
              "train.progress_bar": False, "train.log_every": 1, **extra}
    return load_config(CONFIG, [f"{key}={value}" for key, value in values.items()])


# ---- ITC against the formula ----------------------------------------------------------------------------------------
def torch_contrastive(a, b, ids, temp):
    """X-VLM's get_contrastive_loss with idx: targets spread over same-id columns, both directions averaged."""
    logits = a @ b.t() / temp
    positives = (ids[:, None] == ids[None, :]).float()
    labels = positives / positives.sum(1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * labels).sum(1).mean()
    t2i = -(F.log_softmax(logits.t(), dim=1) * labels).sum(1).mean()
    return (i2t + t2i) / 2


def torch_cfack_itc(v1, t1, v2, t2, cnn, ids, temp):
    c = lambda a, b: torch_contrastive(a, b, ids, temp)  # noqa: E731
    if v2 is None:
        loss = c(v1, t1)
        return loss if cnn is None else loss + torch_contrastive(v1, cnn, torch.arange(len(ids)), temp)
    total = c(v1, t1) + c(v1, t2) + c(v2, t1) + c(v2, t2) + c(v1, v2) + c(t1, t2)
    return total / 6 if cnn is None else (total + 0.5 * c(v1, cnn)) / 6.5


@pytest.mark.parametrize("momentum,cnn", [(True, True), (True, False), (False, True)])
def test_itc_matches_a_torch_reference_with_gradients(momentum: bool, cnn: bool) -> None:
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    names = ["v1", "t1"] + (["v2", "t2"] if momentum else []) + (["cnn"] if cnn else [])
    features = {name: unit(rng.normal(size=(12, 8))).astype(np.float32) for name in names}
    ids = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    temp = np.float32(0.07)

    def ours(feats, t):
        return cfack_itc(feats["v1"], feats["t1"], jnp.asarray(ids), t, feats.get("v2"), feats.get("t2"),
                         feats.get("cnn"))

    loss, (grads, grad_temp) = jax.value_and_grad(ours, argnums=(0, 1))(
        {k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(temp))
    tf = {k: torch.tensor(v, requires_grad=True) for k, v in features.items()}
    tt = torch.tensor(float(temp), requires_grad=True)
    want = torch_cfack_itc(tf["v1"], tf["t1"], tf.get("v2"), tf.get("t2"), tf.get("cnn"), torch.tensor(ids), tt)
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-5)
    for name in names:
        np.testing.assert_allclose(np.asarray(grads[name]), tf[name].grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(float(grad_temp), tt.grad.item(), rtol=1e-4)


# ---- the train step --------------------------------------------------------------------------------------------------
def test_one_step_updates_momentum_as_the_ema_of_the_online_weights(pedes_root: Path) -> None:
    """With the CNN branch on (a narrow ResNet-50 on its own 64-px view): its term trains it."""
    config = cfack_config(pedes_root, **{"train.warmup_steps": 0, "cfack.cnn": "resnet50", "cfack.cnn_width": 8,
                                         "cfack.cnn_image_size": 64})
    task = train.make_task(config, {})
    mesh = make_mesh(config.mesh)
    graphdef, params, opt_state, step_fn = train.setup_training(task.config, mesh)
    # Momentum weights apart from the online ones, so the update is not the identity.
    params = {**params, "momentum": jax.tree.map(lambda x: x * 0.5 + 0.01, params["momentum"])}
    before = jax.tree.map(np.asarray, params)
    batch = next(iter(task.loader(0)))
    batch.pop("origin")
    params, _, metrics = step_fn(params, opt_state, train.global_batch(batch, mesh), np.int32(1))
    for key in ("loss_itc", "loss_itm", "loss_mlm", "temp"):
        assert np.isfinite(float(metrics[key])), key
    m = config.section.momentum
    for part in ("vision", "vision_proj", "text_proj", "text"):
        want = jax.tree.map(lambda old, online: m * old + (1 - m) * online, before["momentum"][part],
                            {k: before[part][k] for k in before["momentum"][part]})
        jax.tree.map(lambda got, w: np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6, atol=1e-7),
                     params["momentum"][part], want)
    for trained in ("vision_proj", "cnn_proj"):
        assert not np.allclose(np.asarray(params[trained]["kernel"]), before[trained]["kernel"]), trained
    assert batch["image_cnn"].shape[1:] == (64, 64, 3)


def test_train_step_on_8_devices_equals_one_device(pedes_root: Path) -> None:
    """Drop path on: its draws, like the hard negatives', depend on the step's key, not on the device count."""
    code = f"""
import jax, numpy as np
from jaxretrieval import train
from jaxretrieval.config import load_config
from jaxretrieval.sharding import make_mesh
config = load_config({str(CONFIG)!r}, ["data.root={pedes_root}", "train.batch_size=16", "cfack.drop_path=0.1"])
task = train.make_task(config, {{}})
batch = next(iter(task.loader(0)))
batch.pop("origin")
out = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = make_mesh(task.config.mesh, devices)
    _, params, opt_state, step = train.setup_training(task.config, mesh)
    params, _, metrics = step(params, opt_state, train.global_batch(batch, mesh), np.int32(1))
    out.append((jax.tree.map(np.asarray, params), {{k: float(v) for k, v in metrics.items()}}))
(p1, m1), (p8, m8) = out
assert len(jax.devices()) == 8
for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)
print("ok", m1["loss"])
"""
    assert run_python(code, devices=8).stdout.startswith("ok")


def test_resume_is_bit_identical_with_the_momentum_state(pedes_root: Path, tmp_path: Path) -> None:
    """The demo config's run (EDA captions, both views, MLM, re-ranked evaluation), then the same run resumed from
    its step-4 checkpoint."""
    config = cfack_config(pedes_root)
    whole = tmp_path / "whole"
    result = train.train(config, whole)
    for key in ("R1", "mAP", "mINP", "rerank_R1", "rerank_mAP", "rerank_mINP"):
        assert 0 <= result[key] <= 100, key
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_itc", "loss_itm", "loss_mlm", "temp"} <= set(logged[0])
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    (resumed / "metrics.jsonl").unlink()
    shutil.rmtree(resumed / "eval")
    train.train(config, resumed)

    def params(workdir: Path) -> dict:
        cfg = evaluate.saved_config(workdir)
        return evaluate.restore_params(cfg, workdir / "checkpoints" / "8", make_mesh(cfg.mesh))[1]

    a, b = params(whole), params(resumed)
    assert set(a["momentum"]) == {"vision", "text", "vision_proj", "text_proj"}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_init_from_a_checkpoint_without_momentum_starts_the_copies_at_its_weights(pedes_root: Path,
                                                                                 tmp_path: Path) -> None:
    """X2-VLM's released checkpoints hold no momentum copies: CFACK's copy_params starts them at the online weights."""
    config = cfack_config(pedes_root)
    online = {k: v for k, v in init_params(config, seed=3, precision="fp32").items() if k != "momentum"}
    write_model(tmp_path / "x2vlm", online, {"config": to_dict(config)})
    _, abstract = abstract_model(config)
    params = get_system("cfack").init_from(config, str(tmp_path / "x2vlm"), {}, abstract,
                                           lambda: init_params(config, seed=4, precision="fp32"))
    for part in ("vision", "vision_proj", "text_proj"):
        jax.tree.map(np.testing.assert_array_equal, params["momentum"][part], online[part])
    jax.tree.map(np.testing.assert_array_equal, params["momentum"]["text"],
                 {k: online["text"][k] for k in params["momentum"]["text"]})
    jax.tree.map(np.testing.assert_array_equal, params["itm_head"], online["itm_head"])


# ---- evaluation with re-ranking --------------------------------------------------------------------------------------
def test_reranked_metrics_equal_a_dense_itm_computation(pedes_root: Path) -> None:
    config = cfack_config(pedes_root)
    task = train.make_task(config, {})
    mesh = make_mesh(config.mesh)
    graphdef, params, _, _ = train.setup_training(task.config, mesh)
    system = get_system("cfack")
    root = data_root(task.config)
    source = caption_source(task.config, root, "test")
    eval_data = eval_inputs(task.config, source, make_tokenizer(task.config, root))
    k = 3
    spec = RerankSpec(system.cross_encoder(task.config, graphdef, mesh), k, -100.0, "replace", 8)
    got = evaluate.evaluate_retrieval(graphdef, params, eval_data, mesh, 8, "text_to_image", rerank=spec)

    model = nnx.merge(graphdef, params)
    images = eval_data.images[:]
    image_tokens = model.image_tokens(jnp.asarray(images))
    text_hidden = model.text_hidden(jnp.asarray(eval_data.tokens))
    itc = np.asarray(model.text_features(text_hidden) @ model.image_features(image_tokens).T)
    q, g = itc.shape
    keep = model.keep(jnp.asarray(eval_data.tokens))
    dense = np.stack([np.asarray(model.match_logits(text_hidden, keep, jnp.repeat(image_tokens[j:j + 1], q, 0))[:, 1])
                      for j in range(g)], axis=1)
    want = np.full((q, g), -100.0, np.float32)
    top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    np.put_along_axis(want, top, np.take_along_axis(dense, top, axis=1), axis=1)
    relevant = eval_data.text_groups[:, None] == eval_data.image_groups[None, :]
    for name, value in ranking_metrics(want, relevant, (1, 5, 10)).items():
        assert got[f"rerank_{name}"] == pytest.approx(value, abs=1e-6), name
    for name, value in ranking_metrics(itc, relevant, (1, 5, 10)).items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert got["rerank_k"] == k and got["num_images"] == g


def test_rerank_needs_a_system_with_a_cross_encoder(demo_root: Path) -> None:
    with pytest.raises(ConfigError, match="no cross-encoder"):
        load_config(None, [f"data.root={demo_root}", "eval.rerank_k=10", "eval.protocol=text_to_image"])
