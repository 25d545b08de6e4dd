"""Training that never loses work: kill -9 (also mid-write), SIGTERM, damaged checkpoints, a failing evaluation, a
config changed on resume, an unwritable workdir. Resumed runs must end bit-identical to an uninterrupted one."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_overrides

from jaxretrieval import checkpoint, evaluate, train
from jaxretrieval.config import Config, load_config
from jaxretrieval.errors import EXIT_PREEMPTED, CheckpointError, ConfigError, DataError
from jaxretrieval.sharding import make_mesh

CONFIG = REPO / "configs" / "demo" / "clip_tiny.yaml"
STEPS, EVERY = 24, 4
RUN = {"train.steps": STEPS, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 3}


def run_config(root: Path, **extra) -> Config:
    """The config `python -m jaxretrieval.train --config CONFIG` with the tiny overrides gives."""
    return load_config(CONFIG, tiny_overrides(root, **{**RUN, **extra}))


def params_of(workdir: Path, step: int = STEPS) -> dict:
    config = evaluate.saved_config(workdir)
    _, params, meta = evaluate.restore_params(config, workdir / "checkpoints" / str(step), make_mesh(config.mesh))
    assert meta["step"] == step
    return jax.tree.map(np.asarray, params)


def assert_same_params(got: dict, want: dict) -> None:
    jax.tree.map(np.testing.assert_array_equal, got, want)


def loss_steps(workdir: Path) -> list[int]:
    import json

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run (checkpoints 16, 20, 24) and its final parameters."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train(run_config(demo_root), workdir)
    return workdir, params_of(workdir)


def copy_run(reference: tuple[Path, dict], tmp_path: Path) -> Path:
    shutil.copytree(reference[0], tmp_path / "run")
    return tmp_path / "run"


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def scramble(path: Path) -> None:
    """Random bytes over the middle of the file, at the same size."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 4
    data[middle:middle + len(data) // 2] = np.random.default_rng(0).bytes(len(data) // 2)
    path.write_bytes(bytes(data))


def command(workdir: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "jaxretrieval.train", "--config", str(CONFIG), "--workdir", str(workdir),
            *tiny_overrides(root, **{**RUN, "train.checkpoint_every": 2})]


def kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_and_after_a_commit_resumes_bit_identical(demo_root, tmp_path):
    """kill -9 while orbax writes a step (its temporary folder exists), then again right after a commit: each
    restart resumes from the newest committed step, and the run ends with the uninterrupted run's parameters."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(command(whole, demo_root), env=env, check=True, capture_output=True, cwd=REPO)
    folder = broken / "checkpoints"

    def writing() -> bool:
        names = os.listdir(folder) if folder.is_dir() else []
        return any("tmp" in name for name in names) and any(name.isdigit() for name in names)

    process = subprocess.Popen(command(broken, demo_root), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_when(process, writing)
    first = checkpoint.step_folders(folder)
    assert first and first[-1] < STEPS, f"not interrupted part-way (checkpoints {first})"

    process = subprocess.Popen(command(broken, demo_root), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_when(process, lambda: (checkpoint.step_folders(folder) or [0])[-1] > first[-1] + 2)
    second = checkpoint.step_folders(folder)
    assert second[-1] > first[-1] and second[-1] < STEPS, f"second kill not part-way ({first} -> {second})"

    subprocess.run(command(broken, demo_root), env=env, check=True, capture_output=True, cwd=REPO)
    assert_same_params(params_of(broken), params_of(whole))
    verdicts = checkpoint.verify_folder(broken)
    assert verdicts[-1].status == "ok" and all(v.status != "damaged" for v in verdicts)


def test_sigterm_checkpoints_the_step_reached_exits_75_and_resumes_bit_identical(demo_root, reference, tmp_path):
    workdir = tmp_path / "run"
    argv = ["--config", str(CONFIG), "--workdir", str(workdir), *tiny_overrides(demo_root, **RUN)]
    sent = {}

    def send_when_training() -> None:
        while not (workdir / "metrics.jsonl").exists() or len(loss_steps(workdir)) < 6:
            time.sleep(0.01)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_when_training, daemon=True).start()
    assert train.main(argv) == EXIT_PREEMPTED
    assert time.monotonic() - sent["at"] < 60
    steps = checkpoint.step_folders(workdir / "checkpoints")
    reached = max(loss_steps(workdir))
    assert steps[-1] == reached and 6 <= reached < STEPS
    assert checkpoint.verify_folder(workdir)[-1].status == "ok"  # sealed before the exit

    assert train.main(argv) == 0
    assert loss_steps(workdir) == list(range(1, STEPS + 1))  # nothing repeated, nothing skipped
    assert_same_params(params_of(workdir), reference[1])


@pytest.mark.parametrize("damage", ["truncate data file", "scramble data file", "truncate params manifest",
                                    "truncate meta", "truncate params _METADATA", "delete data position"])
def test_damaged_newest_checkpoint_warns_and_falls_back(demo_root, reference, tmp_path, caplog, damage):
    workdir = copy_run(reference, tmp_path)
    newest = workdir / "checkpoints" / str(STEPS)
    target = {"truncate data file": lambda: largest_file(newest / "params"),
              "scramble data file": lambda: largest_file(newest / "opt_state"),
              "truncate params manifest": lambda: newest / "params" / "manifest.ocdbt",
              "truncate meta": lambda: newest / "meta" / "metadata",
              "truncate params _METADATA": lambda: newest / "params" / "_METADATA",
              "delete data position": lambda: newest / "data" / "process_0-of-1.json"}[damage]()
    {"scramble": scramble, "delete": Path.unlink}.get(damage.split()[0], truncate)(target)

    with caplog.at_level(logging.WARNING, logger="jaxretrieval"):
        train.train(run_config(demo_root), workdir)
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warned and f"step {STEPS}" in warned[0] and str(newest) in warned[0]
    assert (workdir / "checkpoints_damaged").is_dir()
    assert loss_steps(workdir)[-EVERY:] == list(range(STEPS - EVERY + 1, STEPS + 1))  # steps 21..24 again
    assert_same_params(params_of(workdir), reference[1])


def test_damaged_newest_checkpoint_is_an_error_with_on_corrupt_error(demo_root, reference, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path)
    truncate(largest_file(workdir / "checkpoints" / str(STEPS) / "params"))
    argv = ["--config", str(CONFIG), "--workdir", str(workdir), "checkpoint.on_corrupt=error",
            *tiny_overrides(demo_root, **RUN)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint step {STEPS} at {workdir / 'checkpoints' / str(STEPS)} is damaged" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_verify_command_prints_a_line_per_checkpoint(reference, tmp_path, capsys):
    workdir = copy_run(reference, tmp_path)
    assert checkpoint.main(["verify", str(workdir)]) == 0
    assert capsys.readouterr().out.split().count("ok") == 3
    scramble(largest_file(workdir / "checkpoints" / "20" / "params"))
    assert checkpoint.main(["verify", str(workdir)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:3] for line in lines] == [["16", "ok"], ["20", "damaged"], ["24", "ok"]]
    assert "checksum mismatch" in lines[1]


@pytest.mark.parametrize("target", ["params/manifest.ocdbt", "meta/metadata", "params/_METADATA", "data file"])
def test_damaged_checkpoint_is_one_clear_error_for_every_reader(demo_root, reference, tmp_path, capsys, target):
    """evaluate, load() and train.init_from on a damaged step: one error naming its step and path."""
    import jaxretrieval

    workdir = copy_run(reference, tmp_path)
    step = workdir / "checkpoints" / str(STEPS)
    truncate(largest_file(step / "params") if target == "data file" else step / target)
    with pytest.raises(CheckpointError, match=f"checkpoint step {STEPS} at {step} is damaged.*intact: step 20"):
        jaxretrieval.load(workdir)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(step)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: checkpoint step {STEPS} at {step} is damaged: " + err.split("is damaged: ", 1)[1].splitlines()[0]]
    with pytest.raises(CheckpointError, match=f"step {STEPS}"):
        train.train(run_config(demo_root, **{"train.init_from": str(step)}), tmp_path / "new")


def test_failed_final_evaluation_keeps_the_checkpoint_and_a_rerun_only_evaluates(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    image = sorted((data / "images").glob("test_*"))[0]
    original = image.read_bytes()
    image.write_bytes(b"not an image")
    workdir, config = tmp_path / "run", run_config(data)
    with pytest.raises(DataError, match=f"evaluation at step {STEPS} failed.*{image.name}.*rerun the same command"):
        train.train(config, workdir)
    assert checkpoint.verify_folder(workdir)[-1].step == STEPS
    assert checkpoint.verify_folder(workdir)[-1].status == "ok"
    trained = loss_steps(workdir)
    assert trained[-1] == STEPS

    image.write_bytes(original)
    result = train.train(config, workdir)
    assert loss_steps(workdir) == trained  # no step trained again
    assert result["step"] == STEPS and (workdir / "eval" / f"step_{STEPS}.json").exists()
    assert train.train(config, workdir) == result  # a finished run reports its last evaluation


def test_resume_lists_config_changes_and_refuses_frozen_keys(demo_root, reference, tmp_path, caplog):
    workdir, root = copy_run(reference, tmp_path), demo_root
    with pytest.raises(ConfigError, match=r"train\.seed cannot change mid-run.*--allow-config-change"):
        train.train(run_config(root, **{"train.seed": 1}), workdir)
    assert not (workdir / f"config.step_{STEPS}.yaml").exists()

    with caplog.at_level(logging.INFO, logger="jaxretrieval"):
        train.train(run_config(root, **{"train.steps": STEPS + 2, "train.lr": 2e-3}), workdir)
    changed = [r.getMessage() for r in caplog.records if "changed config" in r.getMessage()]
    assert changed and "train.lr: 0.001 -> 0.002" in changed[0] and f"train.steps: {STEPS} -> {STEPS + 2}" in changed[0]
    assert any(f"resumed from step {STEPS} of {workdir}" in r.getMessage() for r in caplog.records)
    assert "lr: 0.001" in (workdir / f"config.step_{STEPS}.yaml").read_text()
    assert "lr: 0.002" in (workdir / "config.yaml").read_text()
    train.train(run_config(root, **{"train.steps": STEPS + 2, "train.lr": 2e-3, "train.seed": 1}), workdir,
                allow_config_change=True)


def test_unwritable_workdir_is_an_error_before_training(demo_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["--config", str(CONFIG), "--workdir", str(blocker / "run"), *tiny_overrides(demo_root, **RUN)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert f"workdir {blocker / 'run'}" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(demo_root, tmp_path):
    """launch/local.py, 2 processes x 1 device; SIGTERM to process 1 only: both checkpoint the same step (each
    writes its data position into it) and the launcher exits 75."""
    workdir = tmp_path / "run"
    port = __import__("test_multiprocess").free_port()
    launcher = subprocess.Popen(
        [sys.executable, "launch/local.py", "-n", "2", "--port", str(port), "--config", str(CONFIG),
         "--workdir", str(workdir), *tiny_overrides(demo_root, **{**RUN, "train.steps": 400})],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while (not (workdir / "metrics.jsonl").exists() or len(loss_steps(workdir)) < 5) and time.time() < deadline:
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        time.sleep(0.05)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    worker = next(pid for pid in map(int, children)
                  if b"JAX_PROCESS_ID=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    os.kill(worker, signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == EXIT_PREEMPTED, output[-3000:]
    step = checkpoint.step_folders(workdir / "checkpoints")[-1]
    assert step == max(loss_steps(workdir)) < 400
    assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert output.count(f"after step {step}; its checkpoint is") == 2, output[-3000:]


def test_a_failed_checkpoint_write_is_an_error_and_keeps_the_earlier_ones(demo_root, tmp_path, monkeypatch):
    real_save = checkpoint.save

    def disk_full_at_12(mngr, step, **items):
        if step == 12:
            raise OSError(28, "No space left on device")
        real_save(mngr, step, **items)

    monkeypatch.setattr(checkpoint, "save", disk_full_at_12)
    with pytest.raises(CheckpointError, match=r"writing checkpoint step 12 to .*12 failed .*No space left.*intact"):
        train.train(run_config(demo_root), tmp_path)
    assert [(v.step, v.status) for v in checkpoint.verify_folder(tmp_path)] == [(4, "ok"), (8, "ok")]


def test_a_workdir_without_room_for_a_checkpoint_is_an_error_before_training(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(train.OutputPathError, match=f"workdir {tmp_path} has 0 MiB free, a checkpoint needs about"):
        train.train(run_config(demo_root), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not checkpoint.step_folders(tmp_path / "checkpoints")


def test_the_command_says_it_resumed_and_where_its_outputs_are(demo_root, reference, tmp_path):
    """At default verbosity, from a fresh interpreter (absl has configured logging before ours runs)."""
    workdir = copy_run(reference, tmp_path)
    result = subprocess.run(command(workdir, demo_root), env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"INFO jaxretrieval.train: resumed from step {STEPS} of {workdir}" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"outputs in {workdir}: config.yaml, metrics.jsonl")
    assert "resuming with a changed config: train.checkpoint_every: 4 -> 2" in result.stderr
