"""Training examples and evaluation inputs from precomputed region features (`data.kind: precomp`, see precomp.py),
with VSE-infinity's two training augmentations (woodfrog/vse_infty, lib/datasets/image_caption.py; read for facts):

- region drop ("size augmentation"): each region of an image is kept when a uniform draw exceeds 0.2, order kept;
  the kept rows come first and zeros pad the set back to its K rows, `image_lengths` the count (at least 1: an image
  that lost every region keeps them all, where the original would fail);
- caption noise (`process_caption`): the caption is split into words as BERT's basic tokenizer does, each word into
  WordPiece pieces, and each word with probability 0.2 is changed: half of those have every piece replaced by [MASK],
  a tenth by a random vocabulary id each, the rest are deleted. Then [CLS] ... [SEP], cut to the context length with
  [SEP] kept last (the original does not cut).

Every draw comes from grain's per-element rng, so a resumed run sees what an uninterrupted one would. Optional
CLIP global features (AAHR) ride along from `{split}_clip_ims.npy` (one row per image) and `{split}_clip_caps.npy`
(one row per caption line), written by `python -m jaxretrieval.clip_globals`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxretrieval.data.pipeline import EvalInputs
from jaxretrieval.data.precomp import PrecompSource
from jaxretrieval.data.sources import CaptionRecord
from jaxretrieval.data.transforms import EncodePair
from jaxretrieval.errors import DataError

GLOBAL_FILES = ("{split}_clip_ims.npy", "{split}_clip_caps.npy")


def drop_regions(regions: np.ndarray, rng: np.random.Generator, p: float) -> tuple[np.ndarray, int]:
    """(regions with the kept rows first and zeros after, the kept count); see the module docstring."""
    keep = np.flatnonzero(rng.random(len(regions)) > p)
    if not len(keep):
        return regions, len(regions)
    out = np.zeros_like(regions)
    out[:len(keep)] = regions[keep]
    return out, len(keep)


def noisy_caption(words: list[list[int]], rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                  p: float = 0.2) -> list[int]:
    """VSE-infinity's training noise over a caption's word pieces (see the module docstring)."""
    out: list[int] = []
    for pieces in words:
        draw = rng.random()
        if draw >= p:
            out.extend(pieces)
        elif draw / p < 0.5:
            out.extend([mask_id] * len(pieces))
        elif draw / p < 0.6:
            out.extend(int(rng.integers(vocab_size)) for _ in pieces)
    return out


def noisy_tokens(tokenizer: Any, caption: str, rng: np.random.Generator, p: float) -> np.ndarray:
    """A caption's token row with VSE-infinity's training noise at word rate p (none at 0)."""
    words = tokenizer.word_pieces(caption)
    ids = (noisy_caption(words, rng, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size, p=p) if p
           else [i for word in words for i in word])
    return pack_caption(ids, tokenizer)


class NoisyCaptionPair(EncodePair):
    """EncodePair (an image file and its caption; the image transform and flip as configured) whose caption gets
    VSE-infinity's training noise: the raw-image ("backbone") mode's examples."""

    def __init__(self, *args: Any, caption_noise: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.caption_noise = caption_noise

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        out = super().random_map(record, rng)
        if out is not None:
            out["text"] = noisy_tokens(self.tokenizer, record.caption, rng, self.caption_noise)
        return out


def pack_caption(ids: list[int], tokenizer: Any) -> np.ndarray:
    """[CLS] ids [SEP] padded with [PAD] to the context length, cut so [SEP] stays last."""
    length = tokenizer.context_length
    row = [tokenizer.sot_id, *ids[:length - 2], tokenizer.eot_id]
    return np.asarray(row + [tokenizer.pad_id] * (length - len(row)), np.int32)


class GlobalFeatures:
    """A split's CLIP global features, memory-mapped on first use in each process (picklable without the map)."""

    def __init__(self, root: str | Path, split: str, images: int, captions: int):
        self.paths = [Path(root) / name.format(split=split) for name in GLOBAL_FILES]
        self.counts = (images, captions)
        self._arrays: list[np.ndarray] | None = None
        for path in self.paths:
            if not path.is_file():
                raise DataError(f"CLIP global feature file {path} does not exist (write it with `python -m "
                                f"jaxretrieval.clip_globals`)")
        self.dim = self.arrays[0].shape[1]

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            arrays = []
            for path, count, what in zip(self.paths, self.counts, ("images", "caption lines"), strict=True):
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                if array.ndim != 2 or array.shape[0] != count:
                    raise DataError(f"{path}: expected ({count}, dim) global features for the {count} {what}, got "
                                    f"shape {tuple(array.shape)}")
                arrays.append(array)
            if arrays[0].shape[1] != arrays[1].shape[1]:
                raise DataError(f"{self.paths[0]} and {self.paths[1]} differ in width")
            self._arrays = arrays
        return self._arrays

    def image(self, index: int) -> np.ndarray:
        return np.asarray(self.arrays[0][index], np.float32)

    def caption(self, line: int) -> np.ndarray:
        return np.asarray(self.arrays[1][line - 1], np.float32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}


def global_features(source: PrecompSource) -> GlobalFeatures:
    return GlobalFeatures(source.root, source.split, source.num_images, source.num_lines)


class PrecompEncode(grain.transforms.RandomMap):
    """CaptionRecord of `source` -> {"image" (K, D) float32, "image_lengths", "text", "group", "origin"} (+
    "image_global", "text_global" with `globals_`). Picklable: the source reopens its memory map in each worker."""

    def __init__(self, source: PrecompSource, tokenizer: Any, *, region_drop: float, caption_noise: float,
                 globals_: GlobalFeatures | None = None):
        self.source, self.tokenizer, self.region_drop, self.caption_noise, self.globals = (
            source, tokenizer, region_drop, caption_noise, globals_)

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray]:
        regions, length = drop_regions(self.source.regions(record.group), rng, self.region_drop)
        out = {"image": regions, "image_lengths": np.int32(length),
               "text": noisy_tokens(self.tokenizer, record.caption, rng, self.caption_noise),
               "group": np.int32(record.group), "origin": np.array([record.file, record.line], np.int32)}
        if self.globals is not None:
            out.update(image_global=self.globals.image(record.group), text_global=self.globals.caption(record.line))
        return out


class Rows:
    """A dict of equally long arrays, sliced row-wise as one (what `embed_all` batches); `len` is the row count."""

    def __init__(self, **arrays: Any):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: slice) -> dict[str, np.ndarray]:
        return {key: np.asarray(value[index]) for key, value in self.arrays.items()}


class RegionGallery(Rows):
    """Every image of a precomp split, its regions read batch by batch from the memory map; nothing is skipped."""

    skipped: frozenset = frozenset()

    def kept(self) -> np.ndarray:
        return np.ones(len(self), bool)


def precomp_eval_inputs(source: PrecompSource, tokenizer: Any, globals_: GlobalFeatures | None = None) -> EvalInputs:
    """The image_text evaluation of a precomp split: gallery image i is image i of the split (group i), every
    caption a query; with `globals_` each side also carries its CLIP global features."""
    lines = np.asarray([record.line for record in source.records])
    tokens = tokenizer([record.caption for record in source.records])
    images: dict[str, Any] = {"regions": source.features}
    texts: Any = tokens
    if globals_ is not None:
        images["global"] = globals_.arrays[0]
        texts = Rows(tokens=tokens, **{"global": np.asarray(globals_.arrays[1])[lines - 1]})
    return EvalInputs(RegionGallery(**images), texts, np.asarray(source.text_to_image(), np.int32),
                      np.arange(source.num_images, dtype=np.int32))


__all__ = ["GlobalFeatures", "NoisyCaptionPair", "PrecompEncode", "RegionGallery", "Rows", "drop_regions",
           "global_features", "noisy_caption", "noisy_tokens", "pack_caption", "precomp_eval_inputs"]
