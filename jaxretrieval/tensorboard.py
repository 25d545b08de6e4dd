"""`python -m jaxretrieval.tensorboard WORKDIR [--logdir DIR]`

TensorBoard event files of a run's metrics, written without TensorFlow into WORKDIR/tensorboard/: `EventLog` writes
each metrics.jsonl record as the trainer logs it; this command (`backfill`) rewrites the folder from metrics.jsonl
alone, for runs made before event files were written. View with `tensorboard --logdir WORKDIR/tensorboard`.

Tags: `train/<key>` for training records (train/loss, train/loss_itc, train/lr, train/samples_per_s ...) and
`eval/<key>` for `eval_<key>` (eval/i2t_R1, eval/rsum ...), one scalar per numeric value (float32, as every
TensorBoard scalar) at the record's step.

Resumed runs: each EventLog starts a new event file in the same folder, named to sort after the ones already there
(readers take a folder's files in name order), beginning with a SessionLog.START marker at the step after the
checkpoint it resumed from. TensorBoard's reader then drops every value logged at that step or later by the run
that was killed, and a fallback to an older checkpoint cannot leave two values at one step.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from jaxretrieval.errors import OutputPathError, command, parse_command_line, probe_folder, require
from jaxretrieval.report import load_metrics, metrics_path, numeric

FOLDER = "tensorboard"
EXTRA = "tensorboard"  # pip install 'jaxretrieval[tensorboard]'
_PREFIX = "events.out.tfevents."


def available() -> bool:
    """Whether the `tensorboard` package (the only one event files need) is installed."""
    try:
        check_installed()
    except ImportError:
        return False
    return True


def check_installed() -> None:
    """Raises MissingPackageError, naming `pip install 'jaxretrieval[tensorboard]'`, without the package."""
    _modules()


def _modules() -> tuple[ModuleType, ModuleType, ModuleType]:
    event_pb2 = require("tensorboard.compat.proto.event_pb2", EXTRA, "writing TensorBoard event files")
    summary_pb2 = importlib.import_module("tensorboard.compat.proto.summary_pb2")
    record_writer = importlib.import_module("tensorboard.summary.writer.record_writer")
    return event_pb2, summary_pb2, record_writer


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key: eval_R1 -> eval/R1, loss_itc -> train/loss_itc."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """{tag: value} of a record's numeric values; the step, booleans, strings, lists and None are left out."""
    return {tag(key): float(value) for key, value in record.items() if key != "step" and numeric(value)}


def _next_file(folder: Path) -> Path:
    """A new event file name that sorts after every event file in `folder`, even within the same second or after
    the clock went back: its timestamp field is past theirs."""
    stamps = [int(stamp) for p in folder.glob(f"{_PREFIX}*")
              if (stamp := p.name[len(_PREFIX):].split(".")[0]).isdigit()]
    stamp = max([int(time.time()), *(s + 1 for s in stamps)])
    return folder / f"{_PREFIX}{stamp:010d}.{socket.gethostname()}.{os.getpid()}"


class EventLog:
    """Writes metrics.jsonl records as TensorBoard scalars into WORKDIR/tensorboard/ (or `folder`).

    `resume_step`: the checkpoint step the run resumed from (0 for a fresh start); values of a previous run at
    later steps are dropped by readers. `enabled=False` (every process but 0) writes nothing and imports nothing.
    Each `write` is flushed to the file before it returns, so a killed run keeps every record it logged. A closed
    log writes nothing; use it as a context manager or call `close()`."""

    def __init__(self, workdir: str | Path, resume_step: int = 0, enabled: bool = True,
                 folder: str | Path | None = None):
        self.enabled = enabled
        self.path: Path | None = None
        self._file = None
        if not enabled:
            return
        self._event_pb2, self._summary_pb2, record_writer = _modules()
        logdir = probe_folder(Path(folder) if folder is not None else Path(workdir) / FOLDER, "TensorBoard folder")
        self.path = _next_file(logdir)
        try:
            self._file = self.path.open("xb")
        except OSError as e:
            raise OutputPathError(f"cannot create the event file {self.path} ({e.strerror or e})") from None
        self._writer = record_writer.RecordWriter(self._file)
        self._write_event(file_version="brain.Event:2")
        self._write_event(step=int(resume_step) + 1,
                          session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START))

    def _write_event(self, **fields: Any) -> None:
        self._writer.write(self._event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
        self._file.flush()

    def write(self, record: Mapping[str, Any]) -> None:
        """Logs one metrics.jsonl record: a scalar per numeric value, at record["step"]."""
        if self._file is None:
            return
        values = scalars(record)
        if values:
            summary = self._summary_pb2.Summary(
                value=[self._summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in values.items()])
            self._write_event(step=int(record["step"]), summary=summary)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def backfill(workdir: str | Path, logdir: str | Path | None = None) -> Path:
    """Rewrites the event files of WORKDIR/tensorboard/ (or `logdir`) from WORKDIR/metrics.jsonl alone, its repeated
    steps resolved as `report.load_metrics` does; returns the new event file. The event files already there are
    removed once it is written: run it while no training writes to that folder."""
    source = metrics_path(workdir)
    records = load_metrics(source)
    check_installed()  # before anything is written
    folder = Path(logdir) if logdir is not None else source.parent / FOLDER
    old = list(folder.glob("*tfevents*")) if folder.is_dir() else []
    with EventLog(source.parent, folder=folder) as events:
        for record in records:
            events.write(record)
    for path in old:
        path.unlink(missing_ok=True)
    assert events.path is not None
    return events.path


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.tensorboard", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="training run folder holding metrics.jsonl (or the metrics.jsonl file)")
    parser.add_argument("--logdir", help="write the event files here (default: WORKDIR/tensorboard)")
    args = parse_command_line(parser, argv)
    print(backfill(args.workdir, args.logdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
