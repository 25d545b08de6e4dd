"""The failures a user can act on, one type per kind, and the one way every command reports them.

Each command's `main` is wrapped by `command`: a `UserError` becomes one `error: ...` line on stderr and exit
status 2, without a traceback unless `-v` is given or `JAXRETRIEVAL_DEBUG=1` is set. Messages name the file,
line, key or step, and what to do.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import re
import sys
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

EXIT_ERROR = 2  # bad input, config, checkpoint, output path or missing package: fix and rerun
EXIT_PREEMPTED = 75  # stopped by SIGTERM / SIGINT after checkpointing the step reached: rerun to resume (EX_TEMPFAIL)


class UserError(Exception):
    """A failure the user can fix; its message is printed as is after `error: `."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not match the schema."""


class DataError(UserError, ValueError):
    """Bad input data: the message names the file, the line or the key."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, damaged or of another model; the message names the step and path."""


class OutputPathError(UserError, OSError):
    """An output folder or file that cannot be written."""


class MissingPackageError(UserError, ImportError):
    """An optional package a feature needs; the message holds the pip line that installs it."""


def weights_only_reason(error: Exception) -> str:
    """The one-line reason torch.load(weights_only=True) gives for refusing a pickle (torch's message runs to several
    lines of advice, some of it to turn the protection off)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", text, re.S)
    return (found.group(1) if found else text).split(". ")[0].splitlines()[0].strip()


def debug_enabled(argv: list[str] | None = None) -> bool:
    return os.environ.get("JAXRETRIEVAL_DEBUG", "") not in ("", "0") or any(a in ("-v", "--verbose")
                                                                             for a in (argv or ()))


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Imports an optional package, or raises MissingPackageError with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"{purpose} needs the '{module.split('.')[0]}' package: "
                                  f"pip install 'jaxretrieval[{extra}]'") from None


def _probe(folder: Path, what: str) -> None:
    probe = folder / f".write-probe-{uuid.uuid4().hex}"
    try:
        with probe.open("wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputPathError(f"{what} {folder} is not writable ({e.strerror or e}); choose another path or fix "
                              f"its permissions / free space") from None
    finally:
        probe.unlink(missing_ok=True)


def probe_folder(path: str | Path, what: str = "output folder") -> Path:
    """Creates `path` (and its parents) if needed and proves a file can be written there, before any work starts."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} {folder} exists and is not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create {what} {folder} ({e.strerror or e}); choose another path or fix its "
                              f"permissions") from None
    _probe(folder, what)
    return folder


def probe_output_folder(path: str | Path, option: str = "--output-dir") -> Path:
    """Proves the output folder can be written before any work starts, leaving nothing behind: an existing folder is
    probed in place, a new one in the nearest existing folder above it, where it will be created."""
    out = Path(path).expanduser()
    if out.exists():
        if not out.is_dir():
            raise OutputPathError(f"{option} {out} exists and is not a folder; choose another path")
        probe_folder(out, option)
        return out
    above = next(parent for parent in out.absolute().parents if parent.exists())
    if not above.is_dir():
        raise OutputPathError(f"{option} {out} cannot be created: {above} is a file, not a folder; choose another "
                              f"path")
    try:
        probe_folder(above, "folder")
    except OutputPathError as e:
        raise OutputPathError(f"{option} {out} cannot be created: {e}") from None
    return out


def probe_file(path: str | Path, what: str = "output file") -> Path:
    """Proves `path` can be written (its folder created if needed) without touching an existing file there."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputPathError(f"{what} {file} is a folder; give a file name")
    probe_folder(file.parent if str(file.parent) else Path("."), f"folder of the {what}")
    if file.exists() and not os.access(file, os.W_OK):
        raise OutputPathError(f"{what} {file} exists and is not writable")
    return file


def add_verbose(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more and show the traceback of an error (or set JAXRETRIEVAL_DEBUG=1)")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Every command's start: `-v` added, options and `key.path=value` overrides parsed in any order, and logging
    set up for that verbosity. argparse cannot intermix with sub-commands: those parsers (convert, checkpoint) add
    `-v` where they want it and parse as usual."""
    if parser._subparsers is None:
        args = add_verbose(parser).parse_intermixed_args(argv)
    else:
        args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    return args


def configure_logging(verbose: bool) -> None:
    """INFO from our loggers; the libraries' warnings (absl, orbax) only with -v."""
    # absl, imported by orbax, already gave the root logger a plain handler (logging.basicConfig() on its first
    # log call), so basicConfig alone would change nothing: set the level and our format on the plain handlers.
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:  # not a test framework's capturing handler
            handler.setFormatter(formatter)
    root.setLevel(logging.INFO)
    if not verbose:
        for name in ("absl", "orbax", "jax._src", "grain"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:  # absl comes with jax/orbax; nothing to quiet without it
            pass


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wraps a command's `main(argv) -> exit status`: a UserError is one `error:` line and status 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else list(argv)
        try:
            return main(args)
        except UserError as e:
            if debug_enabled(args):
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR

    return wrapped
