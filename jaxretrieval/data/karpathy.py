"""Karpathy's splits of COCO and Flickr30k (`dataset_coco.json`, `dataset_flickr30k.json` of caption_datasets.zip).

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "imgid": 0, "split": "test", "cocoid": 391895, "sentids": [...],
      "sentences": [{"raw": "A man with a red helmet ...", "tokens": ["a", "man", ...], "imgid": 0, ...}, ...]}]}

Flickr30k's images have no `filepath`; the image is then root/filename, otherwise root/filepath/filename. Splits:
COCO train 82,783 + restval 30,504 (together the 113,287 training images of VSE++, ALBEF and CLIP_benchmark),
val 5,000, test 5,000 (the 5K test, 25,010 captions); Flickr30k train 29,000, val 1,014, test 1,000. Split "train"
takes restval too unless `restval=False`.

Records follow the file (images in imgid order in the released files), each image's captions together in their
order, so the i-th selected image is group i, as eval.protocol image_text expects. Captions are `raw` as written or,
with `captions="tokens"`, the lower-cased tokens joined by spaces. Only the selected split's images are checked
(every image's `split` key is). Errors name `FILE images[N]` (N counts from 0, as the JSON array does) and the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxretrieval.data.sources import CaptionRecord, CaptionSource, json_field, json_value, read_text
from jaxretrieval.errors import ConfigError, DataError

CAPTION_FIELDS = ("raw", "tokens")


def read_karpathy(path: Path) -> list:
    """The `images` list of a UTF-8 Karpathy split file (a byte-order mark allowed); anything else is a DataError."""
    data = json_value(read_text(path), str(path), position=True)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = "an object without an 'images' list" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise DataError(f"{path}: expected Karpathy's JSON object holding an 'images' list, got {got}")
    return data["images"]


def image_split(item: object, where: str) -> str:
    """The `split` of one entry of `images`."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return json_field(item, "split", (str,), where)


def image_path(item: dict, where: str) -> str:
    """filepath/filename (or filename alone, as in Flickr30k) of one entry of `images`."""
    filename = json_field(item, "filename", (str,), where)
    if not filename.strip():
        raise DataError(f"{where}: key 'filename' is blank")
    folder = json_field(item, "filepath", (str,), where) if "filepath" in item else ""
    return f"{folder}/{filename}" if folder else filename


def sentences(item: dict, field: str, where: str) -> list[str]:
    """The captions of one entry of `images`: each sentence's `raw`, or its `tokens` joined by spaces."""
    found = json_field(item, "sentences", (list,), where)
    if not found:
        raise DataError(f"{where}: key 'sentences' is an empty list")
    captions = []
    for index, sentence in enumerate(found):
        at = f"{where} sentences[{index}]"
        if not isinstance(sentence, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(sentence).__name__}")
        if field == "raw":
            captions.append(json_field(sentence, "raw", (str,), at))
            continue
        tokens = json_field(sentence, "tokens", (list,), at)
        for position, token in enumerate(tokens):
            if not isinstance(token, str):
                raise DataError(f"{at}: key 'tokens' item {position} has the wrong type ({type(token).__name__})")
        captions.append(" ".join(tokens))
    return captions


class KarpathyCaptionSource(CaptionSource):
    """One split of Karpathy's COCO / Flickr30k JSON (one file or a list) as caption records; the interface of
    CaptionSource. `split` is a split name of the file (train, val, test; restval alone too); train takes restval as
    well unless `restval=False`. `captions` is `raw` or `tokens`. Groups are the images; `image_ids[group]` (and
    `group_keys()`) is an image's cocoid, or its imgid where it has none (Flickr30k).
    """

    def __init__(self, annotation_file: str | Path | Sequence[str | Path], root: str | Path | None = None, *,
                 split: str = "train", restval: bool = True, captions: str = "raw", skip_bad: bool = False,
                 check_images: bool = True):
        if captions not in CAPTION_FIELDS:
            raise ConfigError(f"captions must be one of {', '.join(CAPTION_FIELDS)}, got {captions!r}")
        self.split, self.restval, self.caption_field = split, restval, captions
        self.splits = {split, "restval"} if split == "train" and restval else {split}
        self.image_ids: list[int] = []  # per group: the image's cocoid, or its imgid without one (Flickr30k)
        super().__init__(annotation_file, root, skip_bad=skip_bad, check_images=check_images)

    def _read(self, file: int, path: Path) -> None:
        present: set[str] = set()
        selected = 0
        seen: dict[int, int] = {}  # imgid -> index of its entry
        for index, item in enumerate(read_karpathy(path)):
            where = f"{path} images[{index}]"
            try:
                split = image_split(item, where)
                present.add(split)
                if split not in self.splits:
                    continue
                selected += 1
                relative, imgid = image_path(item, where), json_field(item, "imgid", (int,), where)
                if imgid in seen:
                    raise DataError(f"{where}: key 'imgid' {imgid} repeats images[{seen[imgid]}]")
                seen[imgid] = index
                image_id = json_field(item, "cocoid", (int,), where) if "cocoid" in item else imgid
                captions = sentences(item, self.caption_field, where)
            except DataError as e:
                self._bad("malformed_lines", e)
                continue
            image = self.root / relative
            if self.check_images and not image.is_file():
                self._bad("missing_images", DataError(f"{where}: image file {image} does not exist"))
                continue
            usable = [caption for number, caption in enumerate(captions)
                      if self._usable_captions([caption], f"{where} sentences[{number}]: "
                                                          f"key '{self.caption_field}'")]
            if usable:
                group = self._groups.setdefault((file, imgid), len(self._groups))
                if group == len(self.image_ids):
                    self.image_ids.append(image_id)
                self.records.extend(CaptionRecord(str(image), caption, group, file, index + 1) for caption in usable)
        if not selected:
            names = ", ".join(sorted(present)) or "none: the 'images' list is empty"
            raise DataError(f"{path}: no images of split '{self.split}' (its splits: {names})")

    def group_keys(self) -> list[int]:
        """The image id of every group (cocoid, or imgid without one), in group order."""
        return list(self.image_ids)

    def where(self, record: CaptionRecord) -> str:
        """`FILE images[N]` of the entry a record came from."""
        return f"{self.paths[record.file]} images[{record.line - 1}]"

    def __repr__(self) -> str:
        more = f" (and {len(self.paths) - 1} more files)" if len(self.paths) > 1 else ""
        return (f"KarpathyCaptionSource({self.path}{more} {self.split}, {len(self)} captions, "
                f"{len(self._groups)} images)")
