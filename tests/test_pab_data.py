"""PAB data: hybrid views and squash resize against torchvision, list captions and multi-file sources, the
extra training keys, and the test-set query / gallery readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data.pab import gallery_images, read_queries
from jaxretrieval.data.sources import CaptionRecord, CaptionSource, DataError
from jaxretrieval.data.transforms import EncodePair, HybridView, Preprocess, random_resized_crop_box

MEAN = STD = (0.5, 0.5, 0.5)
SCALE, RATIO = (0.5, 1.0), (3 / 4, 4 / 3)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_lines(path: Path, items: list) -> Path:
    path.write_text("\n".join(item if isinstance(item, str) else json.dumps(item) for item in items) + "\n")
    return path


def torch_pixels(image: Image.Image, transform) -> np.ndarray:
    """torchvision transform + ToTensor + Normalize(0.5, 0.5), as HWC numpy."""
    import torchvision.transforms as T

    tensor = T.Compose([transform, T.ToTensor(), T.Normalize(MEAN, STD)])(image)
    return tensor.permute(1, 2, 0).numpy()


class TorchRng:
    """Draws uniform / integer values the way torchvision's RandomResizedCrop.get_params does."""

    def uniform(self, low: float, high: float) -> float:
        import torch

        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low: int, high: int, endpoint: bool = False) -> int:
        import torch

        return torch.randint(low, high + int(endpoint), (1,)).item()


# ---- transforms ----


def test_squash_matches_torchvision_resize():
    T = pytest.importorskip("torchvision.transforms")
    image = noise_image(37, 23)
    ours = Preprocess(16, MEAN, STD, resize="squash")(image)
    expected = torch_pixels(image, T.Resize((16, 16), interpolation=T.InterpolationMode.BICUBIC))
    assert ours.shape == (16, 16, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_preprocess_crop_is_the_default_and_unknown_resize_fails():
    image = noise_image(37, 23)
    np.testing.assert_array_equal(Preprocess(16, MEAN, STD)(image), Preprocess(16, MEAN, STD, resize="crop")(image))
    assert not np.allclose(Preprocess(16, MEAN, STD)(image), Preprocess(16, MEAN, STD, resize="squash")(image))
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess(16, MEAN, STD, resize="stretch")


@pytest.mark.parametrize(("width", "height"), [(40, 30), (30, 40), (17, 17), (100, 10), (10, 100), (5, 3)])
def test_crop_box_is_torchvisions_get_params(width, height):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")
    image = Image.new("RGB", (width, height))
    for seed in range(300):  # the same uniform / integer draws give the same box, incl. the centre-crop fallback
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO))
        torch.manual_seed(seed)
        assert random_resized_crop_box(width, height, SCALE, RATIO, TorchRng()) == expected


def crop_box_stats(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    top, left, h, w = boxes.T.astype(float)
    return np.array([np.mean(h * w) / (width * height), np.mean(np.log(w / h)), np.mean(top) / height,
                     np.mean(left) / width])


def test_crop_box_distribution_is_valid():
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    width, height = 64, 48
    boxes = np.array([random_resized_crop_box(width, height, SCALE, RATIO, rng) for _ in range(3000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h > 0) & (w > 0))
    area = h * w / (width * height)
    assert area.min() > 0.45 and area.max() <= 1.0
    aspect = np.log(w / h)
    assert aspect.min() > np.log(3 / 4) - 0.1 and aspect.max() < np.log(4 / 3) + 0.1
    # numpy's draws give the box distribution torchvision's give (mean area, log aspect, offsets)
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(3000)])
    np.testing.assert_allclose(crop_box_stats(boxes, width, height), crop_box_stats(theirs, width, height),
                               atol=0.015)

    # an image no sampled box fits falls back to a centre crop at the clamped ratio
    assert random_resized_crop_box(100, 10, SCALE, RATIO, rng) == (0, 43, 10, 13)
    assert random_resized_crop_box(10, 100, SCALE, RATIO, rng) == (43, 0, 13, 10)


def test_hybrid_view_branches_match_torchvision_pixels():
    pytest.importorskip("torchvision")
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    image = noise_image(40, 30, seed=1)
    view = HybridView(16, MEAN, STD)
    squash = Preprocess(16, MEAN, STD, resize="squash")
    branches = set()
    for seed in range(12):
        out = view(image, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        local = view.is_local(replay)
        branches.add(local)
        if local:
            top, left, h, w = random_resized_crop_box(40, 30, SCALE, RATIO, replay)
            crop = T.Lambda(lambda im, b=(top, left, h, w): F.resized_crop(
                im, *b, [16, 16], interpolation=T.InterpolationMode.BICUBIC))
            np.testing.assert_allclose(out, torch_pixels(image, crop), atol=1e-6)
        else:
            np.testing.assert_array_equal(out, squash(image))
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert branches == {True, False}
    np.testing.assert_array_equal(view(image, np.random.default_rng(3)), view(image, np.random.default_rng(3)))


@pytest.mark.parametrize(("threshold", "expected"), [(0.5, 0.5), (0.5 + 1 / 6, 0.1587), (0.5 - 1 / 6, 0.8413)])
def test_hybrid_view_local_frequency(threshold, expected):
    view = HybridView(16, MEAN, STD, threshold=threshold)
    rng = np.random.default_rng(0)
    frequency = np.mean([view.is_local(rng) for _ in range(4000)])
    assert abs(frequency - expected) < 0.025  # P(N(0.5, 1/6) > threshold), ~3 standard errors


def test_hybrid_view_rejects_bad_ranges():
    with pytest.raises(ValueError, match="scale"):
        HybridView(16, MEAN, STD, scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="ratio"):
        HybridView(16, MEAN, STD, ratio=(0.0, 1.0))


def test_encode_pair_uses_the_view_and_skips_bad_images(tmp_path, caplog):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    noise_image(40, 30).save(good)
    bad.write_bytes(b"not an image")
    view = HybridView(16, MEAN, STD)
    preprocess = Preprocess(16, MEAN, STD)

    def tokenizer(caption):
        return np.zeros((1, 4), np.int32)

    encode = EncodePair(preprocess, tokenizer, flip=False, skip_bad=True, view=view)
    for seed in range(4):
        out = encode.random_map(CaptionRecord(str(good), "a man", 3), np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], view(str(good), np.random.default_rng(seed)))
        assert out["group"] == 3
    assert encode.random_map(CaptionRecord(str(bad), "a man", 0), np.random.default_rng(0)) is None
    assert encode.skipped == 1 and "cannot decode image " in caplog.text and "bad.png" in caplog.text
    strict = EncodePair(preprocess, tokenizer, flip=False, skip_bad=False, view=view, files=["a.json", "b.json"])
    with pytest.raises(DataError, match=r"^b\.json:7: cannot decode image .*bad\.png \(not in a format PIL"):
        strict.random_map(CaptionRecord(str(bad), "a man", 0, file=1, line=7), np.random.default_rng(0))
    plain = EncodePair(preprocess, tokenizer, flip=False, skip_bad=False)
    np.testing.assert_array_equal(plain.random_map(CaptionRecord(str(good), "a", 0), np.random.default_rng(0))["image"],
                                  preprocess(str(good)))


# ---- caption sources ----


@pytest.fixture
def images(tmp_path) -> Path:
    for name in ("a", "b", "c"):
        noise_image(8, 8).save(tmp_path / f"{name}.jpg")
    return tmp_path


def test_list_captions_give_one_record_per_caption(images):
    path = write_lines(images / "pair.json", [
        {"image": "a.jpg", "image_id": "p1", "caption": ["a runs", "a falls"]},
        {"image": "b.jpg", "image_id": "p2", "caption": ["b sits"]},
        {"image": "c.jpg", "image_id": "p3", "caption": "c waves"},
    ])
    source = CaptionSource(path)
    assert [r.caption for r in source.records] == ["a runs", "a falls", "b sits", "c waves"]
    assert source.text_to_image() == [0, 0, 1, 2]
    assert source.images() == [str(images / n) for n in ("a.jpg", "b.jpg", "c.jpg")]


@pytest.mark.parametrize(("caption", "expected"), [
    ([], "key 'caption' is an empty list"),
    (["fine", 3], "key 'caption' item 1 has the wrong type (int)"),
    ({"text": "x"}, "key 'caption' has the wrong type (dict)"),
])
def test_bad_list_captions_name_file_and_line(images, caption, expected):
    path = write_lines(images / "pair.json", [{"image": "a.jpg", "caption": "ok"},
                                               {"image": "b.jpg", "caption": caption}])
    with pytest.raises(DataError) as info:
        CaptionSource(path)
    assert f"{path}:2: {expected}" in str(info.value)


def test_several_files_concatenate_and_share_groups(images):
    first = write_lines(images / "pair_0.json", [{"image": "a.jpg", "image_id": "x", "caption": "a one"},
                                                 {"image": "b.jpg", "image_id": "y", "caption": "b one"}])
    second = write_lines(images / "pair_1.json", [{"image": "c.jpg", "image_id": "z", "caption": "c one"},
                                                  {"image": "a.jpg", "image_id": "x", "caption": "a two"}])
    tsv = images / "extra.tsv"
    tsv.write_text("c.jpg\tc two\n")
    source = CaptionSource([first, str(second), tsv], images)
    assert [r.caption for r in source.records] == ["a one", "b one", "c one", "a two", "c two"]
    assert source.text_to_image() == [0, 1, 2, 0, 3]  # tsv lines group by image path, not image_id
    assert len(CaptionSource([first])) == 2 and len(CaptionSource((first,))) == 2
    with pytest.raises(DataError, match="no annotation files given"):
        CaptionSource([])
    with pytest.raises(DataError, match="pair_9.json does not exist"):
        CaptionSource([first, images / "pair_9.json"])


def test_error_in_a_later_file_names_that_file(images):
    first = write_lines(images / "pair_0.json", [{"image": "a.jpg", "caption": "a"}] * 3)
    second = write_lines(images / "pair_1.json", [{"image": "b.jpg", "caption": "b"}, "", "{broken"])
    with pytest.raises(DataError) as info:
        CaptionSource([first, second])
    assert f"{second}:3: not valid JSON" in str(info.value)
    skipping = CaptionSource([first, second], skip_bad=True)
    assert len(skipping) == 4 and skipping.skipped.malformed_lines == 1


def test_pab_training_keys_are_accepted_and_type_checked(images):
    line = {"image": "a.jpg", "caption": "a man falls", "image_id": "0_0", "hard_i": "imgs_0/full/0.jpg",
            "hard_c": "a man stands", "hard_i_id": "0_8954", "source_id": "1_0", "source_caption": "he fell",
            "anomaly": "Falling", "scene": "Lawn"}
    normal = {**line, "normal": True, "hard_i": None}
    del normal["anomaly"]
    source = CaptionSource(write_lines(images / "pair_0.json", [line, normal]))
    assert [r.caption for r in source.records] == ["a man falls"] * 2 and source.text_to_image() == [0, 0]
    for key, value in [("hard_i", 3), ("hard_c", ["x"]), ("scene", False), ("normal", 1), ("anomaly", {"a": 1})]:
        path = write_lines(images / "bad.json", [line, {**line, key: value}])
        with pytest.raises(DataError) as info:
            CaptionSource(path)
        assert f"{path}:2: key '{key}' has the wrong type ({type(value).__name__})" in str(info.value)


# ---- test-set readers ----


def test_read_queries(tmp_path):
    path = write_lines(tmp_path / "query.json", [{"query_index": 0, "caption": "a man falls"}, "",
                                                 {"query_index": "q7", "caption": "a woman runs", "extra": 1}])
    assert read_queries(path) == (["0", "q7"], ["a man falls", "a woman runs"])


@pytest.mark.parametrize(("bad", "expected"), [
    ("{nope", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"caption": "x"}, "missing key 'query_index'"),
    ({"query_index": 5}, "missing key 'caption'"),
    ({"query_index": True, "caption": "x"}, "key 'query_index' has the wrong type (bool)"),
    ({"query_index": 1.5, "caption": "x"}, "key 'query_index' has the wrong type (float)"),
    ({"query_index": 5, "caption": ["x"]}, "key 'caption' has the wrong type (list)"),
    ({"query_index": "1", "caption": "x"}, "duplicate query_index '1' (first on line 1)"),
])
def test_bad_query_lines_name_file_and_line(tmp_path, bad, expected):
    path = write_lines(tmp_path / "query.json", [{"query_index": 1, "caption": "fine"}, bad])
    with pytest.raises(DataError) as info:
        read_queries(path)
    assert f"{path}:2: {expected}" in str(info.value)


def test_query_file_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="query.json does not exist"):
        read_queries(tmp_path / "query.json")
    (tmp_path / "query.json").write_text("\n")
    with pytest.raises(DataError, match="query.json: no queries"):
        read_queries(tmp_path / "query.json")


def test_gallery_images_sorted_by_stem(tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name in ("b.jpg", "a10.JPEG", "a2.png", "c.Bmp", "d.webp", "notes.txt", ".DS_Store"):
        (gallery / name).write_bytes(b"")  # the reader lists files, it does not decode them
    (gallery / "sub.jpg").mkdir()  # a folder, not an image
    stems, paths = gallery_images(gallery)
    assert stems == ["a10", "a2", "b", "c", "d"]
    assert paths == [str(gallery / n) for n in ("a10.JPEG", "a2.png", "b.jpg", "c.Bmp", "d.webp")]


def test_gallery_errors(tmp_path):
    with pytest.raises(DataError, match="gallery folder .*nowhere does not exist"):
        gallery_images(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"no images \(.*\) in"):
        gallery_images(tmp_path)
    (tmp_path / "7.jpg").write_bytes(b"")
    (tmp_path / "7.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"7.jpg and .*7.png share the stem '7'"):
        gallery_images(tmp_path)
