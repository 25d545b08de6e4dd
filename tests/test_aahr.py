"""VSE-infinity and AAHR as systems: their data augmentations, each AAHR term against a numpy reference, the momentum
update and queues step by step through the real train step, k-means per seed, kill -9 and resume bit-identical with
queues and prototypes, evaluation folds and the errors a user meets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxretrieval import checkpoint, evaluate, train
from jaxretrieval.config import load_config
from jaxretrieval.data.precomp import write_precomp_demo
from jaxretrieval.data.precomp_pipeline import drop_regions, noisy_caption
from jaxretrieval.errors import ConfigError, DataError
from jaxretrieval.models.aahr import RelationGNN, enqueue, kmeans
from jaxretrieval.sharding import make_mesh
from jaxretrieval.systems.aahr import prototype_loss, queue_contrastive
from jaxretrieval.systems.vse import hinge_terms

AAHR_CONFIG = REPO / "configs" / "demo" / "aahr_tiny.yaml"
VSE_CONFIG = REPO / "configs" / "demo" / "vse_infty_tiny.yaml"
REGIONS, DIM, GLOBAL = 6, 16, 8
BATCH, QUEUE = 10, 20


@pytest.fixture(scope="module")
def precomp_root(tmp_path_factory) -> Path:
    """A tiny generated precomp set with global feature files (a fixed random projection of the mean region and of
    a caption's characters stands in for CLIP here; clip_globals has its own tests)."""
    root = write_precomp_demo(tmp_path_factory.mktemp("precomp"), images=40, regions=REGIONS, dim=DIM,
                              split_sizes={"train": 40, "test": 10})
    rng = np.random.default_rng(0)
    project = rng.standard_normal((DIM, GLOBAL)).astype(np.float32)
    for split in ("train", "test"):
        images = np.load(root / f"{split}_ims.npy").mean(axis=1) @ project
        lines = (root / f"{split}_caps.txt").read_text().splitlines()
        captions = np.stack([np.bincount([ord(c) % GLOBAL for c in line], minlength=GLOBAL) for line in lines])
        np.save(root / f"{split}_clip_ims.npy", images.astype(np.float32))
        np.save(root / f"{split}_clip_caps.npy", captions.astype(np.float32))
    return root


def overrides(root: Path, section: str = "aahr", **extra) -> list[str]:
    values = {"data.root": str(root), "train.batch_size": BATCH, "train.epochs": 0.4, "train.milestones": "[1]",
              "train.log_every": 1, "train.checkpoint_every": 2, "train.progress_bar": False, "eval.batch_size": 10,
              f"{section}.region_dim": DIM, "model.text.layers": 1}
    if section == "aahr":
        values.update({"aahr.global_dim": GLOBAL, "aahr.queue_size": QUEUE, "aahr.prototypes": 4,
                       "aahr.prototype_refresh": 3})
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def aahr_config(root: Path, **extra):
    return load_config(AAHR_CONFIG, overrides(root, **extra))


# ---- data ------------------------------------------------------------------------------------------------------

def test_region_drop_keeps_order_pads_with_zeros_and_never_empties():
    regions = np.arange(1, 37, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    out, kept = drop_regions(regions, np.random.default_rng(1), 0.2)
    assert 20 < kept < 36
    assert np.all(np.diff(out[:kept, 0]) > 0) and not out[kept:].any()
    assert drop_regions(regions, np.random.default_rng(1), 0.999999)[1] == 36  # all dropped: all kept


def test_caption_noise_masks_replaces_or_deletes_whole_words_at_the_originals_rates():
    words = [[10 + i, 50 + i] for i in range(20000)]
    out = noisy_caption(words, np.random.default_rng(0), mask_id=3, vocab_size=1000, p=0.2)
    masks = out.count(3)
    present = set(out)
    kept = sum(1 for w in words for i in w if i in present)
    # changed words: 20%; of them 50% masked (2 pieces each), 10% random, 40% deleted
    assert abs(masks / 2 / len(words) - 0.10) < 0.01
    assert abs((len(out) - masks) / 2 / len(words) - (0.80 + 0.02)) < 0.01
    assert kept > 0.79 * 2 * len(words)
    assert noisy_caption(words[:5], np.random.default_rng(0), mask_id=3, vocab_size=1000, p=0.0) == [
        i for w in words[:5] for i in w]


# ---- loss terms against numpy ------------------------------------------------------------------------------------

def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_queue_contrastive_equals_numpy_with_same_id_positives():
    rng = np.random.default_rng(0)
    v, t, v_m, t_m = (unit(rng, 4, 8) for _ in range(4))
    queues = {"image": unit(rng, 6, 8), "text": unit(rng, 6, 8), "ids": np.array([1, -1, 7, 2, -1, 1])}
    ids = np.array([1, 2, 3, 1])
    got = queue_contrastive(*map(jnp.asarray, (v, t, v_m, t_m)), jax.tree.map(jnp.asarray, queues), jnp.asarray(ids),
                            0.07)
    positives = ids[:, None] == np.concatenate([ids, queues["ids"]])[None]
    targets = positives / positives.sum(axis=1, keepdims=True)

    def ce(a, cols):
        return -(targets * log_softmax(a @ cols.T / 0.07)).sum(axis=1).mean()

    want = 0.5 * (ce(v, np.concatenate([t_m, queues["text"]])) + ce(t, np.concatenate([v_m, queues["image"]])))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_prototype_loss_targets_the_pairs_nearest_prototype():
    rng = np.random.default_rng(1)
    v, t, v_m, t_m, protos = unit(rng, 5, 8), unit(rng, 5, 8), unit(rng, 5, 8), unit(rng, 5, 8), unit(rng, 3, 8)
    got = prototype_loss(*map(jnp.asarray, (v, t, v_m, t_m, protos)), 0.1)

    def ce(x, pair):
        target = np.argmax(pair @ protos.T, axis=1)
        return -log_softmax(x @ protos.T / 0.1)[np.arange(len(x)), target].mean()

    np.testing.assert_allclose(float(got), 0.5 * (ce(v, t_m) + ce(t, v_m)), rtol=1e-5)


@pytest.mark.parametrize("kind", ["gcn", "gat"])
def test_relation_gnn_neighbourhoods_leave_out_self_and_pair(kind):
    from flax import nnx

    rng = np.random.default_rng(2)
    x, y = jnp.asarray(unit(rng, 6, 8)), jnp.asarray(unit(rng, 6, 8))
    gnn = RelationGNN(8, kind, 2, rngs=nnx.Rngs(0))
    mask = np.asarray(gnn.neighbours(x, y))
    assert (mask[:, :6].sum(axis=1) == 2).all() and (mask[:, 6:].sum(axis=1) == 2).all()
    assert not np.diagonal(mask[:, :6]).any() and not np.diagonal(mask[:, 6:]).any()
    intra = np.asarray(x @ x.T) - 9 * np.eye(6)
    np.testing.assert_array_equal(mask[:, :6], intra >= np.sort(intra, axis=1)[:, -2:-1])
    out = np.asarray(gnn(x, y))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    if kind == "gcn":
        nodes = np.asarray(gnn.linear(jnp.concatenate([x, y])))
        mixed = (mask / mask.sum(axis=1, keepdims=True)) @ nodes
        h = np.asarray(x) + np.where(mixed > 0, mixed, np.expm1(mixed))
        np.testing.assert_allclose(out, h / np.linalg.norm(h, axis=1, keepdims=True), atol=1e-5)


def test_kmeans_is_deterministic_per_key_and_matches_numpy_lloyd():
    rng = np.random.default_rng(3)
    points = jnp.asarray(unit(rng, 40, 6))
    key = jax.random.key(5)
    got = np.asarray(kmeans(points, 4, 5, key))
    np.testing.assert_array_equal(got, np.asarray(kmeans(points, 4, 5, key)))
    assert not np.allclose(got, np.asarray(kmeans(points, 4, 5, jax.random.key(6))))
    p = np.asarray(points)
    centres = p[np.asarray(jax.random.choice(key, 40, (4,), replace=False))]
    for _ in range(5):
        assign = np.argmax(p @ centres.T, axis=1)
        for c in range(4):
            if (assign == c).any():
                s = p[assign == c].sum(axis=0)
                centres[c] = s / (np.linalg.norm(s) + 1e-8)
    np.testing.assert_allclose(got, centres, atol=1e-5)


def test_hinge_turns_to_the_hardest_negative_at_the_warmup_step():
    rng = np.random.default_rng(4)
    v, t = jnp.asarray(unit(rng, 6, 8)), jnp.asarray(unit(rng, 6, 8))
    before = hinge_terms(v, t, 0.2, jnp.int32(29), 30)
    after = hinge_terms(v, t, 0.2, jnp.int32(30), 30)
    assert float(before["max_violation"]) == 0 and float(after["max_violation"]) == 1
    assert float(before["loss_hinge"]) > float(after["loss_hinge"])


# ---- the train step: momentum and queues step by step ------------------------------------------------------------

def at_path(tree: dict, path: tuple) -> np.ndarray:
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_momentum_update_and_queues_follow_a_reference_step_by_step(precomp_root):
    from flax import nnx

    from jaxretrieval.systems.aahr import batch_inputs
    from jaxretrieval.tasks import make_task

    config = aahr_config(precomp_root, **{"aahr.prototypes": 0})
    task = make_task(config, {})
    mesh = make_mesh(config.mesh)
    graphdef, params, opt_state, step_fn = train.setup_training(task.config, mesh)
    m = config.section.momentum
    loader = iter(task.loader(0))
    for step in range(3):  # QUEUE / BATCH = 2: the third step wraps to the start
        batch = {k: v for k, v in next(loader).items() if k != "origin"}
        before = jax.tree.map(np.asarray, params)
        want_momentum = jax.tree_util.tree_map_with_path(
            lambda path, mom, online=before: m * mom + (1 - m) * at_path(online, path), before["momentum"])
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, {**before, "momentum": want_momentum}))
        v_m, t_m = map(np.asarray, model.momentum_embeddings(*batch_inputs(jax.tree.map(jnp.asarray, batch))))
        params, opt_state, _ = step_fn(params, opt_state, batch, step)
        after = jax.tree.map(np.asarray, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after["momentum"],
                     want_momentum)
        start = (step * BATCH) % QUEUE
        np.testing.assert_allclose(after["queues"]["image"][start:start + BATCH], v_m, atol=1e-5)
        np.testing.assert_allclose(after["queues"]["text"][start:start + BATCH], t_m, atol=1e-5)
        np.testing.assert_array_equal(after["queues"]["ids"][start:start + BATCH], batch["group"])
        assert int(after["queues"]["ptr"]) == ((step + 1) * BATCH) % QUEUE
        assert int(after["updates"]) == step + 1
        others = np.delete(np.arange(QUEUE), np.arange(start, start + BATCH))
        np.testing.assert_array_equal(after["queues"]["image"][others], before["queues"]["image"][others])


def test_enqueue_wraps_at_the_queue_end():
    queues = {"image": jnp.zeros((6, 2)), "text": jnp.zeros((6, 2)), "ids": -jnp.ones(6, jnp.int32),
              "ptr": jnp.int32(4)}
    out = enqueue(queues, jnp.ones((2, 2)), 2 * jnp.ones((2, 2)), jnp.array([7, 8], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out["ids"]), [-1, -1, -1, -1, 7, 8])
    assert int(out["ptr"]) == 0


# ---- whole runs -----------------------------------------------------------------------------------------------------

def train_command(workdir: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "jaxretrieval.train", "--config", str(AAHR_CONFIG), "--workdir", str(workdir),
            *overrides(root)]


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical_with_queues_momentum_and_prototypes(precomp_root, tmp_path):
    """8 steps (prototypes clustered at steps 2 and 5, the queue wrapped); a run killed after its step-2 checkpoint
    resumes and ends with every leaf equal to an uninterrupted run's."""
    whole = tmp_path / "whole"
    train.train(aahr_config(precomp_root), whole)
    broken = tmp_path / "broken"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(train_command(broken, precomp_root), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    folder = broken / "checkpoints"
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline and not checkpoint.step_folders(folder):
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = checkpoint.step_folders(folder)
    assert steps and steps[-1] < 8, f"not interrupted part-way ({steps})"
    train.train(aahr_config(precomp_root), broken)

    def final(workdir: Path) -> dict:
        config = evaluate.saved_config(workdir)
        _, params, meta = evaluate.restore_params(config, workdir / "checkpoints" / "8", make_mesh(config.mesh))
        return jax.tree.map(np.asarray, params)

    got, want = final(broken), final(whole)
    assert want["prototypes"].any() and (want["queues"]["ids"] >= 0).all()
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_vse_infty_trains_and_evaluates_1k_folds(precomp_root, tmp_path):
    config = load_config(VSE_CONFIG, overrides(precomp_root, "vse_infty", **{"eval.folds": 2}))
    result = train.train(config, tmp_path / "run")
    metrics = result if "rsum" in result else result.get("eval", result)
    keys = set(metrics) if isinstance(metrics, dict) else set()
    assert {"rsum", "1k_rsum", "i2t_R1", "t2i_R10"} <= keys, keys
    assert metrics["num_images"] == 10 and metrics["num_texts"] == 50


# ---- errors --------------------------------------------------------------------------------------------------------

def test_region_width_and_global_width_mismatches_name_the_file(precomp_root):
    from jaxretrieval.tasks import make_task

    with pytest.raises(ConfigError, match=r"train_ims\.npy holds 16-wide region features but aahr\.region_dim is 32"):
        make_task(aahr_config(precomp_root, **{"aahr.region_dim": 32}), {})
    with pytest.raises(ConfigError, match=r"train_clip_ims\.npy holds 8-wide global features but aahr\.global_dim"):
        make_task(aahr_config(precomp_root, **{"aahr.global_dim": 4}), {})


def test_missing_global_features_and_bad_queue_size_are_clear_errors(precomp_root, tmp_path):
    from jaxretrieval.tasks import make_task

    with pytest.raises(ConfigError, match="aahr.queue_size must be a multiple of train.batch_size"):
        aahr_config(precomp_root, **{"aahr.queue_size": 15})
    bare = write_precomp_demo(tmp_path / "bare", images=10, regions=REGIONS, dim=DIM,
                              split_sizes={"train": 10, "test": 5})
    with pytest.raises(DataError, match=r"train_clip_ims\.npy does not exist .*clip_globals"):
        make_task(aahr_config(bare), {})


@pytest.mark.slow
def test_train_steps_on_8_fsdp_devices_equal_one_device_with_the_queues_split(precomp_root):
    """Three steps (the queue filled, prototypes clustered at step 2): the same losses and state on 8 devices with
    the fsdp rules as on 1, and the queues really split."""
    from conftest import run_python

    extra = ["train.batch_size=16", "aahr.queue_size=32", "aahr.prototype_refresh=2"]
    code = f"""
import jax, numpy as np
from jaxretrieval import train
from jaxretrieval.config import load_config
from jaxretrieval.sharding import make_mesh
out = []
for devices, mesh in ((1, ["mesh.data=1"]), (8, ["mesh.data=2", "mesh.fsdp=4", "sharding=fsdp"])):
    config = load_config({str(AAHR_CONFIG)!r}, {overrides(precomp_root)!r} + {extra!r} + mesh)
    task = train.make_task(config, {{}})
    loader = iter(task.loader(0))
    mesh = make_mesh(task.config.mesh, jax.devices()[:devices])
    _, params, opt_state, step = train.setup_training(task.config, mesh)
    losses = []
    for i in range(3):
        batch = next(loader)
        batch.pop("origin")
        params, opt_state, metrics = step(params, opt_state, train.global_batch(batch, mesh), np.int32(i))
        losses.append({{k: float(v) for k, v in metrics.items() if k.startswith("loss")}})
    queue = params["queues"]["image"]
    out.append((jax.tree.map(np.asarray, params), losses, queue.addressable_shards[0].data.shape, queue.shape))
(p1, l1, _, _), (p8, l8, local, shape) = out
assert local != shape, (local, shape)
assert p1["prototypes"].any()
for a, b in zip(l1, l8):
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)
# The bias before the region MLP's batch norm has a zero gradient up to rounding, which Adam turns into lr-sized
# steps of either sign, on 1 device as on 8 (and in torch): it is left out. Adam amplifies the last bits of other
# small gradients too, so parameters agree to a fraction of the 3 steps' lr (2e-3 each); the queues, written from
# the momentum copies, much closer.
flat8, flat1 = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (p8, p1))
for path, leaf in flat1.items():
    if "layers_0" not in jax.tree_util.keystr(path) or "bias" not in jax.tree_util.keystr(path):
        np.testing.assert_allclose(flat8[path], leaf, rtol=1e-4, atol=6e-4, err_msg=jax.tree_util.keystr(path))
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), p8["queues"], p1["queues"])
print("ok", l1[-1])
"""
    assert run_python(code, devices=8).stdout.startswith("ok")
