"""`python -m jaxretrieval.browse --out DIR (--checkpoint PATH [--config FILE] | --scores FILE ...) [options]`

Writes DIR/index.html, a static offline page of ranked retrieval results (torchreid's visualize_ranked_results as a
page): per query its caption or image, its top-k gallery items with rank and score, green when correct and red when
not, the rank of the first correct item when it lies past k, and the query's AP; a filter, AP sorting and paging
(all client-side, the data embedded in the page), and a header with the overall metrics (as the evaluator reports
them). Thumbnails go to DIR/thumbs/ as small JPEGs. Protocols: text_to_image, image_text (both directions, a tab
each) and reid (query images against the gallery, camera ids shown, the Market protocol's junk marked and not
counted). Rerank-capable systems are browsed by their contrastive scores.

  --checkpoint PATH [--config FILE] [key=value ...]: runs the model on eval.split (--split) of the config's data
      (default config: the one saved with the checkpoint).
  --scores FILE --queries query.json --gallery DIR [--labels FILE]: a (queries, gallery) matrix with its ids, as
      `predict` or `fuse` writes it, over a PAB-style query file and gallery folder; --labels (a JSON object: query
      id -> relevant gallery ids) marks correct / incorrect.
  --scores FILE --config FILE: a re-id matrix over the config's query and gallery images, ids the file stems.
  --plots DIR: a "Training curves" section of DIR's PNGs (`python -m jaxretrieval.report`'s WORKDIR/plots), copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from jaxretrieval.browse_page import Thumbnails, render_page, write_outputs
from jaxretrieval.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    command,
    parse_command_line,
    probe_output_folder,
)
from jaxretrieval.retrieval.embed import text_image_scores
from jaxretrieval.retrieval.metrics import JUNK_PID, _rank_all, image_text_recall, ranking_metrics, reid_metrics

log = logging.getLogger(__name__)
RECALL_AT = (1, 5, 10)
SECTION_KEYS = ("R1", "R5", "R10", "mAP")


@dataclasses.dataclass(frozen=True)
class Item:
    """A query or gallery item as the page shows it: a caption (`text`) or an image file (`image`)."""

    label: str
    text: str | None = None
    image: str | None = None
    pid: int | None = None
    cam: int | None = None  # 0-based; shown 1-based


@dataclasses.dataclass
class Ranking:
    """One direction of retrieval: scores[i, j] ranks gallery[j] for queries[i] (higher first, ties: lower j)."""

    key: str
    title: str
    scores: np.ndarray
    queries: Sequence[Item]
    gallery: Sequence[Item]
    relevant: np.ndarray | None  # (Q, G) bool; None: no labels (nothing marked correct)
    keep: np.ndarray | None = None  # (Q, G) bool; False: junk, left out of the ranking (re-id)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


def text_rankings(protocol: str, scores: np.ndarray, captions: Sequence[Item], images: Sequence[Item],
                  text_groups: np.ndarray, image_groups: np.ndarray) -> tuple[list[Ranking], dict[str, float]]:
    """Captions rank images (and, for image_text, images rank captions) by scores (captions, images); a pair is
    relevant when its groups match. Also the evaluator's metrics: ranking_metrics, or image_text_recall."""
    relevant = np.asarray(text_groups)[:, None] == np.asarray(image_groups)[None, :]
    rankings = [labelled("t2i", "Text \u2192 image", scores, captions, images, relevant)]
    if protocol == "text_to_image":
        return rankings, ranking_metrics(scores, relevant, RECALL_AT)
    if protocol != "image_text":
        raise ConfigError(f"eval.protocol={protocol}: browse shows text_to_image, image_text or reid")
    rankings.append(labelled("i2t", "Image \u2192 text", scores.T, images, captions, relevant.T))
    return rankings, image_text_recall(scores.T, np.asarray(text_groups), RECALL_AT)


def labelled(key: str, title: str, scores: np.ndarray, queries: Sequence[Item], gallery: Sequence[Item],
             relevant: np.ndarray | None) -> Ranking:
    metrics = {} if relevant is None else ranking_metrics(scores, relevant, RECALL_AT)
    return Ranking(key, title, scores, queries, gallery, relevant, None, {k: metrics[k] for k in metrics
                                                                         if k in SECTION_KEYS})


def reid_ranking(scores: np.ndarray, queries: Sequence[Item], gallery: Sequence[Item]) -> tuple[Ranking, dict]:
    """Query images rank the gallery under the Market protocol: a gallery image of the query's id is relevant,
    unless it is from the query's camera (junk, as are ids -1); reid_metrics' metrics."""
    q_pids, q_cams, g_pids, g_cams = (np.array([getattr(item, key) for item in items], np.int64)
                                      for items, key in ((queries, "pid"), (queries, "cam"), (gallery, "pid"),
                                                         (gallery, "cam")))
    match = g_pids[None, :] == q_pids[:, None]
    keep = ~(match & (g_cams[None, :] == q_cams[:, None])) & (g_pids != JUNK_PID)[None, :]
    metrics = reid_metrics(scores, q_pids, q_cams, g_pids, g_cams)
    section = {k: v for k, v in metrics.items() if k in (*SECTION_KEYS, "num_valid_queries")}
    return Ranking("reid", "Query \u2192 gallery", scores, queries, gallery, match, keep, section), metrics


def outcomes(ranking: Ranking) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the 1-based rank of the first relevant item (among the kept ones; 0: none) and the AP (NaN: none),
    exactly as ranking_metrics / reid_metrics count them (they average these)."""
    n = len(ranking.queries)
    if ranking.relevant is None:
        return np.zeros(n, np.int64), np.full(n, np.nan)
    keep = ranking.keep
    first, ap, _ = _rank_all(np.asarray(ranking.scores),
                             lambda rows: (ranking.relevant[rows], None if keep is None else keep[rows]))
    return first + 1, ap


def top_hits(scores: np.ndarray, relevant: np.ndarray | None, keep: np.ndarray | None,
             k: int) -> list[tuple[int, float, str, int]]:
    """One query's best items until k are counted: (gallery index, score, status c/w/j/u, rank; 0 for junk)."""
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    hits, rank = [], 0
    for j in order:
        if keep is not None and not keep[j]:
            hits.append((int(j), float(scores[j]), "j", 0))
            continue
        rank += 1
        status = "u" if relevant is None else "c" if relevant[j] else "w"
        hits.append((int(j), float(scores[j]), status, rank))
        if rank == k:
            break
    return hits


def item_json(item: Item, thumbs: Thumbnails) -> dict[str, Any]:
    return {"label": item.label, "text": item.text, "thumb": thumbs.url(item.image) if item.image else None,
            "pid": item.pid, "cam": item.cam}


def section_json(ranking: Ranking, k: int, worst_first: bool, max_queries: int | None,
                 thumbs: Thumbnails) -> dict[str, Any]:
    """What the page shows of one ranking: the chosen queries (the worst by AP with worst_first, else the first),
    in data order, each with its top-k hits; the gallery items they name."""
    first, ap = outcomes(ranking)
    chosen = np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable") if worst_first else np.arange(len(ap))
    chosen = np.sort(chosen[:max_queries])
    gallery: dict[int, int] = {}
    queries = []
    for i in chosen.tolist():
        hits = top_hits(ranking.scores[i], None if ranking.relevant is None else ranking.relevant[i],
                        None if ranking.keep is None else ranking.keep[i], k)
        found = not np.isnan(ap[i])
        queries.append({**item_json(ranking.queries[i], thumbs), "n": i, "ap": float(ap[i]) if found else None,
                        "gt": int(first[i]) if found else None,
                        "hits": [[gallery.setdefault(j, len(gallery)), round(s, 5), status, rank]
                                 for j, s, status, rank in hits]})
    return {"key": ranking.key, "title": ranking.title, "metrics": ranking.metrics, "total": len(ap),
            "labelled": ranking.relevant is not None, "queries": queries,
            "gallery": [item_json(ranking.gallery[j], thumbs) for j in gallery]}


def page_data(rankings: Sequence[Ranking], meta: dict[str, Any], thumbs: Thumbnails, *, k: int = 10,
              worst_first: bool = False, max_queries: int | None = None, page_size: int = 50,
              plots: dict[str, str] | None = None, plots_folder: str | None = None) -> dict[str, Any]:
    """The JSON the page embeds. meta: title, details [(name, value)], metrics (the evaluator's); plots: PNG file
    name -> title, copied into plots/."""
    sections = [section_json(r, k, worst_first, max_queries, thumbs) for r in rankings]
    return {"meta": {**meta, "k": k, "page_size": page_size, "sort": "ap_asc" if worst_first else "index"},
            "sections": sections, "plots_folder": plots_folder,
            "plots": [{"name": title, "src": f"plots/{quote(name)}"} for name, title in (plots or {}).items()]}


def model_rankings(config: Any, checkpoint_path: str, split: str | None) -> tuple[list[Ranking], dict, list]:
    """Runs the checkpoint on the config's evaluation data: (rankings, the evaluator's metrics, header details)."""
    from jaxretrieval.data.pipeline import caption_source, data_root, eval_inputs
    from jaxretrieval.data.reid_pipeline import reid_eval_splits
    from jaxretrieval.data.tokenizers import build_tokenizer
    from jaxretrieval.evaluate import embed_inputs, encoders, restore_params
    from jaxretrieval.retrieval import embed_all, l2_normalize
    from jaxretrieval.sharding import make_mesh

    protocol, batch = config.eval.protocol, config.eval.batch_size
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, checkpoint_path, mesh)
    details = [("checkpoint", str(checkpoint_path)), ("step", meta.get("step")), ("protocol", protocol)]
    if protocol == "reid":
        if split is not None:
            raise ConfigError("--split: re-id ranks the query split against the gallery split; leave it out")
        encode_image, _ = encoders(graphdef, mesh)
        sets = []
        for part in reid_eval_splits(config):
            emb, pids, cams = part.without_skipped(embed_all(lambda x: encode_image(params, x), part.images, batch,
                                                             mesh))
            paths = np.asarray(part.images.paths)[part.images.kept()]
            sets.append((emb, [Item(Path(p).name, image=p, pid=int(i), cam=int(c))
                               for p, i, c in zip(paths.tolist(), pids, cams, strict=True)]))
        (q_emb, queries), (g_emb, gallery) = sets
        ranking, metrics = reid_ranking(l2_normalize(q_emb) @ l2_normalize(g_emb).T, queries, gallery)
        return [ranking], metrics, [*details, ("split", "query \u00d7 gallery")]
    if not meta.get("tokenizer"):
        raise CheckpointError(f"checkpoint {checkpoint_path} saved no tokenizer: its captions cannot be encoded")
    split = split or config.eval.split
    source = caption_source(config, data_root(config), split)
    inputs = eval_inputs(config, source, build_tokenizer(meta["tokenizer"]))
    image_emb, text_emb = embed_inputs(graphdef, params, inputs.images, inputs.tokens, mesh, batch)
    image_emb, text_emb, text_groups, image_groups = inputs.without_skipped(image_emb, text_emb, protocol)
    kept_images, kept_texts = inputs.kept_rows()
    records = [r for r, kept in zip(source.records, kept_texts, strict=True) if kept]
    captions = [Item(os.path.basename(source.where(r)), text=r.caption) for r in records]
    images = [Item(Path(p).name, image=p) for p, kept in zip(inputs.images.paths, kept_images, strict=True) if kept]
    rankings, metrics = text_rankings(protocol, text_image_scores(text_emb, image_emb), captions, images, text_groups,
                                      image_groups)
    return rankings, metrics, [*details, ("split", split)]


def scores_rankings(args: argparse.Namespace) -> tuple[list[Ranking], dict, list]:
    """The --scores matrix over the PAB-style --queries / --gallery, or over a re-id config's splits."""
    from jaxretrieval.fuse import read_matrices, relevance, reported_as
    from jaxretrieval.retrieval.fusion import ScoreMatrix, align

    matrix = read_matrices({Path(args.scores).stem or "scores": args.scores})[0]
    details = [("scores", args.scores)]

    def aligned(query_ids: list[str], gallery_ids: list[str], what: str) -> ScoreMatrix:
        reference = ScoreMatrix(np.zeros((len(query_ids), len(gallery_ids))), query_ids, gallery_ids, name=what)
        with reported_as(DataError):
            return align([reference, matrix])[1]

    if args.queries:
        from jaxretrieval.data.pab import gallery_images, read_queries

        query_ids, captions = read_queries(args.queries)
        stems, paths = gallery_images(args.gallery)
        matrix = aligned(query_ids, stems, "--queries / --gallery")
        relevant = relevance(args.labels, matrix) if args.labels else None
        ranking = labelled("t2i", "Text \u2192 image", matrix.scores,
                           [Item(q, text=c) for q, c in zip(query_ids, captions, strict=True)],
                           [Item(s, image=p) for s, p in zip(stems, paths, strict=True)], relevant)
        metrics = ranking_metrics(matrix.scores, relevant, RECALL_AT) if relevant is not None else {}
        return [ranking], metrics, [*details, ("queries", args.queries), ("gallery", args.gallery)]
    from jaxretrieval.config import load_config
    from jaxretrieval.data.reid_pipeline import reid_source

    config = load_config(args.config, args.overrides)
    if config.eval.protocol != "reid":
        raise ConfigError(f"--scores with --config reads a re-id config's query and gallery splits, but {args.config} "
                          f"has eval.protocol={config.eval.protocol}; for captions give --queries and --gallery")
    sets = [[Item(Path(r.path).name, image=r.path, pid=r.pid, cam=r.camid) for r in reid_source(config, split)]
            for split in ("query", "gallery")]
    matrix = aligned(*([Path(i.label).stem for i in items] for items in sets), "the query / gallery file stems")
    ranking, metrics = reid_ranking(matrix.scores, *sets)
    return [ranking], metrics, [*details, ("protocol", "reid"), ("split", "query \u00d7 gallery")]


def check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.scores is None):
        raise ConfigError("give --checkpoint (run the model) or --scores (read a score matrix), one of them")
    if args.checkpoint and (args.queries or args.gallery or args.labels):
        raise ConfigError("--queries, --gallery and --labels go with --scores; a --checkpoint reads its config's data")
    if args.scores and bool(args.queries) != bool(args.gallery):
        raise ConfigError("--scores over captions needs both --queries and --gallery")
    if args.scores and not args.queries and not args.config:
        raise ConfigError("--scores needs --queries and --gallery (captions), or --config (a re-id dataset)")
    if args.scores and args.queries and args.config:
        raise ConfigError("--config with --scores names a re-id dataset; caption queries come from --queries")
    if args.scores and args.labels and not args.queries:
        raise ConfigError("--labels marks caption queries; re-id labels come from the file names")
    for option, value in (("--k", args.k), ("--page-size", args.page_size), ("--max-queries", args.max_queries)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if args.plots and not Path(args.plots).is_dir():
        raise DataError(f"--plots {args.plots} is not a folder")


def training_plots(folder: str | None) -> tuple[Path | None, dict[str, str]]:
    """(plots folder, PNG file name -> title): `python -m jaxretrieval.report`'s plots.json order and titles when
    the folder has one, else every PNG by name; a run's WORKDIR stands for its plots/ folder."""
    if folder is None:
        return None, {}
    path = Path(folder)
    if not any(path.glob("*.png")) and (path / "plots").is_dir():
        path = path / "plots"
    names = {p.name: p.name for p in sorted(path.glob("*.png")) if p.is_file()}
    try:
        listed = json.loads((path / "plots.json").read_text(encoding="utf-8"))["plots"]
        titled = {e["file"]: str(e.get("title") or e["file"]) for e in listed if str(e.get("file")) in names}
        names = {**titled, **names, **titled}  # listed first, in the listing's order
    except (OSError, ValueError, KeyError, TypeError):  # no listing, or not report's: the PNGs by name
        pass
    if not names:
        log.warning("--plots %s holds no PNG files: no training curves shown", folder)
    return path, names


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.browse", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for index.html, thumbs/ and plots/")
    parser.add_argument("--checkpoint", help="step folder, checkpoints folder or workdir: run this model")
    parser.add_argument("--config", help="config file (default: the checkpoint's); with --scores: a re-id config")
    parser.add_argument("--scores", help=".npz/.npy/.pt (queries, gallery) matrix with its ids (predict, fuse)")
    parser.add_argument("--queries", help="with --scores: query.json, JSON lines {query_index, caption}")
    parser.add_argument("--gallery", help="with --scores: folder of gallery images, ids their file stems")
    parser.add_argument("--labels", help="with --scores: JSON object, query id -> relevant gallery ids")
    parser.add_argument("--split", help="caption data: the split to rank (default eval.split)")
    parser.add_argument("--k", type=int, default=10, help="gallery items shown per query (default 10)")
    parser.add_argument("--worst-first", action="store_true", help="open sorted by AP ascending; with "
                        "--max-queries keep the worst")
    parser.add_argument("--max-queries", type=int, help="show at most N queries per direction")
    parser.add_argument("--page-size", type=int, default=50, help="queries per page (default 50)")
    parser.add_argument("--plots", help="folder of PNG training curves (WORKDIR/plots) to show and copy")
    parser.add_argument("--title", help="page title (default: the checkpoint or score file's name)")
    parser.add_argument("overrides", nargs="*", help="key.path=value (before or after the options)")
    args = parse_command_line(parser, argv)
    check_args(args)
    out = probe_output_folder(args.out, "--out")
    if args.checkpoint:
        from jaxretrieval.evaluate import command_config

        config = command_config(args.config, args.checkpoint, args.overrides)
        rankings, metrics, details = model_rankings(config, args.checkpoint, args.split)
    else:
        rankings, metrics, details = scores_rankings(args)
    plots, names = training_plots(args.plots)
    thumbs = Thumbnails()
    title = args.title or f"Ranked results: {Path(args.checkpoint or args.scores).name}"
    meta = {"title": title, "details": [(name, str(value)) for name, value in details if value is not None],
            "metrics": metrics}
    data = page_data(rankings, meta, thumbs, k=args.k, worst_first=args.worst_first, max_queries=args.max_queries,
                     page_size=args.page_size, plots=names, plots_folder=plots.resolve().as_uri() if plots else None)
    write_outputs(out, render_page(data), thumbs.render(), plots, list(names))
    print(f"wrote {out / 'index.html'} ({sum(len(s['queries']) for s in data['sections'])} queries, "
          f"{len(thumbs.names)} thumbnails); open it in a browser", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
