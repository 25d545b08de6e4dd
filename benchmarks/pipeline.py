"""Input pipeline throughput: samples/s of training batches (decode, resize + crop, normalise, tokenize, the global
shuffled order) for each source kind, image size, worker count and decode mode, beside open_clip's pipeline (a torch
DataLoader over the same JPEGs with open_clip's image transform and tokenizer) in the same run.

The inputs are generated: photo-sized JPEGs (sides 500-1024 px, COCO-like), smooth shapes plus sensor-like noise,
quality 90, with captions; written once as JSON lines, open_clip TSV, webdataset shards and (with the [tfds] extra) a
TFDS dataset. Modes: `full` (full decode, float32 normalised on the host: the default pipeline) and `fast`
(data.jpeg_draft=true data.normalise_on_device=true). Per-core figures divide by the processes decoding (workers, or
1 in-process); the projection multiplies the best per-core rate by 16 cores (a 16-core host), against the target of
2,500 samples/s at 224 px (one H200's CLIP B/16 step rate, see docs/benchmarks.md).

    python benchmarks/pipeline.py                             # every kind, 224 and 384 px, 0/1/2 workers
    python benchmarks/pipeline.py --kinds jsonl --sizes 224 --workers 0 --batches 4
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import environment
from PIL import Image

WORDS = ("a red square circle blue green large small photo of the on left right top bottom dog cat man woman bike "
         "street tree sky with and in near next to").split()
TARGET = 2500  # samples/s at 224 px: one H200's CLIP B/16 step rate
CORES = 16
INDEX_SECONDS: dict[str, float] = {}  # data.kind=... -> seconds to build the source (scan / index) the first time


def photo(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: gradients, a few blobs, noise; sides as COCO's (500-1024 px)."""
    width, height = int(rng.integers(500, 1025)), int(rng.integers(375, 769))
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([120 + 90 * np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) *
                       np.cos(rng.uniform(2, 9) * y + c) for c in range(3)], axis=-1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    pixels = (pixels + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_inputs(folder: Path, count: int, kinds: list[str]) -> dict[str, list[str]]:
    """The generated images and captions in every format; the config overrides that read each."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    rows = []
    for i in range(count):
        name = f"images/{i:05d}.jpg"
        (folder / name).write_bytes(photo(rng))
        rows.append({"image": name, "caption": " ".join(rng.choice(WORDS, int(rng.integers(6, 16)))), "image_id": i})
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    overrides = {"jsonl": ["data.kind=jsonl", "data.train_file=train.jsonl"]}
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "train.tsv").write_text("filepath\ttitle\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows))
    overrides["csv"] = ["data.kind=csv", "data.train_file=train.tsv"]
    with tarfile.open(folder / "train-000.tar", "w") as tar:
        for i, row in enumerate(rows):
            for member, data in ((f"{i:05d}.jpg", (folder / row["image"]).read_bytes()),
                                 (f"{i:05d}.txt", row["caption"].encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    overrides["webdataset"] = ["data.kind=webdataset", "data.train_file=train-{000..000}.tar"]
    if "tfds" in kinds:
        from jaxretrieval.data.tfds_source import write_tfds

        write_tfds(folder, {"train": [{**row, "image": (folder / row["image"]).read_bytes()} for row in rows]})
        overrides["tfds"] = ["data.kind=tfds", "data.tfds_name=caption_rows", "data.tfds_id_key=image_id"]
    return overrides


def jax_rate(folder: Path, overrides: list[str], size: int, workers: int, mode: str, batch: int,
             batches: int) -> float:
    from jaxretrieval.config import load_config
    from jaxretrieval.data.pipeline import caption_source, make_tokenizer, train_loader

    fast = mode == "fast"
    config = load_config(None, [*overrides, f"data.root={folder}", f"model.image.image_size={size}",
                                f"train.batch_size={batch}", f"data.workers={workers}", "data.flip=false",
                                f"data.jpeg_draft={fast}", f"data.normalise_on_device={fast}",
                                "model.text.context_length=32"])
    start = time.perf_counter()
    source = caption_source(config, folder, "train")
    INDEX_SECONDS.setdefault(overrides[0], time.perf_counter() - start)
    loader = iter(train_loader(config, source, make_tokenizer(config, folder)))
    next(loader)  # workers started, first batch decoded
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - start)


def torch_rate(folder: Path, size: int, workers: int, batch: int, batches: int) -> float | None:
    """open_clip's pipeline on the same JSON lines: PIL decode, its eval transform (Resize bicubic, CenterCrop,
    ToTensor, Normalize), its tokenizer, a torch DataLoader with `workers` processes."""
    try:
        import open_clip
        import torch
    except ImportError:
        return None
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    transform = open_clip.image_transform(size, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            with Image.open(folder / rows[i]["image"]) as image:
                return transform(image.convert("RGB")), tokenizer([rows[i]["caption"]])[0]

    torch.set_num_threads(1)
    loader = iter(torch.utils.data.DataLoader(Pairs(), batch_size=batch, shuffle=True, num_workers=workers,
                                              drop_last=True, persistent_workers=workers > 0))
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batch * batches / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="jsonl,csv,webdataset,tfds")
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--modes", default="full,fast")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if "tfds" in kinds:
        try:
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            print("tfds rows left out: pip install -e '.[tfds]'")
            kinds.remove("tfds")
    sizes, workers, modes = ([int(v) for v in args.sizes.split(",")], [int(v) for v in args.workers.split(",")],
                             args.modes.split(","))
    print(json.dumps(environment(1, ["jax", "grain", "pillow", "torch", "open_clip_torch", "tensorflow-datasets"])))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        begun = time.perf_counter()
        images = max(args.images, args.batch * (args.batches + 2))  # the torch loader reads one epoch, no more
        overrides = write_inputs(folder, images, kinds)
        sides = [Image.open(p).size for p in sorted((folder / "images").iterdir())]
        print(f"{images} JPEGs, mean {np.mean([w for w, _ in sides]):.0f}x{np.mean([h for _, h in sides]):.0f} "
              f"px, {np.mean([p.stat().st_size for p in (folder / 'images').iterdir()]) / 1024:.0f} KiB, written in "
              f"{time.perf_counter() - begun:.1f} s")
        for size in sizes:
            for count in workers:
                for kind in kinds:
                    for mode in modes:
                        rate = jax_rate(folder, overrides[kind], size, count, mode, args.batch, args.batches)
                        rows.append(("jaxretrieval", kind, mode, size, count, rate))
                if not args.no_torch and (rate := torch_rate(folder, size, count, args.batch, args.batches)):
                    rows.append(("open_clip", "jsonl", "full", size, count, rate))
    for kind, seconds in INDEX_SECONDS.items():
        print(f"index: {kind}: {seconds:.3f} s for {images} samples")
    print("\n| pipeline | source | mode | px | workers | samples/s | per core | 16-core projection | vs target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kind, mode, size, count, rate in rows:
        per_core = rate / max(count, 1)
        target = f"{per_core * CORES / TARGET:.2f}x" if size == 224 else "-"
        print(f"| {name} | {kind} | {mode} | {size} | {count} | {rate:,.0f} | {per_core:,.0f} | "
              f"{per_core * CORES:,.0f} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
