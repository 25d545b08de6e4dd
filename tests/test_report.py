"""TensorBoard event files (jaxretrieval.tensorboard) and the plots of `python -m jaxretrieval.report`, from a
synthetic metrics.jsonl with a resumed run that repeats steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxretrieval import report
from jaxretrieval import tensorboard as tb
from jaxretrieval.errors import DataError, MissingPackageError

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def train_record(step: int, offset: float = 0.0) -> dict:
    return {"step": step, "loss": 5.0 / step + offset, "loss_itc": 3.0 / step + offset, "grad_norm": 2.0 + offset,
            "logit_scale": 14.0, "lr": 1e-3 * step / 60, "samples_per_s": 100.0 + step}


def eval_record(step: int, offset: float = 0.0) -> dict:
    recall = {f"eval_{d}_R{k}": min(100.0, 10.0 * k + step / 10 + offset) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    return {"step": step, **recall, "eval_rsum": sum(recall.values()), "eval_num_images": 64,
            "eval_note": "not a number", "eval_flag": True}


# A run logging every 10 steps, evaluating every 20 and checkpointing at 30, killed after step 50; the resumed run
# (from step 30) logs 40, 50 and 60 again with other values.
FIRST = [train_record(10), train_record(20), eval_record(20), train_record(30), train_record(40), eval_record(40),
         train_record(50)]
RESUMED = [train_record(40, 0.5), eval_record(40, 0.5), train_record(50, 0.5), train_record(60, 0.5),
           eval_record(60, 0.5)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def last_wins(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, float32 value)]}: the last record of each kind (training / evaluation) at a step wins."""
    latest = {(report.is_eval_record(r), r["step"]): r for r in records}
    expected: dict[str, dict[int, float]] = {}
    for (_, step), record in latest.items():
        for tag, value in tb.scalars(record).items():
            expected.setdefault(tag, {})[step] = float(np.float32(value))
    return {tag: sorted(points.items()) for tag, points in expected.items()}


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture
def run(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A workdir whose metrics.jsonl and tensorboard/ were written record by record, across a kill and resume."""
    first = tb.EventLog(tmp_path, resume_step=0)
    request.addfinalizer(first.close)  # killed: not closed before the files are read
    for record in FIRST:
        write_jsonl(tmp_path / "metrics.jsonl", [record])
        first.write(record)
    with tb.EventLog(tmp_path, resume_step=30) as resumed:
        for record in RESUMED:
            write_jsonl(tmp_path / "metrics.jsonl", [record])
            resumed.write(record)
    return tmp_path


def test_tags() -> None:
    assert tb.scalars(train_record(10))["train/loss_itc"] == 0.3
    assert set(tb.scalars(eval_record(20))) == {*(f"eval/{d}_R{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)),
                                                "eval/rsum", "eval/num_images"}


def test_event_files_after_resume_equal_metrics(run: Path) -> None:
    expected = last_wins(FIRST + RESUMED)
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/i2t_R1", "eval/rsum"} <= set(expected)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert read_events(run / "tensorboard") == expected
    assert expected["train/loss"][3] == (40, float(np.float32(5.0 / 40 + 0.5)))  # the resumed run's value


def test_load_metrics_resolves_repeats(run: Path) -> None:
    records = report.load_metrics(run / "metrics.jsonl")
    assert [(r["step"], report.is_eval_record(r)) for r in records] == [
        (10, False), (20, False), (20, True), (30, False), (40, False), (40, True), (50, False), (60, False),
        (60, True)]
    assert records[4] == train_record(40, 0.5)


def test_backfill_equals_live_log(run: Path) -> None:
    path = tb.backfill(run)
    assert list((run / "tensorboard").glob("*tfevents*")) == [path]
    assert read_events(run / "tensorboard") == last_wins(FIRST + RESUMED)
    # a run made before event files existed: nothing but metrics.jsonl
    fresh = run / "old"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    tb.main([str(fresh)])
    assert read_events(fresh / "tensorboard") == last_wins(FIRST + RESUMED)


def test_restart_drops_the_killed_runs_later_records(tmp_path: Path) -> None:
    # killed after 50, resumed from 30, read while the resumed run is at 40 (and writing its next line)
    write_jsonl(tmp_path / "metrics.jsonl", FIRST + [train_record(40, 0.5)])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 50, "lo')
    records = report.load_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], report.is_eval_record(r)) for r in records] == [(10, False), (20, False), (20, True),
                                                                        (30, False), (40, False)]
    assert records[-1] == train_record(40, 0.5)
    # resumed from 40, whose evaluation had not finished: it is repeated, the training record of step 40 stays
    path = tmp_path / "again.jsonl"
    write_jsonl(path, FIRST + [eval_record(40, 0.5), train_record(50, 0.5)])
    records = report.load_metrics(path)
    assert [(r["step"], report.is_eval_record(r)) for r in records][-3:] == [(40, False), (40, True), (50, False)]
    assert records[-2:] == [eval_record(40, 0.5), train_record(50, 0.5)] and records[-3] == train_record(40)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_record(10)) + "\n{not json\n" + json.dumps(train_record(20)) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        report.load_metrics(path)
    path.write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: expected an integer 'step'"):
        report.load_metrics(path)


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (500, 320)
        colours = image.convert("RGB").getcolors(maxcolors=500 * 320)
        assert colours is not None and len(colours) > 10


def test_report_writes_plots(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(run)]) == 0
    printed = capsys.readouterr().out.split()
    plots = run / "plots"
    names = {"loss.png", "lr.png", "throughput.png", "grad_norm.png", "train_logit_scale.png", "eval_recall.png",
             "eval_rsum.png", "recall_at_k.png"}
    index = json.loads((plots / "plots.json").read_text())
    files = [e["file"] for e in index["plots"]]
    assert printed == [str(plots / name) for name in [*files, "plots.json", "index.md"]]
    assert set(files) == names
    for name in names:
        check_png(plots / name)
        assert f"]({name})" in (plots / "index.md").read_text()
    assert index["steps"] == [10, 60]
    loss = next(e for e in index["plots"] if e["file"] == "loss.png")
    assert loss["keys"] == ["loss", "loss_itc"]
    curve = next(e for e in index["plots"] if e["file"] == "recall_at_k.png")
    assert curve["title"] == "Recall@K at step 60" and curve["keys"] == ["i2t", "t2i"]


def test_report_reid_metrics_and_no_eval(tmp_path: Path) -> None:
    reid = {"step": 10, "eval_R1": 50.0, "eval_R5": 70.0, "eval_R10": 80.0, "eval_mAP": 40.0, "eval_mINP": 20.0,
            "eval_centroid_R1": 55.0, "eval_centroid_mAP": 45.0, "eval_num_queries": 30, "eval_rerank_k": 10}
    write_jsonl(tmp_path / "metrics.jsonl", [train_record(10), reid])
    written = {p.name for p in report.report(tmp_path, tmp_path / "out")}
    assert {"eval_recall.png", "eval_map.png", "recall_at_k.png"} <= written
    assert not written & {"eval_rsum.png", "eval_other.png"}  # counts are in TensorBoard only
    assert report.recall_curves([train_record(10), reid]) == (10, {"R@K": [(1, 50.0), (5, 70.0), (10, 80.0)],
                                                                   "centroid": [(1, 55.0)]})
    alone = tmp_path / "train_only"
    alone.mkdir()
    write_jsonl(alone / "metrics.jsonl", [train_record(10), train_record(20)])
    written = {p.name for p in report.report(alone)}
    assert "recall_at_k.png" not in written and "loss.png" in written


def test_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "error: workdir" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n{}\n")
    assert report.main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}:1: expected a JSON object" in capsys.readouterr().err
    assert tb.main([str(tmp_path / "missing")]) == 2


def test_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "tensorboard" or n.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto.event_pb2", None)
    assert not tb.available()
    with pytest.raises(MissingPackageError, match=r"pip install 'jaxretrieval\[tensorboard\]'"):
        tb.EventLog(tmp_path)
    disabled = tb.EventLog(tmp_path, enabled=False)  # other processes: nothing imported, nothing written
    disabled.write(train_record(10))
    disabled.close()
    assert not (tmp_path / "tensorboard").exists()


def test_trainer_event_files_match_metrics_jsonl_across_a_resume(demo_root: Path, tmp_path: Path) -> None:
    """The real trainer: a 6-step run, then the same run resumed from its step-3 checkpoint (the step-6 one lost):
    the event files read back give the scalars and steps metrics.jsonl holds, repeats resolved as its last record."""
    import shutil

    from conftest import tiny_config

    from jaxretrieval import train

    config = tiny_config(demo_root, **{"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
                                       "train.progress_bar": False})
    workdir = tmp_path / "run"
    train.train(config, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    train.train(config, workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    events = read_events(workdir / tb.FOLDER)
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/t2i_R1"} <= set(events)
    assert events == last_wins(records)
    assert len(list((workdir / tb.FOLDER).glob("events.out.tfevents.*"))) == 2
