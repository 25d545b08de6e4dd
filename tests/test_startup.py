"""Start-up: a resumed run and a run from train.init_from never pay for a random init, and the persistent
compilation cache is on by default beside the workdir."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config

from jaxretrieval import checkpoint, train
from jaxretrieval.models import init_params


def refuse_random_init(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("random initialisation ran")

    monkeypatch.setattr(train, "init_params", refuse)


def test_a_resumed_run_restores_without_a_random_init(demo_root, tmp_path, monkeypatch):
    train.train(tiny_config(demo_root, **{"train.steps": 2, "train.checkpoint_every": 2}), tmp_path / "run")
    refuse_random_init(monkeypatch)
    result = train.train(tiny_config(demo_root, **{"train.steps": 4, "train.checkpoint_every": 2}), tmp_path / "run")
    assert result["step"] == 4


def test_init_from_reads_parameters_without_a_random_init(demo_root, tmp_path, monkeypatch):
    config = tiny_config(demo_root, **{"train.steps": 1})
    start = tmp_path / "start"
    checkpoint.write_model(start, init_params(config, seed=9, precision="fp32"), {"config": {}})
    refuse_random_init(monkeypatch)
    result = train.train(tiny_config(demo_root, **{"train.steps": 1, "train.init_from": str(start)}),
                         tmp_path / "run")
    assert result["step"] == 1


@pytest.mark.slow
def test_the_compilation_cache_is_on_beside_the_workdir(demo_root, tmp_path):
    """Without JAX_COMPILATION_CACHE_DIR the first run fills runs/.jax_cache; train.compilation_cache=off leaves
    no cache."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    command = [sys.executable, "-m", "jaxretrieval.train", "--config", str(REPO / "configs/demo/clip_tiny.yaml"),
               "model.image.layers=1", "model.text.layers=1", "model.image.width=32", "model.text.width=32",
               "model.image.heads=2", "model.text.heads=2", "model.embed_dim=16", "data.kind=jsonl",
               f"data.root={demo_root}", "train.batch_size=16", "train.steps=1", "train.progress_bar=false",
               "eval.batch_size=16"]
    for name, extra in (("on", []), ("off", ["train.compilation_cache=off"])):
        runs = tmp_path / name
        runs.mkdir()
        subprocess.run([*command, "--workdir", str(runs / "run"), *extra], env=env, cwd=REPO, check=True,
                       capture_output=True, timeout=300)
        cache = runs / ".jax_cache"
        if name == "on":
            assert cache.is_dir() and any(cache.iterdir())
        else:
            assert not cache.exists()
