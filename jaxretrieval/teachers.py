"""`python -m jaxretrieval.teachers {text,image} ...`: the frozen teacher features CUSA distils from, made once.

  python -m jaxretrieval.teachers text --model DIR --data FILE [--data FILE ...] --out FILE.npz
                                       [--batch-size 64] [--max-words 64] [--device cpu]
  python -m jaxretrieval.teachers image --checkpoint PATH --data FILE [--data FILE ...] --out FILE.npz
                                        [--root DIR] [--batch-size 64] [--workers 0]
  python -m jaxretrieval.teachers from-pickle SRC.npy --out FILE.npz

text: a LOCAL sentence-transformers model folder (CUSA uses all-mpnet-base-v2; nothing is downloaded) encodes every
distinct caption of the ALBEF JSON files, cleaned as training cleans it; the ids are the cleaned captions and the
features what `SentenceTransformer.encode` returns. image: any checkpoint `jaxretrieval.load` reads embeds one image
per distinct image_id, L2-normalised; the ids are the image_ids. Both write a .npz of 'ids' and 'features' (float32)
atomically, which `jaxretrieval.data.teacher_features` reads. from-pickle: the original's pickled image teachers
(`{split}_unicom.npy`) rewritten as that .npz, so training never unpickles anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxretrieval.data.albef import AlbefCaptionSource
from jaxretrieval.data.teacher_features import load_image_teachers, save_teachers
from jaxretrieval.errors import ConfigError, MissingPackageError, add_verbose, command, parse_command_line, probe_file

Files = str | Path | Sequence[str | Path]


def distinct_captions(data: Files, *, max_words: int = 64, skip_bad: bool = False) -> list[str]:
    """Every distinct cleaned caption of the annotation files, in order of first appearance (images not checked)."""
    source = AlbefCaptionSource(data, check_images=False, max_words=max_words, skip_bad=skip_bad)
    return list(dict.fromkeys(record.caption for record in source.records))


def sentence_transformers_module():
    """The sentence_transformers package, or a MissingPackageError with the pip line."""
    try:
        return importlib.import_module("sentence_transformers")
    except ImportError:
        raise MissingPackageError("text teacher features need the 'sentence-transformers' package: "
                                  "pip install sentence-transformers") from None


def model_folder(model_dir: str | Path) -> Path:
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--model {folder} is not a folder; give the local folder of a sentence-transformers model "
                          f"(e.g. all-mpnet-base-v2, saved with SentenceTransformer(NAME).save(DIR)); nothing is "
                          f"downloaded")
    return folder


def load_sentence_model(model_dir: str | Path, device: str = "cpu"):
    """A SentenceTransformer from a local folder only; a missing folder or one that holds no model is a
    ConfigError."""
    folder = model_folder(model_dir)
    module = sentence_transformers_module()
    try:
        return module.SentenceTransformer(str(folder), device=device, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"--model {folder}: cannot load a sentence-transformers model from it "
                          f"({type(e).__name__}: {e})") from None


def text_features(model_dir: str | Path, data: Files, *, batch_size: int = 64, max_words: int = 64,
                  device: str = "cpu", skip_bad: bool = False) -> tuple[list[str], np.ndarray]:
    """(distinct cleaned captions, their (N, D) float32 sentence embeddings)."""
    model_folder(model_dir)  # a missing folder or package is told before the data is read
    sentence_transformers_module()
    captions = distinct_captions(data, max_words=max_words, skip_bad=skip_bad)
    model = load_sentence_model(model_dir, device)
    features = model.encode(captions, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return captions, np.asarray(features, dtype=np.float32)


def image_features(checkpoint: str | Path, data: Files, *, root: str | Path | None = None, batch_size: int = 64,
                   workers: int = 0, skip_bad: bool = False) -> tuple[list[str], np.ndarray]:
    """(distinct image_ids, their (N, D) float32 L2-normalised image embeddings); with skip_bad an image that does
    not decode is left out."""
    import jaxretrieval
    from jaxretrieval.data.pipeline import GalleryImages

    source = AlbefCaptionSource(data, root, skip_bad=skip_bad)
    origins: dict[int, str] = {}
    for record in source.records:
        origins.setdefault(record.group, source.where(record))
    model, preprocess, _ = jaxretrieval.load(checkpoint)
    images = GalleryImages(source.images(), preprocess, threads=workers, skip_bad=skip_bad,
                           origins=[origins[group] for group in range(len(origins))])
    batches = [np.asarray(model.encode_image(images[start:start + batch_size], normalize=True))
               for start in range(0, len(images), batch_size)]
    keep = images.kept()
    ids = [image_id for image_id, kept in zip(source.image_ids, keep, strict=True) if kept]
    return ids, np.concatenate(batches)[keep].astype(np.float32)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.teachers", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    text = kinds.add_parser("text", help="sentence-transformers features of the cleaned captions")
    text.add_argument("--model", required=True, help="local folder of a sentence-transformers model")
    text.add_argument("--max-words", type=int, default=64, help="words kept per cleaned caption (as in training)")
    text.add_argument("--device", default="cpu", help="torch device the model runs on (default cpu)")
    image = kinds.add_parser("image", help="image embeddings of one image per image_id")
    image.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
    image.add_argument("--root", help="folder the image paths are relative to (default: the annotation file's)")
    image.add_argument("--workers", type=int, default=0, help="threads decoding images")
    pickled = kinds.add_parser("from-pickle", help="the original's pickled {split}_unicom.npy -> our .npz (read "
                                                   "once, by you, for a file you trust)")
    pickled.add_argument("src", help="a pickled .npy dict image_id -> (1, D) feature")
    for kind in (text, image):
        kind.add_argument("--data", required=True, action="append", help="ALBEF JSON annotation file (repeatable)")
        kind.add_argument("--batch-size", type=int, default=64)
        kind.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of failing")
    for kind in (text, image, pickled):
        kind.add_argument("--out", required=True, help="the .npz to write (ids, features)")
        kind.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")
    return add_verbose(parser)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(_parser(), argv)
    for option, value in (("--batch-size", getattr(args, "batch_size", 1)),
                          ("--max-words", getattr(args, "max_words", 1))):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    out = probe_file(args.out, "--out")
    if args.kind == "text":
        ids, features = text_features(args.model, args.data, batch_size=args.batch_size, max_words=args.max_words,
                                      device=args.device, skip_bad=args.skip_bad)
    elif args.kind == "from-pickle":
        table = load_image_teachers(args.src, allow_pickle=True)
        ids, features = table.ids, table.features
    else:
        ids, features = image_features(args.checkpoint, args.data, root=args.root, batch_size=args.batch_size,
                                       workers=args.workers, skip_bad=args.skip_bad)
    save_teachers(out, ids, features)
    what = "image" if args.kind == "from-pickle" else args.kind
    print(f"wrote {len(ids)} {what} teacher features of dimension {features.shape[1]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
