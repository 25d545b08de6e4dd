"""`python -m jaxretrieval.pab`: the seed's whole inference on a tiny PAB-shaped test set with four tiny scorers (LHP,
UIT, BLIP-2, CLIP): each scorer's matrix, UIT's ITM re-scores of LHP's top k, and the fused ranking against a numpy
transcription of the ensemble formula, with sorted gallery stems; a scorer left out drops out with its weight."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from jaxretrieval import pab
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import load_config, to_dict
from jaxretrieval.data.pedes_demo import write_pedes_demo
from jaxretrieval.data.pipeline import caption_source, data_root, make_tokenizer
from jaxretrieval.models import init_params
from jaxretrieval.retrieval.fusion import load_scores


def scorer(tmp: Path, config_file: str, overrides: list[str]) -> Path:
    """An untrained checkpoint of a demo config (random weights: the command's arithmetic is what is checked)."""
    config = load_config(REPO / "configs" / "demo" / config_file, overrides)
    tokenizer = make_tokenizer(config, data_root(config))
    path = tmp / config_file.removesuffix(".yaml")
    write_model(path, init_params(config, seed=1, precision="fp32"), {"config": to_dict(config),
                                                                      "tokenizer": tokenizer.to_spec()})
    return path


@pytest.fixture(scope="module")
def pab_set(tmp_path_factory, demo_root):
    """Queries, a gallery folder (files created in shuffled order, stems not in sorted order) and labels."""
    tmp = tmp_path_factory.mktemp("pab")
    pedes = write_pedes_demo(tmp / "pedes", num_train_ids=2, num_val_ids=0, num_test_ids=4)
    config = load_config(REPO / "configs" / "demo" / "uit_tiny.yaml", [f"data.root={pedes}"])
    records = caption_source(config, pedes, "test").records[:8]
    gallery = tmp / "gallery"
    gallery.mkdir()
    images = sorted({r.image for r in records})
    stems = {image: f"{(7 * i) % 11:02d}_g" for i, image in enumerate(images)}
    for image in np.random.default_rng(0).permutation(images):
        shutil.copy(image, gallery / f"{stems[image]}{Path(image).suffix}")
    queries = tmp / "query.json"
    queries.write_text("".join(json.dumps({"query_index": i, "caption": r.caption}) + "\n"
                               for i, r in enumerate(records)))
    labels = tmp / "labels.json"
    same = {i: [stems[image] for image in images if any(q.group == r.group and q.image == image for q in records)]
            for i, r in enumerate(records)}
    labels.write_text(json.dumps({str(i): stems_ for i, stems_ in same.items()}))
    checkpoints = {
        "lhp": scorer(tmp, "beit3_tiny.yaml", [f"data.root={demo_root}"]),
        "uit": scorer(tmp, "uit_tiny.yaml", [f"data.root={pedes}"]),
        "blip2": scorer(tmp, "blip2_tiny.yaml", [f"data.root={pedes}"]),  # saved with query_reduce max
        "clip": scorer(tmp, "clip_tiny.yaml", [f"data.root={demo_root}"]),
    }
    return queries, gallery, labels, checkpoints, sorted(stems.values())


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def test_pab_command_fuses_four_scorers_as_the_formula(pab_set, tmp_path, capsys):
    queries, gallery, labels, ckpt, stems = pab_set
    out = tmp_path / "out"
    w1, w2, w3, k = 0.7, 0.8, 0.6, 3
    assert pab.main(["--queries", str(queries), "--gallery", str(gallery), "--lhp", str(ckpt["lhp"]), "--uit",
                     str(ckpt["uit"]), "--blip2", str(ckpt["blip2"]), "--clip", str(ckpt["clip"]), "--out", str(out),
                     "--weights", f"w1={w1}", f"w2={w2}", f"w3={w3}", "--rerank-k", str(k), "--labels", str(labels),
                     "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "drops out" not in err and "UIT re-scores LHP top 3" in err
    lhp, clip = load_scores(out / "lhp" / "scores.npz"), load_scores(out / "clip" / "scores.npz")
    blip2 = load_scores(out / "blip2" / "scores.npz")
    itm = load_scores(out / "uit" / "itm_scores.npz")
    for matrix in (lhp, clip, blip2, itm, load_scores(out / "uit" / "scores.npz")):
        assert matrix.gallery_ids == stems and matrix.query_ids == [str(i) for i in range(8)]
    # UIT re-scored exactly LHP's top k of each row; the rest sits at the row's lowest re-score.
    top = np.argsort(-lhp.scores, axis=1, kind="stable")[:, :k]
    rest = np.ones_like(itm.scores, bool)
    np.put_along_axis(rest, top, False, axis=1)
    row_min = np.take_along_axis(itm.scores, top, axis=1).min(axis=1, keepdims=True)
    np.testing.assert_array_equal(np.where(rest, itm.scores, row_min), np.broadcast_to(row_min, itm.scores.shape))
    # S = {[(1-w1) N(itm) + w1 N(lhp)] w2 + (1-w2) N(blip2)} w3 + (1-w3) N(clip)
    want = (((1 - w1) * minmax(itm.scores) + w1 * minmax(lhp.scores)) * w2 + (1 - w2) * minmax(blip2.scores)) * w3 \
        + (1 - w3) * minmax(clip.scores)
    fused = load_scores(out / "fused.npz")
    np.testing.assert_allclose(fused.scores, want, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "weights.json").read_text()) == pytest.approx(
        {"itm": (1 - w1) * w2 * w3, "lhp": w1 * w2 * w3, "blip2": (1 - w2) * w3, "clip": 1 - w3})
    lines = (out / "submission.txt").read_text().splitlines()
    assert [line.split() for line in lines] == [[stems[j] for j in np.argsort(-row, kind="stable")[:10]]
                                                for row in want]
    # BLIP-2 scored as the seed's blip2_infer.py does: the first query token, whatever the checkpoint's own setting.
    from jaxretrieval.predict import predict
    from jaxretrieval.retrieval.fusion import scores_from_bytes

    def blip2_scores(reduce: str) -> np.ndarray:
        files = predict(ckpt["blip2"], queries, gallery, batch_size=8, overrides=[f"blip2.query_reduce={reduce}"])
        return scores_from_bytes(files["scores.npz"], "blip2").scores

    np.testing.assert_allclose(blip2.scores, blip2_scores("first"), atol=1e-6)
    assert not np.allclose(blip2.scores, blip2_scores("max"), atol=1e-4)
    for name in ("", "lhp", "uit", "blip2", "clip"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert 0 <= metrics["R1"] <= 100 and 0 <= metrics["mAP"] <= 100
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_pab_command_errors_before_scoring(pab_set, tmp_path, capsys):
    queries, gallery, _, ckpt, _ = pab_set
    base = ["--queries", str(queries), "--gallery", str(gallery), "--out", str(tmp_path / "o")]
    assert pab.main(base) == 2
    assert "name at least one scorer" in capsys.readouterr().err
    assert pab.main([*base, "--clip", str(ckpt["clip"]), "--weights", "w4=1"]) == 2
    assert "w1=.. w2=.. w3=.." in capsys.readouterr().err
    assert pab.main([*base, "--clip", str(ckpt["clip"]), "--weights", "w3=1.5"]) == 2
    assert "w3 must lie in [0, 1]" in capsys.readouterr().err
    assert pab.main([*base, "--uit", str(ckpt["clip"])]) == 2  # a CLIP checkpoint has no ITM head
    assert "has no ITM head" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_missing_scorers_drop_out_with_their_weight():
    full = pab.ensemble_weights({"itm", "lhp", "blip2", "clip"}, 0.925, 0.9, 0.9)
    assert sum(full.values()) == pytest.approx(1.0)
    assert pab.ensemble_weights({"itm", "lhp", "clip"}, 0.925, 0.9, 0.9) == {k: v for k, v in full.items()
                                                                             if k != "blip2"}
    assert set(pab.ensemble_weights({"clip"}, 0.925, 0.9, 0.9)) == {"clip"}
    with pytest.raises(Exception, match="weight 0"):
        pab.ensemble_weights({"clip"}, 0.925, 0.9, 1.0)
