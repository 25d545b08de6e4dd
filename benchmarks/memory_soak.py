"""Memory over a long run: trains the tiny CLIP demo for --steps steps, evaluations and checkpoints included, and
samples the training process's resident memory, to check that a long run does not grow (issue 13).

`python benchmarks/memory_soak.py [--steps 2000] [--batch-size B] [--workdir DIR] [--json OUT] [key.path=value ...]`

The run is `python -m jaxretrieval.train --config configs/demo/clip_tiny.yaml` in a child process with
`train.log_every=10`, an evaluation every steps/8 and a checkpoint every steps/10 steps (the last two kept).
Every 0.5 s the script reads VmRSS from /proc/<pid>/status for the trainer and any processes below it, and the
step reached from the last line of metrics.jsonl. RSS swings by a few hundred MiB within every step (memory
taken and handed back to the system in each step), so a single sample says little: RSS "at" a step is
the highest and the lowest sample over the 5% of the run up to it (start: just after the first logged step, i.e.
after compilation). Growth is end over middle, for both; the run passes when both stay below 5%, else exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import environment

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo/clip_tiny.yaml"
LOG_EVERY = 10
LIMIT_PCT = 5.0
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def rss_mib(pid: int) -> float:
    """VmRSS of one process in MiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from the parent ids in /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def last_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl; 0 before the first."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line still being written
    return 0


def rss_at(samples: list[dict[str, Any]], lo: int, hi: int) -> tuple[float, float]:
    """(highest, lowest) RSS sampled while the step reached was in [lo, hi]."""
    window = [s["rss_mib"] for s in samples if lo <= s["step"] <= hi]
    return max(window), min(window)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the demo config's")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--json", type=Path, default=None, help="save the samples and the summary here")
    parser.add_argument("overrides", nargs="*", help="more key.path=value for the trainer (e.g. train.eval_every=0)")
    args = parser.parse_args()
    if args.steps < 20 * LOG_EVERY:
        parser.error(f"--steps must be at least {20 * LOG_EVERY}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="memory_soak_"))
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        parser.error(f"{workdir} already holds a run (it would resume); give an empty --workdir")
    workdir.mkdir(parents=True, exist_ok=True)

    overrides = [f"train.steps={args.steps}", f"train.log_every={LOG_EVERY}", f"train.eval_every={args.steps // 8}",
                 f"train.checkpoint_every={args.steps // 10}", "train.keep_checkpoints=2", "train.progress_bar=false"]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    overrides += args.overrides
    command = [sys.executable, "-m", "jaxretrieval.train", "--config", CONFIG, "--workdir", str(workdir), *overrides]
    env = environment(threads=os.cpu_count() or 0, packages=PACKAGES)
    env["ram_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)  # MemTotal, kB
    print(json.dumps(env))
    print("running:", " ".join(command[1:]), flush=True)

    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    with (workdir / "train.log").open("w") as log:
        trainer = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        while trainer.poll() is None:
            rss = rss_mib(trainer.pid) + sum(rss_mib(child) for child in descendants(trainer.pid))
            if rss:
                samples.append({"t": round(time.monotonic() - start, 2), "step": last_step(metrics),
                                "rss_mib": round(rss, 1)})
            time.sleep(0.5)
    if trainer.returncode != 0:
        print((workdir / "train.log").read_text()[-4000:], file=sys.stderr)
        print(f"error: training exited with {trainer.returncode}; workdir kept: {workdir}", file=sys.stderr)
        return 2

    window, middle = args.steps // 20, args.steps // 2
    rows = {"start (after compile)": (LOG_EVERY, *rss_at(samples, LOG_EVERY, LOG_EVERY + window)),
            "middle": (middle, *rss_at(samples, middle - window, middle)),
            "end": (args.steps, *rss_at(samples, args.steps - window, args.steps))}
    peak = max(samples, key=lambda s: s["rss_mib"])
    growth = {kind: 100 * (rows["end"][i] / rows["middle"][i] - 1) for i, kind in ((1, "high"), (2, "low"))}
    verdict = "PASS" if max(growth.values()) < LIMIT_PCT else "FAIL"

    print(f"\n{args.steps} steps in {samples[-1]['t']:.0f} s, {len(samples)} samples\n")
    print("| point | step | RSS high (MiB) | RSS low (MiB) |\n|---|---|---|---|")
    for name, (step, high, low) in rows.items():
        print(f"| {name} | {step} | {high:.1f} | {low:.1f} |")
    print(f"| peak | {peak['step']} | {peak['rss_mib']:.1f} | |")
    print(f"\ngrowth over the second half: high {growth['high']:+.2f}%, low {growth['low']:+.2f}% "
          f"(limit < {LIMIT_PCT:.0f}%): {verdict}")

    if args.json:
        summary = {name: {"step": step, "high_mib": high, "low_mib": low} for name, (step, high, low) in rows.items()}
        args.json.write_text(json.dumps({"environment": env, "command": command[1:], "summary": summary, "peak": peak,
                                         "growth_pct": growth, "verdict": verdict, "samples": samples}) + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
