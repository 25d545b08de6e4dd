"""`python -m jaxretrieval.predict --checkpoint PATH --queries query.json --gallery DIR --output-dir OUT`

Ranks a gallery folder for every query caption, the way the PAB test set is scored: OUT/submission.txt holds one
line per query (in query.json order) with its top-k gallery file stems, OUT/scores.npz the whole (queries, gallery)
cosine matrix with its query ids and sorted gallery stems (what `python -m jaxretrieval.fuse` reads), and, given
--labels (a JSON object: query id -> relevant gallery stems), OUT/metrics.json with R1 R5 R10 mAP mINP.

For a system with an ITM head (uit, cfack), `--itm-k K` also writes OUT/itm_scores.npz: the ITM logit of each query's
top K gallery images, the rest of the row at its lowest re-score (PAB's fill). The candidates are this checkpoint's
own top K, or with `--itm-candidates FILE` another scorer's (the PAB ensemble re-scores LHP's top 10 with UIT:
`--itm-candidates lhp/scores.npz --itm-k 10`), aligned by query id and gallery stem.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from jaxretrieval.data.pab import gallery_images, read_queries
from jaxretrieval.data.pipeline import GalleryImages, make_preprocess
from jaxretrieval.data.tokenizers import build_tokenizer
from jaxretrieval.errors import ConfigError, DataError, command, parse_command_line, probe_output_folder
from jaxretrieval.evaluate import embed_inputs, restore_params, saved_config
from jaxretrieval.fuse import ranking_outputs, report_written, show_metrics, write_outputs
from jaxretrieval.retrieval.embed import embed_all, text_image_scores
from jaxretrieval.retrieval.fusion import ScoreMatrix, align, load_scores, save_scores
from jaxretrieval.retrieval.rerank import rerank_matrix
from jaxretrieval.sharding import make_mesh
from jaxretrieval.systems import get_system

OUTPUTS = ("submission.txt", "scores.npz", "metrics.json", "itm_scores.npz")


def predict(checkpoint_path: str | Path, queries: str | Path, gallery: str | Path, *, top_k: int = 10,
            labels: str | None = None, batch_size: int = 256, workers: int = 0, itm_k: int = 0,
            itm_candidates: str | Path | ScoreMatrix | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every output file's bytes, computed before anything is written. itm_candidates: a score file, or a matrix;
    overrides: `key=value` changes to the checkpoint's config (e.g. blip2.query_reduce=first)."""
    config = saved_config(checkpoint_path, [*overrides, f"data.workers={workers}", f"eval.batch_size={batch_size}"])
    system = get_system(config.system)
    if (itm_k or itm_candidates is not None) and not system.reranks:
        raise ConfigError(f"--itm-k: system {config.system} has no ITM head (systems with one: uit, cfack)")
    if itm_candidates is not None and not itm_k:
        raise ConfigError("--itm-candidates needs --itm-k (how many of each query's candidates to re-score)")
    candidates = itm_candidates
    if isinstance(itm_candidates, str | Path):
        candidates = load_score_file(itm_candidates, "--itm-candidates")
    query_ids, captions = read_queries(queries)
    stems, paths = gallery_images(gallery)
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, checkpoint_path, mesh)
    tokens = build_tokenizer(meta["tokenizer"])(captions)
    images = GalleryImages(paths, make_preprocess(config), threads=workers)
    if not itm_k:
        image_emb, text_emb = embed_inputs(graphdef, params, images, tokens, mesh, batch_size)
        matrix = ScoreMatrix(text_image_scores(text_emb, image_emb), query_ids, stems,
                             name=Path(checkpoint_path).name)
        return ranking_outputs(matrix, "scores.npz", top_k, labels)
    encoder = system.cross_encoder(config, graphdef, mesh)
    image_emb, image_inputs = embed_all(lambda x: encoder.image(params, x), images, batch_size, mesh)
    text_emb, text_inputs = embed_all(lambda t: encoder.text(params, t), tokens, batch_size, mesh)
    matrix = ScoreMatrix(text_image_scores(text_emb, image_emb), query_ids, stems, name=Path(checkpoint_path).name)
    try:
        first = align([matrix, candidates])[1].scores if candidates is not None else matrix.scores
    except ValueError as e:
        raise DataError(f"--itm-candidates {itm_candidates}: {e}") from None
    itm = rerank_matrix(first, lambda q, g: encoder.pair_scores(params, q, g), text_inputs, image_inputs,
                        min(itm_k, len(stems)), fill="row_min", mesh=mesh, batch_size=config.eval.rerank_batch)
    files = ranking_outputs(matrix, "scores.npz", top_k, labels)
    buffer = io.BytesIO()
    save_scores(ScoreMatrix(itm, query_ids, stems, name="itm"), buffer)
    return {**files, "itm_scores.npz": buffer.getvalue()}


def load_score_file(path: str | Path, option: str) -> ScoreMatrix:
    """A score matrix with its ids (fusion.load_scores); unreadable or malformed files are a DataError naming it."""
    try:
        return load_scores(path)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{option} {path}: {e}") from None


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
    parser.add_argument("--queries", required=True, help='JSON lines {"query_index": ..., "caption": ...}')
    parser.add_argument("--gallery", required=True, help="folder of gallery images, ranked by file stem")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--labels", help="JSON object: query id -> list of relevant gallery stems")
    parser.add_argument("--top-k", type=int, default=10, help="gallery stems per submission line (default 10)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="threads decoding images")
    parser.add_argument("--itm-k", type=int, default=0, help="write itm_scores.npz: ITM logits of each query's top K "
                                                             "(systems with an ITM head)")
    parser.add_argument("--itm-candidates", help="score file (.npz / .pt with ids) whose top K the ITM head "
                                                 "re-scores (default: this checkpoint's own scores)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the checkpoint's config, e.g. "
                                                                          "blip2.query_reduce=first")
    args = parse_command_line(parser, argv)
    if args.itm_k < 0:
        raise ConfigError(f"--itm-k must be at least 0 (0: no ITM re-scores), got {args.itm_k}")
    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    out_dir = probe_output_folder(args.output_dir)
    files = predict(args.checkpoint, args.queries, args.gallery, top_k=args.top_k, labels=args.labels,
                    batch_size=args.batch_size, workers=args.workers, itm_k=args.itm_k,
                    itm_candidates=args.itm_candidates, overrides=args.overrides)
    show_metrics(files)
    write_outputs(out_dir, files, OUTPUTS)
    report_written(files, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
