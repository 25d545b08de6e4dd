"""WebDataset shards as a random-access source: shard patterns, sample grouping, reads by reference, bad samples."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data import webdataset as wds
from jaxretrieval.data.sources import DataError, image_file
from jaxretrieval.data.webdataset import WebDatasetSource, brace_expand, expand_shards, read_ref


def image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caption_json(caption: str | None, key: str = "caption") -> bytes:
    return json.dumps({key: caption, "url": "http://example.com/x.jpg", "status": "success"}).encode()


def good_sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(seed)), (f"{key}.txt", f"caption {key}".encode())]


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """Two shards: txt and img2dataset-style json captions, a jpg, a directory key, a meta file, an extra member."""
    first = write_tar(tmp_path / "shard-00000.tar", [
        ("__index__", b"ignored"),
        ("000.png", image_bytes(0)), ("000.txt", b"  a red square\n"),
        ("001.png", image_bytes(1)), ("001.json", caption_json("a blue circle")),
        ("002.JPG", image_bytes(2, "JPEG")), ("002.json", caption_json("ignored")), ("002.txt", b"a photo"),
        ("003.png", image_bytes(3)), ("003.seg.png", image_bytes(30)), ("003.txt", b"with a mask"),
    ])
    second = write_tar(tmp_path / "shard-00001.tar", [
        ("sub/100.png", image_bytes(4)), ("sub/100.json", caption_json("only text", key="text")),
        *good_sample("101", 5),
    ])
    return [first, second]


def pixels(ref: str) -> np.ndarray:
    with Image.open(image_file(ref)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_matches_tarfile(tmp_path, fmt):
    long_dir = "d" * 90 + "/" + "e" * 60  # ustar splits it into prefix + name; GNU and pax write long names
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in [(f"{long_dir}/000.png", b"p" * 700), ("caf\u00e9/001.txt", b"t"), ("__meta__", b""),
                           ("002.json", b"{}" * 300)]:
            if fmt == tarfile.USTAR_FORMAT and not name.isascii():
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("link.png", tarfile.SYMTYPE), ("folder", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "002.json" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg() and m.name != "__meta__"]
    with path.open("rb", buffering=0) as f:
        members, cut = wds.tar_members(f, path)
    assert [tuple(m) for m in members] == expected and cut is None


@pytest.mark.parametrize(("pattern", "expected"), [
    ("s{0..3}", ["s0", "s1", "s2", "s3"]),
    ("s{08..10}.tar", ["s08.tar", "s09.tar", "s10.tar"]),
    ("{0..10..5}", ["0", "5", "10"]),
    ("{3..1}", ["3", "2", "1"]),
    ("{a,b}{1,2}", ["a1", "a2", "b1", "b2"]),
    ("x{a,b{1..2}}y", ["xay", "xb1y", "xb2y"]),
    ("keep{x}", ["keep{x}"]),
    ("plain.tar", ["plain.tar"]),
])
def test_brace_expand(pattern, expected):
    assert brace_expand(pattern) == expected


@pytest.mark.parametrize("pattern", ["s{0..3", "s}0{"])
def test_brace_expand_unbalanced(pattern):
    with pytest.raises(DataError, match="unbalanced braces"):
        brace_expand(pattern)


def test_expand_shards(tmp_path):
    for name in ("a-00.tar", "a-01.tar", "a-02.tar", "b-00.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path / "a-{00..02}.tar")) == [str(tmp_path / f"a-0{i}.tar") for i in range(3)]
    # `::` lists keep their order, globs are sorted, relative patterns resolve under root
    assert expand_shards("b-00.tar::a-*.tar", tmp_path) == [str(tmp_path / n) for n in
                                                             ("b-00.tar", "a-00.tar", "a-01.tar", "a-02.tar")]
    with pytest.raises(DataError, match=r"shard .*a-03\.tar does not exist"):
        expand_shards("a-{00..03}.tar", tmp_path)
    with pytest.raises(DataError, match=r"no shard matches .*c-\*\.tar"):
        expand_shards("a-00.tar::c-*.tar", tmp_path)


def test_records_group_members_by_key(shards):
    source = WebDatasetSource([str(s) for s in shards])
    assert [r.caption for r in source.records] == ["a red square", "a blue circle", "a photo", "with a mask",
                                                   "only text", "caption 101"]
    assert source.group_keys() == ["000", "001", "002", "003", "sub/100", "101"]
    assert source.text_to_image() == list(range(6)) and [r.group for r in source.records] == list(range(6))
    assert [(r.file, r.line) for r in source.records] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert source.where(source[4]) == f"{shards[1]}:sub/100"
    assert source.images() == [r.image for r in source.records] and len(set(source.images())) == 6
    assert all(r.image.startswith(f"tar://{shards[0]}#") for r in source.records[:4])
    assert source.skipped.total == 0 and source.scan_seconds >= 0


def test_random_access_equals_sequential_read(shards):
    source = WebDatasetSource([str(s) for s in shards])
    sequential = {}
    for shard in shards:
        with tarfile.open(shard, "r|") as tar:  # streaming, as webdataset reads
            for member in tar:
                if member.name.lower().endswith((".png", ".jpg")) and ".seg." not in member.name:
                    sequential[member.name.rsplit(".", 1)[0]] = tar.extractfile(member).read()
    for index in np.random.default_rng(0).permutation(len(source)):
        record = source[int(index)]
        assert read_ref(record.image) == sequential[source.keys[record.group]]
    assert np.array_equal(pixels(source[0].image), np.asarray(Image.open(io.BytesIO(image_bytes(0))).convert("RGB")))
    assert Image.open(image_file(source[2].image)).format == "JPEG"
    assert image_file("plain/path.png") == "plain/path.png"


def test_reads_after_pickling_and_forking(shards):
    source = WebDatasetSource([str(s) for s in shards])
    expected = [read_ref(r.image) for r in source.records]  # this process now holds the shards' descriptors
    copy = pickle.loads(pickle.dumps(source))
    assert copy.records == source.records and [read_ref(r.image) for r in copy.records] == expected
    if not hasattr(os, "fork"):
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child starts with no cached descriptors and reopens the shards
        status = 1
        try:
            os.close(read_end)
            if not wds._DESCRIPTORS.open:
                os.write(write_end, b"".join(read_ref(r.image) for r in copy.records[::-1]))
                status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        received = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0 and received == b"".join(expected[::-1])


@pytest.mark.parametrize(("member", "expected"), [
    (("bad.txt", b"caf\xe9"), "member 'bad.txt' is not valid UTF-8 text"),
    (("bad.json", b"{not json"), "not valid JSON"),
    (("bad.json", caption_json(None)), "no string caption under ['caption', 'text']"),
    (("bad.txt", b"  \n"), "the caption is blank"),
])
def test_bad_caption_names_shard_and_key(tmp_path, member, expected):
    shard = write_tar(tmp_path / "s.tar", [*good_sample("a", 0), ("bad.png", image_bytes(1)), member,
                                           *good_sample("z", 2)])
    with pytest.raises(DataError) as info:
        WebDatasetSource([str(shard)])
    assert f"{shard}: sample 'bad'" in str(info.value) and expected in str(info.value)
    source = WebDatasetSource([str(shard)], skip_bad=True)
    assert source.group_keys() == ["a", "z"] and source.skipped.total == 1
    assert (source.skipped.blank_captions if "blank" in expected else source.skipped.malformed_lines) == 1


def test_missing_caption_or_image(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("nocap.png", image_bytes(0)), ("noimg.txt", b"words"),
                                           ("twice.png", image_bytes(1)), ("twice.PNG", image_bytes(1)),
                                           ("twice.txt", b"x"), *good_sample("ok", 2)])
    with pytest.raises(DataError, match=r"s\.tar: sample 'nocap': no caption member"):
        WebDatasetSource([str(shard)])
    source = WebDatasetSource([str(shard)], skip_bad=True)
    assert source.group_keys() == ["ok"] and source[0].group == 0 and source[0].line == 4
    assert (source.skipped.missing_images, source.skipped.malformed_lines) == (1, 2)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_shard(tmp_path, cut):
    full = write_tar(tmp_path / "full.tar", [*good_sample("a", 0), *good_sample("b", 1), *good_sample("c", 2)])
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        image_c = tar.getmember("c.png")
    end = image_c.offset_data + 100 if cut == "data" else image_c.offset + 300  # inside c's image / header
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:end])
    with pytest.raises(DataError, match=r"cut\.tar: sample 'c': the shard is cut off or corrupt"):
        WebDatasetSource([str(shard)])
    source = WebDatasetSource([str(shard)], skip_bad=True)
    assert source.group_keys() == ["a", "b"] and source.skipped.malformed_lines == 1


def test_garbled_header_drops_the_sample_before_it(tmp_path):
    data = write_tar(tmp_path / "s.tar", [*good_sample("a", 0), *good_sample("b", 1)]).read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        end = tar.getmember("b.txt").offset_data + 512  # where the end-of-archive zeros begin
    (tmp_path / "bad.tar").write_bytes(data[:end] + b"\xff" * 512 + data[end:])
    with pytest.raises(DataError, match=r"bad\.tar: sample 'b': the shard is cut off or corrupt \(no valid tar header"):
        WebDatasetSource("bad.tar", tmp_path)
    source = WebDatasetSource("bad.tar", tmp_path, skip_bad=True)  # b may have had more members: dropped
    assert source.group_keys() == ["a"] and source.skipped.malformed_lines == 1


def test_compressed_shard_is_refused(tmp_path):
    plain = write_tar(tmp_path / "s.tar", good_sample("a", 0))
    compressed = tmp_path / "s.tar.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DataError, match=r"gzip-compressed, which has no random access.*gzip -d .*s\.tar\.gz"):
        WebDatasetSource(str(compressed))
    (tmp_path / "junk.tar").write_bytes(b"x" * 2048)
    with pytest.raises(DataError, match="junk.tar is not a tar archive"):
        WebDatasetSource("junk.tar", tmp_path)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.tar is empty \(0 bytes\)"):
        WebDatasetSource("s.tar::empty.tar", tmp_path)


def test_index_is_deterministic_for_resume(tmp_path):
    for shard in range(3):
        write_tar(tmp_path / f"{shard:05d}.tar", [m for i in range(5) for m in good_sample(f"{shard}{i:03d}",
                                                                                        shard * 5 + i)])
    first = WebDatasetSource("{00000..00002}.tar", tmp_path)
    seen = [(first[i], read_ref(first[i].image)) for i in range(4, 11)]
    again = WebDatasetSource("{00000..00002}.tar", tmp_path)
    assert len(again) == len(first) == 15
    assert [(again[i], read_ref(again[i].image)) for i in range(4, 11)] == seen


def test_grain_loader_reads_records_by_index(shards):
    source = WebDatasetSource([str(s) for s in shards])
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=1,
                                          shard_options=grain.sharding.NoSharding())
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=[])
    expected = [source[sampler[k].record_key] for k in range(len(source))]
    assert list(loader) == expected and sorted(r.group for r in expected) == list(range(len(source)))


def test_a_run_trains_and_evaluates_from_shards(demo_root, tmp_path):
    """img2dataset-style shards of the demo (one sample per caption, json captions in the test shards) through the
    config keys: batches decode from inside the tars, and the evaluation reads its gallery from them."""
    import io
    import tarfile

    from conftest import tiny_config

    from jaxretrieval import train

    for split, per_shard in (("train", 300), ("test", 40)):
        rows = [json.loads(line) for line in (demo_root / f"{split}.jsonl").read_text().splitlines()]
        for shard, start in enumerate(range(0, len(rows), per_shard)):
            with tarfile.open(tmp_path / f"{split}-{shard:03d}.tar", "w") as tar:
                for i, row in enumerate(rows[start:start + per_shard], start=start):
                    caption = json.dumps({"caption": row["caption"]}) if split == "test" else row["caption"]
                    for name, data in ((f"{i:06d}.png", (demo_root / row["image"]).read_bytes()),
                                       (f"{i:06d}.{'json' if split == 'test' else 'txt'}", caption.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    shards = len(list(tmp_path.glob("train-*.tar")))
    (tmp_path / "vocab.txt").write_bytes((demo_root / "vocab.txt").read_bytes())  # data.tokenizer under data.root
    config = tiny_config(demo_root, **{"data.kind": "webdataset", "data.root": str(tmp_path),
                                       "data.train_file": f"train-{{000..{shards - 1:03d}}}.tar",
                                       "data.test_file": "test-*.tar", "train.steps": 2, "train.progress_bar": False})
    result = train.train(config, tmp_path / "run")
    test_rows = len((demo_root / "test.jsonl").read_text().splitlines())
    assert (result["num_images"], result["num_texts"]) == (test_rows, test_rows)  # each sample its own image
    assert 0 <= result["t2i_R1"] <= 100
