"""launch/: the dry-runs print exactly the expected commands, bad arguments exit 2 naming the argument, printed
commands survive the shells they pass through, and the local launcher runs processes and reports failures."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

if str(REPO) not in sys.path:  # `launch` is not an installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from launch import local, slurm, tpu_pod  # noqa: E402
from launch.common import LaunchError, run_commands  # noqa: E402

CONFIG = "configs/demo/clip_tiny.yaml"
TRICKY = ["train.steps=1000", "data.root=/data/my images", "train.name=it's \"x\""]  # a space, ' and "
ZONE = ["--zone", "us-central2-b"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("XLA_FLAGS", raising=False)


def fake_program(folder: Path, name: str, body: str) -> Path:
    """An executable Python script `folder/name` running `body` with the current interpreter."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
    path.chmod(0o755)
    return path


def lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


# --- Cloud TPU -------------------------------------------------------------------------------------------------------

def test_tpu_all_dry_run_prints_every_command(capsys):
    argv = ["all", "my-pod", *ZONE, "--accelerator-type", "v4-32", "--spot", "--config", str(REPO / CONFIG),
            "--workdir", "gs://my-bucket/runs/demo", *TRICKY[:1], "--dry-run", *TRICKY[1:]]
    assert tpu_pod.main(argv) == 0
    ssh = "gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --worker=all --command"
    scp = "gcloud compute tpus tpu-vm scp my-pod:jaxretrieval/train.log logs/my-pod/worker-{0}.log " \
          "--zone us-central2-b --worker={0}"
    train = ("python3 -m jaxretrieval.train --config configs/demo/clip_tiny.yaml --workdir gs://my-bucket/runs/demo "
             "distributed.initialize=always "
             "train.steps=1000 'data.root=/data/my images' 'train.name=it'\"'\"'s \"x\"'")
    assert lines(capsys) == [
        "gcloud compute tpus tpu-vm create my-pod --zone us-central2-b --accelerator-type v4-32 "
        "--version tpu-ubuntu2204-base --spot",
        f"git -C {shlex.quote(str(REPO))} archive --format=tar.gz -o /tmp/my-pod-code.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/my-pod-code.tar.gz my-pod:jaxretrieval-code.tar.gz "
        "--zone us-central2-b --worker=all",
        f"{ssh} " + shlex.quote("mkdir -p jaxretrieval && tar -xzf jaxretrieval-code.tar.gz -C jaxretrieval "
                                '&& cd jaxretrieval && python3 -m pip install -e ".[tpu]"'),
        f"{ssh} " + shlex.quote(f"cd jaxretrieval && set -o pipefail && {train} 2>&1 | tee train.log"),
        "mkdir -p logs/my-pod",
        *(scp.format(i) for i in range(4)),
        "gcloud compute tpus tpu-vm delete my-pod --zone us-central2-b --quiet",
    ]


def test_tpu_single_steps_project_runtime_and_git_clone(capsys):
    assert tpu_pod.main(["create", "pod-2", "--zone", "europe-west4-a", "--project", "my-proj-1",
                         "--accelerator-type", "v6e-8", "--preemptible", "--dry-run"]) == 0
    assert tpu_pod.main(["setup", "pod-2", "--zone", "europe-west4-a", "--repo-url", "https://example.com/r.git",
                         "--ref", "v0.1", "--python", "python3.11", "--dry-run"]) == 0
    assert tpu_pod.main(["logs", "pod-2", "--zone", "europe-west4-a", "--workers", "1", "--local-dir", "out",
                         "--dry-run"]) == 0
    install = ("(test -d jaxretrieval/.git || git clone https://example.com/r.git jaxretrieval) && cd jaxretrieval "
               '&& git fetch --quiet origin v0.1 && git checkout --quiet --force FETCH_HEAD '
               '&& python3.11 -m pip install -e ".[tpu]"')
    assert lines(capsys) == [
        "gcloud compute tpus tpu-vm create pod-2 --zone europe-west4-a --project my-proj-1 --accelerator-type v6e-8 "
        "--version v2-alpha-tpuv6e --preemptible",
        "gcloud compute tpus tpu-vm ssh pod-2 --zone europe-west4-a --worker=all --command " + shlex.quote(install),
        "mkdir -p out",
        "gcloud compute tpus tpu-vm scp pod-2:jaxretrieval/train.log out/worker-0.log --zone europe-west4-a "
        "--worker=0",
    ]


@pytest.mark.parametrize("accelerator, hosts", [("v2-8", 1), ("v3-32", 4), ("v4-8", 1), ("v4-32", 4),
                                                ("v5p-128", 16), ("v5litepod-8", 1), ("v5litepod-16", 4),
                                                ("v6e-256", 64)])
def test_tpu_workers_per_accelerator_type(accelerator, hosts):
    assert tpu_pod.workers(accelerator) == hosts


def test_tpu_remote_command_passes_overrides_through_the_worker_shell(tmp_path, capsys):
    """Runs the --command of `run` in bash as a worker would, with a fake python that records its arguments."""
    python = fake_program(tmp_path, "python", "print(json.dumps(sys.argv[1:]))")
    (tmp_path / "jaxretrieval").mkdir()
    assert tpu_pod.main(["run", "my-pod", *ZONE, "--config", CONFIG, "--python", str(python), *TRICKY,
                         "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    subprocess.run(["bash", "-c", argv[argv.index("--command") + 1]], cwd=tmp_path, check=True, capture_output=True)
    logged = json.loads((tmp_path / "jaxretrieval" / "train.log").read_text())
    assert logged == ["-m", "jaxretrieval.train", "--config", CONFIG, "distributed.initialize=always", *TRICKY]


def test_tpu_failing_step_stops_with_its_exit_code_and_the_delete_command(tmp_path, monkeypatch, capsys):
    fake_program(tmp_path, "gcloud", "sys.exit(5)")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert tpu_pod.main(["run", "my-pod", *ZONE, "--config", CONFIG]) == 5
    out, err = capsys.readouterr()
    assert out.startswith("+ gcloud compute tpus tpu-vm ssh my-pod")
    assert "step 1 of 1 failed with exit code 5" in err
    assert "gcloud compute tpus tpu-vm delete my-pod --zone us-central2-b --quiet" in err


def test_run_commands_stops_at_the_first_failure(tmp_path, capsys):
    marker = tmp_path / "marker"
    with pytest.raises(LaunchError) as failure:
        run_commands([["true"], ["false"], ["touch", str(marker)]], dry_run=False)
    assert failure.value.code == 1 and "step 2 of 3 failed with exit code 1: false" in str(failure.value)
    assert lines(capsys) == ["+ true", "+ false"] and not marker.exists()
    with pytest.raises(LaunchError) as missing:
        run_commands([["no-such-program-here"]], dry_run=False)
    assert missing.value.code == 127 and "command not found" in str(missing.value)


# --- SLURM -----------------------------------------------------------------------------------------------------------

SLURM_JOB = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00", "--output",
             "logs/%x-%j.out"]
SLURM_TRAIN = ["--config", CONFIG, "--workdir", "/shared/runs/demo", *TRICKY]


def test_slurm_dry_run_prints_the_script_and_sbatch(capsys):
    assert slurm.main([*SLURM_JOB, "--prelude", "source .venv/bin/activate", *SLURM_TRAIN, "--dry-run"]) == 0
    task = ("export JAX_PROCESS_ID=$SLURM_PROCID; exec python -m jaxretrieval.train --config "
            "configs/demo/clip_tiny.yaml --workdir /shared/runs/demo train.steps=1000 'data.root=/data/my images' "
            "'train.name=it'\"'\"'s \"x\"'")
    assert lines(capsys) == [
        "cat > jaxretrieval.sbatch <<'EOF'",
        "#!/bin/bash",
        "#SBATCH --job-name=jaxretrieval",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=12:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --output=logs/%x-%j.out",
        "# Written by launch/slurm.py: one JAX process per node, rank 0 on the first node.",
        "set -eo pipefail",
        "source .venv/bin/activate",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'export JAX_COORDINATOR_ADDRESS="$head_node:8476"',
        'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
        "srun --ntasks-per-node=1 --cpus-per-task=8 --kill-on-bad-exit=1 bash -c " + shlex.quote(task),
        "EOF",
        "mkdir -p logs",
        "sbatch jaxretrieval.sbatch",
    ]


def test_slurm_script_runs_under_fake_scontrol_and_srun(tmp_path):
    """The written script, run by bash: coordinator on the first node, rank from SLURM_PROCID, overrides intact.
    scontrol lists many nodes: a `| head -n 1` would die of SIGPIPE under pipefail."""
    fake_program(tmp_path, "scontrol", "print('node-a'); print('\\n'.join(f'node-{i}' for i in range(20000)))")
    fake_program(tmp_path, "srun", "args = [a for a in sys.argv[1:] if not a.startswith('--')]\n"
                                   "os.execvpe(args[0], args, {**os.environ, 'SLURM_PROCID': '1'})")
    keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]
    python = fake_program(tmp_path, "python", f"print(json.dumps([sys.argv[1:], [os.environ[k] for k in {keys}]]))")
    script = tmp_path / "job.sbatch"
    assert slurm.main([*SLURM_JOB, *SLURM_TRAIN, "--python", str(python), "--script", str(script)]) == 0
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv, values = json.loads(result.stdout)
    assert argv == ["-m", "jaxretrieval.train", "--config", CONFIG, "--workdir", "/shared/runs/demo", *TRICKY]
    assert values == ["node-a:8476", "2", "1"]


def test_slurm_writes_then_submits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / CONFIG)
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "1", "--config", config]) == 0
    assert "#SBATCH --nodes=1" in (tmp_path / "jaxretrieval.sbatch").read_text()
    assert lines(capsys) == ["wrote jaxretrieval.sbatch", "submit with: sbatch jaxretrieval.sbatch"]
    fake_program(tmp_path, "sbatch", "print('Submitted batch job 42'); sys.exit(int(os.environ['SBATCH_CODE']))")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_CODE", "0")
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "1", "--config", config, "--submit"]) == 0
    monkeypatch.setenv("SBATCH_CODE", "4")
    assert slurm.main(["--nodes", "1", "--gpus-per-node", "1", "--config", config, "--submit"]) == 4
    assert "failed with exit code 4: sbatch jaxretrieval.sbatch" in capsys.readouterr().err


# --- local -----------------------------------------------------------------------------------------------------------

def test_local_dry_run_prints_environment_and_command(capsys):
    assert local.main(["-n", "2", "--devices-per-process", "4", "--port", "9000", "--python", "python",
                       "--config", CONFIG, *TRICKY, "--dry-run"]) == 0
    env = ("JAX_COORDINATOR_ADDRESS=127.0.0.1:9000 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={} JAX_PLATFORMS=cpu "
           "PYTHONUNBUFFERED=1 XLA_FLAGS=--xla_force_host_platform_device_count=4")
    command = ("python -m jaxretrieval.train --config configs/demo/clip_tiny.yaml train.steps=1000 "
               "'data.root=/data/my images' 'train.name=it'\"'\"'s \"x\"'")
    assert lines(capsys) == [f"{env.format(0)} {command}", f"{env.format(1)} {command}"]


def test_local_runs_processes_with_prefixed_output(capsys):
    code = "import os; print('process', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'])"
    assert local.main(["-n", "2", "--", sys.executable, "-c", code]) == 0
    assert sorted(lines(capsys)) == ["[0] process 0 of 2", "[1] process 1 of 2"]


def test_local_reports_the_failing_process_and_stops_the_others(capsys):
    code = "import os, sys, time\nif os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)"
    assert local.main(["-n", "3", "--", sys.executable, "-c", code]) == 3
    assert "process 1 exited with code 3" in capsys.readouterr().err


# --- bad arguments ---------------------------------------------------------------------------------------------------

TPU_RUN = ["run", "my-pod", *ZONE, "--config", CONFIG]
SLURM_OK = ["--nodes", "1", "--gpus-per-node", "1", "--config", CONFIG]
BAD = [
    (tpu_pod, ["create", "My_Pod", *ZONE, "--accelerator-type", "v4-32"], "'My_Pod' is not a valid TPU name"),
    (tpu_pod, ["delete", "1pod", *ZONE], "'1pod' is not a valid TPU name"),
    (tpu_pod, ["delete", "pod-", *ZONE], "'pod-' is not a valid TPU name"),
    (tpu_pod, ["delete", "p" * 64, *ZONE], "is not a valid TPU name"),
    (tpu_pod, ["create", "pod", *ZONE, "--accelerator-type", "v4_32"], "argument --accelerator-type: 'v4_32'"),
    (tpu_pod, ["create", "pod", *ZONE, "--accelerator-type", "v7-8"], "argument --accelerator-type: 'v7-8'"),
    (tpu_pod, ["create", "pod", *ZONE, "--accelerator-type", "v4-0"], "argument --accelerator-type: 'v4-0'"),
    (tpu_pod, ["create", "pod", *ZONE], "create needs --accelerator-type"),
    (tpu_pod, ["create", "pod", *ZONE, "--accelerator-type", "v4-8", "--spot", "--preemptible"], "--preemptible"),
    (tpu_pod, ["delete", "pod", "--zone", "us-central2"], "argument --zone: 'us-central2'"),
    (tpu_pod, ["delete", "pod"], "--zone"),
    (tpu_pod, ["delete", "pod", *ZONE, "--project", "X"], "argument --project: 'X'"),
    (tpu_pod, ["delete", "pod", *ZONE, "stray"], "unrecognized arguments: stray"),
    (tpu_pod, ["logs", "pod", *ZONE], "logs needs --workers or --accelerator-type"),
    (tpu_pod, ["logs", "pod", *ZONE, "--workers", "0"], "argument --workers: 0 is out of range"),
    (tpu_pod, ["setup", "pod", *ZONE, "--remote-dir", "a b"], "argument --remote-dir: 'a b'"),
    (tpu_pod, ["run", "pod", *ZONE, "--config", "nope.yaml"], "argument --config: no such file: 'nope.yaml'"),
    (tpu_pod, ["run", "pod", *ZONE], "--config"),
    (tpu_pod, [*TPU_RUN, "train.steps"], "override 'train.steps' must look like key.path=value"),
    (tpu_pod, [*TPU_RUN, "=5"], "override '=5'"),
    (tpu_pod, [*TPU_RUN, "train steps=5"], "override 'train steps=5'"),
    (tpu_pod, [*TPU_RUN, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (slurm, ["--nodes", "0", "--gpus-per-node", "1", "--config", CONFIG], "argument --nodes: 0 is out of range"),
    (slurm, ["--nodes", "1", "--gpus-per-node", "x", "--config", CONFIG], "argument --gpus-per-node: 'x'"),
    (slurm, ["--gpus-per-node", "1", "--config", CONFIG], "--nodes"),
    (slurm, [*SLURM_OK, "--time", "1h"], "argument --time: '1h'"),
    (slurm, [*SLURM_OK, "--job-name", "a b"], "argument --job-name: 'a b'"),
    (slurm, [*SLURM_OK, "--partition", "gpu;rm"], "argument --partition: 'gpu;rm'"),
    (slurm, [*SLURM_OK, "--port", "80"], "argument --port: 80 is out of range"),
    (slurm, [*SLURM_OK, "lr"], "override 'lr'"),
    (slurm, ["--nodes", "1", "--gpus-per-node", "1", "--config", "nope.yaml"], "no such file: 'nope.yaml'"),
    (local, ["-n", "0", "--config", CONFIG], "argument -n/--num-processes: 0 is out of range"),
    (local, ["--devices-per-process", "0", "--config", CONFIG], "argument --devices-per-process: 0"),
    (local, ["--port", "70000", "--config", CONFIG], "argument --port: 70000 is out of range"),
    (local, ["-n", "2"], "--config (or a command after --)"),
    (local, ["--config", CONFIG, "--", "true"], "not both"),
    (local, ["--config", CONFIG, "oops"], "override 'oops'"),
]


@pytest.mark.parametrize("module, argv, message", BAD, ids=[" ".join(argv)[:60] for _, argv, _ in BAD])
def test_bad_arguments_exit_2_naming_them(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_tpu_config_must_be_inside_the_repository(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: tiny\n")
    with pytest.raises(SystemExit) as exit_:
        tpu_pod.main(["run", "pod", *ZONE, "--config", str(config)])
    assert exit_.value.code == 2 and "is outside the repository" in capsys.readouterr().err


@pytest.mark.parametrize("invocation", [["launch/tpu_pod.py"], ["launch/slurm.py"], ["launch/local.py"],
                                        ["-m", "launch.tpu_pod"], ["-m", "launch.slurm"], ["-m", "launch.local"]])
def test_help_from_the_repository_root(invocation):
    result = subprocess.run([sys.executable, *invocation, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python launch/")
