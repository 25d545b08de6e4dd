"""Bad records: blank captions, images that do not decode in training (also inside grain workers) and in evaluation
(an error naming the annotation line, or with eval.skip_bad_records skipped, counted and left out of the protocol)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config

from jaxretrieval.config import load_config
from jaxretrieval.data.pab import read_queries
from jaxretrieval.data.pipeline import caption_source, eval_inputs, make_tokenizer, train_loader
from jaxretrieval.data.reid import EncodeReid, ReidRecord, ReidSource, ReidTrainTransform
from jaxretrieval.data.reid_pipeline import ReidSplit, reid_eval_splits, reid_source
from jaxretrieval.data.sources import CaptionSource, DataError
from jaxretrieval.evaluate import evaluate_reid_splits, evaluate_retrieval
from jaxretrieval.models import abstract_model, init_params
from jaxretrieval.sharding import make_mesh


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def corrupt(path: Path) -> None:
    """Keeps the first half of the file: a truncated image, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def line_of(annotations: Path, image: str) -> int:
    """The first line of `annotations` that names `image`."""
    lines = annotations.read_text().splitlines()
    return next(number for number, line in enumerate(lines, start=1) if image in line)


# ---- blank captions ----


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(("caption", "expected"), [
    ("", "key 'caption' is blank"),
    ("   ", "key 'caption' is blank"),
    (["fine", "\t"], "key 'caption' item 1 is blank"),
])
def test_blank_json_captions_name_file_and_line_or_are_counted(images, caption, expected):
    path = write_lines(images / "train.jsonl", [{"image": "a.jpg", "caption": "a cat"},
                                                {"image": "b.jpg", "caption": caption, "image_id": 9}])
    with pytest.raises(DataError) as info:
        CaptionSource(path)
    assert str(info.value).startswith(f"{path}:2: {expected}")
    source = CaptionSource(path, skip_bad=True)
    assert source.skipped.blank_captions == 1 and source.skipped.total == 1
    kept = ["a cat", "fine"] if isinstance(caption, list) else ["a cat"]
    assert [record.caption for record in source.records] == kept
    assert source.images() == [str(images / name) for name in ("a.jpg", "b.jpg")[:len(kept)]]


def test_blank_tsv_caption_names_file_and_line(images, caplog):
    path = images / "train.tsv"
    path.write_text("a.jpg\ta cat\nb.jpg\t  \nb.jpg\n")
    with pytest.raises(DataError, match=rf"^{path}:2: the caption is blank"):
        CaptionSource(path)
    with caplog.at_level(logging.WARNING):
        source = CaptionSource(path, skip_bad=True)
    assert (source.skipped.blank_captions, source.skipped.malformed_lines) == (1, 1) and len(source) == 1
    assert "1 malformed lines, 0 missing images, 1 blank captions" in caplog.text


def test_blank_query_caption_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "query.json", [{"query_index": 0, "caption": "a man falls"},
                                                 {"query_index": 1, "caption": " \u3000"}])
    with pytest.raises(DataError, match=rf"^{path}:2: key 'caption' is blank"):
        read_queries(path)


def test_bad_utf8_names_file_and_line(images):
    path = images / "train.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        CaptionSource(path)
    assert CaptionSource(path, skip_bad=True).skipped.malformed_lines == 1


# ---- corrupt images in training ----


@pytest.fixture
def broken_demo(demo_root, tmp_path) -> tuple[Path, str, int]:
    """A copy of the demo data with one training image truncated: (root, image name, its first train.jsonl line)."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    name = "train_00007.png"
    corrupt(root / "images" / name)
    return root, name, line_of(root / "train.jsonl", name)


def test_corrupt_training_image_names_annotation_line_in_grain_workers(broken_demo):
    root, name, line = broken_demo
    config = tiny_config(root, **{"train.batch_size": 8, "data.workers": 2})
    loader = train_loader(config, caption_source(config, root, "train"), make_tokenizer(config, root))
    # Each of the image's three captions is a record (lines line..line + 2); whichever comes first is named.
    pattern = rf"train\.jsonl:({line}|{line + 1}|{line + 2}): cannot decode image .*{name} \("
    with pytest.raises(DataError, match=pattern):
        for _, _ in zip(range(40), loader, strict=False):  # 40 x 8 > 256 records: one epoch at least
            pass


def test_corrupt_training_image_is_one_error_line_of_its_own_after_the_progress_bar(broken_demo):
    """The train command with its progress bar on: the error names the annotation line, on a line of its own."""
    root, name, line = broken_demo
    overrides = [f"{key}={value}" for key, value in {
        "data.kind": "jsonl", "data.root": root, "train.batch_size": 32, "train.steps": 30, "train.progress_bar": True,
        "model.image.layers": 1, "model.text.layers": 1}.items()]
    result = subprocess.run([sys.executable, "-m", "jaxretrieval.train", "--config",
                             str(REPO / "configs/demo/clip_tiny.yaml"), "--workdir", str(root.parent / "run"),
                             *overrides], env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [text for text in result.stderr.splitlines() if "error:" in text]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(rf"train\.jsonl:({line}|{line + 1}|{line + 2}): cannot decode image .*{name}", errors[0])
    assert "Traceback" not in result.stderr


def test_corrupt_reid_training_image_names_the_file(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    encode = EncodeReid(ReidTrainTransform(size=(64, 32)))
    with pytest.raises(DataError, match=rf"cannot decode image {bad} \("):
        encode.random_map(ReidRecord(str(bad), 0, 0), np.random.default_rng(0))


# ---- corrupt images in evaluation ----


@pytest.fixture(scope="module")
def tiny_model(demo_root):
    config = tiny_config(demo_root)
    graphdef, _ = abstract_model(config.model)
    return graphdef, init_params(config.model, seed=0, precision="fp32"), make_mesh(config.mesh)


def evaluate(tiny_model, root: Path, protocol: str, skip: bool, test_file: str = "test.jsonl") -> dict:
    graphdef, params, mesh = tiny_model
    config = tiny_config(root, **{"eval.protocol": protocol, "eval.skip_bad_records": skip,
                                  "data.test_file": test_file})
    inputs = eval_inputs(config, caption_source(config, root, "test"), make_tokenizer(config, root))
    return evaluate_retrieval(graphdef, params, inputs, mesh, config.eval.batch_size, protocol)


@pytest.mark.parametrize("protocol", ["image_text", "text_to_image"])
def test_corrupt_gallery_image_is_an_error_or_skipped_as_if_never_listed(demo_root, tmp_path, tiny_model, protocol,
                                                                         caplog):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    name = "test_00005.png"
    corrupt(root / "images" / name)
    line = line_of(root / "test.jsonl", name)
    with pytest.raises(DataError, match=rf"^{root / 'test.jsonl'}:{line}: cannot decode image .*{name} \("):
        evaluate(tiny_model, root, protocol, skip=False)

    with caplog.at_level(logging.WARNING):
        skipped = evaluate(tiny_model, root, protocol, skip=True)
    assert f"evaluation skips {root / 'test.jsonl'}:{line}: cannot decode image" in caplog.text and name in caplog.text
    # The same as an evaluation whose annotations never listed the image (3 captions, all of its group).
    kept = [text for text in (root / "test.jsonl").read_text().splitlines() if name not in text]
    write_lines(root / "without.jsonl", kept)
    reference = evaluate(tiny_model, root, protocol, skip=False, test_file="without.jsonl")
    assert skipped.pop("skipped") == 1 and reference.pop("skipped") == 0
    assert skipped["num_images"] == 31 and skipped["num_texts"] == 93
    assert skipped == pytest.approx(reference)


def test_every_gallery_image_skipped_is_an_error(demo_root, tmp_path, tiny_model):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    (root / "one.jsonl").write_text(json.dumps({"image": "images/test_00000.png", "caption": "a cat"}) + "\n")
    corrupt(root / "images" / "test_00000.png")
    with pytest.raises(DataError, match="every one of the 1 gallery images was skipped"):
        evaluate(tiny_model, root, "image_text", skip=True, test_file="one.jsonl")


@pytest.fixture(scope="module")
def reid(tmp_path_factory):
    """A tiny re-id demo (query and gallery splits), its config and an untrained tiny CTL model."""
    root = tmp_path_factory.mktemp("reid") / "data"
    overrides = [f"data.root={root}", "data.demo_num_train=4", "data.demo_num_test=6", "model.num_classes=4",
                 "model.resnet.width=8"]
    config = load_config(REPO / "configs/demo/ctl_tiny.yaml", overrides)
    reid_source(config, "train")  # generates the demo
    graphdef, _ = abstract_model(config.model)
    return config, overrides, graphdef, init_params(config.model, seed=0, precision="fp32")


def test_corrupt_reid_eval_image_is_an_error_or_skipped(reid, caplog):
    config, overrides, graphdef, params = reid
    mesh = make_mesh(config.mesh)
    query, gallery = reid_eval_splits(config)
    bad = Path(gallery.images.paths[3])
    backup = bad.read_bytes()
    corrupt(bad)
    try:
        with pytest.raises(DataError, match=rf"cannot decode image {bad} \("):
            evaluate_reid_splits(graphdef, params, (query, gallery), mesh, 16)
        skip_config = load_config(REPO / "configs/demo/ctl_tiny.yaml", [*overrides, "eval.skip_bad_records=true"])
        with caplog.at_level(logging.WARNING):
            skipped = evaluate_reid_splits(graphdef, params, reid_eval_splits(skip_config), mesh, 16)
        assert f"evaluation skips cannot decode image {bad}" in caplog.text
        source = reid_source(config, "gallery")
        without = ReidSource([record for record in source if record.path != str(bad)], "gallery without one")
        reference = evaluate_reid_splits(graphdef, params, (query, ReidSplit(config, without)), mesh, 16)
    finally:
        bad.write_bytes(backup)
    assert skipped.pop("skipped") == 1 and reference.pop("skipped") == 0
    assert skipped == pytest.approx(reference, nan_ok=True)
