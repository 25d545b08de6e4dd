"""`python -m jaxretrieval.search`: a gallery folder embedded once into a saved index, then searched by caption files
and image folders, each result list equal to ranking the model's own embeddings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

import jaxretrieval
from jaxretrieval import search, train
from jaxretrieval.data.pipeline import GalleryImages


@pytest.fixture(scope="module")
def setup(demo_root, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(workdir of a tiny trained CLIP, gallery folder of the demo's test images, the test captions)."""
    root = tmp_path_factory.mktemp("search")
    workdir = root / "run"
    train.train(tiny_config(demo_root), workdir)
    gallery = root / "gallery"
    gallery.mkdir()
    records = [json.loads(line) for line in (demo_root / "test.jsonl").read_text().splitlines()]
    for record in records:
        shutil.copy(demo_root / record["image"], gallery / f"img_{record['image_id']}.png")
    return workdir, gallery, [r["caption"] for r in records]


def reference(workdir: Path, gallery: Path, query_embeddings, k: int) -> list[list[str]]:
    model, preprocess, _ = jaxretrieval.load(workdir)
    paths = sorted(gallery.iterdir(), key=lambda p: p.stem)
    images = GalleryImages([str(p) for p in paths], preprocess)[0:len(paths)]
    gallery_emb = np.asarray(model.encode_image(images, normalize=True))
    order = np.argsort(-(query_embeddings(model) @ gallery_emb.T), axis=1, kind="stable")[:, :k]
    return [[paths[i].stem for i in row] for row in order]


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_index_once_then_query_by_captions_and_by_images(setup, tmp_path, capsys):
    workdir, gallery, captions = setup
    index = tmp_path / "index"
    assert search.main(["index", "--checkpoint", str(workdir), "--gallery", str(gallery), "--out", str(index),
                        "--batch-size", "8"]) == 0
    count = len(list(gallery.iterdir()))
    assert f"index of {count} images" in capsys.readouterr().err
    queries = tmp_path / "captions.txt"
    queries.write_text("\n".join(captions[:6]) + "\n\n")  # blank lines are not queries
    out = tmp_path / "results.jsonl"
    assert search.main(["query", "--checkpoint", str(workdir), "--index", str(index), "--queries", str(queries),
                        "--k", "5", "--output", str(out)]) == 0
    got = results(out)
    assert [r["query"] for r in got] == [str(i) for i in range(1, 7)]
    _, _, tokenizer = jaxretrieval.load(workdir)
    want = reference(workdir, gallery, lambda m: np.asarray(m.encode_text(tokenizer(captions[:6]), normalize=True)),
                     5)
    assert [[item[0] for item in r["results"]] for r in got] == want
    assert all(np.all(np.diff([item[1] for item in r["results"]]) <= 0) for r in got)

    by_image = tmp_path / "by_image.jsonl"
    assert search.main(["query", "--checkpoint", str(workdir), "--index", str(index), "--query-images",
                        str(gallery), "--k", "3", "--output", str(by_image)]) == 0
    for row in results(by_image):  # each image finds itself first (ties aside, its score is 1)
        assert row["results"][0][1] == pytest.approx(1.0, abs=1e-5)


def test_bad_requests_are_one_error_line_and_write_nothing(setup, tmp_path, capsys):
    workdir, gallery, captions = setup
    index = tmp_path / "index"
    assert search.main(["index", "--checkpoint", str(workdir), "--gallery", str(gallery), "--out", str(index)]) == 0
    assert search.main(["index", "--checkpoint", str(workdir), "--gallery", str(gallery), "--out", str(index)]) == 2
    assert "already exists" in capsys.readouterr().err
    queries = tmp_path / "q.txt"
    queries.write_text(captions[0] + "\n")
    out = tmp_path / "out.jsonl"
    assert search.main(["query", "--checkpoint", str(workdir), "--index", str(index), "--queries", str(queries),
                        "--k", "100000", "--output", str(out)]) == 2
    assert "--k 100000 exceeds the" in capsys.readouterr().err
    (index / "embeddings.npy").unlink()
    assert search.main(["query", "--checkpoint", str(workdir), "--index", str(index), "--queries", str(queries),
                        "--output", str(out)]) == 2
    assert "embeddings.npy is missing" in capsys.readouterr().err
    assert not out.exists()
