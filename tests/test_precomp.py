"""SCAN / BUTD precomputed region features (jaxretrieval.data.precomp)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxretrieval.data.precomp import _CONCEPTS, PrecompSource, folds, parse_ref, write_precomp_demo
from jaxretrieval.errors import DataError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_precomp_demo(tmp_path_factory.mktemp("precomp") / "coco_precomp", seed=0, images=30, regions=8,
                              dim=16, split_sizes={"train": 30, "dev": 10, "test": 10})


def _write(root, split="test", images=2, captions=None, ids=None, shape=None):
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", np.zeros(shape or (images, 3, 4), np.float32))
    if captions is None:
        captions = [f"caption {i}" for i in range(5 * images)]
    data = captions if isinstance(captions, bytes) else "".join(f"{c}\n" for c in captions).encode()
    (root / f"{split}_caps.txt").write_bytes(data)
    if ids is not None:
        (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_demo_reads_back(demo):
    source = PrecompSource(demo, "train")
    assert isinstance(source.features, np.memmap)
    assert source.features.shape == (30, 8, 16) and source.features.dtype == np.float32
    assert source.im_div == 5 and len(source) == 150 and source.num_images == 30
    assert source.text_to_image() == [i // 5 for i in range(150)]
    assert source.group_keys() == [str(i) for i in range(30)]
    assert PrecompSource(demo, "dev").group_keys() == [str(i) for i in range(30, 40)]
    lines = (demo / "train_caps.txt").read_text().splitlines()
    assert [r.caption for r in source.records] == lines
    assert [r.line for r in source.records] == list(range(1, 151))
    record = source[7]
    assert record.group == 1 and source.where(record) == f"{demo / 'train_caps.txt'}:8"
    path, index = parse_ref(record.image)
    assert path == (demo / "train_ims.npy").absolute() and index == 1
    assert source.images()[1] == record.image and len(source.images()) == 30
    full = np.load(demo / "train_ims.npy")
    np.testing.assert_array_equal(source.regions(3), full[3])
    assert type(source.regions(3)) is np.ndarray
    np.testing.assert_array_equal(source.region_batch([4, 0, 4]), full[[4, 0, 4]])
    assert source.region_batch([]).shape == (0, 8, 16)
    with pytest.raises(IndexError):
        source.regions(30)
    vocab = (demo / "vocab.txt").read_text().split()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and vocab[5:] == sorted(vocab[5:])
    assert {w for r in source.records for w in r.caption.split()} <= set(vocab)


def test_demo_is_learnable(tmp_path):
    """A linear probe on the mean region feature finds both concepts a test image's captions name."""
    root = write_precomp_demo(tmp_path, seed=1, images=120, regions=8, dim=32)

    def probe_data(split):
        source = PrecompSource(root, split)
        x = source.region_batch(range(source.num_images)).mean(axis=1)
        y = np.zeros((source.num_images, len(_CONCEPTS)))
        for record in source.records:
            said = set(record.caption.split())
            for c, names in enumerate(_CONCEPTS):
                if said & set(names):
                    y[record.group, c] = 1.0
        assert (y.sum(axis=1) == 2).all()
        return np.c_[x, np.ones(len(x))], y

    x, y = probe_data("train")
    weights = np.linalg.lstsq(x, y, rcond=None)[0]
    xt, yt = probe_data("test")
    top2 = np.argsort(-(xt @ weights), axis=1)[:, :2]
    assert np.mean(np.take_along_axis(yt, top2, axis=1).sum(axis=1) == 2) > 0.8


def test_demo_deterministic(tmp_path):
    a = write_precomp_demo(tmp_path / "a", seed=3, images=12, regions=4, dim=8)
    b = write_precomp_demo(tmp_path / "b", seed=3, images=12, regions=4, dim=8)
    c = write_precomp_demo(tmp_path / "c", seed=4, images=12, regions=4, dim=8)
    for name in ("train_ims.npy", "train_caps.txt", "test_caps.txt", "dev_ids.txt", "vocab.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train_ims.npy").read_bytes() != (c / "train_ims.npy").read_bytes()


def test_one_caption_per_image(tmp_path):
    root = _write(tmp_path, images=3, captions=["x", "y", "z"])
    source = PrecompSource(root, "test")
    assert source.im_div == 1 and source.text_to_image() == [0, 1, 2] and source.group_keys() == [0, 1, 2]


def test_caption_count_not_a_multiple(tmp_path):
    root = _write(tmp_path, images=2, captions=[f"c{i}" for i in range(7)])
    with pytest.raises(DataError, match=r"test_caps\.txt holds 7 captions for the 2 images"):
        PrecompSource(root, "test")


def test_ids_count_mismatch(tmp_path):
    root = _write(tmp_path, images=2, ids=["a", "b", "c"])
    with pytest.raises(DataError, match=r"test_ids\.txt holds 3 image ids for the 2 images"):
        PrecompSource(root, "test")
    _write(tmp_path, images=2, ids=["a", " b "])
    assert PrecompSource(tmp_path, "test").group_keys() == ["a", "b"]


def test_bad_feature_files(tmp_path):
    root = _write(tmp_path, shape=(2, 4))
    with pytest.raises(DataError, match=r"test_ims\.npy: expected region features of shape"):
        PrecompSource(root, "test")
    np.save(root / "test_ims.npy", np.zeros((2, 3, 4), np.int32))
    with pytest.raises(DataError, match="expected float region features"):
        PrecompSource(root, "test")
    (root / "test_ims.npy").write_bytes(b"not an npy")
    with pytest.raises(DataError, match=r"test_ims\.npy: not a readable"):
        PrecompSource(root, "test")
    (root / "test_ims.npy").unlink()
    with pytest.raises(DataError, match=r"region feature file .*test_ims\.npy does not exist"):
        PrecompSource(root, "test")
    with pytest.raises(DataError, match=r"caption file .*dev_caps\.txt does not exist"):
        PrecompSource(root, "dev")


def test_bad_utf8_names_line(tmp_path):
    data = b"".join(b"ok %d\n" % i for i in range(10)).replace(b"ok 3", b"ok \xff")
    root = _write(tmp_path, captions=data)
    with pytest.raises(DataError, match=r"test_caps\.txt:4: not valid UTF-8"):
        PrecompSource(root, "test")
    source = PrecompSource(root, "test", skip_bad=True)
    assert len(source) == 9 and source.skipped.malformed_lines == 1


def test_blank_caption(tmp_path):
    captions = [f"c{i}" for i in range(10)]
    captions[6] = "   "
    root = _write(tmp_path, captions=captions)
    with pytest.raises(DataError, match=r"test_caps\.txt:7: the caption is blank"):
        PrecompSource(root, "test")
    source = PrecompSource(root, "test", skip_bad=True)
    assert source.skipped.blank_captions == 1 and len(source) == 9
    assert source.text_to_image() == [0] * 5 + [1] * 4  # later captions keep their images
    assert [r.line for r in source.records][5:] == [6, 8, 9, 10]


def test_folds(tmp_path):
    root = _write(tmp_path, images=10)
    source = PrecompSource(root, "test")
    found = folds(source, 5)
    assert [f.images for f in found] == [range(2 * i, 2 * i + 2) for i in range(5)]
    assert [f.captions for f in found] == [range(10 * i, 10 * i + 10) for i in range(5)]
    assert len(folds(source, 1)) == 1
    with pytest.raises(DataError, match="10 images do not split into 3 equal folds"):
        folds(source, 3)
