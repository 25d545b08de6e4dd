"""Re-id data for Centroids-ReID: split readers, identity-balanced (P x K) batch order, and augmentation.

Readers return a `ReidSource` of `ReidRecord(path, pid, camid)`:
- `market1501` / `dukemtmc`: a folder with `bounding_box_train`, `query` and `bounding_box_test` of `*.jpg`
  files named `<pid>_c<camera>...` (other files are ignored). Junk images (pid -1) are skipped in every split;
  Market's pid 0 (background distractors) is kept. Camera ids become 0-based. Train pids are relabelled to
  0..N-1 in sorted order; query/gallery pids are kept.
- `street2shop` (= `deepfashion`): one COCO-style JSON per split (`images` with `id`/`file_name`, `annotations`
  with `image_id`/`pair_id`/`source`), images under `root/<split>`. The pid is the `pair_id`; camid is 1 for
  the gallery (shop images) and 0 for train and query (user images). Train drops pair ids with a single image
  and is relabelled; query/gallery pids are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image

from jaxretrieval.data.sources import DataError
from jaxretrieval.data.transforms import load_image

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")
MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILE_NAME = re.compile(r"([-\d]+)_c(\d)")


class ReidRecord(NamedTuple):
    path: str
    pid: int
    camid: int


class ReidSource:
    """Records of one split; usable as a grain RandomAccessDataSource."""

    def __init__(self, records: Sequence[ReidRecord], name: str = "reid"):
        self.records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ReidRecord:
        return self.records[index]

    @property
    def pids(self) -> np.ndarray:
        return np.array([r.pid for r in self.records], dtype=np.int64)

    @property
    def camids(self) -> np.ndarray:
        return np.array([r.camid for r in self.records], dtype=np.int64)

    @property
    def num_ids(self) -> int:
        return len({r.pid for r in self.records})

    def __repr__(self) -> str:
        return f"ReidSource({self.name}, {len(self)} images, {self.num_ids} ids)"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got '{split}'")


def _relabel(records: list[ReidRecord]) -> list[ReidRecord]:
    labels = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=labels[r.pid]) for r in records]


def _folder_split(root: str | Path, split: str, dataset: str, max_camera: int) -> ReidSource:
    _check_split(split)
    folder = Path(root) / MARKET_FOLDERS[split]
    if not folder.is_dir():
        raise DataError(f"{dataset} {split} folder {folder} does not exist")
    records = []
    for path in sorted(folder.glob("*.jpg")):
        match = _FILE_NAME.search(path.name)
        try:
            pid, camera = int(match.group(1)), int(match.group(2))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            # The original's reader searches the name the same way (re.search, not match).
            raise DataError(f"{path}: file name holds no '<pid>_c<camera>' (such as 0002_c1s1_000451_03.jpg)") from None
        if pid == JUNK_PID:
            continue
        if pid < 0:
            raise DataError(f"{path}: person id {pid} is negative (only -1, junk, is allowed)")
        if not 1 <= camera <= max_camera:
            raise DataError(f"{path}: camera {camera} is outside 1..{max_camera}")
        records.append(ReidRecord(str(path), pid, camera - 1))
    if not records:
        raise DataError(f"{dataset} {split} folder {folder} holds no images with a person id")
    return ReidSource(_relabel(records) if split == "train" else records, f"{dataset} {split} {folder}")


def market1501(root: str | Path, split: str) -> ReidSource:
    """Market-1501 split ('train', 'query' or 'gallery'); `root` holds `bounding_box_train` etc. (6 cameras)."""
    return _folder_split(root, split, "market1501", max_camera=6)


def dukemtmc(root: str | Path, split: str) -> ReidSource:
    """DukeMTMC-reID split; `root` is the `DukeMTMC-reID` folder (8 cameras)."""
    return _folder_split(root, split, "dukemtmc", max_camera=8)


def _require(item: Any, key: str, types: tuple[type, ...], where: str) -> Any:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if key not in item:
        raise DataError(f"{where}: missing key '{key}'")
    value = item[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise DataError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")
    return value


def _load_coco(json_path: Path) -> tuple[list, list]:
    try:
        data = json.loads(json_path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"annotation file {json_path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read annotation file {json_path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{json_path}: not valid UTF-8 text (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise DataError(f"{json_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{json_path}: not valid JSON (nested too deeply)") from None
    return _require(data, "images", (list,), str(json_path)), _require(data, "annotations", (list,), str(json_path))


def street2shop(root: str | Path, json_path: str | Path, split: str, *, image_dir: str | Path | None = None,
                by_source: bool = False) -> ReidSource:
    """A COCO-style re-id split (Street2Shop, DeepFashion consumer-to-shop); images under `image_dir` (default
    `root/<split>`). Records are in sorted pair-id order, annotations in file order within an id.

    `by_source=True` reads query or gallery from one combined test file, as the conversion scripts split it:
    'user' annotations are the query, all others the gallery. Annotations whose image is not listed are skipped.
    """
    _check_split(split)
    json_path = Path(json_path)
    images, annotations = _load_coco(json_path)
    file_names: dict[int | str, str] = {}
    for i, item in enumerate(images):
        where = f"{json_path}: images[{i}]"
        key = _require(item, "id", (int, str), where)
        file_names[key] = _require(item, "file_name", (str,), where)
    by_pid: dict[int, list[str]] = defaultdict(list)
    unlisted = 0
    for i, item in enumerate(annotations):
        where = f"{json_path}: annotations[{i}]"
        image_id = _require(item, "image_id", (int, str), where)
        pid = _require(item, "pair_id", (int,), where)
        if pid < 0:
            raise DataError(f"{where}: key 'pair_id' is negative ({pid})")
        if by_source or "source" in item:
            source = _require(item, "source", (str,), where)
            if source not in ("user", "shop"):
                raise DataError(f"{where}: key 'source' must be 'user' or 'shop', got '{source}'")
            if by_source and split != "train" and (source == "user") != (split == "query"):
                continue
        if image_id not in file_names:
            unlisted += 1
            continue
        by_pid[pid].append(file_names[image_id])
    if unlisted:
        log.warning("%s: skipped %d annotations whose image_id is not in 'images'", json_path, unlisted)
    if split == "train":
        by_pid = {pid: files for pid, files in by_pid.items() if len(files) > 1}
    folder = Path(image_dir) if image_dir is not None else Path(root) / split
    camid = 1 if split == "gallery" else 0
    records = [ReidRecord(str(folder / name), pid, camid) for pid in sorted(by_pid) for name in by_pid[pid]]
    if not records:
        need = " (train needs pair ids with two or more images)" if split == "train" else ""
        raise DataError(f"{json_path}: no {split} images{need}")
    return ReidSource(_relabel(records) if split == "train" else records, f"{split} {json_path}")


deepfashion = street2shop


def coco_split_json(train_json: str | Path, split: str) -> Path:
    """The original's naming rule for the query/gallery JSON: 'train' in the file name replaced by the split."""
    _check_split(split)
    path = Path(train_json)
    if "train" not in path.name:
        raise DataError(f"{path}: file name holds no 'train' to replace with '{split}'")
    return path.with_name(path.name.replace("train", split))


# ---------------------------------------------------------------------------------------------------------
# Identity-balanced sampling (RandomIdentitySampler + the per-pid dataset of Centroids-ReID)


def _identity_groups(pids: np.ndarray, num_ids: int, num_instances: int) -> list[np.ndarray]:
    if pids.ndim != 1 or not np.issubdtype(pids.dtype, np.integer):
        raise ValueError(f"pids must be a 1-D integer array, got {pids.dtype} of shape {pids.shape}")
    if num_ids < 1 or num_instances < 1:
        raise ValueError(f"num_ids and num_instances must be >= 1, got {num_ids} and {num_instances}")
    order = np.argsort(pids, kind="stable")
    starts = np.unique(pids[order], return_index=True)[1]
    groups = [g for g in np.split(order, starts[1:]) if _usable(g.size, num_instances)]
    if len(groups) < num_ids:
        raise DataError(f"only {len(groups)} identities have enough images (2 or more when K > 1) for batches "
                        f"of {num_ids} identities x {num_instances} instances")
    return groups


def _usable(count: int, k: int) -> int:
    """Images of an identity used per epoch: a lone leftover image (count % K == 1) is dropped."""
    return count - 1 if count % k == 1 else count


def _plan(pids: Sequence[int] | np.ndarray, num_ids: int, num_instances: int, seed: int,
          epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
    groups = _identity_groups(np.asarray(pids), num_ids, num_instances)
    rng = np.random.default_rng([seed, epoch])
    k = num_instances
    chunks: list[list[tuple[np.ndarray, int]]] = []  # per identity: (K rows, number of real rows)
    for group in groups:
        shuffled = rng.permutation(group)[:_usable(group.size, k)]
        own = []
        for start in range(0, shuffled.size, k):
            part = shuffled[start:start + k]
            pad = rng.choice(part, k - part.size, replace=True) if part.size < k else part[:0]
            own.append((np.concatenate([part, pad]), part.size))
        chunks.append(own)
    taken = [0] * len(chunks)
    available = list(range(len(chunks)))
    rows, real = [], []
    while len(available) >= num_ids:
        for pick in rng.choice(len(available), num_ids, replace=False):
            identity = available[pick]
            chunk, count = chunks[identity][taken[identity]]
            taken[identity] += 1
            rows.append(chunk)
            real.append(np.arange(k) < count)
        available = [i for i in available if taken[i] < len(chunks[i])]
    return np.concatenate(rows).astype(np.int64), np.concatenate(real)


def pk_epoch_plan(pids: Sequence[int] | np.ndarray, num_ids: int, num_instances: int, seed: int, epoch: int, *,
                  resample: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's (record indices, real mask); consecutive P*K blocks are the batches, K rows per identity.

    Per identity (in sorted pid order) its images are shuffled and cut into groups of K; with count % K == 1
    the leftover image is dropped, so identities with a single image never appear (K > 1). A last group
    with fewer than K images is padded by drawing from its own images with replacement. Then P identities at a
    time are drawn uniformly without replacement among those with groups left, each giving its next group,
    until fewer than P identities have groups left. `resample=False` (DATALOADER.USE_RESAMPLING False, the CTL
    scripts) marks the padding rows not real: the original feeds zero images there, masked out of the losses.
    Deterministic in (seed, epoch); the order is global, each process takes its rows of every batch.
    """
    indices, real = _plan(pids, num_ids, num_instances, seed, epoch)
    return indices, real if not resample else np.ones_like(real)


def pk_epoch_order(pids: Sequence[int] | np.ndarray, num_ids: int, num_instances: int, seed: int,
                   epoch: int) -> np.ndarray:
    """The record indices of `pk_epoch_plan` (padding rows are resampled images)."""
    return _plan(pids, num_ids, num_instances, seed, epoch)[0]


def pk_num_batches(pids: Sequence[int] | np.ndarray, num_ids: int, num_instances: int, seed: int,
                   epoch: int) -> int:
    """The number of batches of that epoch: it varies from epoch to epoch, as identities run out unevenly."""
    return len(_plan(pids, num_ids, num_instances, seed, epoch)[0]) // (num_ids * num_instances)


def pk_max_batches(pids: Sequence[int] | np.ndarray, num_ids: int, num_instances: int) -> int:
    """An upper bound on the batches of any epoch: every identity's groups, P per batch."""
    groups = _identity_groups(np.asarray(pids), num_ids, num_instances)
    return sum(math.ceil(_usable(g.size, num_instances) / num_instances) for g in groups) // num_ids


# ---------------------------------------------------------------------------------------------------------
# Transforms (datasets/transforms/build.py of Centroids-ReID)


def _check_size(size: tuple[int, int]) -> None:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) >= 1, got {size}")


def _resized(image: Image.Image | str, size: tuple[int, int]) -> np.ndarray:
    """torchvision Resize((h, w)) on a PIL image (bilinear, PIL's antialiasing) -> uint8 (h, w, 3)."""
    image = load_image(image) if isinstance(image, str) else image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _normalised(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """ToTensor + Normalize, channels last."""
    return (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """Zhong et al.'s random erasing as Centroids-ReID applies it: after normalisation, on (H, W, C).

    With `probability`, up to `attempts` rectangles of area U(area) of the image and aspect (h / w)
    U(min_aspect, 1 / min_aspect) are tried; the first strictly smaller than the image is filled with `fill`
    (the config's PIXEL_MEAN values, written into the normalised image as they are).
    """

    probability: float = 0.5
    area: tuple[float, float] = (0.02, 0.4)
    min_aspect: float = 0.3
    fill: Sequence[float] = IMAGENET_MEAN
    attempts: int = 100

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.uniform(0, 1) >= self.probability:
            return pixels
        height, width = pixels.shape[:2]
        for _ in range(self.attempts):
            target = rng.uniform(*self.area) * height * width
            aspect = rng.uniform(self.min_aspect, 1 / self.min_aspect)
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                pixels = pixels.copy()
                pixels[top:top + h, left:left + w] = np.asarray(self.fill, pixels.dtype)[:pixels.shape[2]]
                return pixels
        return pixels


@dataclasses.dataclass(frozen=True)
class ReidTrainTransform:
    """Image (or path) + rng -> float32 (H, W, 3): Resize(size), flip, Pad(padding, 0), RandomCrop(size),
    ToTensor, Normalize(mean, std), RandomErasing(erase_prob, fill=mean)."""

    size: tuple[int, int] = (256, 128)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    flip_prob: float = 0.5
    padding: int = 10
    erase_prob: float = 0.5

    def __post_init__(self):
        _check_size(self.size)
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")

    def __call__(self, image: Image.Image | str, rng: np.random.Generator) -> np.ndarray:
        pixels = _resized(image, self.size)
        if rng.random() < self.flip_prob:
            pixels = pixels[:, ::-1]
        p, (height, width) = self.padding, self.size
        pixels = np.pad(pixels, ((p, p), (p, p), (0, 0)))
        top = int(rng.integers(0, 2 * p, endpoint=True)) if p else 0
        left = int(rng.integers(0, 2 * p, endpoint=True)) if p else 0
        pixels = _normalised(pixels[top:top + height, left:left + width], self.mean, self.std)
        return RandomErasing(self.erase_prob, fill=self.mean)(pixels, rng)


@dataclasses.dataclass(frozen=True)
class ReidEvalTransform:
    """Image (or path) -> float32 (H, W, 3): Resize(size), ToTensor, Normalize(mean, std). `rng` is ignored."""

    size: tuple[int, int] = (256, 128)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        _check_size(self.size)

    def __call__(self, image: Image.Image | str, rng: np.random.Generator | None = None) -> np.ndarray:
        return _normalised(_resized(image, self.size), self.mean, self.std)


class EncodeReid(grain.transforms.RandomMap):
    """ReidRecord -> {"image": float32 (H, W, 3), "label": int32 pid, "camera": int32 camid, "origin": [pid, camid]
    (kept on the host to name a batch's records in errors)}."""

    def __init__(self, transform: Callable[[Image.Image | str, np.random.Generator], np.ndarray]):
        self.transform = transform

    def random_map(self, record: ReidRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = self.transform(record.path, rng)
        return {"image": np.ascontiguousarray(image, dtype=np.float32), "label": np.int32(record.pid),
                "camera": np.int32(record.camid), "origin": np.array([record.pid, record.camid], np.int32)}
