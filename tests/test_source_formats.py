"""Every caption format users hold, against the JSON-lines source on the same data: the same images, captions and
groups come out of the full pipeline (decode, resize, normalise, tokenize, the global shuffled order), and a loader
restored mid-epoch continues with the exact next batch. Then what only TFDS has: nested features, splits, errors."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from jaxretrieval.data.pipeline import caption_source, make_tokenizer, train_loader
from jaxretrieval.data.sources import DataError, image_file
from jaxretrieval.data.tfds_source import write_tfds as write_caption_rows

tfds = pytest.importorskip("tensorflow_datasets")
ROWS = 24  # the first 8 demo images, 3 captions each
BATCH = 8


def write_tfds(folder: Path, splits: dict[str, list[dict]], nested: bool = False) -> Path:
    write_caption_rows(folder, splits, nested=nested, image_format="png")
    return folder


def demo_rows(demo_root: Path, split: str, count: int) -> list[dict]:
    lines = (demo_root / f"{split}.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def write_format(kind: str, demo_root: Path, folder: Path) -> dict[str, str]:
    """The demo's first train rows (and test rows) written in `kind`; the config overrides that read them."""
    splits = {"train": demo_rows(demo_root, "train", ROWS), "test": demo_rows(demo_root, "test", 6)}
    (folder / "images").symlink_to(demo_root / "images")
    (folder / "vocab.txt").write_bytes((demo_root / "vocab.txt").read_bytes())
    if kind == "jsonl":
        for split, rows in splits.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {}
    if kind == "csv":
        for split, rows in splits.items():
            body = "".join(f"{r['image']}\t{r['caption']}\t{r['image_id']}\n" for r in rows)
            (folder / f"{split}.tsv").write_text("filepath\ttitle\timage_id\n" + body)
        return {"data.train_file": "train.tsv", "data.test_file": "test.tsv", "data.csv_group_key": "image_id"}
    if kind == "karpathy":
        entries: dict[tuple, dict] = {}
        for split, rows in splits.items():
            for r in rows:
                entry = entries.setdefault((split, r["image_id"]), {
                    "filename": r["image"], "imgid": len(entries), "cocoid": r["image_id"], "split": split,
                    "sentences": []})
                entry["sentences"].append({"raw": r["caption"], "tokens": r["caption"].split()})
        (folder / "dataset_demo.json").write_text(json.dumps({"images": list(entries.values())}))
        return {"data.train_file": "dataset_demo.json", "data.test_file": "dataset_demo.json"}
    if kind == "webdataset":
        for split, rows in splits.items():
            with tarfile.open(folder / f"{split}-000.tar", "w") as tar:
                for i, row in enumerate(rows):
                    for name, data in ((f"{i:04d}.png", (demo_root / row["image"]).read_bytes()),
                                       (f"{i:04d}.txt", row["caption"].encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return {"data.train_file": "train-{000..000}.tar", "data.test_file": "test-*.tar"}
    assert kind == "tfds"
    write_tfds(folder, {split: [{**r, "image": (demo_root / r["image"]).read_bytes()} for r in rows]
                        for split, rows in splits.items()})
    return {"data.tfds_name": "caption_rows", "data.tfds_id_key": "image_id"}


def epoch_rows(config, folder: Path) -> tuple[list[dict], object, object]:
    source = caption_source(config, folder, "train")
    tokenizer = make_tokenizer(config, folder)
    loader = iter(train_loader(config, source, tokenizer))
    batches = [next(loader) for _ in range(ROWS // BATCH)]
    rows = [{key: batch[key][i] for key in ("image", "text", "group")} for batch in batches for i in range(BATCH)]
    return rows, source, tokenizer


def row_key(row: dict) -> tuple[bytes, bytes]:
    return row["text"].tobytes(), np.round(row["image"], 5).tobytes()


@pytest.fixture(scope="module")
def jsonl_epoch(demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    write_format("jsonl", demo_root, folder)
    config = tiny_config(folder, **{"train.batch_size": BATCH})
    return epoch_rows(config, folder)[0]


@pytest.mark.parametrize("kind", ["csv", "karpathy", "webdataset", "tfds"])
def test_each_format_gives_the_jsonl_rows_and_resumes_exactly(kind, demo_root, jsonl_epoch, tmp_path):
    overrides = write_format(kind, demo_root, tmp_path)
    config = tiny_config(tmp_path, **{"data.kind": kind, "train.batch_size": BATCH, **overrides})
    rows, source, tokenizer = epoch_rows(config, tmp_path)
    # One epoch holds every record once: the same (caption tokens, pixels) rows as the JSON lines ...
    assert collections.Counter(map(row_key, rows)) == collections.Counter(map(row_key, jsonl_epoch))
    # ... and the same captions share a group (webdataset has no group ids: each sample is its own group).
    want = {row_key(r): int(r["group"]) for r in jsonl_epoch}
    pairs = {(want[row_key(r)], int(r["group"])) for r in rows}
    if kind == "webdataset":
        assert len({got for _, got in pairs}) == ROWS
    else:
        assert len(pairs) == len({w for w, _ in pairs}) == len({g for _, g in pairs}) == ROWS // 3
    # Resume: the iterator state after one batch, restored in a fresh loader, gives the next batches exactly.
    first = iter(train_loader(config, source, tokenizer))
    next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(2)]
    second = iter(train_loader(config, caption_source(config, tmp_path, "train"), tokenizer))
    second.set_state(state)
    for want_batch in expected:
        got = next(second)
        for key in ("image", "text", "group"):
            np.testing.assert_array_equal(got[key], want_batch[key])


def test_a_run_trains_and_evaluates_from_tfds(demo_root, tmp_path):
    from jaxretrieval import train

    overrides = write_format("tfds", demo_root, tmp_path)
    config = tiny_config(tmp_path, **{"data.kind": "tfds", "train.steps": 2, "eval.protocol": "image_text",
                                      **overrides})
    result = train.train(config, tmp_path / "run")
    assert (result["num_images"], result["num_texts"]) == (2, 6)  # 6 test captions of 2 images
    assert 0 <= result["t2i_R1"] <= 100


@pytest.fixture(scope="module")
def nested(demo_root, tmp_path_factory) -> Path:
    """COCO-style features: a sequence of captions per image and the id under the flat key `image/id`."""
    rows = [{"image": (demo_root / f"images/train_{i:05d}.png").read_bytes(), "image_id": 100 - i,
             "caption": [f"caption {i} {k}" for k in range(i % 3 + 1)]} for i in range(5)]
    return write_tfds(tmp_path_factory.mktemp("nested"), {"train": rows, "validation": rows[:2]}, nested=True)


def test_nested_captions_give_one_record_each(nested, demo_root):
    from jaxretrieval.data.tfds_source import TfdsCaptionSource

    source = TfdsCaptionSource("caption_rows", nested, "train", caption_key="captions/text", id_key="image/id")
    by_group = collections.defaultdict(list)
    for record in source.records:
        by_group[source.group_keys()[record.group]].append(record.caption)
    assert {key: sorted(captions) for key, captions in by_group.items()} == {
        100 - i: [f"caption {i} {k}" for k in range(i % 3 + 1)] for i in range(5)}
    assert len(source.images()) == 5 and source.text_to_image() == [r.group for r in source.records]
    record = source.records[0]
    index = record.line - 1
    assert source.where(record) == f"caption_rows/1.0.0 train[{index}]"
    for record in source.records:  # each reference reads back its own example's encoded image
        example = 100 - source.group_keys()[record.group]
        assert image_file(record.image).read() == (demo_root / f"images/train_{example:05d}.png").read_bytes()


def test_version_folder_and_split_slices(nested):
    from jaxretrieval.data.tfds_source import TfdsCaptionSource

    folder = nested / "caption_rows" / "1.0.0"
    assert len(TfdsCaptionSource("", folder, "validation", caption_key="captions/text")) == 1 + 2
    sliced = TfdsCaptionSource("caption_rows:1.0.0", nested, "train[:2]", caption_key="captions/text")
    assert sorted(sliced.group_keys()) == [0, 1]  # no id key: the example index


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_key": "caption"}, r"caption_rows/1.0.0 train\[\d\]: no feature 'caption' \(it has captions, image, "
                                 r"image/id\)"),
    ({"caption_key": "captions/text", "id_key": "captions"}, r"train\[\d\]: feature 'captions' is not an int"),
    ({"caption_key": "image/id"}, r"train\[\d\]: feature 'image/id' is not text \(int"),
    ({"caption_key": "captions/text", "image_key": "captions/text"}, r"feature 'captions/text' is not an encoded"),
    ({"split": "val"}, r"cannot read split 'val'.*its splits: (train, validation|validation, train)"),
])
def test_errors_name_dataset_split_index_and_feature(nested, kwargs, message):
    from jaxretrieval.data.tfds_source import TfdsCaptionSource

    kwargs = {"caption_key": "captions/text", **kwargs}
    with pytest.raises(DataError, match=message):
        TfdsCaptionSource("caption_rows", nested, kwargs.pop("split", "train"), **kwargs)


def test_missing_dataset_and_skip_bad(nested, tmp_path, caplog):
    from jaxretrieval.data.tfds_source import TfdsCaptionSource

    with pytest.raises(DataError, match=r"cannot open TFDS dataset 'nope' under .*the datasets there: caption_rows"):
        TfdsCaptionSource("nope", nested, "train")
    with pytest.raises(DataError, match=r"holds no dataset_info.json"):
        TfdsCaptionSource("", tmp_path, "train")
    rows = [{"image": b"\x89PNG-not-really", "image_id": 1, "caption": ["a", " "]},
            {"image": b"x", "image_id": 2, "caption": ["b"]}]
    folder = write_tfds(tmp_path / "blank", {"train": rows}, nested=True)
    with pytest.raises(DataError, match=r"train\[\d\]: feature 'captions/text' item 1 is blank"):
        TfdsCaptionSource("caption_rows", folder, "train", caption_key="captions/text")
    source = TfdsCaptionSource("caption_rows", folder, "train", caption_key="captions/text", skip_bad=True)
    assert sorted(r.caption for r in source.records) == ["a", "b"] and source.skipped.blank_captions == 1


def test_tfds_batches_equal_with_grain_workers(demo_root, tmp_path):
    """Worker processes open the dataset themselves (the parent's readers are not shared): same batches."""
    overrides = write_format("tfds", demo_root, tmp_path)
    batches = {}
    for workers in (0, 2):
        config = tiny_config(tmp_path, **{"data.kind": "tfds", "train.batch_size": BATCH, "data.workers": workers,
                                          **overrides})
        loader = iter(train_loader(config, caption_source(config, tmp_path, "train"), make_tokenizer(config, tmp_path)))
        batches[workers] = [next(loader) for _ in range(2)]
    for got, want in zip(batches[2], batches[0], strict=True):
        for key in ("image", "text", "group"):
            np.testing.assert_array_equal(got[key], want[key])


def test_readme_format_table_lines_are_valid_config():
    """Each one-line config of the README's format table names real keys and values."""
    import re
    import shlex

    from jaxretrieval.config import load_config

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "README.md").read_text()
    table = text[text.index("| format | config |"):].split("\n\n")[0].splitlines()[2:]
    assert len(table) >= 9
    kinds = set()
    for row in table:
        words = shlex.split(re.findall(r"`([^`]*)`", row.split("|")[2])[0])
        file = repo / words.pop(1) if words[0] == "--config" else None
        config = load_config(file, words[1:] if file else words)
        kinds.add(config.data.kind)
    assert {"jsonl", "albef", "csv", "karpathy", "webdataset", "tfds", "cuhk-pedes", "market1501", "demo"} <= kinds
