"""Integrity records of checkpoint step folders: the size and SHA-256 of every file, written once the step is committed
(`seal`) and checked before anything reads it (`verify`).

A record is `STEP/integrity.json`: {"format": 1, "files": {relative path: [size, sha256 hex]}}. A step without one is
`unsealed` (written by an older version, or cut off between its commit and its seal): readable, but not verifiable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

RECORD = "integrity.json"
FORMAT = 1


class Verdict(NamedTuple):
    step: int
    path: Path
    status: str  # ok, unsealed or damaged
    detail: str = ""  # what is wrong (damaged), or why it cannot be checked (unsealed)

    def line(self) -> str:
        return f"step {self.step:>8}  {self.status:<8}  {self.path}" + (f"  ({self.detail})" if self.detail else "")


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != RECORD)


def seal(step_dir: str | Path) -> None:
    """Writes the integrity record of a committed step folder (atomically: a cut-off write leaves no record)."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _digest(p)] for p in _files(step_dir)}
    staging = step_dir / f".{RECORD}.partial"
    with staging.open("w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, step_dir / RECORD)


def is_sealed(step_dir: str | Path) -> bool:
    return (Path(step_dir) / RECORD).is_file()


def verify(step_dir: str | Path, step: int, items: Iterable[str] | None = None) -> Verdict:
    """Checks the files of `items` (top-level sub-folders such as params, meta; None: every file) against the record."""
    step_dir = Path(step_dir)
    record_path = step_dir / RECORD
    if not record_path.is_file():
        return Verdict(step, step_dir, "unsealed", "no integrity record: written by an older version or cut off "
                                                   "before it was sealed; not verifiable")
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
        expected = {str(name): (int(size), str(digest)) for name, (size, digest) in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Verdict(step, step_dir, "damaged", f"{RECORD} is unreadable ({type(e).__name__})")
    wanted = tuple(f"{item}/" for item in items) if items is not None else None
    for name, (size, digest) in sorted(expected.items()):
        if wanted is not None and "/" in name and not name.startswith(wanted):
            continue
        path = step_dir / name
        if not path.is_file():
            return Verdict(step, step_dir, "damaged", f"{name} is missing")
        found = path.stat().st_size
        if found != size:
            return Verdict(step, step_dir, "damaged", f"{name} has {found} bytes, {size} were written")
        if _digest(path) != digest:
            return Verdict(step, step_dir, "damaged", f"{name} has changed since it was written (checksum mismatch)")
    return Verdict(step, step_dir, "ok")
