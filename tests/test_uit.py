"""UIT (system uit): its loss arithmetic against PyTorch references written from the original's formulas (ITC with
soft targets and label smoothing, the chunk pooling and BatchNorm1d projections, SimMIM's pixel shuffle and masked L1),
the block mask, the lr_mult groups, a train step on 8 devices against 1, and a short run with re-ranked evaluation
resumed bit-identically (the projections' batch-norm statistics included)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_python
from flax import nnx

from jaxretrieval import evaluate, train
from jaxretrieval.config import load_config
from jaxretrieval.data.pedes_demo import write_pedes_demo
from jaxretrieval.errors import ConfigError
from jaxretrieval.models.uit import FeatureMapping, adaptive_avg_pool, block_mask, pixel_shuffle
from jaxretrieval.optim import path_scales
from jaxretrieval.sharding import make_mesh, path_name
from jaxretrieval.systems.uit import UITSettings, eda_caption, fast_layer_scale, uit_itc

torch = pytest.importorskip("torch")
F = torch.nn.functional
CONFIG = REPO / "configs" / "demo" / "uit_tiny.yaml"


@pytest.fixture(scope="module")
def pedes_root(tmp_path_factory) -> Path:
    return write_pedes_demo(tmp_path_factory.mktemp("pedes") / "data", num_train_ids=8, num_val_ids=0, num_test_ids=4)


def uit_config(root: Path, **extra):
    values = {"data.root": str(root), "train.batch_size": 16, "train.steps": 6, "train.checkpoint_every": 3,
              "train.eval_every": 6, "train.progress_bar": False, "train.log_every": 1, "eval.rerank_k": 4, **extra}
    return load_config(CONFIG, [f"{key}={value}" for key, value in values.items()])


# ---- the losses against the original's arithmetic -------------------------------------------------------------------
def torch_itc(image_feat, text_feat, idx, temp, epsilon):
    """CMP.get_contrastive_loss on one process: same-id soft targets, smoothed, both directions averaged."""
    image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
    logits = image_feat @ text_feat.t() / temp
    pos_idx = torch.eq(idx.view(-1, 1), idx.view(1, -1)).float()
    labels = pos_idx / pos_idx.sum(1, keepdim=True)
    labels = (1 - epsilon) * labels + epsilon / logits.shape[1]
    loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("epsilon", [0.0, 0.2])
def test_itc_with_label_smoothing_matches_the_original_with_gradients(epsilon):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)
    ids = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    temp = 0.07

    def ours(image, text, temp):
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        return uit_itc(norm(image), norm(text), jnp.asarray(ids), temp, epsilon)

    loss, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(jnp.asarray(image), jnp.asarray(text), jnp.float32(temp))
    t_image, t_text = (torch.tensor(x, requires_grad=True) for x in (image, text))
    t_temp = torch.tensor(temp, requires_grad=True)
    want = torch_itc(t_image, t_text, torch.tensor(ids), t_temp, epsilon)
    want.backward()
    assert float(loss) == pytest.approx(want.item(), rel=1e-5)
    for got, ref in zip(grads, (t_image.grad, t_text.grad, t_temp.grad), strict=True):
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("length", [49, 55, 31, 3])
def test_chunk_pooling_is_torch_adaptive_avg_pool(length):
    x = np.random.default_rng(length).normal(size=(2, length, 5)).astype(np.float32)
    want = torch.nn.AdaptiveAvgPool1d(3)(torch.tensor(x).transpose(1, 2)).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), 3)), want, rtol=1e-6, atol=1e-6)


def test_feature_mapping_is_batchnorm_dropout_linear():
    """Train mode: batch statistics, running ones moved by 0.1 (unbiased variance); eval: the running ones; dropout
    zeroes p of the inputs and scales the rest by 1 / (1 - p), as torch's feature_mapping."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(10, 6)).astype(np.float32)
    ours = FeatureMapping(6, 4, rate=0.5, rngs=nnx.Rngs(0), dtype=jnp.float32)
    ours.linear.kernel[...] = rng.normal(size=(6, 4)).astype(np.float32)
    ours.linear.bias[...] = rng.normal(size=4).astype(np.float32)
    ours.norm.scale[...] = rng.uniform(0.5, 2, size=6).astype(np.float32)
    ours.norm.bias[...] = rng.normal(size=6).astype(np.float32)
    ref = torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.0), torch.nn.Linear(6, 4))
    with torch.no_grad():
        ref[0].weight.copy_(torch.tensor(np.asarray(ours.norm.scale[...])))
        ref[0].bias.copy_(torch.tensor(np.asarray(ours.norm.bias[...])))
        ref[2].weight.copy_(torch.tensor(np.asarray(ours.linear.kernel[...]).T))
        ref[2].bias.copy_(torch.tensor(np.asarray(ours.linear.bias[...])))
    ref.train()
    want_train = ref(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), train=True)), want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.norm.mean[...]), ref[0].running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.norm.var[...]), ref[0].running_var.numpy(), rtol=1e-5)
    ref.eval()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), ref(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)
    dropped = np.asarray(ours(jnp.ones((400, 6)), train=True, key=jax.random.key(0)))
    plain = np.asarray(ours(jnp.ones((400, 6)), train=True))
    assert not np.allclose(dropped, plain)  # the key switches dropout on in training ...
    np.testing.assert_array_equal(np.asarray(ours(jnp.ones((4, 6)), key=jax.random.key(0))),
                                  np.asarray(ours(jnp.ones((4, 6)))))  # ... never in evaluation


def test_mim_arithmetic_matches_simmim():
    """PixelShuffle and SimMIM's loss: the L1 error over masked pixels (one mask for the batch), summed over the
    batch and divided by one image's masked count and the channels."""
    rng = np.random.default_rng(2)
    b, r = 3, 4
    decoded = rng.normal(size=(b, 2, 2, 3 * r * r)).astype(np.float32)
    want = torch.nn.PixelShuffle(r)(torch.tensor(decoded).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    shuffled = np.asarray(pixel_shuffle(jnp.asarray(decoded), r))
    np.testing.assert_array_equal(shuffled, want)
    x = rng.normal(size=(b, 8, 8, 3)).astype(np.float32)
    mask = (rng.random((1, 2, 2)) < 0.5).astype(np.int64)  # patch grid 2x2 of 4-px patches
    mask[0, 0, 0] = 1
    t_mask = torch.tensor(mask).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    recon = F.l1_loss(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(want).permute(0, 3, 1, 2), reduction="none")
    original = ((recon * t_mask).sum() / (t_mask.sum() + 1e-5) / 3).item()
    weight = np.repeat(np.repeat(mask, 4, 1), 4, 2)[..., None]
    per_image = (np.abs(x - shuffled) * weight).sum(axis=(1, 2, 3)) / (weight.sum() + 1e-5) / 3
    assert b * per_image.mean() == pytest.approx(original, rel=1e-5)  # uit.mim_images = the original's batch


def test_block_mask_structure_and_ratio():
    masks = np.stack([np.asarray(block_mask(jax.random.key(i), 224, 4, 32, 0.5))[0] for i in range(300)])
    assert masks.shape == (300, 56, 56)
    blocks = masks[:, ::8, ::8]
    np.testing.assert_array_equal(np.repeat(np.repeat(blocks, 8, 1), 8, 2), masks)  # whole 32-px blocks
    assert set(blocks.sum(axis=(1, 2))) == {math.ceil(49 * 0.5)}  # 25 of the 49 blocks, every time
    frequency = blocks.mean(axis=0)
    assert np.all(np.abs(frequency - 25 / 49) < 4 * math.sqrt(0.25 / 300))  # every block equally likely


def test_masked_patches_do_not_see_their_pixels(pedes_root):
    """SimMIM replaces a masked patch's embedding by the mask token: its pixels cannot change the output."""
    config = uit_config(pedes_root)
    from jaxretrieval.models import abstract_model, init_params

    graphdef, _ = abstract_model(config)
    model = nnx.merge(graphdef, init_params(config, seed=0, precision="fp32"))
    masked = jnp.zeros((1, 16, 16), jnp.int32).at[:, :8].set(1)  # the top half of the patch grid
    pixels = jnp.asarray(np.random.default_rng(3).normal(size=(2, 64, 64, 3)), jnp.float32)
    changed = pixels.at[:, :32].set(5.0)  # only inside the masked patches
    tokens = lambda p: model.vision(p, masked=masked, mask_token=model.mask_token[...])[0]  # noqa: E731
    np.testing.assert_allclose(np.asarray(tokens(changed)), np.asarray(tokens(pixels)), atol=1e-6)
    assert not np.allclose(np.asarray(model.vision(changed)[0]), np.asarray(model.vision(pixels)[0]))


# ---- recipe pieces ---------------------------------------------------------------------------------------------------
def test_lr_mult_groups_follow_the_original_numbering(pedes_root):
    """Swin `layers.2` (our stage 2 blocks and stage 3's merging) and `layers.3`, BERT layers 4 5 10 11, the heads and
    projections learn at lr x 2; stacked BERT layers get one factor per layer."""
    s = UITSettings()
    scale = fast_layer_scale(s, 12)
    assert scale("vision/stages/2/blocks/attn/qkv/kernel") == 2 and scale("vision/stages/3/downsample/norm/scale") == 2
    assert scale("vision/stages/2/downsample/reduction/kernel") == 1 and scale("vision/stages/1/blocks/mlp") == 1
    np.testing.assert_array_equal(scale("text/text/layers/attention/query/kernel"), [1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(scale("text/fusion/layers/cross/intermediate/kernel"), [1, 1, 1, 1, 2, 2])
    assert scale("text/text/layers/5/output/kernel") == 2 and scale("text/fusion/layers/0/norm/scale") == 1
    assert scale("text/embeddings/word/embedding") == 1 and scale("itm_head/dense/kernel") == 2
    assert scale("mlm_head/transform/kernel") == 2 and scale("temp") == 1 and scale("mask_token") == 1
    config = uit_config(pedes_root)
    from jaxretrieval.models import abstract_model

    _, abstract = abstract_model(config)
    scales = path_scales(abstract, fast_layer_scale(config.section, config.model.text.layers))
    flat = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(scales)[0]}
    assert flat["vision_proj/linear/kernel"] == 2 and flat["vision/patch_embed/proj/kernel"] == 1
    np.testing.assert_array_equal(np.ravel(flat["text/text/layers/attention/query/kernel"]), [1, 2])


def test_eda_copy_is_one_operation_sentence_cut_to_max_words():
    from jaxretrieval.data.eda import synonyms_source

    synonyms = synonyms_source("builtin", Path("."))
    caption = "a man in a red shirt is walking quickly down the long street with a black bag"
    copies = {eda_caption(caption, np.random.default_rng(i), synonyms=synonyms, p=1.0, max_words=12)
              for i in range(40)}
    assert len(copies) > 5 and all(len(c.split()) <= 12 for c in copies)
    assert eda_caption(caption, np.random.default_rng(0), synonyms=synonyms, p=0.0, max_words=5) == "a man in a red"


def test_config_checks(pedes_root):
    with pytest.raises(ConfigError, match="uit.mim_block"):
        uit_config(pedes_root, **{"uit.mim_block": 24})
    with pytest.raises(ConfigError, match="WordPiece"):
        uit_config(pedes_root, **{"data.tokenizer_kind": "auto"})
    with pytest.raises(ConfigError, match="swin_depths"):
        uit_config(pedes_root, **{"uit.swin_heads": "[2]"})


# ---- the train step, resume and the re-ranked evaluation -------------------------------------------------------------
def test_train_step_on_8_devices_equals_one_device(pedes_root: Path) -> None:
    """Every term (ITC gathered over the batch, ITM negatives, MLM, MIM, the EDA copy, projection dropout and batch
    norm over the global batch) depends on the step's key and the whole batch, not on the device count."""
    code = f"""
import jax, numpy as np
from jaxretrieval import train
from jaxretrieval.config import load_config
from jaxretrieval.sharding import make_mesh
config = load_config({str(CONFIG)!r}, ["data.root={pedes_root}", "train.batch_size=16", "uit.drop_path=0.1",
                                      "uit.eda=false", "uit.swin_depths=[1,1]"])
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
for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_mim"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, err_msg=key)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)
print("ok", m1["loss"])
"""
    assert run_python(code, devices=8).stdout.startswith("ok")


@pytest.fixture(scope="module")
def uit_run(pedes_root: Path, tmp_path_factory) -> tuple[Path, dict]:
    config = uit_config(pedes_root)
    workdir = tmp_path_factory.mktemp("uit") / "whole"
    return workdir, train.train(config, workdir)


def test_run_reranks_and_resumes_bit_identically(pedes_root: Path, uit_run, tmp_path: Path) -> None:
    config = uit_config(pedes_root)
    whole, result = uit_run
    for key in ("R1", "mAP", "rerank_R1", "rerank_mAP"):
        assert 0 <= result[key] <= 100, key
    assert result["rerank_k"] == 4
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_itc", "loss_itm", "loss_mlm", "loss_mim", "temp"} <= set(logged[0])
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    (resumed / "metrics.jsonl").unlink()
    shutil.rmtree(resumed / "eval")
    train.train(config, resumed)

    def params(workdir: Path) -> dict:
        cfg = evaluate.saved_config(workdir)
        return evaluate.restore_params(cfg, workdir / "checkpoints" / "6", make_mesh(cfg.mesh))[1]

    a, b = params(whole), params(resumed)
    assert not np.allclose(np.asarray(a["vision_proj"]["norm"]["mean"]), 0)  # batch-norm statistics moved
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_predict_writes_itc_scores_and_itm_rescores(pedes_root: Path, uit_run, tmp_path: Path) -> None:
    """What the PAB ensemble needs from UIT: its ITC matrix, and the ITM logits of each query's top k, of its own
    ranking or of another scorer's (the rest of a row at its lowest re-score), with query ids and sorted stems."""
    from jaxretrieval import predict
    from jaxretrieval.data.pipeline import caption_source, make_preprocess
    from jaxretrieval.retrieval.fusion import ScoreMatrix, load_scores, save_scores

    workdir, _ = uit_run
    config = evaluate.saved_config(workdir)
    records = caption_source(config, pedes_root, "test").records[:10]
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    stems: dict[str, str] = {}
    for record in records:
        if record.image not in stems:
            stems[record.image] = f"g{len(stems):02d}"
            shutil.copy(record.image, gallery / f"{stems[record.image]}{Path(record.image).suffix}")
    queries = tmp_path / "query.json"
    queries.write_text("".join(json.dumps({"query_index": f"q{i}", "caption": r.caption}) + "\n"
                               for i, r in enumerate(records)))
    k = 3
    assert predict.main(["--checkpoint", str(workdir), "--queries", str(queries), "--gallery", str(gallery),
                         "--output-dir", str(tmp_path / "own"), "--itm-k", str(k), "--batch-size", "8"]) == 0
    itc, itm = load_scores(tmp_path / "own" / "scores.npz"), load_scores(tmp_path / "own" / "itm_scores.npz")
    assert itm.query_ids == itc.query_ids == [f"q{i}" for i in range(len(records))]
    assert itm.gallery_ids == itc.gallery_ids == sorted(stems.values())

    mesh = make_mesh(config.mesh)
    graphdef, params, meta = evaluate.restore_params(config, workdir, mesh)
    model = nnx.merge(graphdef, params)
    paths = {stem: image for image, stem in stems.items()}
    pixels = jnp.asarray(np.stack([make_preprocess(config)(paths[stem]) for stem in itm.gallery_ids]))
    from jaxretrieval.data.tokenizers import build_tokenizer

    tokens = jnp.asarray(build_tokenizer(meta["tokenizer"])([r.caption for r in records]))
    image_tokens, hidden = model.image_tokens(pixels), model.text_hidden(tokens)
    np.testing.assert_allclose(itc.scores, np.asarray(model.text_features(hidden) @ model.image_features(
        image_tokens).T), atol=1e-5)
    dense = np.stack([np.asarray(model.match_logits(hidden, model.keep(tokens), jnp.repeat(image_tokens[j:j + 1],
                                                                                           len(records), 0))[:, 1])
                      for j in range(len(stems))], axis=1)

    def expected(first: np.ndarray) -> np.ndarray:
        top = np.argsort(-first, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(dense, top, axis=1)
        want = np.repeat(kept.min(axis=1, keepdims=True), dense.shape[1], axis=1)
        np.put_along_axis(want, top, kept, axis=1)
        return want

    np.testing.assert_allclose(itm.scores, expected(itc.scores), atol=1e-4)
    # Another scorer's candidates, saved in its own gallery order: aligned by stem before its top k is taken.
    other = np.random.default_rng(0).normal(size=itc.scores.shape).astype(np.float32)
    save_scores(ScoreMatrix(other[:, ::-1], itc.query_ids, itc.gallery_ids[::-1], "lhp"), tmp_path / "lhp.npz")
    assert predict.main(["--checkpoint", str(workdir), "--queries", str(queries), "--gallery", str(gallery),
                         "--output-dir", str(tmp_path / "lhp"), "--itm-k", str(k), "--itm-candidates",
                         str(tmp_path / "lhp.npz"), "--batch-size", "8"]) == 0
    np.testing.assert_allclose(load_scores(tmp_path / "lhp" / "itm_scores.npz").scores, expected(other), atol=1e-4)


def test_swin_l_override_builds_timms_swin_large():
    """The README's Swin-L line (the original's config_swinL.json) gives timm's swin_large_patch4_window12_384 tower."""
    timm = pytest.importorskip("timm")
    from jaxretrieval.models import abstract_model

    config = load_config(REPO / "configs" / "pab" / "uit_swinb.yaml", [
        "model.image.image_size=384", "model.image.width=192", "uit.swin_heads=[6,12,24,48]", "uit.swin_window=12"])
    _, abstract = abstract_model(config)
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract["vision"]))
    reference = timm.models.swin_transformer.SwinTransformer(
        img_size=384, patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
        num_classes=0)
    assert ours == sum(p.numel() for p in reference.parameters())
