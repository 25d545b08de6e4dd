"""A tiny synthetic person re-id dataset in the Market-1501 layout, generated locally from a seed.

Each identity is a drawn "person" (skin, hair, shirt with a pattern, sleeves, trousers or shorts, shoes, maybe
a bag) and each camera changes the viewing conditions (background, brightness, colour tint, noise, blur), while
every image varies in position, scale and facing direction. Train and test identities are disjoint; every
identity is seen by two or more cameras. `market1501(root, split)` reads the result.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxretrieval.data.demo import install, sibling

FORMAT_VERSION = 1
METADATA_FILE = "reid_demo.json"
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SKIN = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30))
HAIR = ((20, 16, 14), (70, 45, 25), (140, 100, 50), (200, 180, 120), (120, 120, 120))
PATTERNS = ("plain", "hstripes", "vstripes", "split")


def _colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.25, 1.0), rng.uniform(0.2, 0.95))
    return np.array(rgb, np.float32) * 255


def _identity(seed: int, pid: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 1, pid])
    return {
        "skin": np.array(SKIN[rng.integers(len(SKIN))], np.float32),
        "hair": np.array(HAIR[rng.integers(len(HAIR))], np.float32),
        "shirt": _colour(rng), "shirt2": _colour(rng), "trousers": _colour(rng), "shoes": _colour(rng) * 0.5,
        "bag": _colour(rng) if rng.random() < 0.4 else None,
        "pattern": PATTERNS[rng.integers(len(PATTERNS))], "period": float(rng.uniform(0.05, 0.1)),
        "long_sleeves": bool(rng.random() < 0.5), "shorts": bool(rng.random() < 0.25),
        "build": float(rng.uniform(0.85, 1.15)),
    }


def _camera(seed: int, cam: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 2, cam])
    return {
        "background": rng.uniform(50, 200, 3).astype(np.float32), "gradient": float(rng.uniform(-60, 60)),
        "gain": float(rng.uniform(0.7, 1.25)), "tint": rng.uniform(0.85, 1.15, 3).astype(np.float32),
        "noise": float(rng.uniform(2, 9)), "blur": bool(rng.random() < 0.4),
    }


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def render_person(identity: dict[str, Any], camera: dict[str, Any], rng: np.random.Generator,
                  height: int, width: int) -> np.ndarray:
    """One uint8 (height, width, 3) view of `identity` through `camera`, with per-image jitter from `rng`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = camera["background"] + (yy / height - 0.5)[..., None] * camera["gradient"]
    canvas = canvas + rng.normal(0, 6, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    span = height * rng.uniform(0.8, 0.95)  # person height in pixels
    top = (height - span) / 2 + rng.uniform(-0.04, 0.04) * height
    centre = width / 2 + rng.uniform(-0.08, 0.08) * width
    y, x = (yy - top) / span, (xx - centre) / span  # person coordinates: y in [0, 1] from head to feet
    if rng.random() < 0.5:
        x = -x  # facing the other way: the bag changes side
    half = 0.13 * identity["build"]
    legs = (y >= 0.52) & (y < 0.94) & (np.abs(x) < half * 0.9) & (np.abs(x) > 0.012)
    _paint(canvas, legs, identity["trousers"])
    if identity["shorts"]:
        _paint(canvas, legs & (y >= 0.7), identity["skin"])
    _paint(canvas, (y >= 0.94) & (y < 1.0) & (np.abs(x) < half * 0.95) & (np.abs(x) > 0.01), identity["shoes"])
    torso = (y >= 0.17) & (y < 0.53) & (np.abs(x) < half)
    shirt = np.broadcast_to(identity["shirt"], canvas.shape).copy()
    second = {"plain": np.zeros_like(y, bool), "hstripes": (y / identity["period"]) % 2 < 1,
              "vstripes": (x / identity["period"]) % 2 < 1, "split": y >= 0.35}[identity["pattern"]]
    shirt[second] = identity["shirt2"]
    canvas[torso] = shirt[torso]
    arms = (y >= 0.18) & (y < 0.5) & (np.abs(x) >= half) & (np.abs(x) < half + 0.06)
    _paint(canvas, arms, identity["shirt"] if identity["long_sleeves"] else identity["skin"])
    _paint(canvas, arms & (y < 0.28), identity["shirt"])
    if identity["bag"] is not None:
        _paint(canvas, (y >= 0.3) & (y < 0.55) & (x >= half + 0.03) & (x < half + 0.14), identity["bag"])
    head = ((y - 0.09) / 0.08) ** 2 + (x / 0.065) ** 2 < 1
    _paint(canvas, head, identity["skin"])
    _paint(canvas, head & (y < 0.07), identity["hair"])
    canvas = canvas * camera["gain"] * camera["tint"] * rng.uniform(0.9, 1.1)
    if camera["blur"]:
        canvas = (canvas + np.roll(canvas, 1, 0) + np.roll(canvas, 1, 1) + np.roll(canvas, (1, 1), (0, 1))) / 4
    canvas = canvas + rng.normal(0, camera["noise"], canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _junk(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A Market 'junk' image: a fragment of background and clutter, no whole person."""
    base = rng.uniform(40, 220, (height // 8 + 1, width // 4 + 1, 3)).repeat(8, 0).repeat(4, 1)[:height, :width]
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _write_dataset(directory: Path, params: dict[str, Any]) -> dict[str, int]:
    seed, height, width = params["seed"], params["height"], params["width"]
    rng = np.random.default_rng([seed, 0])
    total = params["num_train_ids"] + params["num_test_ids"]
    pids = rng.choice(np.arange(1, 4 * total + 1), total, replace=False)  # sparse ids, as Market's
    train_ids, test_ids = np.sort(pids[:params["num_train_ids"]]), np.sort(pids[params["num_train_ids"]:])
    for folder in FOLDERS:
        (directory / folder).mkdir()
    counts = dict.fromkeys(FOLDERS, 0)
    frame = 0

    def save(pixels: np.ndarray, folder: str, pid: int, cam: int, index: int) -> None:
        nonlocal frame
        frame += 1
        label = f"{pid:04d}" if pid >= 0 else "-1"
        name = f"{label}_c{cam + 1}s1_{frame:06d}_{index:02d}.jpg"
        Image.fromarray(pixels).save(directory / folder / name, quality=92)
        counts[folder] += 1

    cameras = [_camera(seed, cam) for cam in range(params["cameras"])]
    per_camera, queries = params["images_per_id_per_camera"], params["query_per_camera"]
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for pid in ids:
            pid = int(pid)
            identity = _identity(seed, pid)
            id_rng = np.random.default_rng([seed, 3, pid])
            seen = np.sort(id_rng.choice(params["cameras"], id_rng.integers(2, params["cameras"] + 1), replace=False))
            for cam in seen:
                for index in range(per_camera):
                    pixels = render_person(identity, cameras[cam], np.random.default_rng([seed, 4, pid, cam, index]),
                                           height, width)
                    folder = FOLDERS[0] if split == "train" else FOLDERS[1] if index < queries else FOLDERS[2]
                    save(pixels, folder, pid, int(cam), index)
    for index in range(params["distractor_images"]):  # pid 0: Market's background distractors, kept as negatives
        cam = int(rng.integers(params["cameras"]))
        save(render_person(_identity(seed, 0), cameras[cam], rng, height, width), FOLDERS[2], 0, cam, index)
    for _ in range(params["junk_images"]):  # pid -1: junk, skipped by the readers
        save(_junk(rng, height, width), FOLDERS[2], -1, int(rng.integers(params["cameras"])), 0)
    return counts


def _read_params(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("params") if isinstance(meta, dict) else None


def write_reid_demo(root: str | os.PathLike[str], *, num_train_ids: int = 32, num_test_ids: int = 32, cameras: int = 4,
                    images_per_id_per_camera: int = 3, query_per_camera: int = 1, distractor_images: int = 4,
                    junk_images: int = 4, height: int = 64, width: int = 32, seed: int = 0) -> Path:
    """Writes the demo under `root` unless it is there with the same parameters; returns `root`.

    Train images go to `bounding_box_train`; for test identities `query_per_camera` images per camera go to
    `query`, the rest to `bounding_box_test`, with `distractor_images` of pid 0 and `junk_images` of pid -1.
    Files are written to a hidden sibling folder renamed to `root` when complete (`reid_demo.json` last).
    """
    root = Path(root)
    if min(num_train_ids, num_test_ids) < 1:
        raise ValueError(f"num_train_ids and num_test_ids must be >= 1, got {num_train_ids} and {num_test_ids}")
    if not 2 <= cameras <= 6:
        raise ValueError(f"cameras must be in 2..6 (Market-1501 has 6), got {cameras}")
    if not 1 <= query_per_camera < images_per_id_per_camera:
        raise ValueError(f"need 1 <= query_per_camera < images_per_id_per_camera, got {query_per_camera} and "
                         f"{images_per_id_per_camera}")
    if min(distractor_images, junk_images) < 0 or height < 16 or width < 8:
        raise ValueError("distractor_images and junk_images must be >= 0, height >= 16 and width >= 8")
    params = {"format_version": FORMAT_VERSION, "num_train_ids": int(num_train_ids), "num_test_ids": int(num_test_ids),
              "cameras": int(cameras), "images_per_id_per_camera": int(images_per_id_per_camera),
              "query_per_camera": int(query_per_camera), "distractor_images": int(distractor_images),
              "junk_images": int(junk_images), "height": int(height), "width": int(width), "seed": int(seed)}
    if _read_params(root) == params:
        return root
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"re-id demo root {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and _read_params(root) is None:
        raise FileExistsError(f"{root} is not empty and holds no re-id demo; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = sibling(root, "tmp")
    staged.mkdir()
    try:
        counts = _write_dataset(staged, params)
        meta = {"params": params, "images": counts}
        (staged / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        install(staged, root, lambda: _read_params(root) == params)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return root
