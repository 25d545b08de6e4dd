"""Teacher feature tables (our .npz and CUSA's pickled .npy dict) and `python -m jaxretrieval.teachers`, end to end
with a tiny sentence-transformers model and a tiny CLIP checkpoint made here."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxretrieval import teachers
from jaxretrieval.data.albef import pre_caption
from jaxretrieval.data.teacher_features import TeacherTable, load_image_teachers, load_text_teachers, save_teachers
from jaxretrieval.errors import ConfigError, DataError

FEATURES = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


def test_npz_tables_round_trip_and_look_up(tmp_path):
    path = save_teachers(tmp_path / "t.npz", ["b", "a", "c"], FEATURES.astype(np.float64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # no partial file left
    for table in (load_image_teachers(path), load_text_teachers(path)):
        assert (len(table), table.dim, "a" in table, "z" in table) == (3, 4, True, False)
        looked_up = table.lookup(["c", "b", "c"])
        assert looked_up.dtype == np.float32 and np.array_equal(looked_up, FEATURES[[2, 0, 2]])
        assert table.lookup([]).shape == (0, 4)


def test_missing_key_names_the_key_and_the_file(tmp_path):
    path = save_teachers(tmp_path / "text.npz", ["a dog"], FEATURES[:1])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no text teacher feature for 'a cat' "
                                        r"\(the file has 1 ids\); the table is keyed by the cleaned caption"):
        load_text_teachers(path).lookup(["a dog", "a cat"])
    with pytest.raises(DataError, match=r"no image teacher feature for '7'"):
        load_image_teachers(path).lookup(["7"])


def test_cusa_pickled_dict_needs_allow_pickle(tmp_path):
    path = tmp_path / "train_unicom.npy"
    np.save(path, {"x.jpg": FEATURES[:1], "y.jpg": FEATURES[1], 7: FEATURES[2:3]}, allow_pickle=True)
    with pytest.raises(ConfigError) as refused:
        load_image_teachers(path)
    message = str(refused.value)
    assert str(path) in message and "pickle" in message and "runs whatever code" in message
    assert "allow_pickle" in message and "cusa.allow_pickle=true" in message and ".npz" in message
    table = load_image_teachers(path, allow_pickle=True)
    assert np.array_equal(table.lookup(["7", "x.jpg", "y.jpg"]), FEATURES[[2, 0, 1]])


def test_from_pickle_command_rewrites_the_original_file_as_npz(tmp_path, capsys):
    path = tmp_path / "train_unicom.npy"
    np.save(path, {"x.jpg": FEATURES[:1], "y.jpg": FEATURES[1:2]}, allow_pickle=True)
    assert teachers.main(["from-pickle", str(path), "--out", str(tmp_path / "train_unicom.npz")]) == 0
    table = load_image_teachers(tmp_path / "train_unicom.npz")  # no pickle needed any more
    np.testing.assert_array_equal(table.lookup(["y.jpg", "x.jpg"]), FEATURES[[1, 0]].astype(np.float32))
    assert "wrote 2 image teacher features" in capsys.readouterr().out


def test_pickled_dict_of_mixed_dimensions_names_the_key(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, {"x": np.zeros((1, 4)), "y": np.zeros((2, 4))}, allow_pickle=True)
    with pytest.raises(DataError, match=r"bad\.npy: the feature of 'y' has shape \(2, 4\); expected \(4,\)"):
        load_image_teachers(path, allow_pickle=True)


@pytest.mark.parametrize("write, message", [
    (lambda f: np.save(f, FEATURES), r"a bare \.npy array has no image ids"),
    (lambda f: np.savez(f, ids=np.array(["a", "b", "c"])), r"no array 'features'"),
    (lambda f: np.savez(f, ids=np.array(["a", "a", "c"]), features=FEATURES), r"image teacher id 'a' appears twice"),
    (lambda f: np.savez(f, ids=np.array(["a", "b"]), features=FEATURES), r"2 ids for 3 image teacher feature rows"),
    (lambda f: np.savez(f, ids=np.array(["a", "b", "c"]), features=FEATURES * np.array([1, 1, np.nan, 1])),
     r"the image teacher feature of 'a' \(row 0\) is not finite"),
    (lambda f: np.savez(f, ids=np.array(["a", "b", "c"], dtype=object), features=FEATURES),
     r"array 'ids' is stored as Python objects"),
    (lambda f: f.write(b"PK\x03\x04 broken"), r"not a readable \.npz file"),
])
def test_bad_tables_name_the_file(write, message, tmp_path):
    path = tmp_path / "bad.npz"
    with path.open("wb") as f:  # a file object: np.save would add '.npy' to a name
        write(f)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {message}"):
        load_image_teachers(path)


def test_text_tables_are_npz_only_and_missing_files_are_named(tmp_path):
    np.save(tmp_path / "t.npy", FEATURES)
    with pytest.raises(DataError, match=r"t\.npy: not a \.npz file"):
        load_text_teachers(tmp_path / "t.npy")
    with pytest.raises(DataError, match=r"teacher features file .*none\.npz does not exist"):
        load_image_teachers(tmp_path / "none.npz")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="No space left on device"):
        save_teachers(tmp_path / "t.npz", ["a"], FEATURES[:1])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="ids for"):
        TeacherTable(["a"], FEATURES, tmp_path / "t.npz")


# --- the commands -----------------------------------------------------------------------------------------------

CAPTIONS = ["A man on a skateboard.", "a man, on a SKATEBOARD", "The dog sits on the mat!", "a dog-sits", "man"]


def write_annotations(root: Path) -> Path:
    (root / "pics").mkdir(parents=True)
    items = []
    for index, caption in enumerate(CAPTIONS):
        name = f"img{index % 3}.png"
        Image.new("RGB", (20 + index, 16), (60 * (index % 3), 30, 200 - 50 * (index % 3))).save(root / "pics" / name)
        items.append({"image_path": f"pics/{name}", "caption": caption, "image_id": f"id{index % 3}"})
    path = root / "new_train.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory) -> Path:
    """A 1-layer BERT (hidden 32) with mean pooling, saved as a sentence-transformers folder."""
    pytest.importorskip("sentence_transformers")
    torch = pytest.importorskip("torch")
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizer
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Pooling, Transformer

    base = tmp_path_factory.mktemp("sbert")
    bert = base / "bert"
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a man on skateboard the dog sits mat".split()]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64)).save_pretrained(bert)
    BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    SentenceTransformer(modules=[Transformer(str(bert)), Pooling(32)], device="cpu").save(str(base / "model"))
    return base / "model"


def test_text_command_writes_the_encoded_distinct_cleaned_captions(sentence_model, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    data = write_annotations(tmp_path / "data")
    out = tmp_path / "out" / "text.npz"
    assert teachers.main(["text", "--model", str(sentence_model), "--data", str(data), "--data", str(data),
                          "--out", str(out), "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 4 text teacher features of dimension 32 to {out}"
    expected_ids = ["a man on a skateboard", "the dog sits on the mat", "a dog sits", "man"]
    assert expected_ids == list(dict.fromkeys(pre_caption(c) for c in CAPTIONS))
    table = load_text_teachers(out)
    assert table.ids == expected_ids
    reference = SentenceTransformer(str(sentence_model), device="cpu").encode(expected_ids)
    np.testing.assert_allclose(table.features, reference, atol=1e-6, rtol=0)
    assert np.abs(reference[0] - reference[1]).max() > 1e-3  # the captions give different features
    assert sorted(p.name for p in out.parent.iterdir()) == ["text.npz"]


def test_text_command_errors(sentence_model, tmp_path, capsys, monkeypatch):
    data = write_annotations(tmp_path / "data")
    assert teachers.main(["text", "--model", str(tmp_path / "nope"), "--data", str(data), "--out",
                          str(tmp_path / "t.npz")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert teachers.main(["text", "--model", str(tmp_path), "--data", str(data), "--out",
                          str(tmp_path / "t.npz")]) == 2
    assert "cannot load a sentence-transformers model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    assert teachers.main(["text", "--model", str(sentence_model), "--data", str(data), "--out",
                          str(tmp_path / "t.npz")]) == 2
    assert "pip install sentence-transformers" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def tiny_checkpoint(out: Path) -> Path:
    """An untrained tiny CLIP saved as a stand-alone model checkpoint."""
    from flax import nnx

    from jaxretrieval.checkpoint import write_model
    from jaxretrieval.config import load_config, to_dict
    from jaxretrieval.data.tokenizers import WordTokenizer
    from jaxretrieval.models import create_model

    sizes = {"model.name": "tiny", "model.image.width": 32, "model.image.layers": 1, "model.image.heads": 2,
             "model.text.width": 32, "model.text.layers": 1, "model.text.heads": 2, "model.embed_dim": 16}
    config = load_config(None, [f"{key}={value}" for key, value in sizes.items()])
    params = nnx.to_pure_dict(nnx.state(create_model(config)))
    tokenizer = WordTokenizer(["cat"], config.model.text.context_length)
    return write_model(out, params, {"config": to_dict(config), "tokenizer": tokenizer.to_spec()})


def test_image_command_writes_the_library_image_embedding_per_image_id(tmp_path, capsys):
    import jaxretrieval

    data = write_annotations(tmp_path / "data")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "image.npz"
    assert teachers.main(["image", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                          "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 image teacher features of dimension 16 to {out}"
    table = load_image_teachers(out)
    assert table.ids == ["id0", "id1", "id2"]
    model, preprocess, _ = jaxretrieval.load(checkpoint)
    pixels = np.stack([preprocess(str(data.parent / "pics" / f"img{i}.png")) for i in range(3)])
    expected = np.asarray(model.encode_image(pixels, normalize=True))
    np.testing.assert_allclose(table.features, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(table.features, axis=1), 1, atol=1e-5)
