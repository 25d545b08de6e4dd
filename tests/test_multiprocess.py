"""Several processes: jax.distributed start-up from config and environment, two processes training on loopback
(CPU collectives), and their checkpoint restored on another device count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import pytest
from conftest import REPO, tiny_overrides

from jaxretrieval.config import DistributedConfig
from jaxretrieval.sharding import initialize_distributed


@pytest.mark.parametrize(("config", "env", "expected"), [
    (DistributedConfig(), {}, None),
    (DistributedConfig(initialize="never"), {"JAX_COORDINATOR_ADDRESS": "h:1"}, None),
    (DistributedConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "h:1", "num_processes": 4, "process_id": 2}),
    (DistributedConfig(coordinator_address="c:9", num_processes=2, process_id=0),
     {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "c:9", "num_processes": 2, "process_id": 0}),
    (DistributedConfig(initialize="always"), {}, {}),  # Cloud TPU: jax detects the rest
])
def test_distributed_start_up_settings(monkeypatch, config, env, expected):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert initialize_distributed(config) is (expected is not None)
    assert calls == ([] if expected is None else [expected])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_their_checkpoint_restores_on_four_devices(demo_root, tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "jaxretrieval.train", "--config", str(REPO / "configs/demo/clip_tiny.yaml"),
               "--workdir", str(workdir), *tiny_overrides(demo_root)]
    base = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen(command, env={**base, "JAX_PROCESS_ID": str(i)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    final = json.loads((workdir / "eval" / "step_6.json").read_text())
    printed = outputs[0][0]
    assert json.loads(printed[printed.index("{"):]) == final  # the eval line, then the result
    assert "i2t_R1" not in outputs[1][0]  # process 1 reports nothing (gloo may print its own line)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(1, 7))  # one writer
    result = subprocess.run([sys.executable, "-m", "jaxretrieval.evaluate", "--checkpoint", str(workdir)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu",
                                 "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = json.loads(result.stdout)
    assert {k: restored[k] for k in final if k != "step"} == {k: v for k, v in final.items() if k != "step"}
