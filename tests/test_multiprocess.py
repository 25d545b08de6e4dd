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
from jaxretrieval.retrieval.metrics import metrics_table
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


def train_command(workdir, processes: int, devices: int, demo_root, *overrides: str) -> list[tuple[list, dict]]:
    """(command, environment) of each process of one training run."""
    command = [sys.executable, "-m", "jaxretrieval.train", "--config", str(REPO / "configs/demo/clip_tiny.yaml"),
               "--workdir", str(workdir), *tiny_overrides(demo_root), *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if processes == 1:
        return [(command, env)]
    env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": str(processes)}
    return [(command, {**env, "JAX_PROCESS_ID": str(i)}) for i in range(processes)]


def run_processes(commands: list[tuple[list, dict]]) -> list[str]:
    procs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command, env in commands]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def logged(workdir) -> dict[int, dict]:
    return {record["step"]: record for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in record}


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_on_four_devices(demo_root, tmp_path):
    """Two processes x one device take the same steps as one process x two devices (one global data order, the
    same global batches); their step-3 checkpoint resumes on one process x four devices and continues the run."""
    reference, split = tmp_path / "one_process", tmp_path / "two_processes"
    run_processes(train_command(reference, 1, 2, demo_root, "mesh.data=2"))
    outputs = run_processes(train_command(split, 2, 1, demo_root, "train.steps=3"))
    # Process 0 prints the final metrics once, as the table of eval/step_3.json; process 1 prints none.
    final = json.loads((split / "eval/step_3.json").read_text())
    assert metrics_table(final, "step 3 (test split)") in outputs[0]
    assert "text -> image" not in outputs[1]  # (gloo may print its own line)
    assert sorted(logged(split)) == [1, 2, 3]  # one writer

    run_processes(train_command(split, 1, 4, demo_root))  # resumes from step 3 on another process and device count
    expected, found = logged(reference), logged(split)
    assert sorted(found) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "logit_scale"):
            assert found[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert expected[6]["loss"] != pytest.approx(expected[1]["loss"], rel=1e-3)  # the runs moved
    final, reference_final = (json.loads((w / "eval/step_6.json").read_text()) for w in (split, reference))
    assert final == pytest.approx(reference_final, abs=1e-9)
