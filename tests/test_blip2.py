"""BLIP-2 (system blip2): its ITC (each image's best query) against a torch transcription of LAVIS's
Blip2Qformer.forward, the hard negatives drawn from that similarity, the evaluation's query reduction, and a short
run with ITM re-ranking."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxretrieval import train
from jaxretrieval.config import load_config
from jaxretrieval.data.pedes_demo import write_pedes_demo
from jaxretrieval.models import abstract_model, init_params
from jaxretrieval.systems.blip2 import blip2_itc, blip2_negatives

torch = pytest.importorskip("torch")
F = torch.nn.functional
CONFIG = REPO / "configs" / "demo" / "blip2_tiny.yaml"


def torch_itc(image_feats, text_feat, image_ids, temp):
    """LAVIS Blip2Qformer.forward's ITC on one process, with image ids: max over the queries, same-id targets
    smoothed 0.9 / 0.1."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze()  # (B, B, Q)
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze()  # (B, B, Q)
    sim_t2i = sim_t2q.max(-1)[0] / temp
    pos_idx = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1)).float()
    sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
    sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
    return ((-F.log_softmax(sim_i2t, dim=1) * sim_targets).sum(1).mean()
            + (-F.log_softmax(sim_t2i, dim=1) * sim_targets).sum(1).mean()) / 2


def test_itc_matches_lavis_with_gradients():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 4, 8)).astype(np.float32)
    text = rng.normal(size=(6, 8)).astype(np.float32)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    ids = np.array([0, 0, 1, 2, 3, 3])

    def ours(image, text, temp):
        similarity = jnp.max(jnp.einsum("iqd,td->itq", image, text), axis=-1)
        return blip2_itc(similarity, jnp.asarray(ids), temp, 0.1)

    loss, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(jnp.asarray(image), jnp.asarray(text),
                                                             jnp.float32(0.07))
    t_image, t_text = torch.tensor(image, requires_grad=True), torch.tensor(text, requires_grad=True)
    t_temp = torch.tensor(0.07, requires_grad=True)
    want = torch_itc(t_image, t_text, torch.tensor(ids), t_temp)
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    for got, ref in zip(grads, (t_image.grad, t_text.grad, t_temp.grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-4, atol=1e-6)


def test_negatives_follow_the_max_similarity_and_skip_same_ids():
    ids = jnp.array([0, 0, 1, 2])
    similarity = jnp.full((4, 4), -5.0).at[0, 3].set(5.0).at[3, 2].set(5.0).at[1, 0].set(9.0)
    picks = [blip2_negatives(jax.random.key(k), similarity, ids, jnp.float32(0.1)) for k in range(20)]
    for negatives in picks:
        assert int(negatives.text_for_image[0]) == 3 and int(negatives.text_for_image[3]) == 2
        assert int(negatives.text_for_image[1]) in (2, 3)  # column 0 is row 1's own id: never drawn
        assert bool(negatives.text_valid.all()) and bool(negatives.image_valid.all())


@pytest.fixture(scope="module")
def pedes_root(tmp_path_factory) -> Path:
    return write_pedes_demo(tmp_path_factory.mktemp("pedes") / "data", num_train_ids=8, num_val_ids=0, num_test_ids=4)


@pytest.mark.parametrize("reduce, shape", [("max", (2, 8, 32)), ("first", (2, 32))])
def test_query_reduce_sets_the_image_embedding(pedes_root, reduce, shape):
    from flax import nnx

    config = load_config(CONFIG, [f"data.root={pedes_root}", f"blip2.query_reduce={reduce}"])
    graphdef, _ = abstract_model(config)
    model = nnx.merge(graphdef, init_params(config, seed=0, precision="fp32"))
    assert model.encode_image(jnp.zeros((2, 32, 32, 3))).shape == shape


def test_run_trains_and_reranks(pedes_root, tmp_path):
    config = load_config(CONFIG, [f"data.root={pedes_root}", "train.batch_size=16", "train.steps=4",
                                  "train.eval_every=4", "train.checkpoint_every=4", "train.progress_bar=false",
                                  "train.log_every=1", "eval.rerank_k=4"])
    result = train.train(config, tmp_path / "run")
    for key in ("R1", "mAP", "rerank_R1", "rerank_mAP"):
        assert 0 <= result[key] <= 100, key
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_itc", "loss_itm", "temp"} <= set(logged[0]) and all(np.isfinite(r["loss"]) for r in logged
                                                                    if "loss" in r)


def test_image_text_recall_scores_each_image_by_its_best_query(pedes_root, tmp_path):
    """COCO-style evaluation of 32-vector images: the recall of the dense max-over-queries matrix."""
    from jaxretrieval.evaluate import image_text_recall_all
    from jaxretrieval.retrieval.metrics import image_text_recall
    from jaxretrieval.sharding import make_mesh

    rng = np.random.default_rng(3)
    images, texts = rng.normal(size=(12, 4, 8)), rng.normal(size=(24, 8))
    text_to_image = np.repeat(np.arange(12), 2)
    dense = np.einsum("iqd,td->itq", images, texts).max(-1)
    got = image_text_recall_all(images, texts, text_to_image, make_mesh(load_config(CONFIG, []).mesh))
    assert got == image_text_recall(dense, text_to_image)
    assert got != image_text_recall(images[:, 0] @ texts.T, text_to_image)
