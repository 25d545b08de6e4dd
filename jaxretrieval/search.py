"""Embed a gallery once, search it many times.

`python -m jaxretrieval.search index --checkpoint CKPT --gallery DIR --out INDEX [--dtype bfloat16]` embeds every
image directly in DIR with the checkpoint's image tower and saves a `GalleryIndex` (ids: the file stems).
`python -m jaxretrieval.search query --checkpoint CKPT --index INDEX (--queries FILE | --query-images DIR) --k 10
--output OUT.jsonl` embeds the queries (captions, one per line in a .txt, or JSON lines {"query_index", "caption"};
or a folder of images, as for re-id), searches the saved gallery on the devices and writes one JSON line per query:
{"query": id, "results": [[gallery id, score], ...]}. The gallery is not embedded again; a query file's results
are written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from jaxretrieval.data.pab import gallery_images, read_queries
from jaxretrieval.data.pipeline import GalleryImages
from jaxretrieval.errors import ConfigError, DataError, OutputPathError, command, parse_command_line, probe_file
from jaxretrieval.evaluate import encoders, restore_params, saved_config
from jaxretrieval.retrieval.embed import embed_all
from jaxretrieval.retrieval.index import STORAGE, GalleryIndex
from jaxretrieval.sharding import make_mesh
from jaxretrieval.systems import get_system


class Encoder:
    """A checkpoint's normalised image and text embeddings, batch by batch over the mesh."""

    def __init__(self, checkpoint: str | Path, batch_size: int, workers: int):
        self.config = saved_config(checkpoint, [f"data.workers={workers}", f"eval.batch_size={batch_size}"])
        self.mesh = make_mesh(self.config.mesh)
        graphdef, self.params, meta = restore_params(self.config, checkpoint, self.mesh)
        self.preprocess, self.tokenizer = get_system(self.config.system).inference(self.config, meta)
        self.encode_image, self.encode_text = encoders(graphdef, self.mesh)
        self.batch_size, self.workers = batch_size, workers

    def images(self, folder: str | Path) -> tuple[list[str], np.ndarray]:
        stems, paths = gallery_images(folder)
        pixels = GalleryImages(paths, self.preprocess, threads=self.workers)
        return stems, embed_all(lambda x: self.encode_image(self.params, x), pixels, self.batch_size, self.mesh)

    def captions(self, captions: list[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ConfigError(f"this checkpoint's system ({self.config.system}) has no text tower: give "
                              "--query-images")
        tokens = self.tokenizer(captions)
        return embed_all(lambda t: self.encode_text(self.params, t), tokens, self.batch_size, self.mesh)


def read_captions(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, captions): JSON lines with query_index and caption, or plain text, one caption per line (id: the line
    number)."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        return read_queries(path)
    if not path.is_file():
        raise DataError(f"query file {path} does not exist")
    lines = [(str(number), line.strip()) for number, line in
             enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no queries")
    return [number for number, _ in lines], [caption for _, caption in lines]


def build_index(checkpoint: str, gallery: str, out: str, *, dtype: str | None, batch_size: int,
                workers: int) -> GalleryIndex:
    if Path(out).exists():
        raise OutputPathError(f"--out {out} already exists; choose a new folder for the index")
    encoder = Encoder(checkpoint, batch_size, workers)
    stems, embeddings = encoder.images(gallery)
    index = GalleryIndex(embeddings, stems, mesh=encoder.mesh, dtype=dtype)
    index.save(out)
    return index


def query_lines(checkpoint: str, index_folder: str, k: int, *, captions: str | None, images: str | None,
                batch_size: int, workers: int) -> bytes:
    encoder = Encoder(checkpoint, batch_size, workers)
    index = GalleryIndex.load(index_folder, mesh=encoder.mesh)
    if index.ids is None:
        raise DataError(f"{index_folder}: the index holds no ids to report")
    if k > len(index):
        raise ConfigError(f"--k {k} exceeds the {len(index)} items of the index {index_folder}")
    if captions is not None:
        ids, texts = read_captions(captions)
        queries = encoder.captions(texts)
    else:
        ids, queries = encoder.images(images)
    if queries.shape[1] != index.shape[1]:
        raise ConfigError(f"the checkpoint embeds in {queries.shape[1]} dims, the index {index_folder} holds "
                          f"{index.shape[1]}: was it built with another model?")
    scores, indices = index.search(queries, k)
    lines = (json.dumps({"query": query, "results": [[str(index.ids[i]), round(float(s), 6)]
                                                     for i, s in zip(row, row_scores, strict=True)]})
             for query, row, row_scores in zip(ids, indices, scores, strict=True))
    return ("\n".join(lines) + "\n").encode()


def write_whole(path: Path, data: bytes) -> None:
    """Writes beside the target and renames into place: a failure leaves any earlier file as it was."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.search", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("index", help="embed a folder of images into a saved index")
    build.add_argument("--gallery", required=True, help="folder of gallery images (ids: file stems)")
    build.add_argument("--out", required=True, help="new folder for the index")
    build.add_argument("--dtype", choices=sorted(STORAGE), default=None,
                       help="stored and multiplied as (default float32; bfloat16 halves memory and uses tensor cores)")
    search = commands.add_parser("query", help="search a saved index")
    search.add_argument("--index", required=True, help="folder `index` wrote")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument("--queries", help="captions: .txt (one per line) or JSON lines {query_index, caption}")
    queries.add_argument("--query-images", help="folder of query images (ids: file stems)")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--output", required=True, help="JSON lines file of results")
    for sub in (build, search):
        sub.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
        sub.add_argument("--batch-size", type=int, default=256)
        sub.add_argument("--workers", type=int, default=0, help="threads decoding images")
    args = parse_command_line(parser, argv)
    for option, value in (("--k", getattr(args, "k", 1)), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if args.command == "index":
        index = build_index(args.checkpoint, args.gallery, args.out, dtype=args.dtype, batch_size=args.batch_size,
                            workers=args.workers)
        print(f"index of {len(index)} images ({index.dtype.name}) written to {args.out}", file=sys.stderr)
        return 0
    output = probe_file(args.output, "--output")
    data = query_lines(args.checkpoint, args.index, args.k, captions=args.queries, images=args.query_images,
                       batch_size=args.batch_size, workers=args.workers)
    write_whole(output, data)
    count = data.count(b"\n")
    print(f"{count} queries' top {args.k} written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
