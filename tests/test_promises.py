"""README promises checked by value (issue 26): checkpoint pruning, grain workers, mean accumulation, centroid
options, the re-id dataset kinds end to end, `train.init_from` a converted CLIP, `convert clip --bpe` and its
refusals, fuse's roles and its .pt reader, and the preset parameter counts."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_config
from flax import nnx
from PIL import Image

import jaxretrieval
from jaxretrieval import checkpoint, evaluate, fuse, predict, retrieve, train
from jaxretrieval.config import load_config
from jaxretrieval.data import pipeline
from jaxretrieval.data.pipeline import caption_source, make_tokenizer, train_loader
from jaxretrieval.data.reid_demo import _camera, _identity, render_person
from jaxretrieval.data.reid_pipeline import reid_eval_splits
from jaxretrieval.losses import training_loss
from jaxretrieval.models import abstract_model, init_params
from jaxretrieval.retrieval import evaluate_reid
from jaxretrieval.sharding import global_batch, make_mesh
from jaxretrieval.train import system_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def losses(workdir: Path) -> dict[int, float]:
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def as_numpy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# --- a tiny CLIP run shared by the checkpoint, worker and predict / retrieve checks --------------------------------

RUN = {"train.steps": 5, "train.checkpoint_every": 1, "train.keep_checkpoints": 2, "data.flip": True}


@pytest.fixture(scope="module")
def clip_run(demo_root, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("clip_run")
    train.train(tiny_config(demo_root, **RUN), workdir)
    return workdir


def test_keep_checkpoints_prunes_to_the_last_k_steps(clip_run):
    """train.keep_checkpoints=2 with a checkpoint every step: of steps 1..5 exactly 4 and 5 remain, each whole."""
    folders = sorted(p.name for p in (clip_run / "checkpoints").iterdir())
    assert folders == ["4", "5"], folders
    assert sorted(losses(clip_run)) == [1, 2, 3, 4, 5]  # every step was run (and logged once)
    for step in ("4", "5"):
        assert (clip_run / "checkpoints" / step / "integrity.json").is_file()


# --- grain worker processes -----------------------------------------------------------------------------------------

def first_batches(root: Path, workers: int, count: int = 4) -> list[dict[str, np.ndarray]]:
    config = tiny_config(root, **{"data.workers": workers, "data.flip": True, "data.hybrid_views": True,
                                  "train.batch_size": 8})
    loader = iter(train_loader(config, caption_source(config, root, "train"), make_tokenizer(config, root)))
    return [next(loader) for _ in range(count)]


@pytest.fixture(scope="module")
def batches_by_workers(demo_root) -> dict[int, list[dict[str, np.ndarray]]]:
    return {workers: first_batches(demo_root, workers) for workers in (0, 2)}


def by_record(batches: list[dict[str, np.ndarray]]) -> dict[tuple, np.ndarray]:
    """(image id, caption ids) -> the augmented image, over several batches (each caption is one record)."""
    out = {}
    for batch in batches:
        for group, text, image in zip(batch["group"], batch["text"], batch["image"], strict=True):
            out[(int(group), tuple(text.tolist()))] = image
    return out


def test_grain_workers_read_the_same_records_with_the_same_augmentation(batches_by_workers):
    """workers=2 vs 0 over the first 4 global batches: the same records, each with bit-identical augmented pixels
    (flip and hybrid views are drawn from the record's stream position, not from the worker)."""
    serial, parallel = (by_record(batches_by_workers[w]) for w in (0, 2))
    assert len(serial) == 32 and serial.keys() == parallel.keys()
    for key, image in serial.items():
        np.testing.assert_array_equal(parallel[key], image, err_msg=str(key))
    flipped = [np.array_equal(image, image[:, ::-1]) for image in serial.values()]
    assert not all(flipped)  # the images are not symmetric: a flip would show


def test_grain_workers_give_the_same_global_batches_and_losses(batches_by_workers, clip_run, demo_root, tmp_path):
    for serial, parallel in zip(batches_by_workers[0], batches_by_workers[2], strict=True):
        np.testing.assert_array_equal(parallel["group"], serial["group"])
        np.testing.assert_array_equal(parallel["text"], serial["text"])
        np.testing.assert_array_equal(parallel["image"], serial["image"])
    train.train(tiny_config(demo_root, **{**RUN, "data.workers": 2, "train.checkpoint_every": 0}), tmp_path)
    expected, found = losses(clip_run), losses(tmp_path)
    assert sorted(found) == sorted(expected)
    np.testing.assert_allclose([found[s] for s in sorted(found)], [expected[s] for s in sorted(expected)],
                               rtol=1e-6, atol=0)


class CountingPool:
    """ThreadPoolExecutor wrapper that records the worker counts it was opened with."""

    opened: list[int] = []

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        CountingPool.opened.append(workers)
        self.pool = ThreadPoolExecutor(workers)

    def __enter__(self):
        return self.pool.__enter__()

    def __exit__(self, *exc):
        return self.pool.__exit__(*exc)


@pytest.fixture
def spied(monkeypatch) -> dict[str, list]:
    """Records the embeddings predict and retrieve compute, and the decoding thread pools they open."""
    seen: dict[str, list] = {"embeddings": []}
    original = evaluate.embed_inputs

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen["embeddings"].append(tuple(np.asarray(x) for x in result))
        return result

    monkeypatch.setattr(evaluate, "embed_inputs", spy)
    monkeypatch.setattr(predict, "embed_inputs", spy)
    CountingPool.opened = []
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", CountingPool)
    return seen


def test_predict_with_worker_threads_writes_the_same_outputs(clip_run, demo_root, tmp_path, spied):
    records = [json.loads(line) for line in (demo_root / "test.jsonl").read_text().splitlines()]
    queries = tmp_path / "query.json"
    queries.write_text("".join(json.dumps({"query_index": i, "caption": r["caption"]}) + "\n"
                               for i, r in enumerate(records[:12])))
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for record in records[::3][:20]:
        shutil.copy(demo_root / record["image"], gallery / Path(record["image"]).name)
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        assert predict.main(["--checkpoint", str(clip_run), "--queries", str(queries), "--gallery", str(gallery),
                             "--output-dir", str(out), "--workers", str(workers), "--batch-size", "8"]) == 0
        outputs[workers] = {name: (out / name).read_bytes() for name in ("submission.txt", "scores.npz")}
    assert CountingPool.opened and set(CountingPool.opened) == {2}  # the threads did decode (workers=2 only)
    assert outputs[2] == outputs[0]
    (images0, texts0), (images2, texts2) = spied["embeddings"]
    np.testing.assert_array_equal(images2, images0)
    with np.load(tmp_path / "out2" / "scores.npz") as saved:
        np.testing.assert_allclose(saved["scores"], texts2 @ images2.T, rtol=1e-6)
        assert len(saved["gallery_ids"]) == 20 and len(saved["query_ids"]) == 12


def test_retrieve_with_worker_threads_gives_the_same_metrics(clip_run, demo_root, tmp_path, spied):
    metrics = {}
    for workers in (0, 2):
        output = tmp_path / f"metrics{workers}.json"
        assert retrieve.main(["--checkpoint", str(clip_run), "--images", str(demo_root), "--captions",
                              str(demo_root / "test.jsonl"), "--output", str(output), "--workers", str(workers),
                              "--batch-size", "8"]) == 0
        metrics[workers] = json.loads(output.read_text())
    assert set(CountingPool.opened) == {2}
    assert metrics[2] == metrics[0] and metrics[0]["num_images"] == 32
    (images0, texts0), (images2, texts2) = spied["embeddings"]
    np.testing.assert_array_equal(images2, images0)
    np.testing.assert_array_equal(texts2, texts0)


# --- train.accumulation=mean ---------------------------------------------------------------------------------------

def test_mean_accumulation_step_is_the_mean_of_the_micro_batch_losses(demo_root):
    """train.micro_batches=2 train.accumulation=mean through the config and the jitted train step: the step's loss
    is the mean of the two micro-batches' own InfoNCE losses (rows 0, 2, 4, ... and 1, 3, 5, ..., as
    jaxretrieval/gradients.py splits), its gradient their mean gradient, and the update AdamW applied to that
    gradient. (train.eps=10 makes Adam's first update ~ lr * g / eps, so the parameters carry the gradient's
    values, not only its signs.)"""
    config = tiny_config(demo_root, **{"train.micro_batches": 2, "train.accumulation": "mean", "train.batch_size": 8,
                                       "train.grad_clip": 0, "train.warmup_steps": 0, "train.lr": 0.1,
                                       "train.eps": 10.0})
    mesh = make_mesh(config.mesh)
    graphdef, params, opt_state, step_fn = train.setup_training(config, mesh)
    start = as_numpy(params)
    loaded = next(iter(train_loader(config, caption_source(config, demo_root, "train"),
                                    make_tokenizer(config, demo_root))))
    batch = {key: loaded[key] for key in ("image", "text", "group")}  # what the train step reads
    new_params, _, metrics = step_fn(params, opt_state, global_batch(batch, mesh), np.int32(1))

    loss_fn = training_loss()

    def rows_loss(p, rows):
        model = nnx.merge(graphdef, p)
        image, text, _ = model(jnp.asarray(batch["image"][rows]), jnp.asarray(batch["text"][rows]))
        return loss_fn(image, text, model.loss_scalars(), jnp.asarray(batch["group"][rows]))

    halves = [np.arange(m, 8, 2) for m in range(2)]
    start = jax.tree.map(jnp.asarray, start)
    each = [float(rows_loss(start, rows)) for rows in halves]
    mean_loss, grads = jax.value_and_grad(lambda p: (rows_loss(p, halves[0]) + rows_loss(p, halves[1])) / 2)(start)
    whole = float(rows_loss(start, np.arange(8)))
    assert float(metrics["loss"]) == pytest.approx(np.mean(each), rel=1e-5)
    assert float(mean_loss) == pytest.approx(np.mean(each), rel=1e-6)
    assert abs(whole - np.mean(each)) > 0.1  # the whole-batch loss (4 more negatives per row) is another number
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)

    tx = system_optimizer(config)
    updates, _ = tx.update(grads, tx.init(start), start)
    expected = as_numpy(optax.apply_updates(start, updates))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(start),
                                                          strict=True))
    assert moved > 1e-4
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7),
                 as_numpy(new_params), expected)


# --- re-id datasets: market1501, dukemtmc, street2shop through train and evaluate ----------------------------------

SIZE = (64, 32)  # data.input_size (each side at least 32)
TRAIN_IDS = (3, 8, 15, 21)  # 4 images each: batches of 2 identities x 4 images


def person(path: Path, pid: int, camera: int, index: int) -> None:
    rng = np.random.default_rng([pid + 5, camera, index])
    pixels = render_person(_identity(7, max(pid, 0)), _camera(7, camera), rng, *SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


# Test identities (pid, camera, index). Query pid 44 has gallery images only in its own camera: per-camera
# centroids (and the image protocol) have no valid match for it; one centroid over all cameras has.
QUERY = [(40, 1, 0), (41, 2, 0), (42, 1, 0), (43, 3, 0), (44, 2, 0)]
GALLERY = [(40, 2, 1), (40, 3, 2), (41, 1, 1), (41, 1, 2), (41, 2, 3), (42, 2, 1), (42, 3, 2), (43, 1, 1),
           (43, 2, 2), (44, 2, 1), (44, 2, 2), (0, 1, 0), (0, 3, 1)]  # pid 0: distractors


def folder_dataset(root: Path, kind: str) -> dict[str, list[tuple[str, int, int]]]:
    """A market1501 / dukemtmc folder (junk pid -1 images included, which the readers skip); returns the expected
    (path, pid, 0-based camera) of each split. Duke's names carry cameras 7 and 8, beyond Market's 6."""
    camera_of = (lambda c: c + 5) if kind == "dukemtmc" else (lambda c: c)
    name = "{pid:04d}_c{cam}_f{index:07d}.jpg" if kind == "dukemtmc" else "{pid:04d}_c{cam}s1_{index:06d}_00.jpg"
    expected: dict[str, list] = {"train": [], "query": [], "gallery": []}
    train_items = [(pid, 1 + i % 3, i) for pid in TRAIN_IDS for i in range(4)]
    for split, folder, items in (("train", "bounding_box_train", train_items), ("query", "query", QUERY),
                                 ("gallery", "bounding_box_test", GALLERY)):
        for pid, cam, index in items:
            path = root / folder / name.format(pid=pid, cam=camera_of(cam), index=index)
            person(path, pid, cam, index)
            expected[split].append((str(path), pid, camera_of(cam) - 1))
        junk = root / folder / name.format(pid=0, cam=1, index=99).replace("0000_", "-1_")
        person(junk, -1, 1, 99)
    return {split: sorted(items) for split, items in expected.items()}  # the readers' (file name) order


def street2shop_dataset(root: Path) -> dict[str, list[tuple[str, int, int]]]:
    """COCO-style JSON splits (train.json, and query.json / gallery.json named after it), images under
    root/<split>; camera 0 for user (train, query) images and 1 for shop (gallery) images."""
    expected: dict[str, list] = {"train": [], "query": [], "gallery": []}
    train_items = [(pid, 1, i) for pid in TRAIN_IDS for i in range(4)] + [(30, 1, 0)]  # pair 30: one image, dropped
    for split, items in (("train", train_items), ("query", QUERY), ("gallery", GALLERY)):
        images, annotations = [], []
        for n, (pid, cam, index) in enumerate(items):
            file_name = f"{split}_{n:03d}.jpg"
            person(root / split / file_name, pid, cam, index)
            images.append({"id": 1000 + n, "file_name": file_name})
            annotations.append({"image_id": 1000 + n, "pair_id": pid,
                                "source": "shop" if split == "gallery" else "user"})
            if not (split == "train" and pid == 30):
                expected[split].append((str(root / split / file_name), pid, 1 if split == "gallery" else 0))
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    expected = {split: sorted(items, key=lambda item: item[1]) for split, items in expected.items()}  # pair-id order
    return expected


def reid_overrides(kind: str, root: Path, **extra) -> list[str]:
    values = {"data.kind": kind, "data.root": str(root), "data.input_size": list(SIZE), "data.padding": 2,
              "train.batch_size": 8, "data.num_instances": 4, "train.epochs": 0, "train.steps": 2,
              "train.schedule": "cosine", "train.warmup_steps": 0, "train.checkpoint_every": 0,
              "train.progress_bar": False, "train.log_every": 1, "eval.batch_size": 16, "data.train_file": "train.json"}
    values.update(extra)
    return [f"{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def reid_runs(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """kind -> (workdir, expected splits, train's last evaluation), after 2 steps of the tiny CTL model."""
    runs = {}
    for kind in ("market1501", "dukemtmc", "street2shop"):
        base = tmp_path_factory.mktemp(kind)
        root = base / "data"
        expected = street2shop_dataset(root) if kind == "street2shop" else folder_dataset(root, kind)
        config = load_config(REPO / "configs" / "demo" / "ctl_tiny.yaml", reid_overrides(kind, root))
        result = train.train(config, base / "run")
        runs[kind] = (base / "run", expected, result)
    return runs


def direct_reid(workdir: Path, expected: dict, **options) -> dict:
    """evaluate_reid on embeddings of the checkpoint computed here, over the expected query and gallery lists."""
    model, preprocess, _ = jaxretrieval.load(workdir)
    sets = []
    for split in ("query", "gallery"):
        paths, pids, cams = zip(*expected[split], strict=True)
        embeddings = np.asarray(model.encode_image(np.stack([preprocess(p) for p in paths]), normalize=True))
        sets += [embeddings, np.asarray(pids), np.asarray(cams)]
    return evaluate_reid(*sets, **options)


def run_evaluate(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert evaluate.main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["market1501", "dukemtmc", "street2shop"])
def test_reid_dataset_kinds_train_and_evaluate(kind, reid_runs, capsys):
    workdir, expected, trained = reid_runs[kind]
    assert sorted(losses(workdir)) == [1, 2]
    config = evaluate.saved_config(workdir)
    assert config.data.kind == kind and config.model.num_classes == len(TRAIN_IDS)  # pair 30 and junk left out
    query, gallery = reid_eval_splits(config)
    for split, read in (("query", query), ("gallery", gallery)):  # junk (-1) skipped, distractors (0) kept
        assert read.images.paths == [path for path, _, _ in expected[split]], split
        np.testing.assert_array_equal(read.pids, [pid for _, pid, _ in expected[split]])
        np.testing.assert_array_equal(read.camids, [cam for _, _, cam in expected[split]])

    metrics = run_evaluate(capsys, "--checkpoint", str(workdir))
    assert metrics["step"] == 2 and metrics["skipped"] == 0
    assert metrics["num_queries"] == metrics["centroid_num_queries"] == len(QUERY)
    images = direct_reid(workdir, expected, centroids=False)
    centroids = direct_reid(workdir, expected, centroids=True, per_camera=True)
    for key, value in images.items():
        assert metrics[key] == pytest.approx(value, abs=1e-4), key
        assert trained[key] == pytest.approx(value, abs=1e-4), key
    for key, value in centroids.items():
        assert metrics[f"centroid_{key}"] == pytest.approx(value, abs=1e-4), key
    # The query of pid 44 (seen in the gallery by its own camera only) has no valid gallery match; street2shop's
    # gallery is all shop images (camera 1), so there every query counts.
    assert metrics["num_valid_queries"] == len(QUERY) - (kind != "street2shop")


def test_centroids_over_all_cameras_with_per_camera_centroids_false(reid_runs, capsys):
    """eval.per_camera_centroids=false: one centroid per identity from all its gallery images, same-camera ones
    included, so pid 44's query (gallery images only in its own camera) now has its centroid."""
    workdir, expected, _ = reid_runs["market1501"]
    default = run_evaluate(capsys, "--checkpoint", str(workdir))
    lenient = run_evaluate(capsys, "--checkpoint", str(workdir), "eval.per_camera_centroids=false")
    direct = direct_reid(workdir, expected, centroids=True, per_camera=False)
    for key, value in direct.items():
        assert lenient[f"centroid_{key}"] == pytest.approx(value, abs=1e-4), key
    assert lenient["centroid_num_valid_queries"] == len(QUERY)
    assert default["centroid_num_valid_queries"] == len(QUERY) - 1
    for key in ("R1", "mAP", "num_valid_queries"):  # the image metrics do not depend on the option
        assert lenient[key] == default[key]

    # By hand: normalised mean of each identity's gallery embeddings, every query ranked against them.
    model, preprocess, _ = jaxretrieval.load(workdir)
    embed = lambda items: np.asarray(model.encode_image(np.stack([preprocess(p) for p, _, _ in items]), True))  # noqa: E731
    query, gallery = embed(expected["query"]), embed(expected["gallery"])
    gallery_pids = np.array([pid for _, pid, _ in expected["gallery"]])
    ids = np.unique(gallery_pids)
    centres = np.stack([gallery[gallery_pids == pid].mean(0) for pid in ids])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    best = ids[np.argmax(query @ centres.T, axis=1)]
    r1 = 100 * np.mean(best == np.array([pid for _, pid, _ in expected["query"]]))
    assert lenient["centroid_R1"] == pytest.approx(r1, abs=1e-4)


# --- convert clip: --bpe, train.init_from, refusals ----------------------------------------------------------------

C_EMBED, C_IMAGE, C_PATCH, C_WIDTH, C_CONTEXT, C_TEXT_WIDTH = 16, 32, 8, 64, 16, 32
MERGES = 20000  # the custom merges file: the first 20000 of CLIP's merges -> 512 + 20000 + 2 ids


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random tiny open_clip CLIP (GELU) saved as an open_clip folder, converted with a custom --bpe merges file
    that is then deleted. Returns (OUT, the torch model, the merges file's lines)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import default_bpe

    from convert.__main__ import main as convert_main

    base = tmp_path_factory.mktemp("converted")
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[:1 + MERGES]
    bpe = base / "custom_bpe.txt.gz"
    bpe.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))  # no trailing newline (open_clip reads one)
    vocab = 512 + MERGES + 2
    cfg = {"embed_dim": C_EMBED,
           "vision_cfg": {"image_size": C_IMAGE, "layers": 1, "width": C_WIDTH, "patch_size": C_PATCH,
                          "head_width": 32},
           "text_cfg": {"context_length": C_CONTEXT, "vocab_size": vocab, "width": C_TEXT_WIDTH, "heads": 2,
                        "layers": 1}}
    torch.manual_seed(0)
    model = CLIP(embed_dim=C_EMBED, vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**cfg["text_cfg"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = base / "open_clip"
    folder.mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    out = base / "out"
    assert convert_main(["clip", str(folder), str(out), "--bpe", str(bpe)]) == 0
    kept = base / "kept_bpe.txt.gz"
    bpe.rename(kept)  # the checkpoint must not need the file any more
    return out, model, kept


TEXTS = ["a big red ring at the top left", "two small blue squares!", "Zebra-crossings & 42 owls, naïvely"]


def test_convert_bpe_file_is_saved_and_used_by_load(converted):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    out, _, bpe = converted
    _, _, tokenizer = jaxretrieval.load(out)
    assert tokenizer.vocab_size == 512 + MERGES + 2
    ours = np.asarray(tokenizer(TEXTS))
    theirs = SimpleTokenizer(bpe_path=str(bpe), context_length=C_CONTEXT)(TEXTS).numpy()
    np.testing.assert_array_equal(ours, theirs)
    standard = SimpleTokenizer(bpe_path=default_bpe(), context_length=C_CONTEXT)(TEXTS).numpy()
    assert not np.array_equal(ours, standard)  # not the merges open_clip ships


def test_init_from_a_converted_checkpoint_starts_from_its_parameters(converted, demo_root, tmp_path):
    out, model, _ = converted
    config = evaluate.saved_config(out, [
        "data.kind=jsonl", f"data.root={demo_root}", "data.tokenizer=checkpoint", f"train.init_from={out}",
        "train.lr=0", "train.end_lr=0", "train.weight_decay=0", "train.warmup_steps=0", "train.steps=1",
        "train.batch_size=8", "train.checkpoint_every=0", "train.progress_bar=False", "train.log_every=1",
        "eval.batch_size=32"])
    train.train(config, tmp_path)
    assert np.isfinite(losses(tmp_path)[1])
    _, trained, meta = evaluate.restore_params(config, tmp_path, make_mesh(config.mesh))
    trained = as_numpy(trained)
    converted_params = as_numpy(jaxretrieval.load(out)[0].params)
    jax.tree.map(np.testing.assert_array_equal, trained, converted_params)
    state = model.state_dict()  # the values are the torch model's, not a fresh initialisation's
    np.testing.assert_array_equal(trained["visual"]["proj"], state["visual.proj"].numpy())
    np.testing.assert_array_equal(trained["text"]["token_embedding"]["embedding"],
                                  state["token_embedding.weight"].numpy())
    fresh = as_numpy(init_params(config.model, seed=config.train.seed, precision="fp32"))
    assert not np.allclose(fresh["visual"]["proj"], trained["visual"]["proj"])
    assert meta["tokenizer"] == json.loads(json.dumps(checkpoint.read_meta_at(out)["tokenizer"]))


def unsupported_sources(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (SRC, a pattern the error must match): open_clip releases whose features convert does not support,
    each as open_clip ships it (weights + open_clip_config.json) and, where it has one, as a bare state dict."""
    import open_clip
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    safetensors_torch = pytest.importorskip("safetensors.torch")
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    vit = {"layers": 1, "width": 64, "patch_size": 8, "image_size": 32, "head_width": 32}
    configs = {
        "resnet": {"embed_dim": 16, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64,
                                                   "head_width": 16}, "text_cfg": text},
        "siglip-bias": {"embed_dim": 16, "vision_cfg": vit, "text_cfg": text, "init_logit_bias": -10.0},
        "layer-scale": {"embed_dim": 16, "vision_cfg": {**vit, "ls_init_value": 0.1}, "text_cfg": text},
    }
    patterns = {"resnet": r"ResNet|only ViT image towers", "siglip-bias": r"SigLIP|logit_bias",
                "layer-scale": r"layer scale|ls_init_value|ls_1\.gamma"}
    sources = {}
    for name, cfg in configs.items():
        model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                     text_cfg=CLIPTextCfg(**cfg["text_cfg"]), init_logit_bias=cfg.get("init_logit_bias"))
        folder = root / name
        folder.mkdir()
        safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(folder / "open_clip_model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        torch.save(model.state_dict(), root / f"{name}.pt")
        sources[f"{name}-folder"] = (folder, patterns[name])
        sources[f"{name}-state-dict"] = (root / f"{name}.pt", patterns[name])
    # SigLIP as open_clip releases it (ViT-B-16-SigLIP): a timm trunk and a custom text tower. Its key names and
    # config, with tiny tensors (every key is read; the refusal must come before any shape matters).
    with torch.device("meta"):
        siglip = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, device="meta")
    folder = root / "siglip-release"
    folder.mkdir()
    safetensors_torch.save_file({key: torch.zeros(2) for key in siglip.state_dict()},
                                str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(
        "ViT-B-16-SigLIP")}))
    sources["siglip-release"] = (folder, r"SigLIP|init_logit_bias|logit_bias|timm|custom_text")
    return sources


UNSUPPORTED = ["resnet-folder", "resnet-state-dict", "siglip-bias-folder", "siglip-bias-state-dict",
               "layer-scale-folder", "layer-scale-state-dict", "siglip-release"]


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory):
    pytest.importorskip("open_clip")
    return unsupported_sources(tmp_path_factory.mktemp("unsupported"))


@pytest.mark.filterwarnings("ignore:the text tower has:UserWarning")
@pytest.mark.parametrize("case", UNSUPPORTED)
def test_convert_refuses_unsupported_clip_features_clearly(case, unsupported, tmp_path, capsys):
    from convert.__main__ import main as convert_main

    src, pattern = unsupported[case]
    capsys.readouterr()
    assert convert_main(["clip", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(pattern, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()


# --- fuse ------------------------------------------------------------------------------------------------------------

def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def test_fuse_iterative_roles_follow_the_formula(tmp_path, capsys):
    """--primary/--itm/--second/--third rename the roles of S = {[(1-w1) N(itm) + w1 N(primary)] w2
    + (1-w2) N(second)} w3 + (1-w3) N(third); files in shuffled id orders are aligned to the first one's."""
    rng = np.random.default_rng(0)
    queries, gallery = [f"q{i}" for i in range(6)], [f"g{j:02d}" for j in range(15)]
    raw = {name: rng.normal(size=(6, 15)) * scale + shift
           for name, scale, shift in (("alpha", 1.0, 0.0), ("bravo", 3.0, 5.0), ("charlie", 0.2, -1.0),
                                      ("delta", 10.0, 2.0))}
    args = []
    for k, (name, scores) in enumerate(raw.items()):
        rows, cols = rng.permutation(6) if k else np.arange(6), rng.permutation(15) if k else np.arange(15)
        np.savez(tmp_path / f"{name}.npz", scores=scores[np.ix_(rows, cols)],
                 query_ids=np.array(queries)[rows], gallery_ids=np.array(gallery)[cols])
        args.append(f"{name}={tmp_path / name}.npz")
    w1, w2, w3 = 0.7, 0.4, 0.8
    roles = {"itm": "charlie", "primary": "delta", "second": "alpha", "third": "bravo"}
    out = tmp_path / "fused"
    assert fuse.main(["--mode", "iterative", "--scores", *args, "--weights", f"w1={w1}", f"w2={w2}", f"w3={w3}",
                      *(f"--{role}={name}" for role, name in roles.items()), "--output-dir", str(out)]) == 0
    n = {role: minmax(raw[name]) for role, name in roles.items()}
    expected = ((((1 - w1) * n["itm"] + w1 * n["primary"]) * w2 + (1 - w2) * n["second"]) * w3
                + (1 - w3) * n["third"])
    with np.load(out / "fused.npz") as fused:
        assert fused["query_ids"].tolist() == queries and fused["gallery_ids"].tolist() == gallery
        np.testing.assert_allclose(fused["scores"], expected, rtol=0, atol=1e-12)
    top = [" ".join(np.array(gallery)[np.argsort(-row, kind="stable")[:10]]) for row in expected]
    assert (out / "submission.txt").read_text().splitlines() == top
    swapped = {**roles, "itm": "delta", "primary": "charlie"}  # the roles matter
    assert fuse.main(["--mode", "iterative", "--scores", *args, "--weights", f"w1={w1}", f"w2={w2}", f"w3={w3}",
                      *(f"--{role}={name}" for role, name in swapped.items()), "--output-dir",
                      str(tmp_path / "swapped")]) == 0
    with np.load(tmp_path / "swapped" / "fused.npz") as other:
        assert np.abs(other["scores"] - expected).max() > 1e-3


class Payload:
    """Unpickling this creates a file: proof of whether pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_fuse_reads_plain_tensors_and_refuses_pickled_objects(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    scores = np.random.default_rng(1).normal(size=(3, 4))
    ids = {"query_ids": ["a", "b", "c"], "gallery_ids": ["w", "x", "y", "z"]}
    torch.save(torch.from_numpy(scores), tmp_path / "plain.pt")
    (tmp_path / "plain.json").write_text(json.dumps(ids))
    np.savez(tmp_path / "same.npz", scores=scores, **{k: np.array(v) for k, v in ids.items()})
    assert fuse.main(["--scores", f"m={tmp_path / 'plain.pt'}", "--weights", "m=1", "--output-dir",
                      str(tmp_path / "ok")]) == 0
    with np.load(tmp_path / "ok" / "fused.npz") as fused:
        np.testing.assert_allclose(fused["scores"], minmax(scores), atol=1e-15)

    marker = tmp_path / "pickled-code-ran"
    torch.save({"scores": torch.from_numpy(scores), "extra": Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text(json.dumps(ids))
    capsys.readouterr()
    assert fuse.main(["--scores", f"e={tmp_path / 'evil.pt'}", f"s={tmp_path / 'same.npz'}", "--weights", "e=0.5",
                      "s=0.5", "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evil.pt" in errors[0] and "weights_only=True" in errors[0], err
    assert not marker.exists() and not (tmp_path / "refused").exists()


def test_fuse_pickle_refusal_is_one_line(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save({"scores": torch.zeros(2, 2), "extra": Payload(tmp_path / "marker")}, tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text(json.dumps({"query_ids": ["a", "b"], "gallery_ids": ["c", "d"]}))
    capsys.readouterr()
    assert fuse.main(["--scores", f"e={tmp_path / 'evil.pt'}", "--weights", "e=1", "--output-dir",
                      str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


# --- parameter counts of the presets ---------------------------------------------------------------------------------

def our_count(name: str) -> int:
    _, params = abstract_model(load_config(None, [f"model.name={name}"]).model)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def test_vit_l14_336_has_open_clips_parameter_count():
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        reference = open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta")
    count = sum(p.numel() for p in reference.parameters())
    assert count == 427_944_193  # open_clip's ViT-L-14-336 (its model_profile table: 427.94 M)
    assert our_count("vit_l14_336") == count


@pytest.mark.parametrize("size", [224, 384])
def test_beit3_base_presets_have_torchscales_parameter_count(size):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3

    # unilm's _get_base_config for BEiT3ForRetrieval: torchscale's BEiT3, then two bias-free 768 x 768 heads
    # (vision_head, language_head) and the logit scale.
    args = EncoderConfig(img_size=size, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
                         normalize_output=True, no_output_layer=True, encoder_embed_dim=768,
                         encoder_attention_heads=12, encoder_ffn_embed_dim=3072, encoder_layers=12)
    with torch.device("meta"):
        encoder = BEiT3(args)
    count = sum(p.numel() for p in encoder.parameters()) + 2 * 768 * 768 + 1
    assert count == {224: 222_167_041, 384: 222_458_881}[size]  # 384: a larger vision position table
    assert our_count(f"beit3_base_patch16_{size}") == count
