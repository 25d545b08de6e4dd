"""`python -m jaxretrieval.clip_globals --root PRECOMP_DIR --images IMAGE_DIR [--pattern "{id}.jpg" ...]
[--splits train,test] (--checkpoint CLIP_CHECKPOINT | --model PRESET [--seed N] --tokenizer FILE) [--batch-size 64]`

Writes the frozen CLIP global features AAHR fuses with its own (system aahr, aahr.global_features) into a precomp
folder (see jaxretrieval.data.precomp), for each split:

    {split}_clip_ims.npy   float32 (images, dim): image i of {split}_ids.txt through the CLIP image tower
    {split}_clip_caps.npy  float32 (lines, dim): line n of {split}_caps.txt (row n - 1) through the text tower

Rows are L2-normalised; a blank caption line gets a zero row. Image i is the file IMAGE_DIR / PATTERN with `{id}`
replaced by line i + 1 of `{split}_ids.txt` (a string: pad it with `{id:0>12}`, not `{id:012}`); with several
--pattern the first that names an existing file wins, and `--id-map FILE` (VSE-infinity's id_mapping.json: id ->
path under IMAGE_DIR) replaces the patterns. Every split's ids and image files are checked before the model loads;
each split's two files are written beside their final names and moved into place once both are complete, so an
error leaves no partial file (the splits finished before it stay written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from jax.sharding import Mesh

from jaxretrieval.api import RetrievalModel, load
from jaxretrieval.checkpoint import read_meta_at
from jaxretrieval.config import Config, load_config
from jaxretrieval.data.pipeline import GalleryImages, make_preprocess, make_tokenizer
from jaxretrieval.data.precomp import SPLITS, PrecompSource
from jaxretrieval.data.sources import read_text
from jaxretrieval.errors import CheckpointError, ConfigError, DataError, command, parse_command_line, probe_folder
from jaxretrieval.evaluate import saved_config
from jaxretrieval.export import LazyTokens, Rows
from jaxretrieval.models import MODEL_PRESETS, abstract_model, init_params
from jaxretrieval.retrieval.embed import embed_all
from jaxretrieval.sharding import make_mesh

log = logging.getLogger(__name__)

OUTPUTS = ("{split}_clip_ims.npy", "{split}_clip_caps.npy")  # what precomp_pipeline.GLOBAL_FILES reads
PART_ROWS = 8192  # rows embedded, then written into the output file, at a time

EPILOG = """image file patterns ({id}: a line of {split}_ids.txt, as written):
  Flickr30K (SCAN / VSE-infinity f30k_precomp, ids are Flickr photo ids):
    --images flickr30k-images --pattern "{id}.jpg"
  COCO 2014 (coco_precomp, ids are COCO image ids; train mixes train2014 and restval from val2014):
    --images coco/images --pattern "train2014/COCO_train2014_{id:0>12}.jpg" \\
                         --pattern "val2014/COCO_val2014_{id:0>12}.jpg"
  COCO 2017 folders: --pattern "train2017/{id:0>12}.jpg" --pattern "val2017/{id:0>12}.jpg"
  VSE-infinity's data release: --images coco/images --id-map coco/id_mapping.json
  the generated demo (python -m jaxretrieval.data.precomp_images): --pattern "{id}.png"
"""


class Clip(NamedTuple):
    model: RetrievalModel
    preprocess: Callable[[Any], np.ndarray]
    tokenizer: Any
    mesh: Mesh


class SplitPlan(NamedTuple):
    source: PrecompSource
    paths: list[str]  # image i's file
    origins: list[str]  # `{split}_ids.txt:line` of image i


def _clip_config(config: Config, where: str) -> Config:
    if config.model.family != "clip":
        raise ConfigError(f"{where} is a {config.system} model (model.family {config.model.family}); CLIP global "
                          f"features need a CLIP (system clip)")
    return config


def load_clip(checkpoint: str | None = None, *, model: str | None = None, seed: int = 0,
              tokenizer: str | None = None) -> Clip:
    """A trained or converted CLIP checkpoint through `jaxretrieval.load`, or (`model`: a models/presets.py name of
    the clip family) a randomly initialised one from `seed` with the tokenizer of `tokenizer` (a word vocabulary,
    or CLIP's BPE merges .gz)."""
    if (checkpoint is None) == (model is None):
        raise ConfigError("give either --checkpoint or --model")
    if checkpoint is not None:
        config = _clip_config(saved_config(checkpoint), f"checkpoint {checkpoint}")
        if not read_meta_at(checkpoint).get("tokenizer"):
            raise CheckpointError(f"checkpoint {checkpoint} holds no tokenizer (convert it again with its tokenizer)")
        retrieval, preprocess, text_tokenizer = load(checkpoint)
        return Clip(retrieval, preprocess, text_tokenizer, make_mesh(config.mesh))
    if tokenizer is None:
        raise ConfigError("--model needs --tokenizer (a word vocabulary file, or CLIP's BPE merges .gz)")
    if MODEL_PRESETS.get(model, {}).get("family", "clip") != "clip":
        clips = [name for name, preset in MODEL_PRESETS.items() if preset and "family" not in preset]
        raise ConfigError(f"--model {model} is not a CLIP preset (CLIP presets: {', '.join(clips)})")
    config = _clip_config(load_config(None, [f"model.name={model}"], notices=False), f"--model {model}")
    config.data.tokenizer = str(Path(tokenizer).absolute())
    try:
        text_tokenizer = make_tokenizer(config, Path.cwd())
    except DataError as e:
        raise DataError(f"--tokenizer {tokenizer}: {e} (a word vocabulary holds one lower-case word a line; for the "
                        f"demo, `python -m jaxretrieval.data.precomp_images` writes ROOT/words.txt)") from None
    graphdef, _ = abstract_model(config)
    params = init_params(config, seed=seed, precision="fp32")
    return Clip(RetrievalModel(graphdef, params), make_preprocess(config), text_tokenizer, make_mesh(config.mesh))


def read_id_map(path: str | Path) -> dict[str, str]:
    """A JSON object: image id -> image path (relative to --images)."""
    text = read_text(Path(path), "--id-map file")
    try:
        mapping = json.loads(text)
    except ValueError as e:
        raise DataError(f"--id-map {path}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f"--id-map {path}: expected a JSON object of image id -> image path strings")
    return {str(key): value for key, value in mapping.items()}


def check_patterns(patterns: Sequence[str]) -> None:
    """Refuses patterns that cannot name one file per id. `{id:012}` formats a string id without an error but pads
    it on the right ("12" -> "120000000000"), so it is refused by name."""
    hint = "the only field is {id}, a string: zero-pad it with {id:0>12}"
    for pattern in patterns:
        try:
            specs = [spec for _, field, spec, _ in string.Formatter().parse(pattern) if field is not None]
            names = {pattern.format(id=image_id) for image_id in ("1", "2")}
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--pattern {pattern!r}: {type(e).__name__}: {e} ({hint})") from None
        if any(re.match(r"0\d", spec or "") for spec in specs):
            raise ConfigError(f"--pattern {pattern!r} would pad the id with zeros on the right ({hint})")
        if len(names) == 1:
            raise ConfigError(f"--pattern {pattern!r} does not use {{id}}: every image would be the same file")


def image_paths(source: PrecompSource, images: Path, patterns: Sequence[str],
                id_map: dict[str, str] | None = None) -> SplitPlan:
    """Each image's file, checked to exist; errors name `{split}_ids.txt` and the line."""
    if source.ids is None:
        raise DataError(f"image id file {source.ids_path} does not exist: it names the image of each row of "
                        f"{source.features_path}, one id a line")
    paths, origins = [], []
    for number, image_id in enumerate(source.ids, start=1):
        where = f"{source.ids_path}:{number}"
        if id_map is not None:
            if image_id not in id_map:
                raise DataError(f"{where}: image id {image_id!r} is not in the --id-map file")
            candidates = [images / id_map[image_id]]
        else:
            candidates = [images / pattern.format(id=image_id) for pattern in patterns]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            tried = " or ".join(str(path) for path in candidates)
            raise DataError(f"{where}: image file {tried} does not exist (image id {image_id!r})")
        paths.append(str(found))
        origins.append(where)
    return SplitPlan(source, paths, origins)


def _embed_into(path: Path, label: str, rows: Any, encode: Callable, clip: Clip, batch_size: int, *,
                targets: np.ndarray | None = None, total: int | None = None, width: int = 0) -> int:
    """Embeds `rows` part by part into a new .npy at `path`; row i goes to row targets[i] of `total` rows (the
    others stay zero) when `targets` is given. Returns the width (`width` when there is nothing to embed)."""
    count = len(rows) if total is None else total
    out: np.ndarray | None = None
    for start in range(0, len(rows), PART_ROWS):
        stop = min(len(rows), start + PART_ROWS)
        emb = np.asarray(embed_all(lambda x: encode(x, True), Rows(rows.__getitem__, start, stop), batch_size,
                                   clip.mesh), np.float32)
        if out is None:
            width = int(emb.shape[1])
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, width))
        out[targets[start:stop] if targets is not None else slice(start, stop)] = emb
        log.info("%s: %d of %d embedded", label, stop, len(rows))
    if out is None:  # nothing to embed: every caption line is blank
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, width))
    out.flush()
    del out
    return width


def write_split(root: Path, plan: SplitPlan, clip: Clip, *, batch_size: int = 64, workers: int = 0) -> dict:
    """Embeds one split and moves its two files into place; its counts, width and seconds."""
    began = time.perf_counter()
    source = plan.source
    split = source.split
    finals = [root / name.format(split=split) for name in OUTPUTS]
    staged = [path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}") for path in finals]
    with source.captions_path.open("rb") as f:
        lines = sum(1 for _ in f)  # as precomp_pipeline.global_features counts them
    records = source.records
    try:
        gallery = GalleryImages(plan.paths, clip.preprocess, threads=workers, origins=plan.origins)
        dim = _embed_into(staged[0], f"{split} images", gallery, clip.model.encode_image, clip, batch_size)
        texts = LazyTokens(clip.tokenizer, [record.caption for record in records])
        targets = np.asarray([record.line - 1 for record in records], np.int64)
        text_dim = _embed_into(staged[1], f"{split} captions", texts, clip.model.encode_text, clip, batch_size,
                               targets=targets, total=lines, width=dim)
        if text_dim != dim:
            raise ConfigError(f"the CLIP's image embeddings are {dim} wide but its text embeddings {text_dim}")
        for stage, final in zip(staged, finals, strict=True):
            os.replace(stage, final)
    finally:
        for stage in staged:
            stage.unlink(missing_ok=True)
    return {"split": split, "images": len(plan.paths), "lines": lines, "blank": lines - len(records), "dim": dim,
            "seconds": time.perf_counter() - began, "files": finals}


def default_splits(root: Path) -> list[str]:
    """The splits of SPLITS with a caption file in `root`."""
    found = [split for split in SPLITS if (root / f"{split}_caps.txt").is_file()]
    if not found:
        raise DataError(f"{root} holds no {{split}}_caps.txt for any of {', '.join(SPLITS)}; name the splits with "
                        f"--splits")
    return found


def run(root: str | Path, images: str | Path, *, splits: Sequence[str] | None = None,
        patterns: Sequence[str] = ("{id}.jpg",), id_map: str | Path | None = None, checkpoint: str | None = None,
        model: str | None = None, seed: int = 0, tokenizer: str | None = None, batch_size: int = 64,
        workers: int = 0, report: Callable[[str], None] = print) -> list[dict]:
    """Writes every split's CLIP global features (see the module docstring); one summary per split."""
    root, images = Path(root), Path(images)
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder")
    if not images.is_dir():
        raise DataError(f"--images {images} is not a folder")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_patterns(patterns)
    mapping = read_id_map(id_map) if id_map is not None else None
    probe_folder(root, "--root")
    # skip_bad: a blank caption line is logged and gets a zero row rather than stopping the run
    plans = [image_paths(PrecompSource(root, split, skip_bad=True), images, patterns, mapping)
             for split in (splits or default_splits(root))]
    clip = load_clip(checkpoint, model=model, seed=seed, tokenizer=tokenizer)
    results = []
    for plan in plans:
        result = write_split(root, plan, clip, batch_size=batch_size, workers=workers)
        report(f"{result['split']}: {result['images']} images, {result['lines']} caption lines ({result['blank']} "
               f"blank: zero rows), dim {result['dim']}, {result['seconds']:.1f} s -> "
               f"{', '.join(path.name for path in result['files'])}")
        results.append(result)
    return results


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.clip_globals", description=__doc__.split("\n\n")[1],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the precomp folder ({split}_ids.txt, {split}_caps.txt)")
    parser.add_argument("--images", required=True, help="the folder the image files are under")
    parser.add_argument("--pattern", action="append", dest="patterns",
                        help='image file under --images, {id} the image id (default "{id}.jpg"); repeat it for '
                             'images in several folders: the first existing file wins')
    parser.add_argument("--id-map", help="JSON object: image id -> path under --images (VSE-infinity's "
                                         "id_mapping.json), in place of --pattern")
    parser.add_argument("--splits", help=f"comma-separated (default: those of {', '.join(SPLITS)} in --root)")
    parser.add_argument("--checkpoint", help="a trained or converted CLIP (step folder, checkpoints folder or "
                                             "workdir; `python -m convert clip` writes one)")
    parser.add_argument("--model", help="instead of --checkpoint: a randomly initialised frozen CLIP of this "
                                        "models/presets.py size (e.g. tiny), for tests and the CPU demo only")
    parser.add_argument("--seed", type=int, default=0, help="--model's initialisation seed (default 0)")
    parser.add_argument("--tokenizer", help="with --model: a word vocabulary file (one word a line) or CLIP's BPE "
                                            "merges (.gz)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="threads decoding images (default 4)")
    args = parse_command_line(parser, argv)
    if args.checkpoint is not None and (args.model is not None or args.tokenizer is not None):
        raise ConfigError("--checkpoint brings its own tokenizer: give --checkpoint, or --model with --tokenizer")
    if args.id_map is not None and args.patterns:
        raise ConfigError("give --pattern or --id-map, not both")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    run(args.root, args.images, splits=splits, patterns=args.patterns or ("{id}.jpg",), id_map=args.id_map,
        checkpoint=args.checkpoint, model=args.model, seed=args.seed, tokenizer=args.tokenizer,
        batch_size=args.batch_size, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
