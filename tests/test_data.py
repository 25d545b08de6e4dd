"""Data pipeline: annotation parsing and its errors, decoding, skipping, batching, iterator state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from jaxretrieval.data.pipeline import caption_source, eval_inputs, make_tokenizer, train_loader
from jaxretrieval.data.sources import CaptionSource, DataError


def copy_demo(demo_root: Path, target: Path) -> Path:
    shutil.copytree(demo_root, target)
    return target


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def good_line(demo_root: Path) -> str:
    return (demo_root / "train.jsonl").read_text().splitlines()[0]


def test_source_groups_captions_of_one_image(demo_root):
    source = CaptionSource(demo_root / "test.jsonl")
    ids = [json.loads(line)["image_id"] for line in (demo_root / "test.jsonl").read_text().splitlines()]
    assert len(source) == len(ids)
    # captions sharing an image_id share a group, and images() lists each image once in group order
    groups = source.text_to_image()
    for a in range(len(ids)):
        for b in range(len(ids)):
            assert (groups[a] == groups[b]) == (ids[a] == ids[b])
    images = source.images()
    assert len(images) == len(set(ids))
    assert all(images[g] == source[i].image for i, g in enumerate(groups))


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"image": "images/train_00000.png", "image_id": 1}', "missing key 'caption'"),
        ('{"image": "images/train_00000.png", "caption": 3, "image_id": 1}', "key 'caption' has the wrong type"),
    ],
)
def test_malformed_line_names_file_and_line(demo_root, tmp_path, bad, expected):
    path = write_lines(tmp_path / "ann.jsonl", [good_line(demo_root), good_line(demo_root), bad])
    with pytest.raises(DataError) as info:
        CaptionSource(path, demo_root)
    assert f"{path}:3" in str(info.value) and expected in str(info.value)


def test_missing_image_names_the_file(demo_root, tmp_path):
    line = json.dumps({"image": "images/nowhere.png", "caption": "a red circle", "image_id": 7})
    path = write_lines(tmp_path / "ann.jsonl", [good_line(demo_root), line])
    with pytest.raises(DataError, match=r"ann.jsonl:2: image file .*nowhere.png does not exist"):
        CaptionSource(path, demo_root)


def test_skip_bad_records_counts_what_it_skips(demo_root, tmp_path):
    missing = json.dumps({"image": "images/nowhere.png", "caption": "a red circle", "image_id": 7})
    path = write_lines(tmp_path / "ann.jsonl", [good_line(demo_root), "{oops", missing, good_line(demo_root)])
    source = CaptionSource(path, demo_root, skip_bad=True)
    caption = json.loads(good_line(demo_root))["caption"]
    assert [(record.line, record.caption) for record in source.records] == [(1, caption), (4, caption)]
    assert (source.skipped.malformed_lines, source.skipped.missing_images) == (1, 1)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nothing.jsonl does not exist"):
        CaptionSource(tmp_path / "nothing.jsonl")


def test_unreadable_image_is_named_when_decoded(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path / "data")
    broken = root / "images" / "train_00003.png"
    broken.write_bytes(b"this is not a png")
    config = tiny_config(root, **{"train.batch_size": 8})
    source = caption_source(config, root, "train")
    loader = train_loader(config, source, make_tokenizer(config, root))
    with pytest.raises(DataError, match=r"train\.jsonl:1[012]: cannot decode image .*train_00003\.png"):
        for _, _ in zip(range(100), loader, strict=False):
            pass


def test_unreadable_image_skipped_when_allowed(demo_root, tmp_path, caplog):
    root = copy_demo(demo_root, tmp_path / "data")
    (root / "images" / "train_00003.png").write_bytes(b"garbage")
    config = tiny_config(root, **{"train.batch_size": 8, "data.skip_bad_records": True})
    loader = train_loader(config, caption_source(config, root, "train"), make_tokenizer(config, root))
    source = caption_source(config, root, "train")
    broken = {record.line for record in source.records if record.image.endswith("train_00003.png")}
    epoch = (len(source) - len(broken)) // 8  # whole batches in one pass over the good records
    batches = [batch for _, batch in zip(range(epoch), loader, strict=False)]
    assert all(b["image"].shape == (8, 32, 32, 3) for b in batches)
    seen = [line for b in batches for _, line in b["origin"].tolist()]
    assert broken and not broken & set(seen)  # exactly the broken image's captions are left out
    assert len(set(seen)) == len(seen) == epoch * 8  # the others once each, in the first epoch
    assert "cannot decode image" in caplog.text and "train_00003.png" in caplog.text
    assert "unreadable images skipped so far" in caplog.text


def test_batches_have_the_contract_shapes_and_normalisation(demo_root):
    config = tiny_config(demo_root, **{"train.batch_size": 8, "data.mean": "[0.5,0.5,0.5]",
                                       "data.std": "[0.5,0.5,0.5]"})
    tokenizer = make_tokenizer(config, demo_root)
    batch = next(iter(train_loader(config, caption_source(config, demo_root, "train"), tokenizer)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (8, config.model.text.context_length) and batch["text"].dtype == np.int32
    assert batch["group"].shape == (8,)
    # mean/std of 0.5 map pixel values 0..255 onto [-1, 1]
    assert batch["image"].min() >= -1.0 - 1e-6 and batch["image"].max() <= 1.0 + 1e-6
    assert np.all(batch["text"].max(axis=1) == tokenizer.eot_id)


def test_iterator_state_resumes_the_same_stream(demo_root):
    config = tiny_config(demo_root, **{"train.batch_size": 8})
    tokenizer = make_tokenizer(config, demo_root)
    source = caption_source(config, demo_root, "train")
    first = iter(train_loader(config, source, tokenizer))
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(2)]
    second = iter(train_loader(config, source, tokenizer))
    second.set_state(state)
    for want in expected:
        got = next(second)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])


def test_eval_inputs_align_captions_with_gallery(demo_root):
    config = tiny_config(demo_root)
    source = caption_source(config, demo_root, "test")
    inputs = eval_inputs(config, source, make_tokenizer(config, demo_root))
    assert len(inputs.images) == len(set(inputs.text_groups)) and inputs.tokens.shape[0] == len(inputs.text_groups)
    np.testing.assert_array_equal(inputs.image_groups, np.arange(len(inputs.images)))
    assert inputs.images[0:5].shape == (5, 32, 32, 3)


def test_vocabulary_command_writes_a_vocab_the_tokenizer_reads(demo_root, tmp_path):
    from jaxretrieval.data.tokenizers import WordTokenizer
    from jaxretrieval.data.vocab import build_vocabulary, main

    assert build_vocabulary(["b a b", "c b a", "d"], min_count=2) == ["b", "a"]
    output = tmp_path / "vocab.txt"
    assert main([str(demo_root / "train.jsonl"), "--output", str(output)]) == 0
    tokenizer = WordTokenizer.from_file(output, 32)
    captions = [json.loads(line)["caption"] for line in (demo_root / "test.jsonl").read_text().splitlines()]
    assert not np.any(tokenizer(captions) == tokenizer.unk_id)


def test_missing_vocabulary_is_a_data_error(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path / "data")
    (root / "vocab.txt").unlink()
    config = tiny_config(root)
    with pytest.raises(DataError, match="vocab.txt"):
        make_tokenizer(config, root)


def test_tab_separated_captions_and_optional_image_id(demo_root, tmp_path):
    items = [json.loads(line) for line in (demo_root / "test.jsonl").read_text().splitlines()[:6]]
    tsv = write_lines(tmp_path / "captions.tsv", [f"{it['image']}\t{it['caption']}" for it in items])
    jsonl = write_lines(tmp_path / "no_ids.jsonl",
                        [json.dumps({"image": it["image"], "caption": it["caption"]}) for it in items])
    reference = CaptionSource(demo_root / "test.jsonl")
    for path in (tsv, jsonl):
        source = CaptionSource(path, demo_root)
        assert [r.caption for r in source.records] == [it["caption"] for it in items]
        assert source.text_to_image() == reference.text_to_image()[:6]
    bad = write_lines(tmp_path / "bad.tsv", [f"{items[0]['image']}\t{items[0]['caption']}", "no tab here"])
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 'image path<TAB>caption'"):
        CaptionSource(bad, demo_root)


def test_clip_bpe_merges_file_as_data_tokenizer(demo_root, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    root = copy_demo(demo_root, tmp_path / "data")
    shutil.copy(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", root / "bpe.txt.gz")
    config = tiny_config(root, **{"data.tokenizer": "bpe.txt.gz", "model.text.vocab_size": 49408,
                                  "model.text.context_length": 77})
    tokenizer = make_tokenizer(config, root)
    np.testing.assert_array_equal(tokenizer(["a big red circle"]), open_clip.tokenize(["a big red circle"]).numpy())
