"""`python -m jaxretrieval.demo [--workdir DIR] [key.path=value ...]`

The quick start: generates the shapes dataset, trains the tiny CLIP of configs/demo/clip_tiny.yaml on it (the run
ends with an evaluation of the final checkpoint) and prints the recall table once; its JSON is in
DIR/eval/step_N.json. `python -m jaxretrieval.report DIR` plots the curves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path("configs") / "demo" / "clip_tiny.yaml"


def find_demo_config() -> Path:
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (base / DEMO_CONFIG).is_file():
            return base / DEMO_CONFIG
    raise SystemExit(f"error: {DEMO_CONFIG} not found; run the demo from the jaxretrieval repository root")


def main(argv: list[str] | None = None) -> int:
    from jaxretrieval import train

    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere; train reports the errors
    # 2: an error, 75: preempted (rerun to resume); train prints the final recall table and where its outputs went.
    return train.main(["--config", str(find_demo_config()), "--workdir", args.workdir, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
