"""Fuse (queries, gallery) score matrices from several models into one ranking, and score it.

Writes DIR/submission.txt (per query its top gallery ids), DIR/fused.npz and, given --labels, DIR/metrics.json.
Linear mode: S = sum_m w_m N(S_m) with one weight per matrix name. Iterative mode (the PAB ensemble):
S = {[(1-w1) N(itm) + w1 N(primary)] w2 + (1-w2) N(second)} w3 + (1-w3) N(third), weights named w1 w2 w3.
N is min-max over the whole matrix. --rerank NAME first keeps NAME's scores only at the primary's top k per
query (the rest: that row's lowest kept score); in iterative mode the itm matrix is otherwise used as given.
One matrix with weight 1 evaluates that matrix alone. Outputs follow the first --scores file's id order.

  python -m jaxretrieval.fuse --mode iterative --scores beit3=beit3.pt itm=uit_itm.npz blip2=blip2.pt clip=clip.pt \\
      --weights w1=0.925 w2=0.9 w3=0.9 --rerank itm --rerank-k 10 --labels labels.json --output-dir out/pab
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxretrieval.errors import (
    ConfigError,
    DataError,
    OutputPathError,
    UserError,
    command,
    parse_command_line,
    probe_output_folder,
    require,
)
from jaxretrieval.retrieval.fusion import (
    ScoreMatrix,
    align,
    format_submission,
    fuse_linear,
    iterative_weights,
    load_scores,
    rerank_topk,
    save_scores,
)

NAME = re.compile(r"[A-Za-z0-9_.-]+")
OUTPUTS = ("submission.txt", "fused.npz", "metrics.json")
TORCH_SUFFIXES = (".pt", ".pth")


@contextlib.contextmanager
def reported_as(kind: type[UserError]) -> Iterator[None]:
    """The fusion library's checks raise ValueError; on the command line they are the user's bad input."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise kind(str(e)) from e


def parse_pairs(items: list[str], option: str, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not NAME.fullmatch(name) or not value:
            raise ConfigError(f"{option} takes NAME={what} (NAME of letters, digits, '_', '.', '-'), got {item!r}")
        if name in pairs:
            raise ConfigError(f"{option} names {name!r} twice")
        pairs[name] = value
    return pairs


def parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for name, value in parse_pairs(items, "--weights", "W").items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--weights {name}={value}: not a number") from None
        if not math.isfinite(weights[name]):
            raise ConfigError(f"--weights {name}={value}: not a finite number")
    return weights


def fusion_weights(args: argparse.Namespace, names: list[str], weights: dict[str, float]) -> dict[str, float]:
    """Per-matrix weights; every naming mistake is caught here, before any score file is read."""
    if args.mode == "iterative":
        if sorted(weights) != ["w1", "w2", "w3"]:
            raise ConfigError(f"iterative mode takes --weights w1=.. w2=.. w3=.., got {sorted(weights)}")
        roles = {"itm": args.itm, "primary": args.primary or "beit3", "second": args.second, "third": args.third}
        if sorted(roles.values()) != sorted(names):
            raise ConfigError(f"iterative mode needs --scores named exactly {sorted(roles.values())} (roles "
                             f"{roles}), got {names}")
        with reported_as(ConfigError):
            return iterative_weights(weights["w1"], weights["w2"], weights["w3"], **roles)
    missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or extra:
        raise ConfigError("--weights must name each --scores matrix once: "
                         + "; ".join(([f"no weight for {missing}"] if missing else [])
                                     + ([f"no --scores named {extra}"] if extra else [])))
    return weights


def rerank_primary(args: argparse.Namespace, names: list[str]) -> str:
    if args.rerank not in names:
        raise ConfigError(f"--rerank {args.rerank!r} names no --scores matrix (have {names})")
    others = [n for n in names if n != args.rerank]
    primary = args.primary or ("beit3" if args.mode == "iterative" else (others[0] if others else None))
    if primary not in others:
        raise ConfigError(f"--rerank needs a primary matrix other than {args.rerank!r} among --scores "
                         f"(set --primary), got {primary!r}")
    return primary


def relevance(labels_path: str, matrix: ScoreMatrix) -> np.ndarray:
    """(queries, gallery) bool mask from a JSON object mapping each query id to its relevant gallery ids."""
    path = Path(labels_path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    try:
        labels = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, an over-long integer, nesting too deep
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(labels, dict):
        raise DataError(f"{path}: expected an object mapping query ids to lists of gallery ids")
    rows = {q: n for n, q in enumerate(matrix.query_ids)}
    cols = {g: n for n, g in enumerate(matrix.gallery_ids)}
    unknown_queries = sorted(q for q in labels if q not in rows)
    if unknown_queries:
        raise DataError(f"{path}: query ids not in the score matrices: {unknown_queries[:5]}")
    relevant = np.zeros(matrix.scores.shape, dtype=bool)
    for query, gallery in labels.items():
        gallery = [gallery] if isinstance(gallery, str | int) else gallery
        if not isinstance(gallery, list):
            raise DataError(f"{path}: query {query!r} maps to a {type(gallery).__name__}, not a list of ids")
        unknown = [str(g) for g in gallery if str(g) not in cols]
        if unknown:
            raise DataError(f"{path}: query {query!r} names gallery ids not in the score matrices: {unknown[:5]}")
        relevant[rows[query], [cols[str(g)] for g in gallery]] = True
    unlabelled = [q for q, row in zip(matrix.query_ids, relevant, strict=True) if not row.any()]
    if unlabelled:
        raise DataError(f"{path}: {len(unlabelled)} queries have no relevant gallery id, e.g. {unlabelled[:5]}")
    return relevant


def compute(args: argparse.Namespace) -> dict[str, bytes]:
    """Every output file's bytes, computed before anything is written."""
    paths = parse_pairs(args.scores, "--scores", "PATH")
    names = list(paths)
    weights = fusion_weights(args, names, parse_weights(args.weights))
    primary = rerank_primary(args, names) if args.rerank else None
    if args.rerank_k < 1 or args.top_k < 1:
        raise ConfigError("--rerank-k and --top-k must be at least 1")
    matrices = {m.name: m for m in read_matrices(paths)}
    with reported_as(DataError):
        if args.rerank:
            matrices[args.rerank] = rerank_topk(matrices[primary], matrices[args.rerank], args.rerank_k)
        fused = fuse_linear(list(matrices.values()), weights)
    return ranking_outputs(fused, "fused.npz", args.top_k, args.labels)


def read_matrices(paths: dict[str, str]) -> list[ScoreMatrix]:
    """The --scores matrices (name -> path), aligned on the first one's ids."""
    for path in paths.values():
        if not Path(path).is_file():
            raise DataError(f"score file not found: {path}")
    if any(Path(path).suffix.lower() in TORCH_SUFFIXES for path in paths.values()):
        require("torch", "convert", "reading .pt score files")
    with reported_as(DataError):
        return align([load_scores(path, name) for name, path in paths.items()])


def ranking_outputs(matrix: ScoreMatrix, scores_name: str, top_k: int, labels: str | None) -> dict[str, bytes]:
    """The bytes of submission.txt (top-k gallery ids per query), the matrix with its ids as `scores_name`
    (.npz) and, given a labels file, metrics.json (R1 R5 R10 mAP mINP)."""
    with reported_as(DataError):
        files = {"submission.txt": format_submission(matrix, top_k).encode()}
    buffer = io.BytesIO()
    save_scores(matrix, buffer)
    files[scores_name] = buffer.getvalue()
    if labels:
        from jaxretrieval.retrieval.metrics import ranking_metrics

        metrics = ranking_metrics(matrix.scores, relevance(labels, matrix))
        files["metrics.json"] = (json.dumps({k: float(v) for k, v in metrics.items()}, indent=2) + "\n").encode()
    return files


def show_metrics(files: dict[str, bytes]) -> None:
    """The metrics (when computed) on stdout, before anything is written: a late write failure keeps them."""
    if "metrics.json" in files:
        print(files["metrics.json"].decode(), end="", flush=True)


def report_written(files: dict[str, bytes], out_dir: str | Path) -> None:
    print(f"wrote {', '.join(files)} to {out_dir}", file=sys.stderr)


def write_outputs(out_dir: Path, files: dict[str, bytes], known: tuple[str, ...] = OUTPUTS) -> None:
    """Stage every file in a temporary folder, then move it into place (stale `known` outputs not written this
    time, such as an old metrics.json, are removed)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"--output-dir {out_dir} exists and is not a folder; choose another path")
    try:
        _move_into_place(out_dir, files, known)
    except OSError as e:
        raise OutputPathError(f"cannot write --output-dir {out_dir} ({e.strerror or e}); choose another path or fix "
                              f"its permissions / free space") from None


def _move_into_place(out_dir: Path, files: dict[str, bytes], known: tuple[str, ...]) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    existed = out_dir.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir if existed else out_dir.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if not existed:
            staging.rename(out_dir)
            return
        for name in files:
            os.replace(staging / name, out_dir / name)
        for name in set(known) - set(files):
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.fuse", description=__doc__.split("\n")[0])
    parser.add_argument("--scores", nargs="+", required=True, metavar="NAME=PATH",
                        help=".npz, .npy or .pt (query, gallery) score matrices with their ids")
    parser.add_argument("--weights", nargs="+", required=True, metavar="NAME=W",
                        help="linear: one per --scores name; iterative: w1 w2 w3")
    parser.add_argument("--mode", choices=("linear", "iterative"), default="linear")
    parser.add_argument("--rerank", metavar="NAME", help="keep NAME's scores only at the primary's top k per query")
    parser.add_argument("--rerank-k", type=int, default=10)
    parser.add_argument("--primary", metavar="NAME", help="matrix whose top k is re-ranked and iterative role "
                        "'primary' (default: beit3 in iterative mode, else the first other --scores)")
    parser.add_argument("--itm", default="itm", metavar="NAME", help="iterative role 'itm' (default itm)")
    parser.add_argument("--second", default="blip2", metavar="NAME", help="iterative role 'second' (default blip2)")
    parser.add_argument("--third", default="clip", metavar="NAME", help="iterative role 'third' (default clip)")
    parser.add_argument("--labels", help="JSON object: query id -> list of relevant gallery ids")
    parser.add_argument("--top-k", type=int, default=10, help="gallery ids per submission line (default 10)")
    parser.add_argument("--output-dir", required=True)
    args = parse_command_line(parser, argv)
    out_dir = probe_output_folder(args.output_dir)
    files = compute(args)
    show_metrics(files)
    write_outputs(out_dir, files)
    report_written(files, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
