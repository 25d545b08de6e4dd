"""open_clip CSV / TSV captions and Karpathy's COCO / Flickr30k split files: records, groups, order, split counts,
every error message and skipping, and the evaluation inputs of a Karpathy test split."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from jaxretrieval.data.csv_source import CsvCaptionSource, csv_separator
from jaxretrieval.data.karpathy import KarpathyCaptionSource
from jaxretrieval.data.sources import SkipCounts
from jaxretrieval.errors import ConfigError, DataError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- open_clip CSV / TSV ----


@pytest.fixture
def images(tmp_path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "img" / name)
    return tmp_path


def test_tsv_reads_open_clip_columns_with_quoted_tabs_and_line_breaks(images):
    outside = png(images / "elsewhere" / "d.png")
    tsv = write(images / "train.tsv", 'filepath\ttitle\n'
                'img/a.png\ta red square\n'
                'img/b.png\t"a caption\twith a tab"\n'
                '\n'
                'img/a.png\t"two\nlines and ""quotes"""\n'
                f'{outside}\tan absolute path\r\n')
    source = CsvCaptionSource(tsv)
    got = [(Path(r.image).relative_to(images).as_posix(), r.caption, r.group, r.line) for r in source.records]
    assert got == [("img/a.png", "a red square", 0, 2), ("img/b.png", "a caption\twith a tab", 1, 3),
                   ("img/a.png", 'two\nlines and "quotes"', 0, 5), ("elsewhere/d.png", "an absolute path", 2, 7)]
    assert source.where(source[3]) == f"{tsv}:7" and source.group_keys() == ["img/a.png", "img/b.png", str(outside)]
    assert source.images() == [str(images / "img/a.png"), str(images / "img/b.png"), str(outside)]


def test_csv_with_bom_a_group_column_extra_columns_and_another_root(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotations")
    csv = write(folder / "train.csv", "\ufeffid,path,caption,url\n"
                "7,img/a.png,\"red, square\",http://x\n"
                "7,img/b.png,same group,http://y\n"
                "9,img/c.png,another,\n")
    source = CsvCaptionSource(csv, images, img_key="path", caption_key="caption", group_key="id", separator=",")
    assert [(r.caption, r.group) for r in source.records] == [("red, square", 0), ("same group", 0), ("another", 1)]
    assert source.group_keys() == ["7", "9"] and source[1].image == str(images / "img/b.png")
    assert len(CsvCaptionSource([csv, csv], images, img_key="path", caption_key="caption", separator=",")) == 6
    unchecked = write(images / "x.csv", "filepath,title\nnot/there.png,fine\n")
    assert CsvCaptionSource(unchecked, separator=",", check_images=False)[0].image == str(images / "not/there.png")


def test_separator_names_and_bad_separators():
    assert [csv_separator(value) for value in ("\t", "\\t", "tab", ",", "|")] == ["\t", "\t", "\t", ",", "|"]
    for value in ("", ",,", '"', "\n"):
        with pytest.raises(ConfigError, match="one character"):
            csv_separator(value)


CSV_ERRORS = [
    ("filepath\tcaption\nimg/a.png\tx\n", {},
     ":1: the header has no column 'title' (its columns: 'filepath', 'caption')"),
    ("filepath,title\nimg/a.png,x\n", {},
     ":1: the header has no column 'filepath' (its columns: 'filepath,title'); one column: is the separator '\\t'"),
    ("filepath\ttitle\ttitle\nimg/a.png\tx\ty\n", {}, ":1: the header has column 'title' 2 times"),
    ("filepath\ttitle\tid\nimg/a.png\tx\n", {"group_key": "id"},
     ":2: 2 fields where the header has 3 (column 'id' is missing)"),
    ("filepath\ttitle\nimg/a.png\tx\n\nimg/b.png\n", {},
     ":4: 1 field where the header has 2 (column 'title' is missing)"),
    ("filepath\ttitle\nimg/a.png\tan\tunquoted tab\n", {},
     ":2: 3 fields where the header has 2 (a field holding the separator '\\t' must be quoted)"),
    ("filepath\ttitle\nimg/a.png\t  \n", {}, ":2: column 'title' is blank (empty or only whitespace)"),
    ("filepath\ttitle\n \tx\n", {}, ":2: column 'filepath' is blank"),
    ("filepath\ttitle\tid\nimg/a.png\tx\t\n", {"group_key": "id"}, ":2: column 'id' is blank"),
    ("filepath\ttitle\nimg/nope.png\tx\n", {}, ":2: column 'filepath': image file {root}/img/nope.png does not exist"),
    ("filepath\ttitle\nimg/a.png\tx\nimg/b.png\t\"open\nquote\n", {},
     ":3: not a valid CSV row (unexpected end of data)"),
    ("filepath\ttitle\nimg/a.png\t\"closed\"then text\n", {}, ":2: not a valid CSV row"),
    (b"filepath\ttitle\nimg/a.png\tcaf\xe9\n", {}, ":2: not valid UTF-8 text (byte 14 of the line)"),
    ("\n\n", {}, ": no header row"),
]


@pytest.mark.parametrize(("text", "kwargs", "message"), CSV_ERRORS)
def test_csv_errors_name_file_line_and_column(images, text, kwargs, message):
    tsv = write(images / "bad.tsv", text)
    with pytest.raises(DataError, match=re.escape(f"{tsv}{message.format(root=images)}")):
        CsvCaptionSource(tsv, **kwargs)


def test_csv_skip_bad_counts_and_keeps_line_numbers(images, caplog):
    tsv = write(images / "mixed.tsv", b"filepath\ttitle\n"
                b"img/a.png\tgood one\n"
                b"img/a.png\tcaf\xe9\n"
                b"img/b.png\n"
                b"img/nope.png\tgone\n"
                b"img/b.png\t \n"
                b"img/b.png\t\"x\"y\n"
                b"img/c.png\tgood two\n")
    source = CsvCaptionSource(tsv, skip_bad=True)
    assert [(r.caption, r.line) for r in source.records] == [("good one", 2), ("good two", 8)]
    assert source.skipped == SkipCounts(malformed_lines=3, missing_images=1, blank_captions=1)
    assert "skipped 5 records" in caplog.text and f"{tsv}:4: 1 field" in caplog.text


# ---- Karpathy's dataset_*.json ----

SPLITS = ["train", "train", "restval", "restval", "val", "test", "test"]


def karpathy_json(root: Path, flickr: bool = False) -> dict:
    """7 images (2 train, 2 restval, 1 val, 2 test) with 5 captions each, one test image with 6, as COCO has."""
    entries = []
    for imgid, split in enumerate(SPLITS):
        folder = "train2014" if split == "train" else "val2014"
        filename = f"{imgid}.png" if flickr else f"COCO_{folder}_{imgid:012d}.png"
        png(root / filename if flickr else root / folder / filename)
        count = 6 if imgid == 6 else 5
        sentences = [{"tokens": ["image", str(imgid), "caption", str(n)], "raw": f"Image {imgid}, caption {n}.",
                      "imgid": imgid, "sentid": imgid * 10 + n} for n in range(count)]
        entry = {"filename": filename, "imgid": imgid, "sentences": sentences, "split": split,
                 "sentids": [s["sentid"] for s in sentences]}
        entry.update({} if flickr else {"filepath": folder, "cocoid": 1000 + imgid})
        entries.append(entry)
    return {"images": entries, "dataset": "flickr30k" if flickr else "coco"}


def dump(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco(tmp_path) -> tuple[Path, dict]:
    data = karpathy_json(tmp_path)
    return dump(tmp_path / "dataset_coco.json", data), data


@pytest.mark.parametrize(("split", "restval", "imgids"), [
    ("train", True, [0, 1, 2, 3]), ("train", False, [0, 1]), ("val", True, [4]), ("test", True, [5, 6]),
    ("restval", True, [2, 3])])
def test_karpathy_split_selection(coco, split, restval, imgids):
    path, _ = coco
    source = KarpathyCaptionSource(path, split=split, restval=restval)
    assert source.group_keys() == [1000 + i for i in imgids]
    assert len(source) == sum(6 if i == 6 else 5 for i in imgids)


def test_karpathy_test_split_order_paths_and_captions(coco):
    path, _ = coco
    source = KarpathyCaptionSource(path, split="test")
    assert [r.group for r in source.records] == [0] * 5 + [1] * 6
    assert [r.caption for r in source.records[4:6]] == ["Image 5, caption 4.", "Image 6, caption 0."]
    assert source.images() == [str(path.parent / "val2014" / f"COCO_val2014_{i:012d}.png") for i in (5, 6)]
    assert source.text_to_image() == [0] * 5 + [1] * 6 and source.where(source[5]) == f"{path} images[6]"
    tokens = KarpathyCaptionSource(path, split="test", captions="tokens")
    assert tokens[0].caption == "image 5 caption 0"


def test_flickr_images_sit_under_root_and_group_by_imgid(tmp_path):
    path = dump(tmp_path / "dataset_flickr30k.json", karpathy_json(tmp_path / "flickr30k-images", flickr=True))
    source = KarpathyCaptionSource(path, tmp_path / "flickr30k-images", split="test")
    assert source.images() == [str(tmp_path / "flickr30k-images" / f"{i}.png") for i in (5, 6)]
    assert source.group_keys() == [5, 6]


def edit(data: dict, index: int, change) -> dict:
    data = copy.deepcopy(data)
    change(data["images"][index])
    return data


KARPATHY_ERRORS = [
    (lambda d: edit(d, 5, lambda e: e.pop("filename")), "test", " images[5]: missing key 'filename'"),
    (lambda d: edit(d, 3, lambda e: e.pop("split")), "test", " images[3]: missing key 'split'"),
    (lambda d: edit(d, 6, lambda e: e.update(imgid="6")), "test", " images[6]: key 'imgid' has the wrong type (str)"),
    (lambda d: edit(d, 6, lambda e: e.update(imgid=5)), "test", " images[6]: key 'imgid' 5 repeats images[5]"),
    (lambda d: edit(d, 6, lambda e: e.update(cocoid=True)), "test", " images[6]: key 'cocoid' has the wrong type"),
    (lambda d: edit(d, 5, lambda e: e.update(sentences=[])), "test", " images[5]: key 'sentences' is an empty list"),
    (lambda d: edit(d, 5, lambda e: e["sentences"][1].pop("raw")), "test",
     " images[5] sentences[1]: missing key 'raw'"),
    (lambda d: edit(d, 5, lambda e: e["sentences"][2].update(raw=" ")), "test",
     " images[5] sentences[2]: key 'raw' is blank (empty or only whitespace)"),
    (lambda d: edit(d, 5, lambda e: e.update(filename="gone.png")), "test",
     " images[5]: image file {root}/val2014/gone.png does not exist"),
    (lambda d: {"images": [*d["images"], 3]}, "val", " images[7]: expected a JSON object, got int"),
    (lambda d: d, "testing", ": no images of split 'testing' (its splits: restval, test, train, val)"),
    (lambda d: d["images"], "test", ": expected Karpathy's JSON object holding an 'images' list, got a list"),
    (lambda d: {"annotations": []}, "test", ": expected Karpathy's JSON object holding an 'images' list, got an obj"),
]


@pytest.mark.parametrize(("change", "split", "message"), KARPATHY_ERRORS)
def test_karpathy_errors_name_the_image_index_and_key(coco, change, split, message):
    path, data = coco
    dump(path, change(data))
    with pytest.raises(DataError, match=re.escape(f"{path}{message.format(root=path.parent)}")):
        KarpathyCaptionSource(path, split=split)


def test_karpathy_token_errors_bad_json_and_bad_option(coco):
    path, data = coco
    dump(path, edit(data, 5, lambda e: e["sentences"][0].update(tokens=["a", 1])))
    with pytest.raises(DataError, match=re.escape(f"{path} images[5] sentences[0]: key 'tokens' item 1 has the")):
        KarpathyCaptionSource(path, split="test", captions="tokens")
    with pytest.raises(ConfigError, match="captions must be one of raw, tokens"):
        KarpathyCaptionSource(path, split="test", captions="text")
    write(path, b"\xef\xbb\xbf{\"images\": [}")
    with pytest.raises(DataError, match=re.escape(f"{path}: not valid JSON")):
        KarpathyCaptionSource(path, split="test")


def test_karpathy_checks_only_the_selected_split_and_skips_bad_images(coco, caplog):
    path, data = coco
    data = edit(data, 0, lambda e: e.pop("filename"))  # a train image
    assert len(KarpathyCaptionSource(dump(path, data), split="test")) == 11
    data = edit(data, 1, lambda e: e.update(filename="gone.png"))
    data = edit(data, 2, lambda e: e["sentences"][0].update(raw=""))
    source = KarpathyCaptionSource(dump(path, data), split="train", skip_bad=True)
    assert source.skipped == SkipCounts(malformed_lines=1, missing_images=1, blank_captions=1)
    assert source.group_keys() == [1002, 1003] and len(source) == 9
    assert "skipped 3 records" in caplog.text


def test_eval_inputs_on_a_karpathy_test_split(coco):
    from jaxretrieval.data.pipeline import eval_inputs

    path, _ = coco
    config = tiny_config(path.parent, **{"eval.protocol": "image_text"})
    source = KarpathyCaptionSource(path, split="test")
    inputs = eval_inputs(config, source, lambda texts: np.zeros((len(texts), 4), np.int32))
    np.testing.assert_array_equal(inputs.image_groups, [0, 1])
    np.testing.assert_array_equal(inputs.text_groups, [0] * 5 + [1] * 6)
    assert inputs.tokens.shape == (11, 4) and inputs.images.origins == [f"{path} images[5]", f"{path} images[6]"]
    size = config.model.image.image_size
    assert inputs.images[0:2].shape == (2, size, size, 3)


@pytest.mark.parametrize("kind", ["csv", "karpathy"])
def test_a_run_trains_and_evaluates_from_each_format(kind, demo_root, tmp_path):
    """The demo's JSON lines rewritten as open_clip's TSV and as Karpathy's JSON, then `train` through the config
    keys: the same records reach the loop and the image_text evaluation (one image per group)."""
    from jaxretrieval import train

    lines = {split: [json.loads(line) for line in (demo_root / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "test")}
    if kind == "csv":
        for split, rows in lines.items():
            body = "".join(f"{r['image']}\t{r['caption']}\n" for r in rows)
            write(tmp_path / f"{split}.tsv", "filepath\ttitle\n" + body)
        files = {"data.train_file": "train.tsv", "data.test_file": "test.tsv"}
    else:
        entries: dict[str, dict] = {}
        for split, rows in lines.items():
            for r in rows:
                entry = entries.setdefault(r["image"], {"filename": r["image"], "imgid": len(entries), "split": split,
                                                        "sentences": []})
                entry["sentences"].append({"raw": r["caption"], "tokens": r["caption"].split()})
        write(tmp_path / "dataset_demo.json", json.dumps({"images": list(entries.values())}))
        files = {"data.train_file": "dataset_demo.json", "data.test_file": "dataset_demo.json"}
    config = tiny_config(demo_root, **{"data.kind": kind, "data.root": str(demo_root), "train.steps": 2,
                                       "train.progress_bar": False, **{k: str(tmp_path / v) for k, v in files.items()}})
    result = train.train(config, tmp_path / "run")
    test_images = len({r["image"] for r in lines["test"]})
    assert (result["num_images"], result["num_texts"]) == (test_images, len(lines["test"]))
    assert 0 <= result["t2i_R1"] <= 100
