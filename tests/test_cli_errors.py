"""Every command turns bad input into one `error: ...` line naming what to fix, exit status 2, no traceback (unless
-v or JAXRETRIEVAL_DEBUG=1), probes its output path before the work and ends saying where its outputs are."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from convert.__main__ import main as convert_main
from jaxretrieval import evaluate, fuse, predict, retrieve, train
from jaxretrieval.retrieval.fusion import ScoreMatrix, save_scores


@pytest.fixture(scope="module")
def workdir(demo_root, tmp_path_factory) -> Path:
    """A tiny CLIP trained for a few steps with the word-level tokenizer."""
    path = tmp_path_factory.mktemp("run")
    train.train(tiny_config(demo_root), path)
    return path


@pytest.fixture
def blocked(tmp_path) -> Iterator[Path]:
    """A folder no file can be written under: read-only, or for root (whom chmod does not stop) a regular file."""
    if os.geteuid() == 0:
        path = tmp_path / "a_file"
        path.write_text("")
        yield path
        return
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o500)
    yield path
    path.chmod(0o700)


def the_error(err: str, *names: object) -> str:
    """The one `error:` line of stderr, which names each of `names`; no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def score_file(path: Path) -> Path:
    scores = np.arange(12, dtype=np.float64).reshape(3, 4)
    save_scores(ScoreMatrix(scores, ["q0", "q1", "q2"], ["g0", "g1", "g2", "g3"], name=path.stem), path)
    return path


# Output paths are probed before the work: the checkpoint, queries and score files named here need not exist.

def test_evaluate_output_under_an_unwritable_folder(blocked, tmp_path, capsys):
    output = blocked / "metrics.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "absent"), "--output", str(output)]) == 2
    the_error(capsys.readouterr().err, output, "--output")


def test_retrieve_output_under_an_unwritable_folder(blocked, tmp_path, capsys):
    output = blocked / "metrics.json"
    assert retrieve.main(["--checkpoint", str(tmp_path / "absent"), "--images", str(tmp_path), "--captions",
                          str(tmp_path / "absent.tsv"), "--output", str(output)]) == 2
    the_error(capsys.readouterr().err, output, "--output")


def test_predict_output_dir_unwritable(blocked, tmp_path, capsys):
    out = blocked / "out"
    assert predict.main(["--checkpoint", str(tmp_path / "absent"), "--queries", str(tmp_path / "query.json"),
                         "--gallery", str(tmp_path), "--output-dir", str(out)]) == 2
    the_error(capsys.readouterr().err, out, "--output-dir")


def test_fuse_output_dir_unwritable(blocked, tmp_path, capsys):
    out = blocked / "fused"
    scores = score_file(tmp_path / "clip.npz")
    assert fuse.main(["--scores", f"clip={scores}", "--weights", "clip=1", "--output-dir", str(out)]) == 2
    the_error(capsys.readouterr().err, out, "--output-dir")
    assert not out.exists()


def test_convert_out_under_an_unwritable_folder(blocked, tmp_path, capsys):
    out = blocked / "converted"
    assert convert_main(["ctl", str(tmp_path / "absent.ckpt"), str(out)]) == 2
    the_error(capsys.readouterr().err, out, "OUT")


# Metrics are printed before a late write failure is reported.

def make_output_a_folder(monkeypatch, module, name: str, output: Path) -> None:
    """Wraps module.name so the output path turns into a folder after the probe, while the metrics are computed."""
    compute = getattr(module, name)

    def late_failure(*args, **kwargs):
        result = compute(*args, **kwargs)
        output.mkdir()
        return result

    monkeypatch.setattr(module, name, late_failure)


def test_evaluate_prints_the_metrics_before_a_late_write_failure(workdir, tmp_path, monkeypatch, capsys):
    output = tmp_path / "metrics.json"
    make_output_a_folder(monkeypatch, evaluate, "run", output)
    assert evaluate.main(["--checkpoint", str(workdir), "--output", str(output)]) == 2
    out, err = capsys.readouterr()
    assert {"t2i_R1", "rsum", "step"} <= json.loads(out).keys()
    the_error(err, output)


def test_retrieve_prints_the_table_before_a_late_write_failure(workdir, demo_root, tmp_path, monkeypatch, capsys):
    output = tmp_path / "metrics.json"
    make_output_a_folder(monkeypatch, retrieve, "retrieve", output)
    assert retrieve.main(["--checkpoint", str(workdir), "--images", str(demo_root), "--captions",
                          str(demo_root / "test.jsonl"), "--output", str(output)]) == 2
    out, err = capsys.readouterr()
    assert "text -> image" in out
    the_error(err, output)


# Where the outputs went; overrides anywhere.

def test_evaluate_overrides_before_the_options_and_where_the_metrics_went(workdir, tmp_path, capsys):
    output = tmp_path / "new" / "metrics.json"
    assert evaluate.main(["eval.batch_size=8", "--checkpoint", str(workdir), "--output", str(output)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads(output.read_text())
    assert err.splitlines()[-1] == f"metrics written to {output}"
    assert evaluate.main(["--checkpoint", str(workdir)]) == 0
    assert "metrics printed to stdout only" in capsys.readouterr().err.splitlines()[-1]


def test_evaluate_override_before_checkpoint_applies(workdir, capsys):
    assert evaluate.main(["model.text.width=48", "model.text.heads=2", "--checkpoint", str(workdir)]) == 2
    the_error(capsys.readouterr().err, "parameter 'text/", "has shape")


def test_fuse_says_where_it_wrote(tmp_path, capsys):
    out = tmp_path / "fused"
    scores = score_file(tmp_path / "clip.npz")
    assert fuse.main(["--output-dir", str(out), "--scores", f"clip={scores}", "--weights", "clip=1"]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote submission.txt, fused.npz to {out}"


# Bad input files and options, missing packages.

def test_fuse_unreadable_score_file_is_a_data_error(tmp_path, capsys):
    bad = tmp_path / "clip.npz"
    bad.write_text("not numpy")
    assert fuse.main(["--scores", f"clip={bad}", "--weights", "clip=1", "--output-dir", str(tmp_path / "o")]) == 2
    the_error(capsys.readouterr().err, bad)


def test_fuse_non_finite_weight_is_named(tmp_path, capsys):
    scores = score_file(tmp_path / "clip.npz")
    assert fuse.main(["--scores", f"clip={scores}", "--weights", "clip=nan", "--output-dir", str(tmp_path)]) == 2
    the_error(capsys.readouterr().err, "--weights clip=nan")


def test_fuse_pt_scores_without_torch(tmp_path, monkeypatch, capsys):
    scores = tmp_path / "clip.pt"
    scores.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    assert fuse.main(["--scores", f"clip={scores}", "--weights", "clip=1", "--output-dir", str(tmp_path / "o")]) == 2
    the_error(capsys.readouterr().err, "'torch'", "pip install 'jaxretrieval[convert]'")


def test_clip_export_without_safetensors(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    out = tmp_path / "exported"
    assert convert_main(["clip-export", str(workdir), str(out), "--format", "open_clip"]) == 2
    the_error(capsys.readouterr().err, "'safetensors'", "pip install 'jaxretrieval[convert]'")
    assert not out.exists()


def test_convert_without_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert convert_main(["clip", str(tmp_path / "ViT-B-32.pt"), str(tmp_path / "out")]) == 2
    the_error(capsys.readouterr().err, "'torch'", "pip install 'jaxretrieval[convert]'")


def test_convert_clip_without_open_clip_or_bpe(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "open_clip"
                        else find_spec(name, *rest))
    assert convert_main(["clip", str(tmp_path / "ViT-B-32.pt"), str(tmp_path / "out")]) == 2
    the_error(capsys.readouterr().err, "--bpe PATH", "'open_clip'", "pip install 'jaxretrieval[bench]'")


def test_clip_export_refuses_a_word_tokenizer_model(workdir, tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "exported"
    assert convert_main(["clip-export", str(workdir), str(out), "--format", "hf"]) == 2
    the_error(capsys.readouterr().err, workdir, "'words' tokenizer", "BPE")
    assert not out.exists()


def test_convert_refuses_an_existing_out(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert convert_main(["ctl", str(tmp_path / "absent.ckpt"), str(tmp_path / "taken")]) == 2
    the_error(capsys.readouterr().err, tmp_path / "taken", "already exists")


# Tracebacks only on request, in a fresh interpreter as a user runs the command.

def run_module(*args: str, debug: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXRETRIEVAL_DEBUG": debug}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("how", ["default", "-v", "JAXRETRIEVAL_DEBUG=1"])
def test_traceback_only_with_verbose_or_debug(how, tmp_path):
    missing = tmp_path / "absent"
    verbose = ["-v"] if how == "-v" else []
    done = run_module("jaxretrieval.evaluate", "--checkpoint", str(missing), *verbose,
                      debug="1" if how.startswith("JAXRETRIEVAL_DEBUG") else "0")
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: checkpoint {missing} does not exist"], done.stderr
    assert ("Traceback" in done.stderr) == (how != "default"), done.stderr
