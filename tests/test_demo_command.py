"""The README's first quick-start command, run as a user would: it must train, evaluate and reach at least half
the recall the README reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_demo_command_reaches_half_the_readme_recall(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "jaxretrieval.demo", "--workdir", "runs/demo"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "demo" / "eval" / "step_300.json").read_text())
    assert (metrics["num_images"], metrics["num_texts"]) == (200, 600)
    assert metrics["step"] == 300
    # The README's table: t2i R@1 64.5, i2t R@1 65.0 (chance 0.5); the gate is about half of that.
    assert metrics["t2i_R1"] >= 33 and metrics["i2t_R1"] >= 32, metrics
    assert result.stdout.count("text -> image") == 1 and "image -> text" in result.stdout  # the table, once
    assert "{" not in result.stdout  # no JSON dump on the terminal: it is in eval/step_300.json
