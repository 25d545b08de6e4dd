"""`python -m jaxretrieval.clip_globals` on a tiny generated precomp set, with a random frozen CLIP (model tiny)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxretrieval.checkpoint import write_model
from jaxretrieval.clip_globals import image_paths, load_clip, main
from jaxretrieval.config import load_config, to_dict
from jaxretrieval.data.precomp import PrecompSource, write_precomp_demo
from jaxretrieval.data.precomp_images import image_concepts, write_precomp_demo_images, write_word_vocab
from jaxretrieval.data.precomp_pipeline import GlobalFeatures

SIZES = {"train": 20, "test": 10}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = write_precomp_demo(tmp_path_factory.mktemp("precomp") / "demo", split_sizes=SIZES, regions=4, dim=16)
    write_precomp_demo_images(root)
    write_word_vocab(root)
    # line 7 repeats line 3 (another image's caption), line 4 is blank
    path = root / "test_caps.txt"
    lines = path.read_text().splitlines()
    lines[6], lines[3] = lines[2], "   "
    path.write_text("".join(f"{line}\n" for line in lines))
    return root


def args(root: Path, *extra: str) -> list[str]:
    return ["--root", str(root), "--images", str(root / "images"), "--pattern", "{id}.png", "--splits", "train,test",
            *extra]


def random_clip(root: Path) -> list[str]:
    return ["--model", "tiny", "--seed", "0", "--tokenizer", str(root / "words.txt")]


def outputs(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if "clip" in path.name)


@pytest.fixture(scope="module")
def written(demo: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("written") / "demo"
    shutil.copytree(demo, root)
    assert main(args(root, *random_clip(root), "--batch-size", "8")) == 0
    return root


def test_images_render_each_id_once_and_are_kept(demo: Path):
    folder = demo / "images"
    ids = [line for split in SIZES for line in (demo / f"{split}_ids.txt").read_text().split()]
    assert sorted(path.stem for path in folder.glob("*.png")) == sorted(ids)
    before = (folder / f"{ids[0]}.png").stat().st_mtime_ns
    assert write_precomp_demo_images(demo) == folder
    assert (folder / f"{ids[0]}.png").stat().st_mtime_ns == before
    assert all(len(set(pair)) == 2 for _, pair in image_concepts(demo, "train"))


def test_shapes_norms_and_reader(written: Path, capsys):
    for split, count in SIZES.items():
        ims = np.load(written / f"{split}_clip_ims.npy")
        caps = np.load(written / f"{split}_clip_caps.npy")
        assert ims.dtype == caps.dtype == np.float32
        assert ims.shape == (count, 64) and caps.shape == (5 * count, 64)
        np.testing.assert_allclose(np.linalg.norm(ims, axis=1), 1.0, atol=1e-5)
        norms = np.linalg.norm(caps, axis=1)
        if split == "train":
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        assert GlobalFeatures(written, split, count, 5 * count).dim == 64  # what AAHR's pipeline reads
    assert outputs(written) == sorted(f"{s}_clip_{k}.npy" for s in SIZES for k in ("ims", "caps"))
    assert not [path for path in written.iterdir() if path.name.startswith(".")]


def test_rows_follow_caption_lines(written: Path):
    caps = np.load(written / "test_clip_caps.npy")
    lines = (written / "test_caps.txt").read_text().splitlines()
    np.testing.assert_array_equal(caps[3], 0.0)  # the blank line 4
    np.testing.assert_array_equal(caps[6], caps[2])
    others = np.delete(caps, 3, axis=0)
    np.testing.assert_allclose(np.linalg.norm(others, axis=1), 1.0, atol=1e-5)
    clip = load_clip(model="tiny", seed=0, tokenizer=str(written / "words.txt"))
    alone = np.asarray(clip.model.encode_text(clip.tokenizer([lines[4]]), True))[0]
    np.testing.assert_allclose(caps[4], alone, atol=1e-5)
    image_id = (written / "test_ids.txt").read_text().split()[1]
    pixels = clip.preprocess(str(written / "images" / f"{image_id}.png"))[None]
    image = np.asarray(clip.model.encode_image(pixels, True))[0]
    np.testing.assert_allclose(np.load(written / "test_clip_ims.npy")[1], image, atol=1e-5)


def test_checkpoint_gives_the_same_rows(written: Path, tmp_path: Path):
    clip = load_clip(model="tiny", seed=0, tokenizer=str(written / "words.txt"))
    config = load_config(None, ["model.name=tiny"])
    checkpoint = write_model(tmp_path / "clip", clip.model.params, {"config": to_dict(config),
                                                                    "tokenizer": clip.tokenizer.to_spec()})
    root = tmp_path / "demo"
    shutil.copytree(written, root)
    for path in root.glob("*_clip_*.npy"):
        path.unlink()
    assert main(args(root, "--checkpoint", str(checkpoint), "--batch-size", "8")) == 0
    for name in outputs(written):
        np.testing.assert_allclose(np.load(root / name), np.load(written / name), atol=1e-5)


def test_missing_image_names_file_and_line_and_writes_nothing(demo: Path, tmp_path: Path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    image_id = (root / "test_ids.txt").read_text().split()[2]
    (root / "images" / f"{image_id}.png").unlink()
    assert main(args(root, *random_clip(root))) == 2
    error = capsys.readouterr().err
    assert "test_ids.txt:3" in error and f"{image_id}.png" in error and "does not exist" in error
    assert outputs(root) == []
    assert not [path for path in root.iterdir() if path.name.startswith(".")]


def test_unreadable_image_leaves_no_partial_split(demo: Path, tmp_path: Path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    image_id = (root / "test_ids.txt").read_text().split()[-1]
    (root / "images" / f"{image_id}.png").write_bytes(b"not a png")
    assert main(args(root, *random_clip(root), "--batch-size", "8")) == 2
    error = capsys.readouterr().err
    assert f"test_ids.txt:{SIZES['test']}" in error and f"{image_id}.png" in error
    # train finished before the error and stays whole; test's files never appear
    assert outputs(root) == ["train_clip_caps.npy", "train_clip_ims.npy"]
    assert np.load(root / "train_clip_ims.npy").shape == (SIZES["train"], 64)
    assert not [path for path in root.iterdir() if path.name.startswith(".")]


def test_coco_style_patterns_pick_the_folder_that_holds_each_id(demo: Path, tmp_path: Path):
    images = tmp_path / "coco"
    for folder in ("train2014", "val2014"):
        (images / folder).mkdir(parents=True)
    ids = (demo / "test_ids.txt").read_text().split()
    for number, image_id in enumerate(ids):
        folder = "train2014" if number % 2 else "val2014"
        shutil.copy(demo / "images" / f"{image_id}.png", images / folder / f"COCO_{folder}_{image_id:0>12}.png")
    patterns = ["train2014/COCO_train2014_{id:0>12}.png", "val2014/COCO_val2014_{id:0>12}.png"]
    plan = image_paths(PrecompSource(demo, "test", skip_bad=True), images, patterns)
    assert plan.paths[1] == str(images / "train2014" / f"COCO_train2014_{ids[1]:0>12}.png")
    assert plan.paths[2] == str(images / "val2014" / f"COCO_val2014_{ids[2]:0>12}.png")
    assert plan.origins[2] == f"{demo / 'test_ids.txt'}:3"


@pytest.mark.parametrize("extra, message", [
    (["--pattern", "{id:012}.png"], "{id:0>12}"),
    (["--pattern", "x.png"], "does not use {id}"),
])
def test_bad_patterns(demo: Path, extra: list[str], message: str, capsys):
    argv = ["--root", str(demo), "--images", str(demo / "images"), *extra, *random_clip(demo)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_ids_file(demo: Path, tmp_path: Path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    (root / "test_ids.txt").unlink()
    assert main(args(root, *random_clip(root))) == 2
    assert "test_ids.txt does not exist" in capsys.readouterr().err
