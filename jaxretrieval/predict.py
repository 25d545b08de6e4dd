"""`python -m jaxretrieval.predict --checkpoint PATH --queries query.json --gallery DIR --output-dir OUT`

Ranks a gallery folder for every query caption, the way the PAB test set is scored: OUT/submission.txt holds one
line per query (in query.json order) with its top-k gallery file stems, OUT/scores.npz the whole (queries, gallery)
cosine matrix with its query ids and sorted gallery stems (what `python -m jaxretrieval.fuse` reads), and, given
--labels (a JSON object: query id -> relevant gallery stems), OUT/metrics.json with R1 R5 R10 mAP mINP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxretrieval.data.pab import gallery_images, read_queries
from jaxretrieval.data.pipeline import GalleryImages, make_preprocess
from jaxretrieval.data.tokenizers import build_tokenizer
from jaxretrieval.errors import ConfigError, command, parse_command_line, probe_output_folder
from jaxretrieval.evaluate import embed_inputs, restore_params, saved_config
from jaxretrieval.fuse import ranking_outputs, report_written, show_metrics, write_outputs
from jaxretrieval.retrieval.fusion import ScoreMatrix
from jaxretrieval.sharding import make_mesh

OUTPUTS = ("submission.txt", "scores.npz", "metrics.json")


def predict(checkpoint_path: str | Path, queries: str | Path, gallery: str | Path, *, top_k: int = 10,
            labels: str | None = None, batch_size: int = 256, workers: int = 0) -> dict[str, bytes]:
    """Every output file's bytes, computed before anything is written."""
    config = saved_config(checkpoint_path, [f"data.workers={workers}", f"eval.batch_size={batch_size}"])
    query_ids, captions = read_queries(queries)
    stems, paths = gallery_images(gallery)
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, checkpoint_path, mesh)
    tokens = build_tokenizer(meta["tokenizer"])(captions)
    images = GalleryImages(paths, make_preprocess(config), threads=workers)
    image_emb, text_emb = embed_inputs(graphdef, params, images, tokens, mesh, batch_size)
    matrix = ScoreMatrix(text_emb @ image_emb.T, query_ids, stems, name=Path(checkpoint_path).name)
    return ranking_outputs(matrix, "scores.npz", top_k, labels)


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
    args = parse_command_line(parser, argv)
    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    out_dir = probe_output_folder(args.output_dir)
    files = predict(args.checkpoint, args.queries, args.gallery, top_k=args.top_k, labels=args.labels,
                    batch_size=args.batch_size, workers=args.workers)
    show_metrics(files)
    write_outputs(out_dir, files, OUTPUTS)
    report_written(files, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
