"""README promises of launch/: `launch/local.py -n 2` really trains (one global data order: the same run as one
process with two devices), and the TPU pod / SLURM flags land where they belong in the printed commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_overrides

if str(REPO) not in sys.path:  # `launch` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from jaxretrieval import checkpoint, evaluate  # noqa: E402
from jaxretrieval.config import MeshConfig  # noqa: E402
from jaxretrieval.sharding import make_mesh  # noqa: E402
from launch import slurm, tpu_pod  # noqa: E402

CONFIG = "configs/demo/clip_tiny.yaml"
ZONE = ["--zone", "us-central2-b"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_local_launcher_trains_two_processes_as_one_process_with_two_devices(demo_root, tmp_path):
    overrides = tiny_overrides(demo_root, **{"train.steps": 2, "train.checkpoint_every": 2})
    launched, reference = tmp_path / "launched", tmp_path / "reference"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith("JAX_COMPILATION")
           or k.startswith("JAX_PERSISTENT")}
    env.pop("XLA_FLAGS", None)
    launcher = subprocess.Popen(
        [sys.executable, "launch/local.py", "-n", "2", "--port", str(free_port()), "--config", CONFIG,
         "--workdir", str(launched), *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.Popen(
        [sys.executable, "-m", "jaxretrieval.train", "--config", CONFIG, "--workdir", str(reference), *overrides,
         "mesh.data=2"],
        cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = launcher.communicate(timeout=600)
    single_out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, single_out[-3000:]
    assert launcher.returncode == 0, out[-3000:]

    lines = out.splitlines()
    assert all(line[:4] in ("[0] ", "[1] ") for line in lines), lines[:5]
    assert any(line.startswith("[0] ") and "text -> image" in line for line in lines)  # process 0 reports
    assert not any(line.startswith("[1] ") and "text -> image" in line for line in lines)

    records = logged(launched)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # every step once: one writer
    assert [r["step"] for r in records if "eval_i2t_R1" in r] == [2]
    verdicts = checkpoint.verify_folder(launched)
    assert [(v.step, v.status) for v in verdicts] == [(2, "ok")]

    expected = {r["step"]: r for r in logged(reference) if "loss" in r}
    for record in (r for r in records if "loss" in r):
        for key in ("loss", "grad_norm", "logit_scale"):
            assert record[key] == pytest.approx(expected[record["step"]][key], rel=1e-6, abs=1e-6), key
    got, want = (json.loads((w / "eval" / "step_2.json").read_text()) for w in (launched, reference))
    assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-6)

    config = evaluate.saved_config(reference)
    mesh = make_mesh(MeshConfig())  # the checkpoints restore on this process's device(s)
    params = [jax.tree.map(np.asarray, evaluate.restore_params(config, w, mesh)[1]) for w in (launched, reference)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), *params)


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_tpu_pod_all_keep_leaves_the_vm_up(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    common = ["all", "my-pod", *ZONE, "--accelerator-type", "v4-16", "--config", CONFIG, "--dry-run"]
    assert tpu_pod.main(common) == 0
    full = lines(capsys)
    assert tpu_pod.main([*common, "--keep"]) == 0
    kept = lines(capsys)
    delete = "gcloud compute tpus tpu-vm delete my-pod --zone us-central2-b --quiet"
    assert full[-1] == delete and kept == full[:-1]  # every other step stays, in order
    assert not any("delete" in line for line in kept)
    assert sum("scp my-pod:jaxretrieval/train.log" in line for line in kept) == 2  # logs of both workers


def test_slurm_account_and_cpus_per_task_land_in_the_header_and_srun(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "4", "--account", "my-lab", "--cpus-per-task", "12",
                       "--partition", "gpu", "--config", CONFIG, "--dry-run"]) == 0
    out = lines(capsys)
    header = out[:out.index("# Written by launch/slurm.py: one JAX process per node, rank 0 on the first node.")]
    assert "#SBATCH --account=my-lab" in header and "#SBATCH --cpus-per-task=12" in header
    assert header.index("#SBATCH --partition=gpu") < header.index("#SBATCH --account=my-lab")
    srun = [line for line in out if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0].startswith("srun --ntasks-per-node=1 --cpus-per-task=12 --kill-on-bad-exit=1 ")
    assert not any("cpus-per-task=8" in line or "account" in line for line in out if line not in header)
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "4", "--config", CONFIG, "--dry-run"]) == 0
    assert not any("--account" in line for line in lines(capsys))  # no account unless given
