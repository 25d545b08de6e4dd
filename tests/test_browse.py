"""`python -m jaxretrieval.browse`: the data its page embeds (top-k, correct / junk flags, first correct rank, AP)
against the ground truth and our metrics (trained CLIP and re-id models, score files), escaping, and the page in
headless Chromium. That test needs `pip install selenium` and `apt-get install -y chromium chromium-driver` (or
CHROMIUM / CHROMEDRIVER naming the binaries): it skips without them, but fails in CI (CI=true).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, REPO, tiny_config
from PIL import Image

from jaxretrieval import browse, train
from jaxretrieval.browse_page import COLOURS, JS, STATUS, embed_json, read_page_data, render_page
from jaxretrieval.config import load_config
from jaxretrieval.data.reid_pipeline import reid_source
from jaxretrieval.retrieval.fusion import ScoreMatrix, save_scores
from jaxretrieval.retrieval.metrics import ranking_metrics, reid_metrics, reid_query_results

XSS = "<b>x</b><script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"></script><!-- -->"
REID_NAME = re.compile(r"(\d+)_c(\d+)")


def page(out: Path) -> dict:
    return read_page_data((out / "index.html").read_text(encoding="utf-8"))


def items(n: int, prefix: str) -> list[browse.Item]:
    return [browse.Item(f"{prefix}{i}", text=f"{prefix} {i}") for i in range(n)]


def check_section(section: dict, scores: np.ndarray, relevant: np.ndarray, k: int, keep=None) -> None:
    """Each query's hits are its best items by score (ties: lower index) until k are counted, flagged by the
    ground truth; gt is the 1-based rank of its first relevant kept item; ap is ranking_metrics' for that row."""
    for q in section["queries"]:
        i, row, rel = q["n"], scores[q["n"]], relevant[q["n"]]
        kept = np.ones_like(rel) if keep is None else keep[i]
        order = list(np.argsort(-row, kind="stable"))
        counted = [j for j in order if kept[j]]
        expected = order[:order.index(counted[k - 1]) + 1] if len(counted) >= k else order
        shown = [section["gallery"][g]["label"] for g, *_ in q["hits"]]
        assert shown == [f"g{j}" for j in expected]
        assert [h[2] for h in q["hits"]] == ["j" if not kept[j] else "c" if rel[j] else "w" for j in expected]
        assert [h[3] for h in q["hits"] if h[3]] == list(range(1, min(k, len(counted)) + 1))
        hits = [j for j in counted if rel[j]]
        if not hits:
            assert q["gt"] is None and q["ap"] is None
            continue
        assert q["gt"] == counted.index(hits[0]) + 1
        if keep is None:
            assert q["ap"] == pytest.approx(ranking_metrics(row[None], rel[None])["mAP"] / 100, abs=1e-12)


def test_text_sections_match_the_ground_truth_and_ranking_metrics():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(12, 7)), 1)  # rounded: ties, broken by the lower gallery index
    text_groups, image_groups = rng.permutation(np.r_[np.arange(7), rng.integers(0, 7, 5)]), np.arange(7)
    rankings, metrics = browse.text_rankings("image_text", scores, items(12, "q"), items(7, "g"), text_groups,
                                             image_groups)
    assert set(metrics) == {"i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"}
    data = browse.page_data(rankings, {"title": "t", "details": [], "metrics": metrics}, browse.Thumbnails(), k=3)
    t2i, i2t = data["sections"]
    check_section(t2i, scores, text_groups[:, None] == image_groups[None, :], 3)
    assert t2i["metrics"]["R1"] == metrics["t2i_R1"]
    assert np.mean([q["ap"] for q in t2i["queries"]]) * 100 == pytest.approx(t2i["metrics"]["mAP"])
    # Image -> text: queries are the images (gallery labels g*), the gallery the captions (q*).
    for q in i2t["queries"]:
        assert [h[2] == "c" for h in q["hits"]] == [text_groups[int(i2t["gallery"][h[0]]["label"][1:])] == q["n"]
                                                    for h in q["hits"]]
    assert i2t["metrics"]["R1"] == metrics["i2t_R1"]
    worst = browse.page_data(rankings[:1], data["meta"], browse.Thumbnails(), k=3, worst_first=True, max_queries=4)
    kept = sorted(q["ap"] for q in worst["sections"][0]["queries"])
    assert kept == sorted(q["ap"] for q in t2i["queries"])[:4] and worst["meta"]["sort"] == "ap_asc"


def test_reid_marks_junk_and_counts_as_reid_metrics():
    rng = np.random.default_rng(1)
    q_pids, q_cams = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 2])
    g_pids, g_cams = np.array([0, 0, 0, 1, 1, 2, -1, 4, 3, 4]), np.array([0, 0, 1, 0, 1, 1, 1, 2, 2, 0])
    scores = rng.normal(size=(4, 10))
    scores[0, [0, 1, 6]] = 5  # query 0: its same-camera images and a -1 distractor on top
    queries = [browse.Item(f"q{i}", pid=int(q_pids[i]), cam=int(q_cams[i])) for i in range(4)]
    gallery = [browse.Item(f"g{j}", pid=int(g_pids[j]), cam=int(g_cams[j])) for j in range(10)]
    ranking, metrics = browse.reid_ranking(scores, queries, gallery)
    assert metrics == reid_metrics(scores, q_pids, q_cams, g_pids, g_cams)
    section = browse.page_data([ranking], {"title": "r", "details": [], "metrics": metrics}, browse.Thumbnails(),
                               k=4)["sections"][0]
    match = g_pids[None] == q_pids[:, None]
    keep = ~(match & (g_cams[None] == q_cams[:, None])) & (g_pids != -1)
    check_section(section, scores, match, 4, keep)  # query 0's hits open with its three junk items:
    assert [h[2] for h in section["queries"][0]["hits"][:3]] == ["j", "j", "j"] and section["queries"][0]["gt"] > 0
    assert section["queries"][3]["gt"] == section["queries"][3]["ap"] is None  # id 3 only under its own camera
    results = reid_query_results(scores, q_pids, q_cams, g_pids, g_cams)
    for q in section["queries"][:3]:
        assert q["ap"] == pytest.approx(results.ap[q["n"]], abs=1e-12)
        assert q["gt"] == results.first_match[q["n"]] + 1


def test_page_escapes_every_string_from_data():
    text = f"{XSS} & \u2028 </SCRIPT > <!--"
    embedded = embed_json({"caption": text})
    assert not re.search(r"</|<!--|-->|[<>&\u2028]", embedded) and json.loads(embedded) == {"caption": text}
    data = {"meta": {"title": text, "details": [], "metrics": {}, "k": 1, "page_size": 1, "sort": "index"},
            "sections": [], "plots": [], "plots_folder": None}
    html = render_page(data)
    assert html.lower().count("</script") == 2 and "<!--" not in html and "<b>x" not in html
    assert read_page_data(html) == data
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|Function\(", JS)


@pytest.fixture(scope="module")
def clip_page(demo_root, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny CLIP trained 2 steps (its final evaluation kept) and its page over the demo test split."""
    run = tmp_path_factory.mktemp("clip")
    evaluated = train.train(tiny_config(demo_root, **{"train.steps": 2, "train.checkpoint_every": 2,
                                                       "train.warmup_steps": 1}), run)
    assert browse.main(["--checkpoint", str(run), "--out", str(run / "page"), "--k", "5", "--page-size", "20"]) == 0
    return run / "page", evaluated


def test_clip_page_matches_the_evaluator_and_the_annotations(clip_page, demo_root):
    out, evaluated = clip_page
    data = page(out)
    for key, value in data["meta"]["metrics"].items():
        assert value == pytest.approx(evaluated[key], abs=1e-6), key
    lines = (demo_root / "test.jsonl").read_text().splitlines()
    image_of = {f"test.jsonl:{n}": Path(json.loads(line)["image"]).name for n, line in enumerate(lines, 1)}
    t2i, i2t = data["sections"]
    assert len(t2i["queries"]) == len(lines) and len(i2t["queries"]) == len(set(image_of.values()))
    for q in t2i["queries"]:
        assert len(q["hits"]) == 5 and [h[3] for h in q["hits"]] == [1, 2, 3, 4, 5]
        assert [h[1] for h in q["hits"]] == sorted((h[1] for h in q["hits"]), reverse=True)
        assert [h[2] for h in q["hits"]] == ["c" if t2i["gallery"][h[0]]["label"] == image_of[q["label"]] else "w"
                                             for h in q["hits"]]
        assert (q["gt"] <= 5) == ("c" in [h[2] for h in q["hits"]])
    for q in i2t["queries"]:
        assert [h[2] for h in q["hits"]] == ["c" if image_of[i2t["gallery"][h[0]]["label"]] == q["label"] else "w"
                                             for h in q["hits"]]
    for section in (t2i, i2t):
        ranks = np.array([q["gt"] for q in section["queries"]])
        assert section["metrics"]["R1"] == pytest.approx(100 * np.mean(ranks == 1))
        assert section["metrics"]["mAP"] == pytest.approx(100 * np.mean([q["ap"] for q in section["queries"]]))
    thumbs = {item["thumb"] for item in t2i["gallery"]} | {q["thumb"] for q in i2t["queries"]}
    for thumb in thumbs:
        with Image.open(out / thumb) as image:
            assert image.format == "JPEG" and max(image.size) <= 160


def write_pab(folder: Path, demo_root: Path, n_queries: int = 12) -> dict[str, str]:
    """A PAB-style query file (one caption is an XSS attempt), a gallery of 6 demo images, labels and a score
    matrix saved in a shuffled order: the browse arguments."""
    rng = np.random.default_rng(2)
    (gallery := folder / "gallery").mkdir(parents=True)
    stems = [f"img{j}" for j in range(6)]
    for j, stem in enumerate(stems):
        shutil.copy(demo_root / "images" / f"test_{j:05d}.png", gallery / f"{stem}.png")
    ids = [f"q{i}" for i in range(n_queries)]
    captions = [XSS if i == 3 else f"caption number {i}" for i in range(n_queries)]
    (folder / "query.json").write_text("".join(json.dumps({"query_index": q, "caption": c}) + "\n"
                                               for q, c in zip(ids, captions, strict=True)))
    labels = {q: [stems[i % 6]] + ([stems[(i + 1) % 6]] if i % 3 == 0 else []) for i, q in enumerate(ids)}
    (folder / "labels.json").write_text(json.dumps(labels))
    rows, cols = rng.permutation(n_queries), rng.permutation(6)
    save_scores(ScoreMatrix(rng.normal(size=(n_queries, 6)), [ids[i] for i in rows], [stems[j] for j in cols]),
                folder / "fused.npz")
    (plots := folder / "plots").mkdir()
    for name in ("loss curve.png", "lr.png"):
        Image.new("RGB", (60, 40), (40, 90, 200)).save(plots / name)
    (plots / "plots.json").write_text(json.dumps({"plots": [{"file": "lr.png", "title": "learning <rate>"}]}))
    return {"--scores": str(folder / "fused.npz"), "--queries": str(folder / "query.json"),
            "--gallery": str(gallery), "--labels": str(folder / "labels.json"), "--plots": str(plots)}


@pytest.fixture(scope="module")
def pab_page(demo_root, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("pab")
    args = write_pab(folder, demo_root)
    argv = [part for pair in args.items() for part in pair]
    assert browse.main([*argv, "--out", str(folder / "page"), "--k", "3", "--page-size", "5"]) == 0
    return folder / "page", args


def test_scores_page_follows_the_labels_in_any_id_order(pab_page, tmp_path):
    out, args = pab_page
    data, labels = page(out), json.loads(Path(args["--labels"]).read_text())
    section = data["sections"][0]
    assert [q["label"] for q in section["queries"]] == list(labels)  # query.json order, not the matrix's
    assert section["queries"][3]["text"] == XSS
    for q in section["queries"]:
        assert [h[2] for h in q["hits"]] == ["c" if section["gallery"][h[0]]["label"] in labels[q["label"]] else "w"
                                             for h in q["hits"]]
    assert data["meta"]["metrics"]["mAP"] == pytest.approx(100 * np.mean([q["ap"] for q in section["queries"]]))
    assert data["plots"] == [{"name": "learning <rate>", "src": "plots/lr.png"},  # report's listing first
                             {"name": "loss curve.png", "src": "plots/loss%20curve.png"}]
    assert (out / "plots" / "loss curve.png").is_file() and not re.search(r"https?:", (out / "index.html").read_text())
    # Without labels (a blind test set): rankings only, nothing marked or scored.
    assert browse.main(["--out", str(tmp_path), *(f"{key}={args[key]}" for key in ("--scores", "--queries",
                                                                                  "--gallery"))]) == 0
    blind = page(tmp_path)
    assert blind["meta"]["metrics"] == {} and not blind["sections"][0]["labelled"]
    assert {h[2] for q in blind["sections"][0]["queries"] for h in q["hits"]} == {"u"}
    assert {q["ap"] for q in blind["sections"][0]["queries"]} == {None}


def test_reid_scores_page_over_a_config_and_input_errors(tmp_path, capsys):
    overrides = [f"data.root={tmp_path / 'reid'}", "data.demo_num_train=4", "data.demo_num_test=4"]
    config = load_config(REPO / "configs/demo/ctl_tiny.yaml", overrides)
    query, gallery = (reid_source(config, split) for split in ("query", "gallery"))
    q_ids, g_ids = ([Path(r.path).stem for r in split] for split in (query, gallery))
    scores = np.random.default_rng(3).normal(size=(len(q_ids), len(g_ids)))
    save_scores(ScoreMatrix(scores[::-1], q_ids[::-1], g_ids), tmp_path / "reid.npz")
    out = tmp_path / "page"
    argv = ["--scores", str(tmp_path / "reid.npz"), "--config", str(REPO / "configs/demo/ctl_tiny.yaml"),
            "--out", str(out), *overrides]
    assert browse.main(argv) == 0
    data = page(out)
    parsed = [np.array([[int(x) for x in REID_NAME.search(i).groups()] for i in ids]) for ids in (q_ids, g_ids)]
    (q_pids, q_cams), (g_pids, g_cams) = (p.T for p in parsed)
    assert data["meta"]["metrics"] == reid_metrics(scores, q_pids, q_cams, g_pids, g_cams)
    section = data["sections"][0]
    gallery_pid = {item["label"]: REID_NAME.search(item["label"]).groups() for item in section["gallery"]}
    for q in section["queries"]:
        pid, cam = REID_NAME.search(q["label"]).groups()
        assert [h[2] for h in q["hits"]] == ["j" if gallery_pid[section["gallery"][h[0]]["label"]] == (pid, cam)
                                             else "c" if gallery_pid[section["gallery"][h[0]]["label"]][0] == pid
                                             else "w" for h in q["hits"]]
    capsys.readouterr()
    assert browse.main(argv[:2] + ["--checkpoint", "x", "--out", str(out)]) == 2
    assert browse.main(["--scores", str(tmp_path / "reid.npz"), "--queries", "q.json", "--out", str(out)]) == 2
    save_scores(ScoreMatrix(scores[:, 1:], q_ids, g_ids[1:]), tmp_path / "short.npz")
    assert browse.main(["--scores", str(tmp_path / "short.npz"), *argv[2:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "one of them" in errors[0] and "--gallery" in errors[1] and g_ids[0] in errors[2]


def test_reid_model_page_matches_its_evaluation(tmp_path):
    overrides = [f"data.root={tmp_path / 'reid'}", *"data.demo_num_train=8 data.demo_num_test=6 train.batch_size=16 "
                 "train.epochs=0 train.steps=2 train.schedule=cosine train.warmup_steps=0 train.progress_bar=false "
                 "train.checkpoint_every=2 eval.batch_size=32".split()]
    evaluated = train.train(load_config(REPO / "configs/demo/ctl_tiny.yaml", overrides), tmp_path / "run")
    out = tmp_path / "page"
    assert browse.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--k", "5", "--worst-first"]) == 0
    data = page(out)
    assert data["meta"]["metrics"] == pytest.approx({k: v for k, v in evaluated.items()
                                                     if k in data["meta"]["metrics"]}, abs=1e-6)
    assert set(data["meta"]["metrics"]) >= {"R1", "R5", "R10", "mAP", "mINP"} and data["meta"]["sort"] == "ap_asc"
    assert all(q["thumb"] and q["cam"] is not None and (out / q["thumb"]).is_file()
               for q in data["sections"][0]["queries"])


def browser_binaries() -> tuple[str, str]:
    """(Chromium, chromedriver) paths, with selenium importable; a clear skip locally and a failure in CI."""
    chromium = os.environ.get("CHROMIUM") or next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver", path=os.pathsep.join(
        [os.environ.get("PATH", ""), os.environ.get("CHROMEWEBDRIVER", "")]))  # GitHub runners: CHROMEWEBDRIVER
    missing = [what for what, found in (("Chromium", chromium), ("chromedriver", driver),
                                        ("the selenium package", importlib.util.find_spec("selenium"))) if not found]
    if missing:
        message = (f"browser test needs {', '.join(missing)}: pip install selenium; apt-get install -y chromium "
                   f"chromium-driver (or set CHROMIUM / CHROMEDRIVER)")
        if os.environ.get("JAXRETRIEVAL_NO_BROWSER"):  # .ci/run found no way to install one (no apt-get)
            pytest.skip(f"{message} ({os.environ['JAXRETRIEVAL_NO_BROWSER']})")
        if IN_CI:
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    chromium, driver = browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def test_page_in_a_browser(browser, pab_page, clip_page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, args = pab_page
    labels = json.loads(Path(args["--labels"]).read_text())
    browser.get((out / "index.html").as_uri())

    def rows():
        return browser.find_elements(By.CSS_SELECTOR, "#queries .query")

    def filtered(text: str) -> list[str]:
        box = browser.find_element(By.ID, "filter")
        box.clear()  # no input event: the page updates on the typing below (or the event sent)
        box.send_keys(text) if text else browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
        return [row.get_attribute("data-query") for row in rows()]

    def check_borders(expected) -> None:
        for row in rows():
            for figure in row.find_elements(By.CSS_SELECTOR, ".hit"):
                thumb = figure.find_element(By.CSS_SELECTOR, "img, .hit-text")
                border = browser.execute_script("return getComputedStyle(arguments[0]).borderTopColor", thumb)
                status = expected(row.get_attribute("data-query"), figure.get_attribute("data-gallery"))
                assert border == COLOURS[status] and figure.get_attribute("data-status") == STATUS[status]

    assert [row.get_attribute("data-query") for row in rows()] == list(labels)[:5]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#queries .hit img")) == 5 * 3
    assert browser.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    check_borders(lambda query, item: "c" if item in labels[query] else "w")
    # The filter: only the XSS caption holds "script"; it shows as text and runs nothing.
    assert filtered("SCRIPT") == ["q3"]
    caption = rows()[0].find_element(By.CSS_SELECTOR, ".caption")
    assert caption.get_attribute("textContent") == XSS and not caption.find_elements(By.CSS_SELECTOR, "*")
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    assert filtered("number 1") == ["q1", "q10", "q11"] and filtered("") == list(labels)[:5]
    # Sorting by AP, then paging through all 12 queries (5 a page).
    Select(browser.find_element(By.ID, "sort")).select_by_value("ap_asc")
    section = page(out)["sections"][0]
    by_ap = [q["label"] for q in sorted(section["queries"], key=lambda q: (q["ap"], q["n"]))]
    seen = []
    for number in (1, 2, 3):
        assert browser.find_element(By.ID, "page-info").text == f"page {number} / 3"
        seen += [row.get_attribute("data-query") for row in rows()]
        browser.find_element(By.ID, "next").click() if number < 3 else None
    assert seen == by_ap and not browser.find_element(By.ID, "next").is_enabled()
    plot = browser.find_element(By.CSS_SELECTOR, "#plots img")
    assert plot.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", plot) == 60
    urls = browser.execute_script("return Array.from(document.querySelectorAll('[src],[href]'), e => e.src || e.href)")
    assert urls and all(url.startswith("file:///") for url in urls)  # thumbnails, the plot and its folder only
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The CLIP page's image -> text tab: caption results bordered by the annotations.
    clip_out, _ = clip_page
    browser.get((clip_out / "index.html").as_uri())
    assert len(rows()) == 20 and len(browser.find_elements(By.CSS_SELECTOR, ".hit img")) == 20 * 5
    browser.find_elements(By.CSS_SELECTOR, "#tabs button")[1].click()
    i2t = page(clip_out)["sections"][1]
    truth = {q["label"]: {i2t["gallery"][h[0]]["label"]: h[2] for h in q["hits"]} for q in i2t["queries"]}
    assert len(browser.find_elements(By.CSS_SELECTOR, ".hit .hit-text")) == 5 * min(20, len(truth))
    check_borders(lambda query, item: truth[query][item])
    shot = tmp_path / "browse.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
