"""`python -m jaxretrieval.embed`: a split's embeddings in clip-retrieval's layout, streamed in parts, equal to the
evaluator's own embeddings and rankings; bad requests fail before the model loads and leave nothing behind."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config

from jaxretrieval import export
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import load_config, to_dict
from jaxretrieval.data.pipeline import caption_source, eval_inputs, make_tokenizer
from jaxretrieval.evaluate import embed_inputs, restore_params, saved_config
from jaxretrieval.models import create_model, init_params
from jaxretrieval.retrieval.index import GalleryIndex
from jaxretrieval.retrieval.similarity import topk_similarity
from jaxretrieval.sharding import make_mesh

faiss = pytest.importorskip("faiss")
parquet = pytest.importorskip("pyarrow.parquet")

PART = 7  # rows per part: several parts of images and of captions, the last one short


def tiny_checkpoint(out: Path, config) -> Path:
    """An untrained model of `config` saved as a stand-alone checkpoint, with the data's tokenizer (no training)."""
    from flax import nnx

    meta = {"config": to_dict(config)}
    if config.system != "ctl":
        meta["tokenizer"] = make_tokenizer(config, Path(config.data.root)).to_spec()
    return write_model(out, nnx.to_pure_dict(nnx.state(create_model(config, seed=1))), meta)


@pytest.fixture(scope="module")
def setup(demo_root, tmp_path_factory) -> dict:
    """The checkpoint, its fp32 and fp16 exports of the test split, and the evaluator's embeddings of that split."""
    root = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(root / "ckpt", tiny_config(demo_root))
    outs = {}
    for dtype in ("float32", "float16"):
        outs[dtype] = root / dtype
        assert export.main(["--checkpoint", str(ckpt), "--split", "test", "--out", str(outs[dtype]), "--dtype", dtype,
                            "--part-size", str(PART)]) == 0
    config = saved_config(ckpt)
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, ckpt, mesh)
    source = caption_source(config, demo_root, "test")
    inputs = eval_inputs(config, source, make_tokenizer(config, demo_root))
    image_emb, text_emb = embed_inputs(graphdef, params, inputs.images, inputs.tokens, mesh, config.eval.batch_size)
    return {"ckpt": ckpt, "out": outs, "image": image_emb, "text": text_emb, "source": source, "inputs": inputs,
            "mesh": mesh}


def parts(folder: Path, sub: str) -> list[Path]:
    return sorted((folder / sub).iterdir())


def read(folder: Path, emb: str, meta: str) -> tuple[np.ndarray, dict]:
    arrays = [np.load(p) for p in parts(folder, emb)]
    tables = [parquet.read_table(p).to_pydict() for p in parts(folder, meta)]
    assert [len(a) for a in arrays] == [len(next(iter(t.values()))) for t in tables]  # aligned part by part
    return np.concatenate(arrays), {key: sum((t[key] for t in tables), []) for key in tables[0]}


def test_layout_parts_and_metadata_rows_line_up(setup):
    out, source, inputs = setup["out"]["float32"], setup["source"], setup["inputs"]
    images, captions = len(inputs.images), len(source.records)
    for emb, meta, rows in (("img_emb", "metadata", images), ("text_emb", "text_metadata", captions)):
        count = math.ceil(rows / PART)
        width = len(str(count))  # zero-padded as clip-retrieval pads: sorted order is part order
        assert [p.name for p in parts(out, emb)] == [f"{emb}_{i:0{width}d}.npy" for i in range(count)]
        assert [p.name for p in parts(out, meta)] == [f"{meta}_{i:0{width}d}.parquet" for i in range(count)]
        assert [len(np.load(p)) for p in parts(out, emb)] == [PART] * (count - 1) + [rows - PART * (count - 1)]
    assert sorted(p.name for p in out.iterdir()) == ["img_emb", "manifest.json", "metadata", "text_emb",
                                                     "text_metadata"]

    image_emb, image_meta = read(out, "img_emb", "metadata")
    assert image_emb.shape == (images, 16) and image_emb.dtype == np.float32
    assert list(image_meta) == ["image_path", "image_index", "image_id", "group"]
    assert image_meta["image_path"] == inputs.images.paths and image_meta["image_index"] == list(range(images))
    assert image_meta["group"] == inputs.image_groups.tolist()
    keys = [str(k) for k in source.group_keys()]
    assert image_meta["image_id"] == [keys[g] for g in inputs.image_groups]

    text_emb, text_meta = read(out, "text_emb", "text_metadata")
    assert text_emb.shape == (captions, 16)
    assert list(text_meta) == ["caption", "caption_index", "image_index", "image_id", "group", "image_path"]
    assert text_meta["caption"] == [r.caption for r in source.records]
    assert text_meta["caption_index"] == list(range(captions))
    assert text_meta["group"] == inputs.text_groups.tolist()
    # Each caption points at its own image's gallery row.
    assert [image_meta["image_path"][i] for i in text_meta["image_index"]] == [r.image for r in source.records]
    assert [image_meta["image_id"][i] for i in text_meta["image_index"]] == text_meta["image_id"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(setup["ckpt"].absolute()) and manifest["split"] == "test"
    assert manifest["dtype"] == "float32" and manifest["dim"] == 16 and manifest["normalised"] is True
    assert manifest["images"]["count"] == images and manifest["texts"]["count"] == captions
    assert manifest["images"]["parts"] == math.ceil(images / PART) and manifest["images"]["skipped"] == []
    assert manifest["system"] == "clip" and manifest["protocol"] == "image_text" and manifest["config"] is None


def test_embeddings_equal_the_evaluators(setup):
    for dtype, atol in (("float32", 1e-5), ("float16", 2e-3)):
        image_emb, _ = read(setup["out"][dtype], "img_emb", "metadata")
        text_emb, _ = read(setup["out"][dtype], "text_emb", "text_metadata")
        assert image_emb.dtype == text_emb.dtype == np.dtype(dtype)
        np.testing.assert_allclose(image_emb.astype(np.float32), setup["image"], atol=atol)
        np.testing.assert_allclose(text_emb.astype(np.float32), setup["text"], atol=atol)
        np.testing.assert_allclose(np.linalg.norm(image_emb.astype(np.float32), axis=1), 1, atol=atol)
    assert json.loads((setup["out"]["float16"] / "manifest.json").read_text())["dtype"] == "float16"


def same_ranking(found: np.ndarray, want: np.ndarray, want_scores: np.ndarray, queries: np.ndarray,
                 gallery: np.ndarray, atol: float) -> None:
    """`found` is the reference top-k: equal lists, except that items of equal reference score (within atol) may
    trade places."""
    assert found.shape == want.shape and all(len(set(row)) == len(row) for row in found.tolist())
    found_scores = np.take_along_axis(queries @ gallery.T, found, axis=1)
    np.testing.assert_allclose(found_scores, want_scores, atol=atol)
    differ = found != want
    np.testing.assert_array_less(np.abs(found_scores - want_scores)[differ], atol)


def test_faiss_over_the_export_ranks_as_the_evaluator(setup):
    out = setup["out"]["float32"]
    image_emb, _ = read(out, "img_emb", "metadata")
    text_emb, text_meta = read(out, "text_emb", "text_metadata")
    index = faiss.IndexFlatIP(image_emb.shape[1])
    index.add(np.ascontiguousarray(image_emb))
    _, found = index.search(np.ascontiguousarray(text_emb), 10)
    scores, want = topk_similarity(setup["text"], setup["image"], 10, mesh=setup["mesh"])
    same_ranking(found, want, scores, setup["text"], setup["image"], 1e-5)
    assert (found == want).mean() > 0.9
    # Recall@10 from the export's metadata equals the evaluator's (text -> image).
    hits = (found == np.asarray(text_meta["image_index"])[:, None]).any(axis=1)
    assert hits.mean() == (want == setup["inputs"].text_groups[:, None]).any(axis=1).mean()


def test_a_gallery_index_reads_the_export(setup):
    out = setup["out"]["float16"]
    index = export.index_from_export(out, "image")
    assert index.shape == setup["image"].shape and index.dtype == np.float16
    assert index.ids.tolist() == list(range(len(setup["image"])))
    scores, want = topk_similarity(setup["text"], setup["image"], 5, mesh=setup["mesh"])
    _, found = index.search(setup["text"], 5)
    same_ranking(found, want, scores, setup["text"], setup["image"], 5e-3)
    texts = export.index_from_export(out, "text", ids="caption")
    assert texts.ids.tolist() == [r.caption for r in setup["source"].records]
    loaded = GalleryIndex.load(out)  # the export folder as it is
    np.testing.assert_array_equal(loaded.search(setup["text"], 5)[1], found)


def test_bad_requests_fail_before_the_model_loads_and_write_nothing(setup, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(export, "restore_params", no_load)
    ckpt = str(setup["ckpt"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert export.main(["--checkpoint", ckpt, "--split", "test", "--out", str(full)]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "not empty" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    assert export.main(["--checkpoint", ckpt, "--split", "validation", "--out", str(tmp_path / "new")]) == 2
    assert "unknown split 'validation'" in capsys.readouterr().err
    assert export.main(["--checkpoint", ckpt, "--split", "test", "--out", str(tmp_path / "new"),
                        "--part-size", "0"]) == 2
    assert "--part-size" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no output, no staging folder left


def test_a_failed_run_leaves_nothing_and_an_empty_out_is_filled(setup, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["--checkpoint", str(setup["ckpt"]), "--split", "test", "--out", str(empty),
                        "--part-size", "100"]) == 0
    assert len(list((empty / "img_emb").iterdir())) == 1
    monkeypatch.setattr(export, "embed_all", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        export.main(["--checkpoint", str(setup["ckpt"]), "--split", "test", "--out", str(tmp_path / "x")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_reid_splits_export_images_with_person_and_camera_ids(tmp_path):
    config = load_config(REPO / "configs/demo/ctl_tiny.yaml", [
        f"data.root={tmp_path / 'data'}", "data.demo_num_train=4", "data.demo_num_test=4", "eval.batch_size=16",
        "model.num_classes=4"])
    ckpt = write_model(tmp_path / "ckpt", init_params(config, seed=0, precision="fp32"), {"config": to_dict(config)})
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(ckpt), "--split", "query", "--out", str(out), "--part-size", "5"]) == 0
    embeddings, meta = read(out, "img_emb", "metadata")
    assert list(meta) == ["image_path", "image_index", "pid", "camid"] and not (out / "text_emb").exists()
    assert all("query" in path for path in meta["image_path"]) and len(embeddings) == len(meta["pid"])
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    assert json.loads((out / "manifest.json").read_text())["texts"] is None
    assert export.main(["--checkpoint", str(ckpt), "--split", "test", "--out", str(tmp_path / "bad")]) == 2


def test_the_embed_module_is_the_command():
    import jaxretrieval.embed

    assert jaxretrieval.embed.main is export.main


def test_images_that_fail_to_decode_are_left_out_and_listed(setup, demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    bad = setup["inputs"].images.paths[3].replace(str(demo_root), str(data))
    Path(bad).write_bytes(b"not an image")
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(setup["ckpt"]), "--split", "test", "--out", str(out), "--part-size",
                        str(PART), f"data.root={data}", "eval.skip_bad_records=true"]) == 0
    embeddings, meta = read(out, "img_emb", "metadata")
    rows = len(setup["image"])
    assert meta["image_index"] == [i for i in range(rows) if i != 3] and len(embeddings) == rows - 1
    np.testing.assert_allclose(embeddings.astype(np.float32), np.delete(setup["image"], 3, axis=0), atol=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["skipped"] == [3] and manifest["images"]["count"] == rows - 1


def test_loading_a_checkpoint_from_python_logs_no_library_warnings(setup):
    """`jaxretrieval.load` in a script that configured no logging: orbax's read-only manager warnings stay quiet."""
    import subprocess
    import sys

    from conftest import REPO

    code = f"import jaxretrieval; jaxretrieval.load({str(setup['ckpt'])!r}); print('loaded')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "loaded", result.stderr[-2000:]
    assert "WARNING:absl" not in result.stderr and "read_only" not in result.stderr, result.stderr[-2000:]
