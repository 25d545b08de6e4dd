"""`python -m jaxretrieval.demo [--workdir DIR] [key.path=value ...]`

The quick start: generates the shapes dataset, trains the tiny CLIP of configs/demo/clip_tiny.yaml on it,
evaluates the final checkpoint with `jaxretrieval.evaluate` and prints the recall table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path("configs") / "demo" / "clip_tiny.yaml"


def find_demo_config() -> Path:
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (base / DEMO_CONFIG).is_file():
            return base / DEMO_CONFIG
    raise SystemExit(f"error: {DEMO_CONFIG} not found; run the demo from the jaxretrieval repository root")


def main(argv: list[str] | None = None) -> int:
    from jaxretrieval import evaluate, train
    from jaxretrieval.retrieval import recall_table

    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_intermixed_args(argv)  # overrides anywhere; train and evaluate report the errors
    config = str(find_demo_config())
    train_args = ["--config", config, "--workdir", args.workdir, *args.overrides]
    status = train.main(train_args)
    if status != 0:
        return status  # 2: an error, 75: preempted (rerun to resume)
    output = Path(args.workdir) / "eval" / "final.json"
    status = evaluate.main(["--config", config, "--checkpoint", args.workdir, "--output", str(output),
                            *args.overrides])
    if status != 0:
        return status
    print()
    print(recall_table(json.loads(output.read_text())))
    print(f"outputs in {Path(args.workdir).absolute()}; the recall table is in {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
