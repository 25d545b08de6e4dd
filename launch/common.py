"""What the launch scripts share: argument checks, the train command, and showing or running a list of commands.

Every command is a list of arguments. `--dry-run` prints each one shell-quoted (`shlex.join`), one per line, so
the output can be pasted into a shell; a real run prints the same line after `+ ` and runs it, stopping at the
first failure.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
TRAIN_MODULE = "jaxretrieval.train"


class LaunchError(Exception):
    """A launch that cannot go on; `code` is the exit status the script returns (2: bad arguments)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def matching(pattern: str, what: str, examples: str) -> Callable[[str], str]:
    """An argparse `type` accepting values that fully match `pattern`; the error names the value and examples."""
    regex = re.compile(pattern)

    def check(text: str) -> str:
        if not regex.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {what} (e.g. {examples})")
        return text

    return check


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` accepting integers in [low, high] (no upper bound when high is None)."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {bound}")
        return value

    return check


def existing_file(text: str) -> str:
    """An argparse `type` for a file that must exist on this machine."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def add_train_arguments(parser: argparse.ArgumentParser, python: str, config_required: bool = True) -> None:
    """--config, --workdir, --python and the positional key.path=value overrides of the train command."""
    group = parser.add_argument_group("train command")
    group.add_argument("--config", type=existing_file, required=config_required, help="YAML config file")
    group.add_argument("--workdir", help="output folder of the run (default: the trainer's runs/<config name>)")
    group.add_argument("--python", default=python, help=f"Python interpreter that runs the trainer (default: {python})")
    group.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides passed to the trainer")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args that also accepts overrides placed between options (argparse alone rejects `NAME --x 1 a=b`).

    Leftover words join `args.overrides` in order; leftover options, stray words, or overrides that are not
    `key.path=value` are argparse errors (exit code 2)."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    if not takes_overrides or any(word.startswith("-") for word in extra):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    args.overrides = [*args.overrides, *extra]
    for override in args.overrides:
        if not OVERRIDE.match(override):
            parser.error(f"override {override!r} must look like key.path=value")
    return args


def train_command(python: str, config: str, workdir: str | None, overrides: Sequence[str]) -> list[str]:
    """`python -m jaxretrieval.train --config FILE [--workdir DIR] [key.path=value ...]` as a list of arguments."""
    command = [python, "-m", TRAIN_MODULE, "--config", config]
    if workdir:
        command += ["--workdir", workdir]
    return command + list(overrides)


def run_commands(commands: Sequence[Sequence[str]], dry_run: bool, out: TextIO | None = None) -> None:
    """Prints each command shell-quoted; unless dry_run, runs it and raises LaunchError at the first failure."""
    out = out or sys.stdout
    for index, command in enumerate(commands, 1):
        line = shlex.join(command)
        print(line if dry_run else f"+ {line}", file=out, flush=True)
        if dry_run:
            continue
        try:
            subprocess.run(command, check=True)
        except FileNotFoundError:
            raise LaunchError(f"{command[0]}: command not found (step {index} of {len(commands)})", 127) from None
        except subprocess.CalledProcessError as e:
            raise LaunchError(f"step {index} of {len(commands)} failed with exit code {e.returncode}: {line}",
                              e.returncode or 1) from None


def report(error: LaunchError) -> int:
    """Prints a LaunchError the way the scripts do and returns its exit code."""
    print(f"error: {error}", file=sys.stderr)
    return error.code
