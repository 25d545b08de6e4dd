"""What the side-by-side benchmarks share: step timing, the host and package record, one framework per fresh process,
and the median of alternating rounds."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[float, float, list[Any]]:
    """(first step seconds, median step seconds after warmup, what every step returned); `step` must block until
    it is done."""
    times, outputs = [], []
    for _ in range(max(warmup, 1) + steps):
        start = time.perf_counter()
        outputs.append(step())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[max(warmup, 1):]), outputs


def time_trainer_step(config: Any, host_batch: dict, warmup: int, steps: int) -> dict[str, Any]:
    """jaxretrieval's own jitted train step (`train.setup_training`) on one batch, timed by `time_steps`: the row
    of the side-by-side table."""
    import jax
    import numpy as np

    from jaxretrieval import train
    from jaxretrieval.sharding import global_batch, make_mesh

    mesh = make_mesh(config.mesh)
    _, params, opt_state, step_fn = train.setup_training(config, mesh)
    batch = global_batch(host_batch, mesh)
    state = {"params": params, "opt": opt_state, "step": 0}

    def step() -> None:
        state["step"] += 1
        state["params"], state["opt"], metrics = step_fn(state["params"], state["opt"], batch,
                                                         np.int32(state["step"]))
        float(jax.block_until_ready(metrics["loss"]))

    first, median, _ = time_steps(step, warmup, steps)
    return {"framework": "jaxretrieval", "device": jax.devices()[0].device_kind, "first_step_s": first,
            "step_s": median}


def torch_device_name(device: Any) -> str:
    """The GPU's name for a CUDA torch device, else "cpu"."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def time_torch_step(framework: str, device: Any, step: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    """A torch side's row of the side-by-side table: `step` (blocking) timed by `time_steps` on `device`."""
    first, median, _ = time_steps(step, warmup, steps)
    return {"framework": framework, "device": torch_device_name(device), "first_step_s": first, "step_s": median}


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(threads: int, packages: Sequence[str]) -> dict[str, Any]:
    """Host, thread count and package versions, read without starting jax or torch (the children do that)."""
    return {"date": date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), **{name: package_version(name) for name in packages}}


def run_isolated(script: str, name: str, argv: list[str]) -> dict[str, Any]:
    """Runs `script` for one framework in a fresh process, so neither's thread pools or allocator touch the other's
    run; its row comes back through --json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, script, *argv, "--frameworks", name, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]


def alternating_rounds(script: str, frameworks: list[str], argv: list[str], rounds: int) -> list[dict[str, Any]]:
    """Each framework's median round (by step time) of `rounds` alternating runs, with every round's step time."""
    runs = [run_isolated(script, name, argv) for _ in range(rounds) for name in frameworks]
    rows = []
    for i in range(len(frameworks)):
        mine = runs[i::len(frameworks)]  # runs are round-major
        median = sorted(mine, key=lambda r: r["step_s"])[(len(mine) - 1) // 2]
        rows.append({**median, "round_step_s": [r["step_s"] for r in mine]})
    return rows


def print_rounds(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if len(row.get("round_step_s", [])) > 1:
            print(f"{row['framework']} rounds (ms/step): " + ", ".join(f"{t * 1e3:.0f}" for t in row["round_step_s"]))


def print_step_table(rows: list[dict[str, Any]], flops: float, batch: int, title: str, unit: str = "step",
                     per: str = "samples", peak_tflops: float | None = None) -> None:
    """The side-by-side table: per framework its median `unit` time, `per`/s, TFLOP/s from the analytic `flops`,
    MFU against `peak_tflops`, the first call, and each other framework's time over jaxretrieval's."""
    ours = next((r["step_s"] for r in rows if r["framework"] == "jaxretrieval"), None)
    print(f"\n{title}, {flops / 1e9:.0f} GFLOP/{unit} (analytic)\n")
    print(f"| framework | device | {unit} (ms, median) | {per}/s | TFLOP/s | MFU | first {unit} (s) | jax speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tflops = flops / r["step_s"] / 1e12
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "-"
        ratio = f"{r['step_s'] / ours:.2f}x" if ours and r["framework"] != "jaxretrieval" else ""
        print(f"| {r['framework']} | {r['device']} | {r['step_s'] * 1e3:.1f} | {batch / r['step_s']:.1f} | "
              f"{tflops:.3f} | {mfu} | {r['first_step_s']:.2f} | {ratio} |")
    print_rounds(rows)


def add_step_options(parser: Any, *, steps: int, warmup: int) -> None:
    """The options every side-by-side step benchmark takes beside its sizes."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--frameworks", default="jax,torch")
    parser.add_argument("--json", default=None)


def side_by_side(script: str, argv: list[str], args: Any, benches: dict[str, Callable[[], dict[str, Any]]],
                 packages: Sequence[str]) -> list[dict[str, Any]]:
    """With several --frameworks: the environment line, then each framework in fresh processes over --rounds
    (`alternating_rounds`); with one: that framework's row measured in this process."""
    frameworks = args.frameworks.split(",")
    if len(frameworks) == 1:
        return [benches[frameworks[0]]()]
    print(" | ".join(f"{k}: {v}" for k, v in environment(0, packages).items()))
    return alternating_rounds(script, frameworks, argv, args.rounds)


def save_rows(path: str | None, rows: list[dict[str, Any]]) -> None:
    """The rows as JSON (--json), for a parent process or a later table."""
    if path:
        Path(path).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
