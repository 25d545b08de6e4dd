"""PAB test-set readers: the blind queries and the gallery folder.

`query.json` holds JSON lines (UTF-8) `{"query_index": int or string, "caption": text}`, the caption not blank;
rows of every score matrix follow its line order. `gallery/` holds the images; columns of every score matrix
follow the gallery sorted by file stem, the order `gallery_images` returns and the ensemble relies on (the
original scripts used unsorted `os.listdir`, which differs between file systems).
"""

from __future__ import annotations

from pathlib import Path

from jaxretrieval.data.sources import DataError, decode_line, parse_json_object, raw_lines

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _query_line(text: str, where: str) -> tuple[str, str]:
    item = parse_json_object(text, where, {"query_index": (int, str), "caption": (str,)})
    if not item["caption"].strip():
        raise DataError(f"{where}: key 'caption' is blank (empty or only whitespace)")
    return str(item["query_index"]), item["caption"]


def read_queries(path: str | Path) -> tuple[list[str], list[str]]:
    """(query ids, captions) of a `query.json`, in line order; ids are `query_index` as strings."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"query file {path} does not exist")
    first_line: dict[str, int] = {}
    ids, captions = [], []
    for number, raw in raw_lines(path):
        text = decode_line(raw, f"{path}:{number}", first=number == 1)
        if not text.strip():
            continue
        query_id, caption = _query_line(text, f"{path}:{number}")
        if query_id in first_line:
            raise DataError(f"{path}:{number}: duplicate query_index '{query_id}' "
                            f"(first on line {first_line[query_id]})")
        first_line[query_id] = number
        ids.append(query_id)
        captions.append(caption)
    if not ids:
        raise DataError(f"{path}: no queries")
    return ids, captions


def gallery_images(folder: str | Path) -> tuple[list[str], list[str]]:
    """(stems, paths) of the images directly in `folder`, sorted by stem; stems must be unique."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"gallery folder {folder} does not exist")
    by_stem: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in by_stem:
            first, second = sorted((by_stem[path.stem], path))
            raise DataError(f"gallery images {first} and {second} share the stem '{path.stem}'")
        by_stem[path.stem] = path
    if not by_stem:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in gallery folder {folder}")
    stems = sorted(by_stem)
    return stems, [str(by_stem[stem]) for stem in stems]
