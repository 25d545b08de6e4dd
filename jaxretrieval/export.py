"""`python -m jaxretrieval.embed --checkpoint PATH --split S --out DIR [--config FILE] [--dtype float16|float32]
[--part-size N] [key=value ...]`

Writes the L2-normalised embeddings of one split in clip-retrieval's layout (what `clip-retrieval inference` writes
and its `index` / autofaiss and `back` read), streamed in parts of --part-size rows: each part is embedded, written
and dropped, so a split of millions of items never sits in memory whole.

    DIR/img_emb/img_emb_{i}.npy                    (rows, dim) image embeddings of part i (the split's gallery)
    DIR/metadata/metadata_{i}.parquet              one row per row of img_emb_{i}.npy: image_path, image_index,
                                                   image_id, group (re-id: image_path, image_index, pid, camid)
    DIR/text_emb/text_emb_{i}.npy                  (rows, dim) caption embeddings of part i (every caption)
    DIR/text_metadata/text_metadata_{i}.parquet    one row per row of text_emb_{i}.npy: caption, caption_index,
                                                   image_index (the gallery row of its image), image_id, group,
                                                   image_path
    DIR/manifest.json                              checkpoint, step, config, split, counts, dtype, dim, normalised

`{i}` is zero-padded to the digits of the part count, as clip-retrieval pads it, so sorted file order is part
order. clip-retrieval's readers concatenate `metadata/*.parquet` in sorted order as the metadata of row n of the
index built from `img_emb/`; images and captions differ in count here, so the caption metadata lives in its own
folder, text_metadata/, aligned row by row with text_emb/ (to serve a text index with clip back, point its metadata
at text_metadata/). image_index and caption_index number the split's gallery images and captions from 0; image_id is
the annotation's image_id (or the image path without one) as a string; group is the evaluator's dense group id. The
whole folder is written beside DIR and renamed into place at the end: a failed run leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from jaxretrieval import checkpoint
from jaxretrieval.config import Config
from jaxretrieval.data import reid_pipeline
from jaxretrieval.data.pipeline import caption_source, data_root, eval_inputs, make_tokenizer
from jaxretrieval.data.tokenizers import Tokenizer, build_tokenizer
from jaxretrieval.errors import (
    ConfigError,
    DataError,
    OutputPathError,
    command,
    parse_command_line,
    probe_output_folder,
    require,
)
from jaxretrieval.evaluate import command_config, encoders, restore_params
from jaxretrieval.retrieval.embed import embed_all
from jaxretrieval.retrieval.index import GalleryIndex
from jaxretrieval.sharding import make_mesh

log = logging.getLogger(__name__)

DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
DEFAULT_PART_SIZE = 100_000
REID_SPLITS = ("train", "query", "gallery")
# modality -> (embedding folder and file prefix, metadata folder and file prefix, id column, manifest key)
LAYOUT = {"image": ("img_emb", "metadata", "image_index", "images"),
          "text": ("text_emb", "text_metadata", "caption_index", "texts")}


class Rows:
    """Rows [start, stop) of a lazily fetched sequence; `embed_all` slices it batch by batch, so only one batch of
    pixels or tokens is ever materialised."""

    def __init__(self, fetch: Callable[[slice], np.ndarray], start: int, stop: int) -> None:
        self.fetch, self.start, self.stop = fetch, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        begin, end, _ = index.indices(len(self))
        return self.fetch(slice(self.start + begin, self.start + end))


class LazyTokens:
    """Passed to `eval_inputs` in place of token arrays: captions tokenized only when a slice of them is read."""

    def __init__(self, tokenizer: Tokenizer, captions: list[str]) -> None:
        self.tokenizer, self.captions = tokenizer, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.asarray(self.tokenizer(self.captions[index]))


class Modality(NamedTuple):
    rows: Any  # sliceable: GalleryImages or LazyTokens
    columns: dict[str, Sequence[Any]]  # metadata column -> one value per row
    encode: int  # 0: the image tower, 1: the text tower
    skipped: set[int]  # rows that failed to decode (filled while embedding; eval.skip_bad_records)


def caption_plan(config: Config, split: str, tokenizer: Tokenizer) -> dict[str, Modality]:
    """The gallery images and every caption of a captioned split, chosen as the evaluator chooses them (eval_inputs:
    one image per group for image_text, every distinct image for text_to_image)."""
    source = caption_source(config, data_root(config), split)
    inputs = eval_inputs(config, source, lambda captions: LazyTokens(tokenizer, captions))
    keys = [str(key) for key in source.group_keys()]
    by_group = config.eval.protocol == "image_text"
    image_row: dict[Any, int] = {}
    for record in source.records:
        image_row.setdefault(record.group if by_group else record.image, len(image_row))
    images = inputs.images
    image_columns = {"image_path": images.paths, "image_index": np.arange(len(images)),
                     "image_id": [keys[g] for g in inputs.image_groups], "group": inputs.image_groups}
    records = source.records
    text_columns = {"caption": [r.caption for r in records], "caption_index": np.arange(len(records)),
                    "image_index": np.asarray([image_row[r.group if by_group else r.image] for r in records]),
                    "image_id": [keys[r.group] for r in records], "group": inputs.text_groups,
                    "image_path": [r.image for r in records]}
    return {"image": Modality(images, image_columns, 0, images.skipped),
            "text": Modality(inputs.tokens, text_columns, 1, set())}


def reid_plan(config: Config, split: str) -> dict[str, Modality]:
    """The images of a re-id split (no captions), with their person and camera ids."""
    if split not in REID_SPLITS:
        raise DataError(f"unknown split '{split}' for eval.protocol reid ({', '.join(REID_SPLITS)})")
    data = reid_pipeline.ReidSplit(config, reid_pipeline.reid_source(config, split))
    columns = {"image_path": data.images.paths, "image_index": np.arange(len(data.images)), "pid": data.pids,
               "camid": data.camids}
    return {"image": Modality(data.images, columns, 0, data.images.skipped)}


def export_plan(config: Config, split: str, meta: dict) -> dict[str, Modality]:
    """What `export` writes for `split`, read before the model loads (a bad split fails here)."""
    protocol = config.eval.protocol
    if protocol == "reid":
        return reid_plan(config, split)
    if protocol not in ("image_text", "text_to_image"):
        raise ConfigError(f"eval.protocol {protocol}: the export supports image_text, text_to_image and reid")
    spec = meta.get("tokenizer")
    tokenizer = build_tokenizer(spec) if spec else make_tokenizer(config, data_root(config))
    return caption_plan(config, split, tokenizer)


def _take(values: Sequence[Any], start: int, stop: int, keep: np.ndarray | None) -> Any:
    part = values[start:stop]
    if keep is None:
        return part
    return part[keep] if isinstance(part, np.ndarray) else [v for v, k in zip(part, keep, strict=True) if k]


def write_modality(folder: Path, modality: str, plan: Modality, encode: Callable, *, part_size: int, dtype: np.dtype,
                   batch_size: int, mesh: Mesh) -> dict[str, Any]:
    """Embeds and writes one modality part by part; its manifest entry."""
    emb_dir, meta_dir, _, _ = LAYOUT[modality]
    total = len(plan.rows)
    parts = max(1, -(-total // part_size))
    width = len(str(parts))
    writer = jax.process_index() == 0
    if writer:
        (folder / emb_dir).mkdir()
        (folder / meta_dir).mkdir()
    count, dim = 0, None
    for part in range(parts):
        start, stop = part * part_size, min(total, (part + 1) * part_size)
        emb = embed_all(encode, Rows(plan.rows.__getitem__, start, stop), batch_size, mesh)
        dim = int(emb.shape[1])
        bad = sorted(i - start for i in plan.skipped if start <= i < stop)
        keep = None
        if bad:
            keep = np.ones(stop - start, bool)
            keep[bad] = False
            emb = emb[keep]
        if writer:
            name = str(part).zfill(width)
            np.save(folder / emb_dir / f"{emb_dir}_{name}.npy", emb.astype(dtype), allow_pickle=False)
            write_parquet({key: _take(values, start, stop, keep) for key, values in plan.columns.items()},
                          folder / meta_dir / f"{meta_dir}_{name}.parquet")
        count += len(emb)
        log.info("%s part %d/%d: %d rows", modality, part + 1, parts, len(emb))
    return {"count": count, "parts": parts, "dim": dim, "embeddings": emb_dir, "metadata": meta_dir,
            "skipped": sorted(plan.skipped)}


def write_parquet(columns: dict[str, Any], path: Path) -> None:
    """One metadata part: integer columns as int64, the others (paths, captions, ids) as strings."""
    pyarrow = require("pyarrow", "export", "writing the metadata parquet files")
    table = pyarrow.table({key: np.asarray(v, np.int64) if isinstance(v, np.ndarray) else list(v)
                           for key, v in columns.items()})
    require("pyarrow.parquet", "export", "writing the metadata parquet files").write_table(table, path)


def export(config: Config, checkpoint_path: str | Path, split: str, out: str | Path, *, dtype: str = "float16",
           part_size: int = DEFAULT_PART_SIZE, config_file: str | None = None) -> dict[str, Any]:
    """Writes the split's embeddings to `out` (see the module docstring); returns the manifest. `out` must not exist
    or be empty; everything is written into a sibling folder renamed to `out` at the end."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if part_size < 1:
        raise ConfigError(f"--part-size must be a positive number of rows, got {part_size}")
    require("pyarrow.parquet", "export", "writing the metadata parquet files")
    out = check_out(str(out))
    meta = checkpoint.read_meta_at(checkpoint_path)
    plans = export_plan(config, split, meta)
    mesh = make_mesh(config.mesh)
    graphdef, params, meta = restore_params(config, checkpoint_path, mesh)
    towers = encoders(graphdef, mesh)
    writer = jax.process_index() == 0
    staging = out.absolute().parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    if writer:
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    try:
        entries = {}
        for modality, plan in plans.items():
            tower = towers[plan.encode]
            entries[LAYOUT[modality][3]] = write_modality(
                staging, modality, plan, lambda x, tower=tower: tower(params, x), part_size=part_size,
                dtype=DTYPES[dtype], batch_size=config.eval.batch_size, mesh=mesh)
        manifest = {"format": "clip-retrieval", "checkpoint": str(Path(checkpoint_path).absolute()),
                    "step": meta.get("step"), "config": config_file, "system": config.system,
                    "model": config.model.name, "data_kind": config.data.kind, "split": split,
                    "protocol": config.eval.protocol, "dtype": dtype,
                    "dim": next(iter(entries.values()))["dim"], "normalised": True, "part_size": part_size,
                    "images": entries["images"], "texts": entries.get("texts")}
        if writer:
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            try:
                os.replace(staging, out)  # an empty `out` is replaced; a non-empty one is refused
            except OSError as e:
                raise OutputPathError(f"--out {out}: cannot move the export into place ({e.strerror or e}); "
                                      f"choose a new folder") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def index_from_export(folder: str | Path, modality: str = "image", *, ids: str | None = "auto",
                      mesh: Mesh | None = None, **options: Any) -> GalleryIndex:
    """A GalleryIndex of an export's image (or text) embeddings, parts concatenated in order; `ids`: the metadata
    column kept as the index's ids ("auto": image_index / caption_index; None: none). Options as for GalleryIndex
    (dtype, precision, gallery_chunk, query_chunk); the stored dtype is kept by default."""
    if modality not in LAYOUT:
        raise ValueError(f"modality must be one of {', '.join(LAYOUT)}, got {modality!r}")
    folder = Path(folder)
    emb_dir, meta_dir, id_column, key = LAYOUT[modality]
    try:
        entry = json.loads((folder / "manifest.json").read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder} is not an embedding export with {key} ({type(e).__name__}: {e})") from None
    if not entry:
        raise DataError(f"{folder}: the export holds no {key}")
    parts = [np.load(path, mmap_mode="r", allow_pickle=False) for path in sorted((folder / emb_dir).glob("*.npy"))]
    rows = sum(len(p) for p in parts)
    if len(parts) != entry["parts"] or rows != entry["count"]:
        raise DataError(f"{folder / emb_dir}: {len(parts)} parts of {rows} rows where manifest.json says "
                        f"{entry['parts']} parts of {entry['count']}")
    gallery = np.empty((rows, entry["dim"]), parts[0].dtype)
    start = 0
    for part in parts:
        gallery[start:start + len(part)] = part
        start += len(part)
    values = None
    if ids is not None:
        parquet = require("pyarrow.parquet", "export", "reading the metadata parquet files")
        column = id_column if ids == "auto" else ids
        tables = [parquet.read_table(path, columns=[column]) for path in sorted((folder / meta_dir).glob("*.parquet"))]
        values = np.concatenate([t.column(column).to_numpy(zero_copy_only=False) for t in tables])
        if len(values) != rows:
            raise DataError(f"{folder / meta_dir}: {len(values)} metadata rows for {rows} embeddings")
    return GalleryIndex(gallery, values, mesh=mesh, **options)


def check_out(path: str) -> Path:
    """--out: absent or an empty folder, proven writable (before anything is loaded)."""
    out = Path(path).expanduser()
    if out.is_dir() and any(out.iterdir()):
        raise OutputPathError(f"--out {out} is not empty; choose a new folder (or an empty one)")
    return probe_output_folder(out, "--out")


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.embed",
                                     description="A split's image and caption embeddings in clip-retrieval's layout")
    parser.add_argument("--config", help="config file (default: the config saved with the checkpoint)")
    parser.add_argument("--checkpoint", required=True, help="step folder, checkpoints folder or workdir")
    parser.add_argument("--split", required=True, help="test / train (re-id: query / gallery / train)")
    parser.add_argument("--out", required=True, help="new (or empty) output folder")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                        help="stored embedding dtype (default float16, as clip-retrieval stores them)")
    parser.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE,
                        help=f"rows per .npy / .parquet part (default {DEFAULT_PART_SIZE})")
    parser.add_argument("overrides", nargs="*", help="key.path=value (before or after the options)")
    args = parse_command_line(parser, argv)
    out = check_out(args.out)
    config = command_config(args.config, args.checkpoint, args.overrides)
    manifest = export(config, args.checkpoint, args.split, out, dtype=args.dtype, part_size=args.part_size,
                      config_file=args.config)
    counts = ", ".join(f"{manifest[key]['count']} {key}" for key in ("images", "texts") if manifest[key])
    log.info("wrote %s (%s, dim %d, %s) to %s", counts, manifest["split"], manifest["dim"], args.dtype, out)
    return 0
