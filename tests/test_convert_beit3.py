"""`python -m convert beit3` against torchscale's BEiT3 in unilm's retrieval layout, every tensor randomised: the
converted checkpoint's embeddings, config and tokenizer, the position-table resize, pretrained (headless)
checkpoints, and inputs that must be refused."""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sentencepiece = pytest.importorskip("sentencepiece")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm's old module path
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig

from test_beit3 import TorchRetrieval, randomised, torch_config  # noqa: E402

import jaxretrieval  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.beit3 import Sizes, build_config  # noqa: E402
from jaxretrieval.checkpoint import read_meta_at  # noqa: E402
from jaxretrieval.data.spm import SentencePieceTokenizer  # noqa: E402
from jaxretrieval.evaluate import saved_config  # noqa: E402

TOL = 1e-5  # README (Convert > BEiT-3): embeddings within 1e-5 of torchscale's (fp32; measured ~2e-7)
CAPTIONS = ["kari tome su", "zo bi xylophone ka ri", "", " ".join(["na lo pe vi"] * 30)]
# (layers, width, ffn_dim, patch, image size, max text positions, extra vocabulary rows beyond the tokenizer's)
SIZES = {"small": (2, 64, 160, 8, 32, 66, 0), "wide": (3, 128, 512, 4, 24, 80, 8)}
POSITIONS = "beit3.encoder.embed_positions.A.weight"


@dataclasses.dataclass
class Release:
    reference: TorchRetrieval
    path: Path  # the saved {'model': state_dict}
    state: dict[str, torch.Tensor]
    sizes: tuple


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    """A ~100-piece sentencepiece model trained on generated text."""
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syllables = "ka ri to me su na lo pe vi da ge hu zo bi".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "xlmr"),
                                             vocab_size=100, minloglevel=2)
    return folder / "xlmr.model"


@pytest.fixture(scope="module")
def tokenizer(spm_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_file(spm_path, context_length=64)


def encoder_config(layers, width, ffn_dim, patch, image, positions, vocab) -> EncoderConfig:
    # unilm's head width is 64.
    return torch_config(encoder_layers=layers, encoder_embed_dim=width, encoder_attention_heads=width // 64,
                        encoder_ffn_embed_dim=ffn_dim, img_size=image, patch_size=patch, vocab_size=vocab,
                        max_source_positions=positions)


@pytest.fixture(scope="module", params=list(SIZES))
def release(request, tmp_path_factory, tokenizer) -> Release:
    *sizes, extra = SIZES[request.param]
    reference = randomised(encoder_config(*sizes, tokenizer.vocab_size + extra), seed=len(request.param))
    path = tmp_path_factory.mktemp("release") / "beit3_retrieval.pth"
    state = reference.state_dict()
    torch.save({"model": state}, path)
    return Release(reference, path, state, tuple(sizes))


def convert(src: Path, out: Path, spm: Path, *extra: str) -> int:
    return main(["beit3", str(src), str(out), "--spm", str(spm), *extra])


def nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def pixels_for(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, size, size, 3)).astype(np.float32)


def max_diff(ours, theirs: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


@pytest.fixture(scope="module")
def converted(release, spm_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "beit3"
    assert convert(release.path, out, spm_path) == 0
    return out


def test_embeddings_match_unilm(release, converted):
    model, _, tokenizer = jaxretrieval.load(converted)
    image = release.sizes[4]
    pixels = pixels_for(image)
    ids = tokenizer(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 64) and ids[-1, -1] == tokenizer.eot_id  # the long caption is cut
    with torch.no_grad():
        _, image_ref = release.reference.image(nchw(pixels))
        tokens = torch.from_numpy(np.asarray(ids, np.int64))
        _, text_ref = release.reference.text(tokens, tokens == 1)
    image_diff = max_diff(model.encode_image(pixels, normalize=True), image_ref)
    text_diff = max_diff(model.encode_text(ids, normalize=True), text_ref)
    print(f"max |diff| image {image_diff:.2e} text {text_diff:.2e}")
    assert image_diff < TOL and text_diff < TOL
    assert model.logit_scale == pytest.approx(math.exp(2.3), rel=1e-6)


def test_config_and_tokenizer_saved(release, converted, tokenizer):
    layers, width, ffn_dim, patch, image, positions = release.sizes
    config = saved_config(converted)
    model = config.model
    assert (model.name, model.family) == ("custom", "beit3")
    assert dataclasses.asdict(model.multiway) == {"layers": layers, "width": width, "heads": width // 64,
                                                  "ffn_dim": ffn_dim, "max_text_positions": positions, "pad_id": 1,
                                                  "remat": "none"}
    assert (model.image.image_size, model.image.patch_size) == (image, patch)
    assert model.text.vocab_size == release.state["beit3.text_embed.weight"].shape[0] >= tokenizer.vocab_size
    assert model.text.context_length == 64
    assert (list(config.data.mean), list(config.data.std)) == ([0.5] * 3, [0.5] * 3)
    assert (config.data.resize, config.data.tokenizer) == ("squash", "checkpoint")
    assert read_meta_at(converted)["tokenizer"] == tokenizer.to_spec()


def test_preset_names():
    base = Sizes(layers=12, width=768, heads=12, ffn_dim=3072, patch_size=16, image_size=224, vocab_size=64010,
                 max_text_positions=1024)
    large = Sizes(layers=24, width=1024, heads=16, ffn_dim=4096, patch_size=16, image_size=384, vocab_size=64010,
                  max_text_positions=1024)
    assert build_config(base).model.name == "beit3_base_patch16_224"
    assert build_config(large).model.name == "beit3_large_patch16_384"
    assert build_config(dataclasses.replace(base, image_size=480)).model.name == "custom"


def test_image_size_resamples_positions_as_unilm(release, spm_path, tmp_path):
    layers, width, ffn_dim, patch, image, positions = release.sizes
    new = image + 2 * patch
    out = tmp_path / "resized"
    assert convert(release.path, out, spm_path, "--image-size", str(new)) == 0
    # unilm's load_model_and_may_interpolate, step by step, on the torch table.
    table = release.state[POSITIONS]
    old_grid, grid = image // patch, new // patch
    cells = table[3:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    cells = torch.nn.functional.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:3], cells.permute(0, 2, 3, 1).flatten(1, 2)[0]])
    model, _, _ = jaxretrieval.load(out)
    np.testing.assert_array_equal(np.asarray(model.params["beit3"]["vision_positions"]), expected.numpy())
    assert saved_config(out).model.image.image_size == new
    # The resized model against unilm's model built at the new size with that table loaded.
    reference = TorchRetrieval(encoder_config(layers, width, ffn_dim, patch, new, positions,
                                              release.state["beit3.text_embed.weight"].shape[0])).eval()
    reference.load_state_dict({**release.state, POSITIONS: expected})
    pixels = pixels_for(new, seed=1)
    with torch.no_grad():
        _, image_ref = reference.image(nchw(pixels))
    diff = max_diff(model.encode_image(pixels, normalize=True), image_ref)
    print(f"resized {image}->{new}: max |diff| {diff:.2e}")
    assert diff < TOL


def test_pretrained_without_heads_gets_unilm_init(release, spm_path, tmp_path):
    state = {k: v for k, v in release.state.items() if k.startswith("beit3.")}
    src = tmp_path / "beit3_pretrained.pth"
    torch.save(state, src)  # a bare state dict, no {'model': ...}
    with pytest.warns(UserWarning, match="no retrieval heads"):
        assert convert(src, tmp_path / "out", spm_path) == 0
    model, _, _ = jaxretrieval.load(tmp_path / "out")
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    for head in ("vision_head", "language_head"):
        kernel = np.asarray(model.params[head]["kernel"])
        assert np.abs(kernel).max() <= 0.02 and 0.005 < kernel.std() < 0.02
    pixels = pixels_for(release.sizes[4])
    with torch.no_grad():
        cls, _ = release.reference.image(nchw(pixels))
    assert max_diff(model.module.image_features(pixels), cls) < TOL


def test_training_checkpoint_with_args_converts(release, spm_path, tmp_path):
    """unilm's fine-tuning checkpoints also pickle their argparse args: read past them, the weights intact."""
    src = tmp_path / "checkpoint-best.pth"
    torch.save({"model": release.state, "epoch": 3, "args": argparse.Namespace(lr=1e-5, model="beit3")}, src)
    assert convert(src, tmp_path / "out", spm_path) == 0
    model, _, tokenizer = jaxretrieval.load(tmp_path / "out")
    pixels, ids = pixels_for(release.sizes[4], seed=2), tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        _, image_ref = release.reference.image(nchw(pixels))
        tokens = torch.from_numpy(np.asarray(ids, np.int64))
        _, text_ref = release.reference.text(tokens, tokens == 1)
    assert max_diff(model.encode_image(pixels, normalize=True), image_ref) < TOL
    assert max_diff(model.encode_text(ids, normalize=True), text_ref) < TOL


class Pickled:
    """Not a tensor type: torch.load(weights_only=True) must refuse it."""


@pytest.mark.parametrize("case, message", [
    ("missing", "missing key 'beit3.encoder.layers.1.ffn.B.fc2.weight'"),
    ("unexpected", "unexpected keys 'mlm_head.weight'"),
    ("shape", "'language_head.weight' has shape"),
    ("not_dict", "holds a list, not a state dict"),
    ("code", "refusing to load"),
    ("out_exists", "already exists"),
    ("no_spm", "does not exist"),
    ("image_size", "not a positive multiple of the patch size"),
    ("vocab", "not the sentencepiece model this BEiT-3 was trained with"),
])
def test_bad_inputs_are_refused(release, spm_path, tmp_path, capsys, case, message):
    state = dict(release.state)
    src, out, spm, extra = tmp_path / "src.pth", tmp_path / "out", spm_path, []
    payload: object = {"model": state}
    if case == "missing":
        del state["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    elif case == "unexpected":
        state["mlm_head.weight"] = torch.zeros(3)
    elif case == "shape":
        state["language_head.weight"] = torch.zeros(2, 2)
    elif case == "not_dict":
        payload = [torch.zeros(2)]
    elif case == "code":
        payload = {"model": state, "extra": Pickled()}
    elif case == "out_exists":
        out.mkdir()
    elif case == "no_spm":
        spm = tmp_path / "missing.spm"
    elif case == "image_size":
        extra = ["--image-size", str(release.sizes[3] * 3 + 1)]
    elif case == "vocab":
        state["beit3.text_embed.weight"] = state["beit3.text_embed.weight"][:50]
    torch.save(payload, src)
    assert convert(src, out, spm, *extra) == 2
    err = capsys.readouterr().err
    assert message in err
    assert case == "out_exists" or not out.exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
