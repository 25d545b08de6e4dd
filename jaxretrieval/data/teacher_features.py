"""Frozen teacher features, looked up by key: CUSA's image teacher (per image_id) and text teacher (per cleaned
caption).

The format we write and recommend is a `.npz` holding `ids` (N strings) and `features` (N, D floats), as
`python -m jaxretrieval.teachers` makes it. CUSA's own image features, `{split}_unicom.npy`, are a pickled dict
image_id -> (1, D) or (D,) array; a pickle can run any code when it is loaded, so it is read only with
`allow_pickle=True`.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxretrieval.errors import ConfigError, DataError, OutputPathError

_NPZ_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_CHECK_ROWS = 1 << 16  # rows checked for non-finite values at a time, so no (N, D) mask is ever made


class TeacherTable:
    """(N, D) float32 features with one string id per row; `lookup(keys)` gathers rows by id.

    `what` names the table in errors ("image teacher", "text teacher"); `hint` ends a missing-key error.
    """

    def __init__(self, ids: Sequence[str], features: np.ndarray, path: str | Path, *, what: str = "teacher",
                 hint: str = ""):
        self.path = Path(path)
        self.what = what
        self.hint = hint
        features = np.asarray(features)
        if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
            raise DataError(f"{self.path}: {what} features must be an (N, D) float array, got {features.dtype} of "
                            f"shape {features.shape}")
        if len(ids) != len(features):
            raise DataError(f"{self.path}: {len(ids)} ids for {len(features)} {what} feature rows")
        if not len(ids) or not features.shape[1]:
            raise DataError(f"{self.path}: holds no {what} features (shape {features.shape})")
        self.ids = [str(key) for key in ids]
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self._rows: dict[str, int] = {}
        for row, key in enumerate(self.ids):
            if self._rows.setdefault(key, row) != row:
                raise DataError(f"{self.path}: {what} id {key!r} appears twice (rows {self._rows[key]} and {row})")
        for start in range(0, len(self.features), _CHECK_ROWS):
            finite = np.isfinite(self.features[start:start + _CHECK_ROWS]).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise DataError(f"{self.path}: the {what} feature of {self.ids[row]!r} (row {row}) is not finite "
                                f"(NaN or inf)")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """The row index of every key; a key not in the table is a DataError naming it."""
        rows = np.empty(len(keys), dtype=np.int64)
        for index, key in enumerate(keys):
            row = self._rows.get(key)
            if row is None:
                hint = f"; {self.hint}" if self.hint else ""
                raise DataError(f"{self.path}: no {self.what} feature for {key!r} (the file has {len(self)} "
                                f"ids){hint}")
            rows[index] = row
        return rows

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), D) float32: the feature of every key; a key not in the table is a DataError naming it."""
        return self.features[self.rows(keys)]

    def __repr__(self) -> str:
        return f"TeacherTable({self.path}, {len(self)} x {self.dim} {self.what} features)"


def _magic(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"teacher features file {path} does not exist")
    try:
        with path.open("rb") as f:
            return f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None


def _read_npz(path: Path, what: str, hint: str) -> TeacherTable:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("ids", "features") if key not in npz.files]
            if missing:
                raise DataError(f"{path}: no array '{missing[0]}' (a teacher .npz holds 'ids' and 'features'; it "
                                f"has {', '.join(npz.files) or 'nothing'})")
            try:
                ids = npz["ids"]
            except ValueError:
                raise DataError(f"{path}: array 'ids' is stored as Python objects (a pickle); save it as a string "
                                f"array: np.array(ids, dtype=str)") from None
            features = npz["features"]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise DataError(f"{path}: array 'ids' must be 1-D strings, got {ids.dtype} of shape {ids.shape}")
    keys = [key.decode() for key in ids.tolist()] if ids.dtype.kind == "S" else ids.tolist()
    return TeacherTable(keys, features, path, what=what, hint=hint)


def _npy_dtype(path: Path) -> np.dtype:
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read(f)[2]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None


def _read_pickled_dict(path: Path, what: str, hint: str) -> TeacherTable:
    try:
        loaded = np.load(path, allow_pickle=True)
    except Exception as e:  # unpickling may raise anything the pickled objects' code raises
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
    table = loaded
    if isinstance(loaded, np.ndarray) and loaded.dtype.hasobject and loaded.ndim == 0:
        table = loaded.item()  # np.save of a dict
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a pickled dict image_id -> feature, got {type(table).__name__}")
    rows = []
    for key, value in table.items():
        row = np.asarray(value, dtype=np.float32)
        if row.ndim == 2 and row.shape[0] == 1:
            row = row[0]
        if row.ndim != 1 or (rows and row.shape != rows[0].shape):
            expected = f"({rows[0].shape[0]},) or (1, {rows[0].shape[0]})" if rows else "(D,) or (1, D)"
            raise DataError(f"{path}: the feature of {key!r} has shape {np.shape(value)}; expected {expected}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: the pickled dict is empty")
    return TeacherTable(list(table), np.stack(rows), path, what=what, hint=hint)


def load_image_teachers(path: str | Path, *, allow_pickle: bool = False) -> TeacherTable:
    """Image teacher features keyed by image_id: our .npz, or (with allow_pickle) CUSA's pickled `{split}_unicom.npy`
    dict."""
    path = Path(path)
    what, hint = "image teacher", "were the features made for this split's annotation file?"
    magic = _magic(path)
    if magic.startswith(_NPZ_MAGIC):
        return _read_npz(path, what, hint)
    if magic == _NPY_MAGIC and not _npy_dtype(path).hasobject:
        raise DataError(f"{path}: a bare .npy array has no image ids; save ids and features together: "
                        f"np.savez(FILE.npz, ids=np.array(ids, dtype=str), features=features)")
    if not allow_pickle:
        kind = "neither .npz nor .npy (perhaps a plain pickle)"
        if magic == _NPY_MAGIC:
            kind = "a pickled numpy object (like CUSA's {split}_unicom.npy)"
        raise ConfigError(f"{path} is {kind}. Loading a pickle runs whatever code it holds, so it is refused "
                          f"unless you trust the file and set allow_pickle (cusa.allow_pickle=true); or save the "
                          f"features once as a safe .npz of 'ids' and 'features' (jaxretrieval.data."
                          f"teacher_features.save_teachers)")
    return _read_pickled_dict(path, what, hint)


def load_text_teachers(path: str | Path) -> TeacherTable:
    """Text teacher features keyed by the cleaned caption: a .npz as `python -m jaxretrieval.teachers text`
    writes it."""
    path = Path(path)
    hint = ("the table is keyed by the cleaned caption: make it with `python -m jaxretrieval.teachers text` from the "
            "same annotation files and the same --max-words")
    if not _magic(path).startswith(_NPZ_MAGIC):
        raise DataError(f"{path}: not a .npz file; text teacher features are a .npz of 'ids' (cleaned captions) "
                        f"and 'features', as `python -m jaxretrieval.teachers text` writes them")
    return _read_npz(path, "text teacher", hint)


def save_teachers(path: str | Path, ids: Sequence[str], features: np.ndarray) -> Path:
    """Writes a teacher .npz atomically (a temporary file in the same folder, then renamed over `path`), so a
    failure leaves no partial file; the table is checked as `TeacherTable` checks it first."""
    path = Path(path)
    table = TeacherTable(ids, features, path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with partial.open("wb") as f:
            np.savez(f, ids=np.array(table.ids, dtype=str), features=table.features)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        raise OutputPathError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        partial.unlink(missing_ok=True)
    return path
