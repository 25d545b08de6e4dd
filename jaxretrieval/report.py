"""`python -m jaxretrieval.report WORKDIR [--out DIR] [--tensorboard]`

Plots a training run's metrics.jsonl as small PNG figures in WORKDIR/plots/ (or --out): the loss and its terms,
learning rate, throughput, gradient norm, any other training value, the evaluation metrics over steps (recall,
mAP/mINP, rsum) and recall_at_k.png, the Recall@K curve of the latest evaluation; plots.json and index.md list
them. Prints the files written. --tensorboard also rewrites WORKDIR/tensorboard/ from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

from jaxretrieval.errors import DataError, command, parse_command_line, probe_output_folder, require

log = logging.getLogger("jaxretrieval.report")
METRICS_FILE = "metrics.jsonl"
FIGSIZE = (5.0, 3.2)  # inches, at DPI: 500 x 320 pixel PNGs of a few tens of KB
DPI = 100
RECALL = re.compile(r"^(?:(?P<prefix>.+)_)?R(?P<k>\d+)$")  # R1, i2t_R5, 1k_t2i_R10, centroid_R50 ...
RANKING = re.compile(r"(^|_)(mAP|mINP)$")
RSUM = re.compile(r"(^|_)rsum$")
COUNT = re.compile(r"(^|_)(num_\w+|queries|skipped|k)$")  # gallery sizes and the like: TensorBoard only
TRAIN_PLOTS = (("loss.png", "loss"), ("lr.png", "learning rate"), ("throughput.png", "samples / s"),
               ("grad_norm.png", "gradient norm"))


def numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_eval_record(record: dict[str, Any]) -> bool:
    return any(key.startswith("eval_") for key in record)


def metrics_path(workdir: str | Path) -> Path:
    """WORKDIR/metrics.jsonl (or WORKDIR itself when it is that file)."""
    path = Path(workdir).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"workdir {path} does not exist")
    if not (path / METRICS_FILE).is_file():
        raise DataError(f"{path} has no {METRICS_FILE}: give the --workdir of a training run")
    return path / METRICS_FILE


def _parse(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise DataError(f"{where}: expected an integer 'step', got {step!r}")
    return record


def load_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in step order (training before evaluation at one step), repeats resolved.

    A resumed run appends to the same file. A record whose step is not after the previous record of its kind
    (training, or evaluation: keys `eval_...`) marks a restart there: the earlier records the restarted run
    recomputes are dropped, those at later steps and those of its step (for an evaluation, the training record of
    its step stays). So the last record of a repeated step wins, and a killed run's records past the point where
    its successor restarted are gone, as in TensorBoard. A last line without its newline that does not parse is
    still being written (or was cut by a kill) and is skipped."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    lines = text.split("\n")
    kept: list[dict[str, Any]] = []
    last: dict[bool, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _parse(line, f"{path}:{number}")
        except DataError:
            if number == len(lines):  # no newline after it
                log.warning("%s:%d: skipping an incomplete last line", path, number)
                continue
            raise
        kind, step = is_eval_record(record), record["step"]
        if kind in last and step <= last[kind]:
            # A training record restarts after the checkpoint before its step; an evaluation may repeat the
            # checkpoint's own step, whose training record stands.
            kept = [r for r in kept if r["step"] < step or (r["step"] == step and kind and not is_eval_record(r))]
            last = {}
            for r in kept:
                last[is_eval_record(r)] = max(last.get(is_eval_record(r), r["step"]), r["step"])
        kept.append(record)
        last[kind] = step
    return sorted(kept, key=lambda r: (r["step"], is_eval_record(r)))


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that hold a number for it."""
    points = [(r["step"], float(r[key])) for r in records if numeric(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


class Plot(NamedTuple):
    file: str
    title: str
    keys: list[str]  # metrics.jsonl keys, one line each


def _file_name(key: str) -> str:
    return re.sub(r"[^\w.-]", "_", key) + ".png"


def _recall_order(name: str) -> tuple[str, int]:
    found = RECALL.match(name)
    assert found is not None
    return found["prefix"] or "", int(found["k"])


def _styles(keys: list[str]) -> list[dict[str, Any]]:
    """Recall lines: one colour per direction or prefix, one dash pattern per K; other lines: the default cycle."""
    names = [_label(k) for k in keys]
    if not all(RECALL.match(n) for n in names):
        return [{} for _ in keys]
    prefixes = list(dict.fromkeys(_recall_order(n)[0] for n in names))
    ks = sorted({_recall_order(n)[1] for n in names})
    dashes = ("-", "--", ":", "-.")
    return [{"color": f"C{prefixes.index(p) % 10}", "linestyle": dashes[ks.index(k) % len(dashes)]}
            for p, k in map(_recall_order, names)]


def plan(records: list[dict[str, Any]]) -> list[Plot]:
    """The figures over steps that `records` fill: one per group of keys."""
    train = sorted({k for r in records if not is_eval_record(r) for k, v in r.items() if k != "step" and numeric(v)})
    evals = sorted({k for r in records if is_eval_record(r) for k, v in r.items() if k != "step" and numeric(v)})
    groups = {"loss.png": [k for k in train if k == "loss" or k.startswith("loss_")], "lr.png": ["lr"],
              "throughput.png": ["samples_per_s"], "grad_norm.png": ["grad_norm"]}
    plots = [Plot(file, title, [k for k in groups[file] if k in train]) for file, title in TRAIN_PLOTS]
    grouped = {k for keys in groups.values() for k in keys}
    plots += [Plot("train_" + _file_name(k), k, [k]) for k in train if k not in grouped]
    names = {k: k.removeprefix("eval_") for k in evals}
    recall = sorted((k for k in evals if RECALL.match(names[k])), key=lambda k: _recall_order(names[k]))
    ranking = [k for k in evals if RANKING.search(names[k])]
    rsum = [k for k in evals if RSUM.search(names[k])]
    other = [k for k in evals if k not in {*recall, *ranking, *rsum} and not COUNT.search(names[k])]
    plots += [Plot("eval_recall.png", "evaluation: Recall@K (%)", recall),
              Plot("eval_map.png", "evaluation: mAP / mINP (%)", ranking),
              Plot("eval_rsum.png", "evaluation: rsum", rsum),
              Plot("eval_other.png", "evaluation", other)]
    return [p for p in plots if p.keys]


def recall_curves(records: list[dict[str, Any]]) -> tuple[int, dict[str, list[tuple[int, float]]]] | None:
    """(step, {direction or prefix: [(K, recall)] by K}) of the latest evaluation holding R@K values, or None."""
    for record in reversed(records):
        curves: dict[str, list[tuple[int, float]]] = {}
        for key, value in record.items():
            found = RECALL.match(key.removeprefix("eval_")) if key.startswith("eval_") else None
            if found and numeric(value):
                curves.setdefault(found["prefix"] or "R@K", []).append((int(found["k"]), float(value)))
        if curves:
            return record["step"], {name: sorted(points) for name, points in sorted(curves.items())}
    return None


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # The Figure API with Agg, not pyplot: no global backend state, so it is safe inside any process.
    backend_agg = require("matplotlib.backends.backend_agg", "report", "plotting metrics")
    figure = require("matplotlib.figure", "report", "plotting metrics").Figure(figsize=FIGSIZE, dpi=DPI,
                                                                               layout="constrained")
    backend_agg.FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure: Any, axes: Any, path: Path, lines: int) -> None:
    if lines > 1:
        axes.legend(fontsize=6, ncol=2 if lines > 5 else 1)
    figure.savefig(path, dpi=DPI)


def _label(key: str) -> str:
    return key.removeprefix("eval_")


def report(workdir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Writes the plots of WORKDIR/metrics.jsonl, plots.json and index.md into `out` (default WORKDIR/plots);
    returns the files written."""
    source = metrics_path(workdir)
    records = load_metrics(source)
    if not records:
        raise DataError(f"{source} holds no records yet")
    folder = probe_output_folder(out if out is not None else source.parent / "plots", "--out")
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for plot in plan(records):
        figure, axes = _figure(plot.title, "step", "")
        for key, style in zip(plot.keys, _styles(plot.keys), strict=True):
            steps, values = series(records, key)
            axes.plot(steps, values, label=_label(key), linewidth=1, marker="o" if len(steps) < 30 else None,
                      markersize=3, **style)
        _save(figure, axes, folder / plot.file, len(plot.keys))
        entries.append({"file": plot.file, "title": plot.title, "keys": plot.keys})
    curves = recall_curves(records)
    if curves is not None:
        step, lines = curves
        figure, axes = _figure(f"Recall@K at step {step}", "K", "recall (%)")
        ks = sorted({k for points in lines.values() for k, _ in points})
        for name, points in lines.items():
            axes.plot([k for k, _ in points], [v for _, v in points], label=name, marker="o", markersize=3)
        axes.set_xscale("log")
        axes.set_xticks(ks, [str(k) for k in ks])
        axes.minorticks_off()
        _save(figure, axes, folder / "recall_at_k.png", len(lines))
        entries.append({"file": "recall_at_k.png", "title": f"Recall@K at step {step}", "keys": sorted(lines)})
    index = {"metrics": str(source), "steps": [records[0]["step"], records[-1]["step"]], "plots": entries}
    (folder / "plots.json").write_text(json.dumps(index, indent=2) + "\n")
    markdown = [f"# Metrics of {source}", ""]
    for entry in entries:
        markdown += [f"## {entry['title']}", "", f"![{entry['title']}]({entry['file']})", ""]
    (folder / "index.md").write_text("\n".join(markdown))
    return [folder / entry["file"] for entry in entries] + [folder / "plots.json", folder / "index.md"]


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.report", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="training run folder holding metrics.jsonl (or the metrics.jsonl file)")
    parser.add_argument("--out", help="write the plots here (default: WORKDIR/plots)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also rewrite WORKDIR/tensorboard/ from metrics.jsonl (not while training writes it)")
    args = parse_command_line(parser, argv)
    if args.tensorboard:
        from jaxretrieval import tensorboard  # it imports this module: not at the top

        tensorboard.check_installed()
    written = report(args.workdir, args.out)
    if args.tensorboard:
        written.append(tensorboard.backfill(args.workdir))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
