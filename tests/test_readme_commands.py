"""The README's Evaluate commands, run as written against what `python -m jaxretrieval.demo` leaves behind.

The demo is run for real (its schedule of steps, checkpoints and evaluations, so the same step folders) at test
size: the tiny model of conftest and the small generated dataset. A README path the demo does not write fails.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides

from jaxretrieval import demo
from jaxretrieval.config import load_config, save_config

README = REPO / "README.md"
DEMO_PATHS = re.compile(r"^(runs/demo|data/demo|configs/demo)(/|$)")
OUTPUT_OPTIONS = ("--output", "--output-dir")


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.S | re.M)


def bash_commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def demo_overrides(root: Path) -> list[str]:
    """The demo at test size: conftest's tiny model and batches, and the dataset counts `root` was generated with;
    the demo config's schedule (steps, checkpoint_every, keep_checkpoints, eval_every) is kept."""
    size = [o for o in tiny_overrides(root) if o.startswith(("model.", "train.batch_size=", "eval.batch_size="))]
    params = json.loads((root / "demo.json").read_text())
    return [*size, "train.progress_bar=false", f"data.demo_seed={params['seed']}",
            f"data.demo_num_train={params['num_train']}", f"data.demo_num_test={params['num_test']}"]


@pytest.fixture(scope="module")
def demo_cwd(demo_root, tmp_path_factory) -> Path:
    """A folder laid out as the repository root after the quick start: configs/demo/clip_tiny.yaml (at test size),
    data/demo and runs/demo, as the demo command writes them."""
    cwd = tmp_path_factory.mktemp("readme")
    overrides = demo_overrides(demo_root)
    (cwd / "configs" / "demo").mkdir(parents=True)
    save_config(load_config(str(REPO / demo.DEMO_CONFIG), overrides), cwd / demo.DEMO_CONFIG)
    (cwd / "data").mkdir()
    (cwd / "data" / "demo").symlink_to(demo_root, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        assert demo.main(["--workdir", "runs/demo", *overrides]) == 0
    return cwd


def demo_files(cwd: Path) -> str:
    run = cwd / "runs" / "demo"
    found = [*run.iterdir(), *(run / "checkpoints").iterdir(), *(run / "eval").iterdir()]
    return ", ".join(sorted(str(p.relative_to(cwd)) for p in found))


def check_paths_exist(words: list[str], cwd: Path) -> None:
    outputs = {value for option, value in zip(words, words[1:], strict=False) if option in OUTPUT_OPTIONS}
    for word in words:
        if DEMO_PATHS.match(word) and word not in outputs:
            assert (cwd / word).exists(), f"the README names {word}, which the demo does not write; it writes " \
                                          f"{demo_files(cwd)}"


def run_module(words: list[str]) -> tuple[int, str, str]:
    assert words[:2] == ["python", "-m"] and words[2].startswith("jaxretrieval."), \
        f"not a `python -m jaxretrieval.*` command; teach this test to run it: {shlex.join(words)}"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = importlib.import_module(words[2]).main(words[3:])
    return code, stdout.getvalue(), stderr.getvalue()


EVALUATE = readme_section("Evaluate")
COMMANDS = [words for block in code_blocks(EVALUATE, "bash") for words in bash_commands(block)]


def test_the_evaluate_section_has_commands():
    assert len(COMMANDS) >= 3 and len(code_blocks(EVALUATE, "python")) == 1


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w[2:4]) for w in COMMANDS])
def test_readme_command_runs_on_the_demo_outputs(words, demo_cwd, monkeypatch):
    monkeypatch.chdir(demo_cwd)
    check_paths_exist(words, demo_cwd)
    code, stdout, stderr = run_module(words)
    assert code == 0, stderr[-3000:]
    assert re.search(r"^(metrics written to |metrics printed to stdout only)", stderr, re.M), stderr[-2000:]
    for option, value in zip(words, words[1:], strict=False):
        if option in OUTPUT_OPTIONS:
            assert (demo_cwd / value).exists(), f"{shlex.join(words)} did not write {value}"
    if words[2] == "jaxretrieval.evaluate":
        metrics = json.loads(stdout)  # stdout is the JSON object alone
        assert {"t2i_R1", "rsum", "step"} <= metrics.keys()
        step = re.search(r"checkpoints/(\d+)$", words[words.index("--checkpoint") + 1])
        if step:
            assert metrics["step"] == int(step.group(1))


def test_readme_python_block_runs_on_the_demo_outputs(demo_cwd, monkeypatch, capsys):
    (code,) = code_blocks(EVALUATE, "python")
    monkeypatch.chdir(demo_cwd)
    for path in re.findall(r"""["']([^"']+)["']""", code):
        check_paths_exist([path], demo_cwd)
    exec(compile(code, "README.md (Evaluate)", "exec"), {})
    printed = capsys.readouterr().out  # image @ text.T: one cosine similarity
    assert -1 <= float(printed.strip().strip("[]")) <= 1, printed
