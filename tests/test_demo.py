import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data import demo
from jaxretrieval.data.demo import BACKGROUND, COLORS, SHAPES, caption_vocabulary, generate_demo
from jaxretrieval.data.tokenizers import WordTokenizer, split_words

SMALL = {"num_train": 40, "num_test": 10, "captions_per_image": 4}


def read_split(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def captions_by_image(root: Path) -> dict[str, list[str]]:
    grouped = defaultdict(list)
    for split in demo.SPLITS:
        for record in read_split(root, split):
            grouped[record["image"]].append(record["caption"])
    return grouped


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=3, **SMALL)


def test_layout(dataset) -> None:
    assert json.loads((dataset / "demo.json").read_text())["seed"] == 3
    image_ids: dict[str, set[int]] = {}
    for split, count in (("train", 40), ("test", 10)):
        records = read_split(dataset, split)
        assert len(records) == count * 4
        ids = {r["image_id"] for r in records}
        assert len(ids) == count
        image_ids[split] = ids
        for record in records:
            assert set(record) == {"image", "caption", "image_id"}
            assert record["image"] == f"images/{split}_{record['image_id'] - (0 if split == 'train' else 40):05d}.png"
    assert image_ids["train"] | image_ids["test"] == set(range(50))
    assert len(list((dataset / "images").iterdir())) == 50


def test_images_open_with_the_requested_size(dataset) -> None:
    for path in captions_by_image(dataset):
        with Image.open(dataset / path) as image:
            assert image.size == (32, 32)
            assert image.mode == "RGB"


def test_each_image_has_distinct_captions(dataset) -> None:
    grouped = captions_by_image(dataset)
    assert len(grouped) == 50
    for captions in grouped.values():
        assert len(captions) == len(set(captions)) == 4


def test_vocab_covers_every_caption(dataset) -> None:
    vocab = (dataset / "vocab.txt").read_text().split()
    assert vocab == sorted(set(vocab)) == caption_vocabulary()
    tokenizer = WordTokenizer.from_file(dataset / "vocab.txt", context_length=32)
    captions = [c for captions in captions_by_image(dataset).values() for c in captions]
    for caption in captions:
        assert set(split_words(caption)) <= set(vocab), caption
    ids = tokenizer(captions)
    assert not (ids == tokenizer.unk_id).any()
    assert (ids.max(axis=1) == tokenizer.eot_id).all()


def test_same_seed_is_byte_identical_and_other_seeds_differ(tmp_path, dataset) -> None:
    again = generate_demo(tmp_path / "again", seed=3, **SMALL)
    assert tree_bytes(again) == tree_bytes(dataset)
    other = tree_bytes(generate_demo(tmp_path / "other", seed=4, **SMALL))
    reference = tree_bytes(dataset)
    assert other.keys() == reference.keys()
    assert other["train.jsonl"] != reference["train.jsonl"]
    assert sum(other[k] != reference[k] for k in reference if k.endswith(".png")) > 40


def test_second_call_does_not_rewrite(dataset) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert generate_demo(dataset, seed=3, **SMALL) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_other_parameters_replace_the_dataset(tmp_path) -> None:
    root = tmp_path / "data"
    generate_demo(root, num_train=6, num_test=2)
    generate_demo(root, num_train=3, num_test=2)
    assert len(list((root / "images").iterdir())) == 5
    assert len(read_split(root, "train")) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_dataset_another_process_installed_first_stays_in_place(tmp_path) -> None:
    root = tmp_path / "demo"
    generate_demo(root, seed=0, num_train=8, num_test=4)
    marker = root / "images" / "reader_is_here"
    marker.write_text("x")  # stands for a reader of the installed copy (process 1 of a two-process run)
    staged = demo.sibling(root, "tmp")  # process 0 finished generating the same dataset a moment later
    staged.mkdir()
    demo.install(staged, root, lambda: demo._read_params(root) is not None)
    assert marker.exists() and not staged.exists()


def test_existing_empty_root_is_fine(tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    generate_demo(root, num_train=2, num_test=1)
    assert (root / "demo.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_demo(tmp_path, num_train=2, num_test=1)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    calls = []

    def failing_render(objects, image_size):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return Image.new("RGB", (image_size, image_size))

    monkeypatch.setattr(demo, "render_scene", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_demo(tmp_path / "data", num_train=10, num_test=2)
    assert list(tmp_path.iterdir()) == []


def grid_cell(words: list[str]) -> tuple[int, int]:
    row = 0 if {"top", "upper"} & set(words) else 2 if {"bottom", "lower"} & set(words) else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    return row, col


@pytest.mark.parametrize("image_size", [32, 64])
def test_captions_describe_the_pixels(tmp_path, image_size) -> None:
    root = generate_demo(tmp_path / "data", seed=1, num_train=80, num_test=0, image_size=image_size)
    extents = {"small": [], "large": []}
    checked_shapes = set()
    for path, captions in captions_by_image(root).items():
        with Image.open(root / path) as image:
            pixels = np.asarray(image)
        foreground = (pixels != BACKGROUND).any(axis=-1)
        present = {tuple(int(v) for v in p) for p in pixels[foreground]}
        for caption in captions:
            assert present == {COLORS[w] for w in split_words(caption) if w in COLORS}, caption
        words = split_words(captions[0])
        if sum(w in SHAPES for w in words) != 1:
            continue
        ys, xs = np.nonzero(foreground)
        row, col = grid_cell(words)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        assert row == int(cy * 3 // image_size) and col == int(cx * 3 // image_size), captions[0]
        extents["large" if {"large", "big"} & set(words) else "small"].append(ys.max() - ys.min())
        (shape,) = [w for w in words if w in SHAPES]
        checked_shapes.add(shape)
        box = foreground[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert box.all() == (shape == "square"), captions[0]
        assert foreground[round(cy), round(cx)] == (shape != "ring"), captions[0]
    assert checked_shapes == set(SHAPES)
    assert max(extents["small"]) < min(extents["large"])


def test_maximum_caption_count(tmp_path) -> None:
    most = demo.MAX_CAPTIONS_PER_IMAGE
    root = generate_demo(tmp_path / "data", num_train=30, num_test=0, captions_per_image=most)
    assert all(len(set(captions)) == most for captions in captions_by_image(root).values())


def test_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_demo(tmp_path / "a", image_size=8)
    with pytest.raises(ValueError, match="captions_per_image"):
        generate_demo(tmp_path / "a", captions_per_image=0)
    with pytest.raises(ValueError, match="num_train"):
        generate_demo(tmp_path / "a", num_train=-1)
