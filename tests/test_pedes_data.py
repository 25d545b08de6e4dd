"""Text-to-person annotations (CUHK-PEDES, ICFG-PEDES, RSTPReid): splits, pids, caption cleaning, every error
naming the file, the record and the key, and the generated demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data.pedes import (
    MAX_WORDS,
    PedesEval,
    PedesPair,
    PedesTrain,
    cuhk_pedes,
    icfg_pedes,
    pedes_paths,
    read_pedes_annotations,
    read_pedes_eval,
    read_pedes_train,
    relevant_images,
    rstpreid,
)
from jaxretrieval.data.pedes_demo import (
    ANNOTATION_FILE,
    COLOURS,
    METADATA_FILE,
    caption_vocabulary,
    write_pedes_demo,
)
from jaxretrieval.errors import ConfigError, DataError


def write_dataset(folder: Path, name: str, records: list) -> Path:
    """The annotation file `name` in `folder`, with an empty file under imgs/ for every image path in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        image = record.get("file_path", record.get("img_path")) if isinstance(record, dict) else None
        if isinstance(image, str) and image.strip() and not image.startswith("/") and not any(
                part in image for part in ("..", "\\", ":")):  # only paths the readers accept
            (folder / "imgs" / image).parent.mkdir(parents=True, exist_ok=True)
            (folder / "imgs" / image).write_bytes(b"")  # the readers only check that the file is there
    path = folder / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


CUHK = [
    {"split": "train", "captions": ["A woman in a RED coat, black pants.", "The lady-in-red walks."],
     "file_path": "CUHK01/0005001.png", "id": 5, "processed_tokens": [["a"], ["the"]]},
    {"split": "test", "captions": ["Man with a blue/white bag!"], "file_path": "Market/0012_c1.jpg", "id": 12},
    {"split": "train", "captions": ["<person> wearing shorts"], "file_path": "CUHK03/0002_1.png", "id": 2},
    {"split": "val", "captions": ["a b c", "d e"], "file_path": "test_query/p1.jpg", "id": 7},
    {"split": "train", "captions": ["Same woman again"], "file_path": "CUHK01/0005002.png", "id": 5},
    {"split": "test", "captions": ["Another view", "of him", "third caption"], "file_path": "Market/0012_c2.jpg",
     "id": 12},
    {"split": "train", "captions": ["Someone else"], "file_path": "train_query/p9.jpg", "id": 9},
    {"split": "test", "captions": ["A girl (young) in green"], "file_path": "Market/0030_c1.jpg", "id": 30},
]


@pytest.fixture
def cuhk(tmp_path) -> Path:
    return write_dataset(tmp_path / "CUHK-PEDES", "reid_raw.json", CUHK)


def test_cuhk_train_pairs_in_file_order_with_dense_pids_by_first_appearance(cuhk):
    train = read_pedes_train(cuhk, "CUHK-PEDES")
    root = cuhk.parent / "imgs"
    assert isinstance(train, PedesTrain) and isinstance(train[0], PedesPair)
    assert [(Path(p.image).relative_to(root).as_posix(), p.caption, p.pid, p.image_index, p.record)
            for p in train] == [
        ("CUHK01/0005001.png", "a woman in a red coat black pants", 0, 0, 1),
        ("CUHK01/0005001.png", "the lady in red walks", 0, 0, 1),
        ("CUHK03/0002_1.png", "person wearing shorts", 1, 1, 3),
        ("CUHK01/0005002.png", "same woman again", 0, 2, 5),
        ("train_query/p9.jpg", "someone else", 2, 3, 7),
    ]
    assert train.person_ids == [5, 2, 9] and train.num_ids == 3 and train.num_images == 4 and len(train) == 5
    assert train.pids.tolist() == [0, 0, 1, 0, 2] and train.pids.dtype == np.int64
    assert train.where(3) == f"{cuhk} record 5"


def test_cuhk_test_and_val_keep_raw_ids_and_make_every_caption_a_query(cuhk):
    test = read_pedes_eval(cuhk, "cuhk-pedes")
    assert isinstance(test, PedesEval) and test.split == "test"
    assert [Path(p).name for p in test.image_paths] == ["0012_c1.jpg", "0012_c2.jpg", "0030_c1.jpg"]
    assert test.image_pids.tolist() == [12, 12, 30] and test.image_records.tolist() == [2, 6, 8]
    assert test.captions == ["man with a blue white bag", "another view", "of him", "third caption",
                             "a girl young in green"]
    assert test.caption_pids.tolist() == [12, 12, 12, 12, 30]
    assert test.caption_images.tolist() == [0, 1, 1, 1, 2]
    assert test.num_ids == 2 and test.where(1) == f"{cuhk} record 6"
    assert [r.tolist() for r in relevant_images(test)] == [[0, 1], [0, 1], [0, 1], [0, 1], [2]]
    val = read_pedes_eval(cuhk, "cuhk-pedes", "val")
    assert val.image_pids.tolist() == [7] and val.captions == ["a b c", "d e"] and val.caption_pids.tolist() == [7, 7]


def test_folder_readers_pick_the_file_the_image_root_and_train_or_test(cuhk, tmp_path):
    assert pedes_paths(cuhk.parent, "RSTPReid") == (cuhk.parent / "data_captions.json", cuhk.parent / "imgs")
    train, test = cuhk_pedes(cuhk.parent, "train"), cuhk_pedes(cuhk.parent, "test", max_words=1)
    assert isinstance(train, PedesTrain) and train.pids.tolist() == [0, 0, 1, 0, 2]
    assert isinstance(test, PedesEval) and test.captions == ["man", "another", "of", "third", "a"]
    other = tmp_path / "elsewhere"
    (other / "CUHK01").mkdir(parents=True)
    with pytest.raises(DataError, match=rf"^{cuhk} record 1: key 'file_path': image file {other}/CUHK01/0005001"):
        read_pedes_train(cuhk, "cuhk-pedes", root=other)
    moved = read_pedes_train(cuhk, "cuhk-pedes", root=other, check_images=False)
    assert moved[0].image == str(other / "CUHK01/0005001.png")


def test_caption_cleaning_follows_x2vlm_pre_caption_and_truncates_to_max_words(tmp_path):
    long = " ".join(f"w{i}" for i in range(MAX_WORDS + 5))
    raw = ["It's a Man-with/a \"HAT\" (big); ok?  #1 *x* ~y:z!", long, "  two   spaces\n"]
    path = write_dataset(tmp_path, "reid_raw.json", [{"split": "test", "captions": raw, "file_path": "a.png", "id": 1}])
    assert MAX_WORDS == 40  # CFACK's max_tokens, passed to pre_caption as max_words
    cleaned = read_pedes_eval(path, "cuhk-pedes").captions
    assert cleaned == ["it s a man with a hat big ok 1 x y z", " ".join(f"w{i}" for i in range(40)), "two spaces"]
    assert read_pedes_eval(path, "cuhk-pedes", max_words=3).captions[1] == "w0 w1 w2"
    assert read_pedes_eval(path, "cuhk-pedes", clean_captions=False).captions == raw
    assert read_pedes_train(path, "cuhk-pedes", split="test", clean_captions=False)[0].caption == raw[0]


def test_icfg_has_train_and_test_only(tmp_path):
    records = [{"split": "test", "captions": ["x"], "file_path": "test/0027/0027_010.jpg", "id": 3102},
               {"split": "train", "captions": ["y", "z"], "file_path": "train/0000/0000_001.jpg", "id": 0},
               {"split": "train", "captions": ["w"], "file_path": "train/0001/0001_001.jpg", "id": 1}]
    folder = tmp_path / "ICFG-PEDES"
    write_dataset(folder, "ICFG-PEDES.json", records)
    train = icfg_pedes(folder, "train")
    assert train.pids.tolist() == [0, 0, 1] and train.person_ids == [0, 1]
    assert icfg_pedes(folder, "test").image_pids.tolist() == [3102]
    with pytest.raises(DataError, match=r"^ICFG-PEDES has no 'val' split; choose one of train, test$"):
        icfg_pedes(folder, "val")
    write_dataset(folder, "ICFG-PEDES.json", [*records, {**records[0], "split": "val"}])
    with pytest.raises(DataError, match=rf"^{folder}/ICFG-PEDES.json record 4: key 'split' is 'val'; ICFG-PEDES "
                                        r"splits are train, test$"):
        icfg_pedes(folder, "train")


def test_rstpreid_reads_img_path(tmp_path):
    records = [{"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["A man.", "In black."], "split": "train"},
               {"id": 3701, "img_path": "3701_c5_0004.jpg", "captions": ["A woman."], "split": "val"},
               {"id": 3801, "img_path": "3801_c2_0010.jpg", "captions": ["Tall person."], "split": "test"}]
    folder = tmp_path / "RSTPReid"
    write_dataset(folder, "data_captions.json", records)
    assert [p.caption for p in rstpreid(folder, "train")] == ["a man", "in black"]
    assert rstpreid(folder, "val").image_pids.tolist() == [3701]
    assert rstpreid(folder, "test").image_paths == [str(folder / "imgs" / "3801_c2_0010.jpg")]
    assert [r.image for r in read_pedes_annotations(folder / "data_captions.json", "rstpreid")] == [
        "0000_c14_0031.jpg", "3701_c5_0004.jpg", "3801_c2_0010.jpg"]
    renamed = {("file_path" if key == "img_path" else key): value for key, value in records[0].items()}
    write_dataset(folder, "data_captions.json", [renamed])  # CUHK-PEDES's key name: not RSTPReid's
    with pytest.raises(DataError, match=rf"^{folder}/data_captions.json record 1: missing key 'img_path'$"):
        rstpreid(folder, "train")


GOOD = {"split": "train", "captions": ["a man"], "file_path": "a.png", "id": 1}


@pytest.mark.parametrize("record, message", [
    ("not an object", r"expected a JSON object, got str"),
    ({k: v for k, v in GOOD.items() if k != "split"}, r"missing key 'split'"),
    ({k: v for k, v in GOOD.items() if k != "captions"}, r"missing key 'captions'"),
    ({k: v for k, v in GOOD.items() if k != "file_path"}, r"missing key 'file_path'"),
    ({k: v for k, v in GOOD.items() if k != "id"}, r"missing key 'id'"),
    ({**GOOD, "split": 1}, r"key 'split' has the wrong type \(int\)"),
    ({**GOOD, "split": "training"}, r"key 'split' is 'training'; CUHK-PEDES splits are train, val, test"),
    ({**GOOD, "id": "1"}, r"key 'id' has the wrong type \(str\)"),
    ({**GOOD, "id": True}, r"key 'id' has the wrong type \(bool\)"),
    ({**GOOD, "id": 1.0}, r"key 'id' has the wrong type \(float\)"),
    ({**GOOD, "id": -1}, r"key 'id' is negative \(-1\)"),
    ({**GOOD, "file_path": None}, r"key 'file_path' has the wrong type \(NoneType\)"),
    ({**GOOD, "file_path": " "}, r"key 'file_path' is blank"),
    ({**GOOD, "file_path": "/abs/a.png"}, r"key 'file_path' is an absolute path \('/abs/a.png'\)"),
    ({**GOOD, "file_path": "C:\\imgs\\a.png"}, r"key 'file_path' is an absolute path"),
    ({**GOOD, "file_path": "../a.png"}, r"key 'file_path' points outside the image root \('../a.png'\)"),
    ({**GOOD, "file_path": "x/../../a.png"}, r"key 'file_path' points outside the image root"),
    ({**GOOD, "file_path": "..\\a.png"}, r"key 'file_path' points outside the image root"),
    ({**GOOD, "captions": "a man"}, r"key 'captions' has the wrong type \(str\)"),
    ({**GOOD, "captions": []}, r"key 'captions' is an empty list"),
    ({**GOOD, "captions": ["ok", 3]}, r"key 'captions' item 1 has the wrong type \(int\)"),
])
def test_bad_records_name_the_file_the_record_and_the_key(tmp_path, record, message):
    path = write_dataset(tmp_path, "reid_raw.json", [GOOD, {**GOOD, "file_path": "b.png"}, record])
    with pytest.raises(DataError, match=rf"^{path} record 3: {message}"):
        read_pedes_train(path, "cuhk-pedes")
    with pytest.raises(DataError, match=rf"^{path} record 3: "):  # any split: the whole file is checked
        read_pedes_eval(path, "cuhk-pedes", check_images=False)


@pytest.mark.parametrize("caption, message", [
    ("", r"is blank \(empty or only whitespace\)"),
    (" \n", r"is blank"),
    ("...", r"is empty once cleaned"),
    ("?! - / ~", r"is empty once cleaned"),
])
def test_captions_that_clean_to_nothing_name_the_record_and_item(tmp_path, caption, message):
    path = write_dataset(tmp_path, "reid_raw.json", [GOOD, {**GOOD, "captions": ["fine", caption]}])
    with pytest.raises(DataError, match=rf"^{path} record 2: key 'captions' item 1 {message}"):
        read_pedes_train(path, "cuhk-pedes")


def test_file_level_errors(tmp_path):
    missing = tmp_path / "reid_raw.json"
    with pytest.raises(DataError, match=rf"^CUHK-PEDES annotation file {missing} does not exist$"):
        read_pedes_train(missing, "cuhk-pedes")
    missing.write_text("[{]")
    with pytest.raises(DataError, match=rf"^{missing}: not valid JSON \(.* at line 1 column 3\)"):
        read_pedes_train(missing, "cuhk-pedes")
    missing.write_bytes(b'[{"split": "\xff"}]')
    with pytest.raises(DataError, match=rf"^{missing}: not valid UTF-8 text \(byte 13\)"):
        read_pedes_train(missing, "cuhk-pedes")
    missing.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match=rf"^{missing}: expected a JSON array of CUHK-PEDES records, got a dict$"):
        read_pedes_train(missing, "cuhk-pedes")
    path = write_dataset(tmp_path, "reid_raw.json", [GOOD])
    with pytest.raises(DataError, match=rf"^{path}: no records of split 'test'$"):
        read_pedes_eval(path, "cuhk-pedes")
    with pytest.raises(DataError, match=r"^CUHK-PEDES has no 'query' split"):
        read_pedes_eval(path, "cuhk-pedes", "query")
    (tmp_path / "imgs" / "a.png").unlink()
    with pytest.raises(DataError, match=rf"^{path} record 1: key 'file_path': image file {tmp_path}/imgs/a.png does "
                                        r"not exist$"):
        read_pedes_train(path, "cuhk-pedes")
    with pytest.raises(ConfigError, match=r"^unknown text-person dataset 'market'; choose one of CUHK-PEDES, "
                                          r"ICFG-PEDES, RSTPReid$"):
        read_pedes_train(path, "market")
    with pytest.raises(ConfigError, match=r"^max_words must be at least 1, got 0$"):
        read_pedes_train(path, "cuhk-pedes", max_words=0)


# --- the generated demo -----------------------------------------------------------------------------------------

def test_demo_reads_back_through_the_cuhk_reader(tmp_path):
    root = write_pedes_demo(tmp_path / "pedes", num_train_ids=5, num_val_ids=1, num_test_ids=3, seed=2)
    meta = json.loads((root / METADATA_FILE).read_text())
    splits = {split: cuhk_pedes(root, split) for split in ("train", "val", "test")}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert meta["counts"]["train"] == {"ids": 5, "images": train.num_images, "captions": len(train)}
    assert len(train) == 2 * train.num_images and 2 * 5 <= train.num_images <= 4 * 5
    for split, data in (("val", val), ("test", test)):
        assert meta["counts"][split] == {"ids": data.num_ids, "images": len(data.image_paths),
                                         "captions": len(data.captions)}
        assert len(data.captions) == 2 * len(data.image_paths)
    # CUHK-PEDES numbering: ids from 1 in split order, so the dense train pid is id - 1
    assert train.person_ids == [1, 2, 3, 4, 5] and sorted(set(train.pids.tolist())) == [0, 1, 2, 3, 4]
    assert set(val.image_pids.tolist()) == {6} and set(test.image_pids.tolist()) == {7, 8, 9}
    assert all(2 <= n <= 4 for n in np.bincount(test.image_pids)[7:])
    records = json.loads((root / ANNOTATION_FILE).read_text())
    assert all(len(r["captions"]) == 2 and r["file_path"].startswith("demo/") for r in records)
    vocabulary = set(caption_vocabulary())
    for pair in train:
        assert set(pair.caption.split(" ")) <= vocabulary
    assert np.asarray(Image.open(train[0].image)).shape == (48, 24, 3)


def test_demo_identity_is_in_the_pixels_and_the_words(tmp_path):
    root = write_pedes_demo(tmp_path / "pedes", num_train_ids=6, num_test_ids=2, seed=1)
    train = cuhk_pedes(root, "train")
    colour_words = {pid: set() for pid in range(6)}
    for pair in train:
        colour_words[pair.pid].add(frozenset(set(pair.caption.split()) & set(COLOURS)))
    assert all(len(words) == 1 and len(next(iter(words))) >= 1 for words in colour_words.values())
    first = {}
    for pair in train:
        first.setdefault(pair.image_index, pair)
    images = [first[i] for i in range(train.num_images)]
    pixels = np.stack([np.asarray(Image.open(p.image), np.float32).ravel() for p in images])
    pids = np.array([p.pid for p in images])
    distance = np.linalg.norm(pixels[:, None] - pixels[None], axis=-1)
    same, off = pids[:, None] == pids[None], ~np.eye(len(images), dtype=bool)
    assert distance[same & off].mean() < distance[~same].mean()
    assert distance[off].min() > 0


def test_demo_is_deterministic_by_seed_and_reused(tmp_path):
    kwargs = {"num_train_ids": 3, "num_val_ids": 0, "num_test_ids": 2, "height": 32, "width": 16}

    def contents(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = contents(write_pedes_demo(tmp_path / "a", **kwargs, seed=4))
    b = contents(write_pedes_demo(tmp_path / "b", **kwargs, seed=4))
    c = contents(write_pedes_demo(tmp_path / "c", **kwargs, seed=5))
    assert a == b
    assert a[ANNOTATION_FILE] != c[ANNOTATION_FILE]
    stamp = (tmp_path / "a" / METADATA_FILE).stat().st_mtime_ns
    write_pedes_demo(tmp_path / "a", **kwargs, seed=4)
    assert (tmp_path / "a" / METADATA_FILE).stat().st_mtime_ns == stamp
    write_pedes_demo(tmp_path / "a", **kwargs, seed=5)
    assert contents(tmp_path / "a") == c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        write_pedes_demo(tmp_path / "mine", **kwargs)
    with pytest.raises(ValueError, match="min_images"):
        write_pedes_demo(tmp_path / "d", min_images=3, max_images=2)
