"""Re-id data: Market/Duke/Street2Shop readers, P x K batch order, Centroids-ReID transforms, the demo dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data.reid import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncodeReid,
    RandomErasing,
    ReidEvalTransform,
    ReidRecord,
    ReidSource,
    ReidTrainTransform,
    coco_split_json,
    dukemtmc,
    market1501,
    pk_epoch_order,
    pk_epoch_plan,
    pk_max_batches,
    pk_num_batches,
    street2shop,
)
from jaxretrieval.data.reid_demo import METADATA_FILE, write_reid_demo
from jaxretrieval.data.sources import DataError


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # the readers only parse file names


@pytest.fixture
def market_root(tmp_path) -> Path:
    root = tmp_path / "market"
    _touch(root / "bounding_box_train", "0012_c1s1_000001_00.jpg", "0012_c3s1_000002_00.jpg", "0007_c2s1_000003_00.jpg",
           "0003_c6s1_000004_00.jpg", "-1_c1s1_000005_00.jpg", "Thumbs.db")
    _touch(root / "query", "0020_c1s1_000006_00.jpg", "0021_c2s1_000007_00.jpg")
    _touch(root / "bounding_box_test", "0020_c4s1_000008_00.jpg", "0000_c1s1_000009_00.jpg", "-1_c2s1_000010_00.jpg")
    return root


def test_market_relabels_train_keeps_test_pids_and_skips_junk(market_root):
    train = market1501(market_root, "train")
    assert [(Path(r.path).name[:7], r.pid, r.camid) for r in train] == [
        ("0003_c6", 0, 5), ("0007_c2", 1, 1), ("0012_c1", 2, 0), ("0012_c3", 2, 2)]
    query, gallery = market1501(market_root, "query"), market1501(market_root, "gallery")
    assert query.pids.tolist() == [20, 21] and query.camids.tolist() == [0, 1]
    assert sorted(gallery.pids.tolist()) == [0, 20]  # pid 0 (distractor) kept, -1 (junk) skipped
    assert train.num_ids == 3 and len(train) == 4 and isinstance(train[0], ReidRecord)


def test_folder_reader_errors_name_the_file(market_root, tmp_path):
    with pytest.raises(DataError, match="query folder .*does not exist"):
        market1501(tmp_path, "query")
    _touch(market_root / "query", "holiday_photo.jpg")
    with pytest.raises(DataError, match="holiday_photo.jpg"):
        market1501(market_root, "query")
    _touch(market_root / "bounding_box_test", "0005_c7s1_000011_00.jpg")
    with pytest.raises(DataError, match=r"0005_c7s1_000011_00.jpg: camera 7 is outside 1..6"):
        market1501(market_root, "gallery")
    assert dukemtmc(market_root, "gallery").camids.max() == 6  # Duke has 8 cameras
    empty = tmp_path / "empty"
    _touch(empty / "bounding_box_train", "-1_c1s1_000001_00.jpg")
    with pytest.raises(DataError, match="holds no images"):
        market1501(empty, "train")
    with pytest.raises(ValueError, match="split"):
        market1501(market_root, "test")


def _coco(path: Path, images: list, annotations: list) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def _s2s_train(tmp_path) -> Path:
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(6)]
    annotations = [{"id": i, "image_id": i, "pair_id": pid, "source": "user"}
                   for i, pid in enumerate([40, 9, 40, 9, 9, 77])]
    annotations.append({"id": 6, "image_id": 99, "pair_id": 77, "source": "shop"})  # unlisted image: skipped
    return _coco(tmp_path / "train_s2s.json", images, annotations)


def test_street2shop_splits(tmp_path):
    train = street2shop(tmp_path, _s2s_train(tmp_path), "train")
    # pair 77 has one listed image and is dropped; 9 -> 0, 40 -> 1; records in pid order
    assert [(Path(r.path).name, r.pid, r.camid) for r in train] == [
        ("1.jpg", 0, 0), ("3.jpg", 0, 0), ("4.jpg", 0, 0), ("0.jpg", 1, 0), ("2.jpg", 1, 0)]
    assert Path(train[0].path).parent == tmp_path / "train"
    test = _coco(tmp_path / "test.json", [{"id": "a", "file_name": "a.jpg"}, {"id": "b", "file_name": "b.jpg"}],
                 [{"image_id": "a", "pair_id": 5, "source": "user"}, {"image_id": "b", "pair_id": 5, "source": "shop"}])
    query = street2shop(tmp_path, test, "query", by_source=True)
    gallery = street2shop(tmp_path, test, "gallery", by_source=True, image_dir=tmp_path / "imgs")
    assert [(Path(r.path).name, r.pid, r.camid) for r in query] == [("a.jpg", 5, 0)]
    assert [(r.path, r.pid, r.camid) for r in gallery] == [(str(tmp_path / "imgs" / "b.jpg"), 5, 1)]
    assert len(street2shop(tmp_path, test, "gallery")) == 2  # without by_source the file is the whole split
    assert coco_split_json("/d/train_128_256.json", "query") == Path("/d/query_128_256.json")


@pytest.mark.parametrize("data, message", [
    ([], "expected a JSON object"),
    ({"annotations": []}, "missing key 'images'"),
    ({"images": [{"id": 1}], "annotations": []}, r"images\[0\]: missing key 'file_name'"),
    ({"images": [], "annotations": [{"image_id": 1}]}, r"annotations\[0\]: missing key 'pair_id'"),
    ({"images": [], "annotations": [{"image_id": 1, "pair_id": "x"}]}, "key 'pair_id' has the wrong type"),
    ({"images": [], "annotations": [{"image_id": 1, "pair_id": True}]}, "key 'pair_id' has the wrong type"),
    ({"images": [], "annotations": [{"image_id": 1, "pair_id": 2, "source": "web"}]}, "key 'source' must be"),
    ({"images": [], "annotations": [{"image_id": 1, "pair_id": 2}]}, "no query images"),
])
def test_street2shop_errors_name_file_and_key(tmp_path, data, message):
    path = tmp_path / "query.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*{message}"):
        street2shop(tmp_path, path, "query")


def test_street2shop_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        street2shop(tmp_path, tmp_path / "nope.json", "train")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        street2shop(tmp_path, tmp_path / "bad.json", "train")
    with pytest.raises(DataError, match="source"):
        _coco(tmp_path / "t.json", [{"id": 0, "file_name": "0.jpg"}], [{"image_id": 0, "pair_id": 1}])
        street2shop(tmp_path, tmp_path / "t.json", "query", by_source=True)


# identity i has COUNTS[i] images; with K = 4: 1 -> never used, 5 -> one group of 4 (one image left out)
COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 2, 12, 4, 6]


def _pids() -> np.ndarray:
    pids = np.repeat(np.arange(len(COUNTS)) * 10, COUNTS)
    return np.random.default_rng(0).permutation(pids)  # records of one identity scattered over the source


def test_pk_epoch_batches_are_p_ids_by_k_rows():
    pids, p, k = _pids(), 3, 4
    indices, real = pk_epoch_plan(pids, p, k, seed=1, epoch=0, resample=False)
    assert len(indices) % (p * k) == 0 and len(indices) == len(real)
    assert np.array_equal(indices, pk_epoch_order(pids, p, k, seed=1, epoch=0))
    seen = {pid: [] for pid in pids.tolist()}
    for block, mask in zip(pids[indices].reshape(-1, p, k), real.reshape(-1, p, k), strict=True):
        assert (block == block[:, :1]).all() and len(set(block[:, 0])) == p
        assert all(row[0] for row in mask)  # padding only after real rows
    for rows, mask in zip(indices.reshape(-1, k), real.reshape(-1, k), strict=True):
        pid = pids[rows[0]]
        seen[pid] += rows[mask].tolist()
        assert set(rows[~mask]) <= set(rows[mask])  # padding resampled from the group's own images
        count = COUNTS[pid // 10]
        assert mask.sum() == min(k, count) or count > k  # small identities: all their images, then padding
    for pid, rows in seen.items():
        assert len(rows) == len(set(rows))  # an image is used at most once per epoch (real rows)
        assert len(rows) <= COUNTS[pid // 10] - (COUNTS[pid // 10] % k == 1)
    assert seen[0] == []  # a single image: never sampled
    assert np.array_equal(pk_epoch_plan(pids, p, k, 1, 0)[1], np.ones_like(real))


def test_pk_epoch_order_determinism_and_coverage():
    pids, p, k = _pids(), 3, 4
    first = pk_epoch_order(pids, p, k, seed=5, epoch=2)
    assert np.array_equal(first, pk_epoch_order(pids, p, k, seed=5, epoch=2))
    assert not np.array_equal(first[:24], pk_epoch_order(pids, p, k, seed=5, epoch=3)[:24])
    assert not np.array_equal(first[:24], pk_epoch_order(pids, p, k, seed=6, epoch=2)[:24])
    covered = set()
    for epoch in range(6):
        order = pk_epoch_order(pids, p, k, seed=5, epoch=epoch)
        covered |= set(pids[order].tolist())
        assert pk_num_batches(pids, p, k, 5, epoch) == len(order) // (p * k) <= pk_max_batches(pids, p, k)
    assert covered == {10 * i for i, count in enumerate(COUNTS) if count > 1}
    with pytest.raises(ValueError, match="only 2 identities"):
        pk_epoch_order(np.array([0, 0, 1, 1, 2]), 3, 2, seed=0, epoch=0)


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (90, 41, 3), dtype=np.uint8))


def test_eval_transform_matches_torchvision(photo):
    T = pytest.importorskip("torchvision.transforms")
    for size in ((256, 128), (40, 40)):
        ours = ReidEvalTransform(size)(photo)
        theirs = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(photo)
        assert ours.shape == (*size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs.numpy().transpose(1, 2, 0), atol=1e-5)


def test_train_transform_flip_pad_crop_matches_torchvision(photo):
    F = pytest.importorskip("torchvision.transforms.functional")
    transform = ReidTrainTransform((64, 32), erase_prob=0.0)
    for seed in range(6):
        ours = transform(photo, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)  # the same draws, in the same order: flip, top, left
        image = F.resize(photo, [64, 32])
        image = F.hflip(image) if replay.random() < 0.5 else image
        top, left = (int(replay.integers(0, 20, endpoint=True)) for _ in range(2))
        image = F.crop(F.pad(image, 10), top, left, 64, 32)
        theirs = F.normalize(F.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD).numpy().transpose(1, 2, 0)
        assert ours.shape == (64, 32, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_train_transform_is_deterministic_per_rng(photo):
    transform = ReidTrainTransform((64, 32))
    a, b = (transform(photo, np.random.default_rng(11)) for _ in range(2))
    assert a.shape == (64, 32, 3) and a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, transform(photo, np.random.default_rng(12)))


def test_random_erasing_rate_and_region():
    pixels = np.full((64, 32, 3), -5.0, np.float32)
    erase, erased = RandomErasing(0.5), 0
    for seed in range(400):
        out = erase(pixels, np.random.default_rng(seed))
        changed = (out != pixels).any(-1)
        if changed.any():
            erased += 1
            rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
            assert changed.sum() == rows.size * cols.size  # one rectangle
            assert 0.02 * 0.8 <= changed.mean() <= 0.4 * 1.2
            np.testing.assert_allclose(out[changed], np.broadcast_to(IMAGENET_MEAN, (changed.sum(), 3)))
    assert 160 <= erased <= 240
    assert pixels.min() == -5.0  # the input is not modified


def test_encode_reid_in_a_grain_pipeline(tmp_path, photo):
    photo.save(tmp_path / "0001_c2s1_000001_00.jpg")
    source = ReidSource([ReidRecord(str(tmp_path / "0001_c2s1_000001_00.jpg"), 3, 1)] * 2)
    dataset = grain.MapDataset.source(source).random_map(EncodeReid(ReidTrainTransform((32, 16))), seed=0)
    items = [dataset[0], dataset[1], dataset[0]]
    assert items[0]["image"].shape == (32, 16, 3) and items[0]["image"].dtype == np.float32
    assert items[0]["label"] == 3 and items[0]["label"].dtype == np.int32 and items[0]["camera"] == 1
    assert np.array_equal(items[0]["image"], items[2]["image"])
    evaluated = grain.MapDataset.source(source).random_map(EncodeReid(ReidEvalTransform((32, 16))), seed=0)[0]
    np.testing.assert_array_equal(evaluated["image"], ReidEvalTransform((32, 16))(source[0].path))


def _raw_pid(path: str) -> int:
    return int(Path(path).name.split("_")[0])


def test_demo_round_trips_through_market1501(tmp_path):
    root = write_reid_demo(tmp_path / "reid", num_train_ids=6, num_test_ids=5, cameras=3, images_per_id_per_camera=3,
                           distractor_images=2, junk_images=3, height=32, width=16, seed=1)
    meta = json.loads((root / METADATA_FILE).read_text())
    train, query, gallery = (market1501(root, split) for split in ("train", "query", "gallery"))
    assert train.num_ids == 6 and sorted(set(train.pids.tolist())) == list(range(6))
    assert len(train) == meta["images"]["bounding_box_train"] and len(query) == meta["images"]["query"]
    assert len(gallery) == meta["images"]["bounding_box_test"] - 3  # junk skipped
    assert len(list((root / "bounding_box_test").glob("-1_*.jpg"))) == 3
    assert not {_raw_pid(r.path) for r in train} & {r.pid for r in query}  # disjoint identities
    assert set(query.pids.tolist()) | {0} == set(gallery.pids.tolist())
    for record in query:  # every query has a true match from another camera
        assert any(g.pid == record.pid and g.camid != record.camid for g in gallery)
    image = np.asarray(Image.open(train[0].path))
    assert image.shape == (32, 16, 3)
    # same identity looks closer than different identities, on average (learnable), but never identical
    pixels = np.stack([np.asarray(Image.open(r.path), np.float32).ravel() for r in train])
    distance = np.linalg.norm(pixels[:, None] - pixels[None], axis=-1)
    same = train.pids[:, None] == train.pids[None]
    off_diagonal = ~np.eye(len(train), dtype=bool)
    assert distance[same & off_diagonal].mean() < distance[~same].mean()
    assert distance[off_diagonal].min() > 0


def test_demo_reuse_replace_and_refuse(tmp_path):
    root = tmp_path / "reid"
    kwargs = {"num_train_ids": 2, "num_test_ids": 2, "cameras": 2, "images_per_id_per_camera": 2, "height": 16,
              "width": 8}
    write_reid_demo(root, **kwargs)
    stamp = (root / METADATA_FILE).stat().st_mtime_ns
    write_reid_demo(root, **kwargs)
    assert (root / METADATA_FILE).stat().st_mtime_ns == stamp
    write_reid_demo(root, **kwargs, seed=3)
    assert json.loads((root / METADATA_FILE).read_text())["params"]["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["reid"]  # no staging folders left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_reid_demo(tmp_path / "other", **kwargs)
