"""Score fusion: loading and aligning id-carrying matrices, min-max, linear and PAB iterative fusion, top-k
re-ranking, submission files, and the `python -m jaxretrieval.fuse` command with its input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxretrieval import fuse
from jaxretrieval.retrieval.fusion import (
    ScoreMatrix,
    align,
    format_submission,
    fuse_iterative,
    fuse_linear,
    load_scores,
    minmax,
    rerank_topk,
    save_scores,
    top_gallery,
    write_submission,
)
from jaxretrieval.retrieval.metrics import ranking_metrics

QUERIES = ["q0", "q1", "q2"]
GALLERY = ["g0", "g1", "g2", "g3", "g4"]


def matrix(scores, name="m", queries=QUERIES, gallery=GALLERY) -> ScoreMatrix:
    return ScoreMatrix(np.asarray(scores, dtype=float), list(queries), list(gallery), name)


def random_matrices(seed=0) -> dict[str, ScoreMatrix]:
    rng = np.random.default_rng(seed)
    names = ["beit3", "itm", "blip2", "clip"]
    return {n: matrix(rng.normal(size=(3, 5)) * (i + 1) + i, n) for i, n in enumerate(names)}


def test_minmax_over_the_whole_matrix_and_constant_is_zeros():
    np.testing.assert_allclose(minmax(np.array([[0.0, 2.0], [4.0, 1.0]])), [[0, 0.5], [1, 0.25]])
    assert np.array_equal(minmax(np.full((2, 3), 7.0)), np.zeros((2, 3)))


def test_fuse_linear_hand_worked():
    a = matrix([[0, 2], [4, 1]], "a", ["q0", "q1"], ["g0", "g1"])  # N: [[0, .5], [1, .25]]
    b = matrix([[1, 1], [3, 5]], "b", ["q0", "q1"], ["g0", "g1"])  # N: [[0, 0], [.5, 1]]
    fused = fuse_linear([a, b], {"a": 0.25, "b": 0.75})
    np.testing.assert_allclose(fused.scores, [[0, 0.125], [0.625, 0.8125]])
    with pytest.raises(ValueError, match="no weight for 'b'"):
        fuse_linear([a, b], {"a": 1.0})
    with pytest.raises(ValueError, match="no score matrix named 'c'"):
        fuse_linear([a, b], {"a": 1.0, "b": 1.0, "c": 1.0})


def test_fuse_iterative_uses_each_weight_where_named():
    m = random_matrices()
    n = {k: minmax(v.scores) for k, v in m.items()}
    w1, w2, w3 = 0.9, 0.6, 0.3
    expected = (((1 - w1) * n["itm"] + w1 * n["beit3"]) * w2 + (1 - w2) * n["blip2"]) * w3 + (1 - w3) * n["clip"]
    fused = fuse_iterative(list(m.values()), w1, w2, w3)
    np.testing.assert_allclose(fused.scores, expected, rtol=0, atol=1e-12)
    for swapped in [(w2, w1, w3), (w1, w3, w2), (w3, w2, w1)]:
        assert not np.allclose(fuse_iterative(list(m.values()), *swapped).scores, expected)
    renamed = [ScoreMatrix(v.scores, v.query_ids, v.gallery_ids, f"x_{k}") for k, v in m.items()]
    roles = {"itm": "x_itm", "primary": "x_beit3", "second": "x_blip2", "third": "x_clip"}
    np.testing.assert_allclose(fuse_iterative(renamed, w1, w2, w3, **roles).scores, expected, atol=1e-12)
    with pytest.raises(ValueError, match=r"w2 must lie in \[0, 1\]"):
        fuse_iterative(list(m.values()), 0.5, 1.5, 0.5)


def test_align_reorders_shuffled_ids():
    base = random_matrices()["beit3"]
    rows, cols = [2, 0, 1], [3, 1, 4, 0, 2]
    shuffled = ScoreMatrix(base.scores[np.ix_(rows, cols)], [QUERIES[i] for i in rows], [GALLERY[j] for j in cols],
                           "shuffled")
    first, second = align([base, shuffled])
    assert second.query_ids == QUERIES and second.gallery_ids == GALLERY
    np.testing.assert_array_equal(second.scores, base.scores)
    fused = fuse_linear([shuffled, base], {"shuffled": 0.5, base.name: 0.5})
    assert fused.query_ids == [QUERIES[i] for i in rows]
    np.testing.assert_allclose(fused.scores, minmax(shuffled.scores))


@pytest.mark.parametrize("bad, message", [
    (matrix(np.zeros((3, 5)), "other", gallery=["g0", "g1", "g2", "g3", "gX"]), r"'other'.*gallery ids.*lacks 'g4'"),
    (matrix(np.zeros((3, 5)), "other", queries=["q0", "q1", "qX"]), r"'other'.*query ids.*has extra 'qX'"),
    (matrix(np.zeros((3, 5)), "other", gallery=["g0", "g1", "g1", "g3", "g4"]), r"'other'.*duplicate gallery.*'g1'"),
    (matrix(np.zeros((3, 5)), "other", queries=["q0", "q0", "q2"]), r"'other'.*duplicate query.*'q0'"),
    (matrix(np.where(np.eye(3, 5) > 0, np.nan, 0.0), "other"), r"'other'.*NaN.*query 'q0'.*gallery item 'g0'"),
])
def test_align_errors_name_the_matrix_and_ids(bad, message):
    with pytest.raises(ValueError, match=message):
        align([matrix(np.zeros((3, 5)), "ref"), bad])


def test_rerank_keeps_topk_and_fills_with_the_row_minimum():
    primary = matrix([[0.9, 0.1, 0.5, 0.5]], "beit3", ["q0"], ["a", "b", "c", "d"])
    # Listed in another gallery order: d c b a.
    reranker = matrix([[9.0, -1.0, 7.0, 3.0]], "itm", ["q0"], ["d", "c", "b", "a"])
    out = rerank_topk(primary, reranker, k=2)
    # Top 2 of the primary: a (0.9), then c over d on the 0.5 tie (lower index). Kept: a -> 3, c -> -1.
    assert out.name == "itm" and out.gallery_ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(out.scores, [[3.0, -1.0, -1.0, -1.0]])
    np.testing.assert_array_equal(rerank_topk(primary, reranker, k=10).scores, [[3.0, 7.0, -1.0, 9.0]])


def test_top_gallery_ties_and_submission_text(tmp_path):
    m = matrix([[0.1, 0.3, 0.3, 0.2, 0.0], [5, 4, 3, 2, 1], [0, 0, 0, 0, 1]], gallery=["A1", "B2", "C3", "D4", "E5"])
    assert top_gallery(m, k=3) == [["B2", "C3", "D4"], ["A1", "B2", "C3"], ["E5", "A1", "B2"]]
    assert top_gallery(m, k=9)[0] == ["B2", "C3", "D4", "A1", "E5"]
    path = write_submission(m, tmp_path / "sub.txt", k=2)
    assert path.read_text() == "B2 C3\nA1 B2\nE5 A1\n"
    with pytest.raises(ValueError, match="whitespace"):
        format_submission(matrix(np.zeros((1, 2)), queries=["q"], gallery=["a b", "c"]))


def test_loading_every_format(tmp_path):
    torch = pytest.importorskip("torch")
    scores = np.arange(15, dtype=np.float32).reshape(3, 5) / 7
    ids = {"query_ids": QUERIES, "gallery_ids": GALLERY}
    torch.save(torch.from_numpy(scores).half(), tmp_path / "tensor.pt")
    (tmp_path / "tensor.json").write_text(json.dumps(ids))
    torch.save({"scores": torch.from_numpy(scores), **ids}, tmp_path / "dict.pt")
    torch.save({"sims": torch.from_numpy(scores), "step": 3}, tmp_path / "lone.pt")
    (tmp_path / "lone.query_ids.txt").write_text("\n".join(QUERIES) + "\n")
    (tmp_path / "lone.gallery_ids.txt").write_text("\n".join(GALLERY) + "\n")
    np.save(tmp_path / "plain.npy", scores)
    (tmp_path / "plain.json").write_text(json.dumps({"query_ids": [0, 1, 2], "gallery_ids": GALLERY}))
    save_scores(matrix(scores, "x"), tmp_path / "saved.npz")
    for stem in ["tensor.pt", "dict.pt", "lone.pt", "plain.npy", "saved.npz"]:
        loaded = load_scores(tmp_path / stem)
        assert loaded.name == stem.split(".")[0] and loaded.gallery_ids == GALLERY
        assert loaded.query_ids == (["0", "1", "2"] if stem == "plain.npy" else QUERIES)
        np.testing.assert_allclose(loaded.scores, scores, rtol=1e-3 if stem == "tensor.pt" else 1e-7)
    assert load_scores(tmp_path / "dict.pt", name="beit3").name == "beit3"


def test_loading_errors(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(FileNotFoundError, match="score file not found"):
        load_scores(tmp_path / "absent.npz")
    np.save(tmp_path / "bare.npy", np.zeros((3, 5)))
    with pytest.raises(ValueError, match="no ids beside it; write bare.json"):
        load_scores(tmp_path / "bare.npy")
    torch.save(torch.zeros(5, 3), tmp_path / "flipped.pt")
    (tmp_path / "flipped.json").write_text(json.dumps({"query_ids": QUERIES, "gallery_ids": GALLERY}))
    with pytest.raises(ValueError, match=r"shape \(5, 3\).*\(3, 5\)"):
        load_scores(tmp_path / "flipped.pt")


# ---- the command ----


@pytest.fixture
def score_files(tmp_path):
    m = random_matrices(seed=1)
    paths = {}
    for i, (name, mat) in enumerate(m.items()):
        # Each file in its own gallery order, as independent tools would write them.
        order = np.random.default_rng(i).permutation(len(GALLERY))
        shuffled = ScoreMatrix(mat.scores[:, order], QUERIES, [GALLERY[j] for j in order], name)
        paths[name] = tmp_path / f"{name}.npz"
        save_scores(shuffled, paths[name])
    labels = {"q0": ["g1"], "q1": ["g0", "g3"], "q2": ["g4"]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    return m, paths, tmp_path / "labels.json"


def run_cli(args, capsys) -> tuple[int, str]:
    code = fuse.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_iterative_matches_the_library(score_files, tmp_path, capsys):
    m, paths, _ = score_files
    out = tmp_path / "out"
    code, err = run_cli(["--mode", "iterative", "--scores", *[f"{k}={v}" for k, v in paths.items()],
                         "--weights", "w1=0.9", "w2=0.6", "w3=0.3", "--rerank", "itm", "--rerank-k", "2",
                         "--output-dir", out], capsys)
    assert code == 0, err
    reranked = rerank_topk(m["beit3"], m["itm"], 2)
    expected = fuse_iterative([m["beit3"], reranked, m["blip2"], m["clip"]], 0.9, 0.6, 0.3)
    fused = load_scores(out / "fused.npz")
    assert fused.query_ids == QUERIES
    np.testing.assert_allclose(align([expected, fused])[1].scores, expected.scores, atol=1e-12)
    assert (out / "submission.txt").read_text() == format_submission(expected)
    assert not (out / "metrics.json").exists()


def test_cli_single_matrix_is_its_own_ranking(score_files, tmp_path, capsys):
    m, paths, _ = score_files
    out = tmp_path / "single"
    assert run_cli(["--scores", f"clip={paths['clip']}", "--weights", "clip=1", "--top-k", "3", "--output-dir", out],
                   capsys)[0] == 0
    lines = (out / "submission.txt").read_text().splitlines()
    assert [line.split() for line in lines] == top_gallery(load_scores(paths["clip"]), 3)
    assert [line.split() for line in lines] == top_gallery(m["clip"], 3)


def test_cli_metrics_equal_ranking_metrics(score_files, tmp_path, capsys):
    _, paths, labels = score_files
    out = tmp_path / "scored"
    code = fuse.main(["--scores", f"beit3={paths['beit3']}", f"blip2={paths['blip2']}", "--weights", "beit3=0.7",
                      "blip2=0.3", "--labels", str(labels), "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics
    fused = load_scores(out / "fused.npz")
    relevant = np.zeros(fused.scores.shape, dtype=bool)
    for q, gallery in json.loads(labels.read_text()).items():
        for g in gallery:
            relevant[fused.query_ids.index(q), fused.gallery_ids.index(g)] = True
    expected = ranking_metrics(fused.scores, relevant)
    assert set(metrics) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert metrics == pytest.approx({k: float(v) for k, v in expected.items()})


@pytest.mark.parametrize("case", ["missing file", "no equals", "empty name", "unknown weight", "missing weight",
                                  "bad weight", "iterative names", "unknown label query", "unknown label gallery",
                                  "rerank unknown", "mismatched ids"])
def test_cli_bad_input_is_a_clear_error_and_writes_nothing(case, score_files, tmp_path, capsys):
    _, paths, labels = score_files
    scores = [f"beit3={paths['beit3']}", f"clip={paths['clip']}"]
    weights = ["beit3=0.5", "clip=0.5"]
    extra: list[str] = []
    if case == "missing file":
        scores[1] = f"clip={tmp_path / 'nope.npz'}"
    elif case == "no equals":
        scores[1] = str(paths["clip"])
    elif case == "empty name":
        scores[1] = f"={paths['clip']}"
    elif case == "unknown weight":
        weights.append("blip2=0.1")
    elif case == "missing weight":
        weights.pop()
    elif case == "bad weight":
        weights[1] = "clip=half"
    elif case == "iterative names":
        extra = ["--mode", "iterative"]
        weights = ["w1=0.5", "w2=0.5", "w3=0.5"]
    elif case in ("unknown label query", "unknown label gallery"):
        bad = {"qX": ["g0"]} if case == "unknown label query" else {"q0": ["g0", "gX"]}
        (tmp_path / "bad_labels.json").write_text(json.dumps(bad))
        extra = ["--labels", str(tmp_path / "bad_labels.json")]
    elif case == "rerank unknown":
        extra = ["--rerank", "itm"]
    elif case == "mismatched ids":
        save_scores(matrix(np.zeros((3, 5)), gallery=["g0", "g1", "g2", "g3", "gX"]), tmp_path / "odd.npz")
        scores[1] = f"clip={tmp_path / 'odd.npz'}"
    out = tmp_path / "out"
    code, err = run_cli(["--scores", *scores, "--weights", *weights, *extra, "--output-dir", out], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_failure_leaves_an_existing_output_dir_untouched(score_files, tmp_path, capsys):
    _, paths, _ = score_files
    out = tmp_path / "out"
    assert run_cli(["--scores", f"clip={paths['clip']}", "--weights", "clip=1", "--output-dir", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _ = run_cli(["--scores", f"clip={paths['clip']}", "--weights", "clip=1", "blip2=0", "--output-dir", out],
                      capsys)
    assert code == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_module_entry_point(score_files, tmp_path):
    _, paths, _ = score_files
    done = subprocess.run([sys.executable, "-m", "jaxretrieval.fuse", "--scores", f"clip={tmp_path / 'gone.pt'}",
                           "--weights", "clip=1", "--output-dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr == f"error: score file not found: {tmp_path / 'gone.pt'}\n"
