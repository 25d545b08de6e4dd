"""Score-level fusion of retrieval models: (queries, gallery) score matrices that carry their own ids.

Each matrix is read with the ids of its rows and columns, so matrices written by different tools in different
orders can be aligned before they are combined. Higher scores are better everywhere, and every ranking breaks ties
by the lower gallery index (after alignment: the order of the first matrix).

Files read by `load_scores`:
- `.npz` with arrays `scores` (Q, G), `query_ids` (Q,) and `gallery_ids` (G,), as `save_scores` writes them.
- `.npy` holding the (Q, G) array, with its ids beside it (see below).
- `.pt`/`.pth` loaded with `torch.load(weights_only=True)`: a (Q, G) tensor, as the PAB repos save them, with its
  ids beside it; or a dict holding the tensor under `scores` (or as its only 2-D tensor), with `query_ids` and
  `gallery_ids` lists in the dict or, when the dict has neither, beside the file.
Ids beside `NAME.npy`/`NAME.pt` come from `NAME.json` ({"query_ids": [...], "gallery_ids": [...]}), or else from
`NAME.query_ids.txt` and `NAME.gallery_ids.txt` (one id a line). Ids are kept as strings.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from jaxretrieval.errors import weights_only_reason
from jaxretrieval.retrieval.rerank import candidates, fill_matrix


@dataclass(eq=False)
class ScoreMatrix:
    """scores[i, j]: how well gallery item gallery_ids[j] matches query query_ids[i] (higher is better)."""

    scores: np.ndarray
    query_ids: list[str]
    gallery_ids: list[str]
    name: str = "scores"
    source: str = ""  # the file it was read from, for error messages

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.query_ids = [str(i) for i in self.query_ids]
        self.gallery_ids = [str(i) for i in self.gallery_ids]
        expected = (len(self.query_ids), len(self.gallery_ids))
        if self.scores.shape != expected:
            raise ValueError(f"{self.label}: scores have shape {self.scores.shape}, but its ids give "
                             f"(queries, gallery) = {expected}")

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.source})" if self.source else repr(self.name)


def _few(ids: Sequence[str], shown: int = 5) -> str:
    text = ", ".join(repr(i) for i in ids[:shown])
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _duplicates(ids: Sequence[str]) -> list[str]:
    return sorted(i for i, count in Counter(ids).items() if count > 1)


def _id_list(value: Any, where: str) -> list[str]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple) or any(isinstance(v, list | tuple | dict) for v in value):
        raise ValueError(f"{where}: ids must be a flat list, got {type(value).__name__}")
    return [str(v) for v in value]


def _ids_beside(path: Path) -> tuple[list[str], list[str]]:
    sidecar = path.with_suffix(".json")
    texts = [path.with_name(f"{path.stem}.{kind}_ids.txt") for kind in ("query", "gallery")]
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{sidecar}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not {"query_ids", "gallery_ids"} <= meta.keys():
            raise ValueError(f"{sidecar}: expected an object with 'query_ids' and 'gallery_ids' lists")
        return _id_list(meta["query_ids"], str(sidecar)), _id_list(meta["gallery_ids"], str(sidecar))
    if all(t.is_file() for t in texts):
        query, gallery = ([line.strip() for line in t.read_text().splitlines() if line.strip()] for t in texts)
        return query, gallery
    raise ValueError(f"{path}: no ids beside it; write {sidecar.name} with 'query_ids' and 'gallery_ids' "
                     f"(or {texts[0].name} and {texts[1].name}, one id a line)")


def _load_torch(path: Path) -> tuple[np.ndarray, tuple[list[str], list[str]] | None]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path}: reading .pt score files needs PyTorch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unpickling error types
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), the only way pickles are opened "
                         f"here: {weights_only_reason(e)}") from None
    ids = None
    if isinstance(obj, dict):
        if "query_ids" in obj or "gallery_ids" in obj:
            if not {"query_ids", "gallery_ids"} <= obj.keys():
                raise ValueError(f"{path}: the dict has only one of 'query_ids' and 'gallery_ids'")
            ids = _id_list(obj["query_ids"], str(path)), _id_list(obj["gallery_ids"], str(path))
        if "scores" in obj:
            obj = obj["scores"]
        else:
            found = [v for v in obj.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
            if len(found) != 1:
                raise ValueError(f"{path}: the dict has no 'scores' entry and {len(found)} 2-D tensors")
            obj = found[0]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a score tensor")
    return obj.detach().to(torch.float64).numpy(), ids


def _load_numpy(path: Path) -> tuple[np.ndarray, tuple[list[str], list[str]] | None]:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as data:
            missing = sorted({"scores", "query_ids", "gallery_ids"} - set(data.files))
            if missing:
                raise ValueError(f"the .npz lacks the array(s) {missing}")
            ids = _id_list(data["query_ids"], "query_ids"), _id_list(data["gallery_ids"], "gallery_ids")
            return data["scores"], ids
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_scores(path: str | Path, name: str | None = None) -> ScoreMatrix:
    """Read a (queries, gallery) score matrix and its ids (formats in the module docstring); name: default the stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        scores, ids = _load_numpy(path)
    elif suffix in (".pt", ".pth"):
        scores, ids = _load_torch(path)
    else:
        raise ValueError(f"{path}: unknown score file type {suffix!r} (expected .npz, .npy or .pt)")
    if ids is None:
        ids = _ids_beside(path)
    return ScoreMatrix(scores, ids[0], ids[1], name=name or path.stem, source=str(path))


def scores_from_bytes(data: bytes, name: str) -> ScoreMatrix:
    """A matrix `save_scores` wrote, from its bytes (what predict returns before anything is written)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        ids = _id_list(arrays["query_ids"], "query_ids"), _id_list(arrays["gallery_ids"], "gallery_ids")
        return ScoreMatrix(arrays["scores"], ids[0], ids[1], name=name)


def save_scores(matrix: ScoreMatrix, path: str | Path | IO[bytes]) -> None:
    """Write `matrix` as `.npz` with arrays scores, query_ids and gallery_ids (what `load_scores` reads back)."""
    if isinstance(path, str | Path):
        if Path(path).suffix != ".npz":
            raise ValueError(f"{path}: score matrices are saved as .npz")
        with Path(path).open("wb") as f:
            save_scores(matrix, f)
        return
    np.savez(path, scores=matrix.scores, query_ids=np.array(matrix.query_ids, dtype=str),
             gallery_ids=np.array(matrix.gallery_ids, dtype=str))


def _check(matrix: ScoreMatrix) -> None:
    for kind, ids in (("query", matrix.query_ids), ("gallery", matrix.gallery_ids)):
        duplicated = _duplicates(ids)
        if duplicated:
            raise ValueError(f"{matrix.label}: duplicate {kind} ids {_few(duplicated)}")
    bad = ~np.isfinite(matrix.scores)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{matrix.label}: {int(bad.sum())} NaN or inf score(s), the first for query "
                         f"{matrix.query_ids[i]!r} and gallery item {matrix.gallery_ids[j]!r}")


def _positions(matrix: ScoreMatrix, reference: ScoreMatrix, kind: str) -> np.ndarray:
    ids, order = getattr(matrix, f"{kind}_ids"), getattr(reference, f"{kind}_ids")
    index = {i: n for n, i in enumerate(ids)}
    missing = [i for i in order if i not in index]
    extra = sorted(set(ids) - set(order))
    if missing or extra:
        problems = ([f"lacks {_few(missing)}"] if missing else []) + ([f"has extra {_few(extra)}"] if extra else [])
        raise ValueError(f"{matrix.label}: its {kind} ids differ from {reference.label}'s: {'; '.join(problems)}")
    return np.array([index[i] for i in order], dtype=np.intp)


def align(matrices: Sequence[ScoreMatrix]) -> list[ScoreMatrix]:
    """Every matrix reordered to the first one's query and gallery order, after checking ids and scores."""
    if not matrices:
        raise ValueError("no score matrices to align")
    for matrix in matrices:
        _check(matrix)
    reference = matrices[0]
    aligned = []
    for matrix in matrices:
        rows, cols = _positions(matrix, reference, "query"), _positions(matrix, reference, "gallery")
        aligned.append(ScoreMatrix(matrix.scores[np.ix_(rows, cols)], list(reference.query_ids),
                                   list(reference.gallery_ids), matrix.name, matrix.source))
    return aligned


def minmax(scores: np.ndarray) -> np.ndarray:
    """(s - min) / (max - min) with min and max over the whole matrix, not per row.

    A constant (or empty) matrix ranks nothing; it maps to zeros, so in a weighted sum it shifts no item.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or scores.max() == scores.min():
        return np.zeros_like(scores)
    low = scores.min()
    return (scores - low) / (scores.max() - low)


def fuse_linear(matrices: Sequence[ScoreMatrix], weights: Mapping[str, float], *, normalize: bool = True,
                name: str = "fused") -> ScoreMatrix:
    """sum_m weights[m.name] * minmax(m.scores), after aligning to the first matrix (normalize=False: raw scores)."""
    names = [m.name for m in matrices]
    if _duplicates(names):
        raise ValueError(f"score matrices share names {_few(_duplicates(names))}")
    missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or extra:
        raise ValueError("weights must name each score matrix once: "
                         + "; ".join(([f"no weight for {_few(missing)}"] if missing else [])
                                     + ([f"no score matrix named {_few(extra)}"] if extra else [])))
    for key, weight in weights.items():
        if not np.isfinite(weight):
            raise ValueError(f"weight for {key!r} is {weight}")
    aligned = align(matrices)
    total = np.zeros_like(aligned[0].scores)
    for matrix in aligned:
        total += float(weights[matrix.name]) * (minmax(matrix.scores) if normalize else matrix.scores)
    return ScoreMatrix(total, aligned[0].query_ids, aligned[0].gallery_ids, name)


def iterative_weights(w1: float, w2: float, w3: float, *, itm: str = "itm", primary: str = "beit3",
                      second: str = "blip2", third: str = "clip") -> dict[str, float]:
    """Per-matrix weights of S = {[(1-w1) N(itm) + w1 N(primary)] w2 + (1-w2) N(second)} w3 + (1-w3) N(third)."""
    for label, weight in (("w1", w1), ("w2", w2), ("w3", w3)):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{label} must lie in [0, 1], got {weight}")
    roles = [itm, primary, second, third]
    if _duplicates(roles):
        raise ValueError(f"the itm, primary, second and third matrices must differ, got {roles}")
    return {itm: (1 - w1) * w2 * w3, primary: w1 * w2 * w3, second: (1 - w2) * w3, third: 1 - w3}


def fuse_iterative(matrices: Sequence[ScoreMatrix], w1: float, w2: float, w3: float, *, itm: str = "itm",
                   primary: str = "beit3", second: str = "blip2", third: str = "clip",
                   name: str = "fused") -> ScoreMatrix:
    """The PAB nested fusion (see `iterative_weights`) of four matrices named by their roles.

    Each weight is used where its name says; the PAB inference script passed w2 in w1's place, so its run with
    `--beit3_weight 0.925 --blip2_weight 0.9` equals w1 = w2 = 0.9 here. `itm` is normally `rerank_topk`'s output.
    """
    weights = iterative_weights(w1, w2, w3, itm=itm, primary=primary, second=second, third=third)
    return fuse_linear(matrices, weights, name=name)


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rerank_topk(primary: ScoreMatrix, reranker: ScoreMatrix, k: int) -> ScoreMatrix:
    """Re-score each query's top k gallery items under `primary` with `reranker` (e.g. an ITM head's logits).

    The result holds the reranker's score at those k positions and, everywhere else in the row, the lowest of those
    k scores, so items the reranker did not see sit level with its last pick. This is the PAB rule: it filled the
    rest with a 1000 placeholder, took each row's minimum (the lowest re-scored item, logits being far below 1000)
    and put it in the placeholders' place. Ties in the primary's top k go to the lower gallery index; k at least
    the gallery size keeps every reranker score. The result takes the reranker's name and the primary's order.
    `rerank.rerank_matrix` does the same with a cross-encoder run only on the top k, instead of a whole matrix.
    """
    if k < 1:
        raise ValueError(f"rerank k must be at least 1, got {k}")
    primary, reranker = align([primary, reranker])
    scores = reranker.scores.copy()
    gallery = scores.shape[1]
    if gallery:
        _, top = candidates(primary.scores, min(k, gallery))
        scores = fill_matrix(np.take_along_axis(reranker.scores, top, axis=1), top, gallery, "row_min")
    return ScoreMatrix(scores, primary.query_ids, primary.gallery_ids, reranker.name, reranker.source)


def top_gallery(matrix: ScoreMatrix, k: int = 10) -> list[list[str]]:
    """Per query (in the matrix's order), the ids of its k best gallery items, best first; ties: lower index."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    ids = np.array(matrix.gallery_ids, dtype=object)
    return [ids[row].tolist() for row in _top_indices(matrix.scores, k)]


def format_submission(matrix: ScoreMatrix, k: int = 10) -> str:
    """The PAB submission text: one line per query, in query order, with its top-k gallery stems space-separated."""
    unusable = [i for i in matrix.gallery_ids if not i or any(c.isspace() for c in i)]
    if unusable:
        raise ValueError(f"{matrix.label}: gallery ids {_few(unusable)} are empty or hold whitespace")
    return "".join(" ".join(row) + "\n" for row in top_gallery(matrix, k))


def write_submission(matrix: ScoreMatrix, path: str | Path, k: int = 10) -> Path:
    path = Path(path)
    path.write_text(format_submission(matrix, k))
    return path
