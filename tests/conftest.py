"""Shared fixtures: a small generated demo dataset and tiny-run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One persistent compilation cache for the suite and the subprocesses it starts: the same tiny models are compiled
# by many tests, each in a fresh jit (or a fresh interpreter). Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
INSTALL = ('pip install -e ".[test]" -c constraints-test.txt && pip install --no-deps torchscale==0.3.0 '
           'fairscale==0.4.13')
_importorskip = pytest.importorskip


def importorskip(modname: str, *args, **kwargs):
    """pytest.importorskip, except that in CI (CI=true) a missing reference package fails the run instead of
    silently skipping its parity tests; locally the skip names the install command."""
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as e:
        message = f"reference package '{modname}' is missing ({e.msg}); install the test dependencies: {INSTALL}"
        if IN_CI:
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


pytest.importorskip = importorskip

from jaxretrieval.config import Config, load_config  # noqa: E402
from jaxretrieval.data.demo import generate_demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_train=256, num_test=32)


def tiny_overrides(root: Path, **extra) -> list[str]:
    """Overrides for a few-second run of the tiny model on the small demo dataset."""
    values = {
        "model.name": "tiny", "model.image.width": 32, "model.image.layers": 1, "model.image.heads": 2,
        "model.text.width": 32, "model.text.layers": 1, "model.text.heads": 2, "model.embed_dim": 16,
        "data.kind": "jsonl", "data.root": str(root), "train.batch_size": 16, "train.steps": 6,
        "train.warmup_steps": 2, "train.lr": 1e-3, "train.log_every": 1, "train.checkpoint_every": 3,
        "train.progress_bar": False, "eval.batch_size": 16,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(root: Path, **extra) -> Config:
    return load_config(None, tiny_overrides(root, **extra))


def run_python(code: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (JAX fixes its device count at start-up)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
