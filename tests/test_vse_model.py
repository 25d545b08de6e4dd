"""models.vse (system vse_infty's VSE) against VSE-infinity's encoders composed in PyTorch (tests/vse_torch.py:
EncoderImageAggr and EncoderText over transformers' BertModel, GPO, l2norm) with random weights, loaded through
`python -m convert vse_infty` (convert/vse.py): image embeddings in eval mode, text embeddings of padded captions,
train-mode image embeddings and running statistics of variable-length region sets (torch padded to the batch's
longest, as the original's collate; ours to a fixed K), all in fp32 to 1e-5; then the converter's reading of the
other checkpoint layouts and its errors."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vse_torch import ImageEncoder, TextEncoder, bert_config, checkpoint_state, randomise  # noqa: E402

import jaxretrieval  # noqa: E402
from convert import ConvertError  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.bert import BertSizes  # noqa: E402
from convert.vse import VSESizes, build_config, import_vse, infer_sizes, read_vse, vse_params  # noqa: E402
from jaxretrieval.checkpoint import read_meta_at  # noqa: E402
from jaxretrieval.evaluate import saved_config  # noqa: E402
from jaxretrieval.models.vse import VSE  # noqa: E402

REGION, EMBED = 48, 32
BERT = {"vocab_size": 99, "width": 32, "layers": 2, "heads": 4, "ffn_dim": 48}
TOL = {"rtol": 1e-5, "atol": 1e-5}
OPT = {"data_name": "f30k", "embed_size": EMBED, "img_dim": REGION, "precomp_enc_type": "basic", "margin": 0.2,
       "num_epochs": 25, "lr_update": 15, "learning_rate": 5e-4, "batch_size": 128, "grad_clip": 2.0,
       "vse_mean_warmup_epochs": 1, "max_violation": False, "no_imgnorm": False, "no_txtnorm": False}


class Pickled:
    """Not a tensor, container or argparse.Namespace: torch.load(weights_only=True) refuses it."""


@pytest.fixture(scope="module")
def reference() -> tuple[ImageEncoder, TextEncoder]:
    image = randomise(ImageEncoder(REGION, EMBED), seed=0).eval()
    text = randomise(TextEncoder(bert_config(**BERT, dropout=0.0), EMBED), seed=1).eval()
    return image, text


def as_state(image: ImageEncoder, text: TextEncoder) -> dict[str, np.ndarray]:
    """{img_enc.* / txt_enc.*: array}, what read_vse gives for a checkpoint of these encoders."""
    return {f"{prefix}{k}": v.detach().numpy().copy() for prefix, module in (("img_enc.", image), ("txt_enc.", text))
            for k, v in module.state_dict().items()}


def ours(state: dict[str, np.ndarray]) -> VSE:
    """Our VSE holding the converted weights (built abstractly: no random init to pay for)."""
    sizes = infer_sizes(state, {}, heads=BERT["heads"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VSE(**sizes.model_kwargs(), rngs=nnx.Rngs(0))))
    params, skipped = vse_params(state, sizes, nnx.to_pure_dict(abstract), "test", updates=7)
    skipped.pop("BERT index buffers", None)  # position_ids, where the transformers version saves it
    assert skipped == {"unused batch norm mlp.bns.1": 5, "batch-norm counters": 1, "BERT pooler": 2}
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    assert int(model.updates[...]) == 7
    return model


@nnx.jit(static_argnames="train")
def encode_image(model: VSE, images: Any, train: bool = False) -> jax.Array:
    return model.encode_image(images, train=train)


@nnx.jit
def encode_text(model: VSE, tokens: jax.Array) -> jax.Array:
    return model.encode_text(tokens)


def regions(lengths: list[int], size: int, seed: int = 0) -> np.ndarray:
    """BUTD-like non-negative features, zero past each length (the original's collate pads with zeros)."""
    x = np.abs(np.random.default_rng(seed).normal(size=(len(lengths), size, REGION))).astype(np.float32)
    x[np.arange(size)[None] >= np.asarray(lengths)[:, None]] = 0
    return x


def captions(lengths: list[int], size: int, seed: int = 0) -> np.ndarray:
    """[CLS] words [SEP], 0-padded to `size`."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), size), np.int64)
    for row, n in zip(ids, lengths, strict=True):
        row[0], row[1:n - 1], row[n - 1] = 2, rng.integers(5, BERT["vocab_size"], n - 2), 3
    return ids


def embed_image(image: ImageEncoder, x: np.ndarray, lengths: list[int]) -> np.ndarray:
    with torch.no_grad():
        return image(torch.from_numpy(x), torch.tensor(lengths, dtype=torch.float32)).numpy()


def test_eval_image_embeddings_match(reference) -> None:
    image, text = reference
    model = ours(as_state(image, text))
    x = regions([7] * 4, 7)
    want = embed_image(image, x, [7] * 4)
    np.testing.assert_allclose(encode_image(model, x), want, **TOL)
    np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1.0, rtol=1e-5)
    # GPO is not a plain mean here: its weights vary over the ranks
    with torch.no_grad():
        weights = image.gpool(torch.randn(4, 7, 3), torch.full((4,), 7.0))[1]
    assert float(weights.std()) > 0.02


def test_text_embeddings_match_padded_captions(reference) -> None:
    """Captions of 11, 6, 3 and 8 tokens: torch's batch padded to the longest, ours to 16."""
    image, text = reference
    model = ours(as_state(image, text))
    lengths = [11, 6, 3, 8]
    ids = captions(lengths, 11)
    with torch.no_grad():
        want = text(torch.from_numpy(ids), torch.tensor(lengths, dtype=torch.float32)).numpy()
    padded = np.zeros((4, 16), np.int64)
    padded[:, :11] = ids
    np.testing.assert_allclose(encode_text(model, padded), want, **TOL)


def test_train_mode_image_embeddings_and_batch_statistics_match(reference) -> None:
    """Regions of 5, 3, 6 and 2: torch gets them padded to 6 (its batch norm sees 4 x 6 rows, zeros included),
    ours padded to 10 with their lengths; the embeddings and the updated running mean / variance agree."""
    image, text = reference
    model = ours(as_state(image, text))
    lengths = [5, 3, 6, 2]
    x = regions(lengths, 10, seed=3)
    image_train = ImageEncoder(REGION, EMBED)
    image_train.load_state_dict(image.state_dict())
    image_train.train()
    want = embed_image(image_train, x[:, :6], lengths)
    got = encode_image(model, {"regions": x, "lengths": np.asarray(lengths, np.int32)}, train=True)
    np.testing.assert_allclose(got, want, **TOL)
    bn = image_train.mlp.bns[0]
    assert not np.allclose(bn.running_mean.numpy(), image.mlp.bns[0].running_mean.numpy())  # it moved
    np.testing.assert_allclose(model.image.mlp.bn_0.mean[...], bn.running_mean.numpy(), **TOL)
    np.testing.assert_allclose(model.image.mlp.bn_0.var[...], bn.running_var.numpy(), **TOL)
    # without the row mask (all 4 x 10 rows) the statistics would differ: the test tells them apart
    full = ImageEncoder(REGION, EMBED)
    full.load_state_dict(image.state_dict())
    assert np.abs(embed_image(full.train(), x, lengths) - want).max() > 1e-3


def test_convert_command_writes_a_loadable_checkpoint(reference, tmp_path, capsys) -> None:
    """`python -m convert vse_infty` of a model_best.pth ({'model', 'opt', 'epoch', 'best_rsum', 'Eiters'}) with a
    vocab: the loaded model's embeddings equal torch's, its updates are Eiters, its config the original's recipe."""
    image, text = reference
    src = tmp_path / "model_best.pth"
    torch.save(checkpoint_state(image, text, opt=argparse.Namespace(**OPT), epoch=12, best_rsum=480.5, Eiters=4321),
               src)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]) + "\n")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["vse_infty", str(src), str(tmp_path / "out"), "--vocab", str(vocab), "--heads", "4"]) == 0
    assert "1 batch-norm counters, 5 unused batch norm mlp.bns.1, 2 BERT pooler" in log.getvalue()
    model, _, tokenizer = jaxretrieval.load(tmp_path / "out")
    x, ids = regions([4] * 3, 4, seed=5), captions([9, 4, 6], 9)
    with torch.no_grad():
        want_text = text(torch.from_numpy(ids), torch.tensor([9.0, 4.0, 6.0])).numpy()
    np.testing.assert_allclose(model.encode_image(x, normalize=True), embed_image(image, x, [4] * 3), **TOL)
    np.testing.assert_allclose(model.encode_text(ids, normalize=True), want_text, **TOL)
    assert int(model.module.updates[...]) == 4321
    assert tokenizer is not None and tokenizer.vocab_size == 99
    config = saved_config(tmp_path / "out")
    assert (config.system, config.model.name, config.model.embed_dim) == ("vse_infty", "custom", EMBED)
    assert (config.section.region_dim, config.section.region_mlp, config.section.hinge_warmup_epochs) == (REGION,
                                                                                                          True, 1)
    assert (config.train.epochs, config.train.lr, config.train.milestones, config.data.root) == (25, 5e-4, [15],
                                                                                                 "data/f30k_precomp")
    assert read_meta_at(tmp_path / "out")["converted_from"]["Eiters"] == 4321
    assert main(["vse_infty", str(src), str(tmp_path / "out")]) == 2  # OUT exists: refused before reading
    assert "already exists" in capsys.readouterr().err


def test_plain_state_dict_layouts_read_alike(reference, tmp_path) -> None:
    """A bare [img_enc, txt_enc] list, a flat dict with img_enc. / txt_enc. keys (DataParallel's module. inside)."""
    image, text = reference
    want = as_state(image, text)
    torch.save([image.state_dict(), text.state_dict()], tmp_path / "pair.pth")
    flat = {f"img_enc.module.{k}": v for k, v in image.state_dict().items()}
    flat.update({f"module.txt_enc.{k}": v for k, v in text.state_dict().items()})
    torch.save(flat, tmp_path / "flat.pth")
    for name in ("pair.pth", "flat.pth"):
        state, saved = read_vse(tmp_path / name)
        assert saved == {} and state.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_array_equal(state[key], value)


def save(tmp_path: Path, state: dict, **extra) -> Path:
    path = tmp_path / "bad.pth"
    torch.save({"model": [{k[8:]: torch.from_numpy(np.asarray(v)) for k, v in state.items() if k.startswith(p)}
                          for p in ("img_enc.", "txt_enc.")], **extra}, path)
    return path


def edited(state: dict, drop: str | None = None, **shapes) -> dict:
    out = {k: v for k, v in state.items() if k != drop}
    for key, shape in shapes.items():
        out[key.replace("__", ".")] = np.zeros(shape, np.float32)
    return out


@pytest.mark.parametrize("change,message", ids=["missing", "missing gpo", "mlp shape", "bert shape", "gpo shape",
                                                 "bn shape", "unexpected", "no fc", "no bert"], argvalues=[
    (lambda s: edited(s, drop="img_enc.mlp.layers.1.bias"), r"1 required keys missing: img_enc\.mlp\.layers\.1\.bias"),
    (lambda s: edited(s, drop="txt_enc.gpool.gru.bias_hh_l0_reverse"), r"missing: txt_enc\.gpool\.gru\.bias_hh_l0_rev"),
    (lambda s: edited(s, img_enc__mlp__layers__0__weight=(17, REGION)),
     r"'img_enc\.mlp\.layers\.0\.weight' has shape \(17, 48\), system vse_infty's model takes \(16, 48\)"),
    (lambda s: edited(s, txt_enc__bert__encoder__layer__1__intermediate__dense__weight=(50, 32)),
     r"'txt_enc\.bert\.encoder\.layer\.1\.intermediate\.dense\.weight' has shape \(50, 32\).* takes \(48, 32\)"),
    (lambda s: edited(s, txt_enc__gpool__gru__weight_ih_l0=(96, 16)),
     r"'txt_enc\.gpool\.gru\.weight_ih_l0' has shape \(96, 16\).* takes \(96, 32\)"),
    (lambda s: edited(s, img_enc__mlp__bns__0__running_var=(3,)), r"'img_enc\.mlp\.bns\.0\.running_var' has shape"),
    (lambda s: edited(s, img_enc__extra__weight=(2, 2)), r"1 unexpected keys .*: img_enc\.extra\.weight"),
    (lambda s: edited(s, drop="img_enc.fc.weight"), r"missing key 'img_enc\.fc\.weight'"),
    (lambda s: edited(s, drop="txt_enc.bert.embeddings.word_embeddings.weight"),
     r"missing key 'txt_enc\.bert\.embeddings\.word_embeddings\.weight'"),
])
def test_converter_errors_name_the_file_and_key(reference, tmp_path, change, message) -> None:
    src = save(tmp_path, change(as_state(*reference)))
    with pytest.raises(ConvertError, match=message) as error:
        import_vse(src, tmp_path / "out", heads=BERT["heads"])
    assert str(src) in str(error.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("extra,message", ids=["opt embed_size", "backbone", "no_imgnorm", "pickled object"],
                         argvalues=[
    ({"opt": argparse.Namespace(**{**OPT, "embed_size": 64})}, r"embed_size 64 but 'img_enc\.fc\.weight' has shape"),
    ({"opt": argparse.Namespace(**{**OPT, "precomp_enc_type": "backbone"})}, "precomp_enc_type backbone"),
    ({"opt": argparse.Namespace(**{**OPT, "no_imgnorm": True})}, "no_imgnorm"),
    ({"opt": Pickled()}, r"refusing to load .*weights_only=True"),
])
def test_converter_refuses_other_options_and_unsafe_pickles(reference, tmp_path, extra, message) -> None:
    src = save(tmp_path, as_state(*reference), **extra)
    with pytest.raises(ConvertError, match=message):
        import_vse(src, tmp_path / "out", heads=BERT["heads"])
    assert not (tmp_path / "out").exists()


def test_converter_refuses_what_is_not_vse_infty(tmp_path) -> None:
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ConvertError, match=r"other\.pth holds a dict with keys state_dict: not a VSE-infinity"):
        read_vse(tmp_path / "other.pth")
    torch.save({"model": [{}]}, tmp_path / "one.pth")
    with pytest.raises(ConvertError, match=r"'model' must be \[img_enc state dict, txt_enc state dict\]"):
        read_vse(tmp_path / "one.pth")
    with pytest.raises(ConvertError, match="does not exist"):
        read_vse(tmp_path / "missing.pth")


def test_released_sizes_name_the_preset() -> None:
    """BERT-base, 2048-wide regions, 1024-wide space: preset vse_bert_base; COCO's options: testall in 5 folds, and
    a run trained with the hardest negative from the start has no warm-up."""
    bert = BertSizes(vocab_size=30522, width=768, layers=12, heads=12, ffn_dim=3072, max_positions=512,
                     type_vocab_size=2, fusion_from=12, pooler=False)
    config = build_config(VSESizes(region_dim=2048, embed_dim=1024, region_mlp=True, text=bert),
                          {"data_name": "coco", "max_violation": True})
    assert (config.model.name, config.model.text.context_length, config.section.region_dim) == ("vse_bert_base", 64,
                                                                                                2048)
    assert (config.data.root, config.data.test_file, config.eval.folds) == ("data/coco_precomp", "testall", 5)
    assert (config.section.hinge_warmup_epochs, config.train.epochs, config.train.batch_size) == (0, 25, 128)
