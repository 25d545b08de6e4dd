"""The pipeline's fast paths: JPEG draft decoding (data.jpeg_draft) and uint8 batches normalised on the device
(data.normalise_on_device)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from jaxretrieval import train
from jaxretrieval.data.pipeline import caption_source, make_tokenizer, train_loader
from jaxretrieval.data.transforms import HybridView, Preprocess, load_image, normalise_pixels

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 640x480 photo-like JPEG (smooth gradients, texture) and the same pixels as PNG."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 480.0
    pixels = np.stack([128 + 100 * np.sin(3 * x + c) * np.cos(2 * y - c) for c in range(3)], axis=-1)
    pixels = (pixels + rng.normal(0, 6, pixels.shape)).clip(0, 255).astype(np.uint8)
    folder = tmp_path_factory.mktemp("photo")
    Image.fromarray(pixels).save(folder / "p.jpg", quality=92)
    Image.fromarray(pixels).save(folder / "p.png")
    return folder


@pytest.mark.parametrize("resize, decoded", [("crop", (320, 240)), ("squash", (320, 240))])
def test_draft_decodes_at_reduced_scale_close_to_a_full_decode(photo, resize, decoded):
    # crop: the short side must stay >= 224 (scale 1/2 keeps 240); squash: both sides >= 224.
    target = (lambda s: (299, 224)) if resize == "crop" else (lambda s: (224, 224))
    assert load_image(str(photo / "p.jpg"), target).size == decoded
    assert load_image(str(photo / "p.jpg")).size == (640, 480)
    full = Preprocess(224, MEAN, STD, resize=resize)(str(photo / "p.jpg"))
    fast = Preprocess(224, MEAN, STD, resize=resize, draft=True)(str(photo / "p.jpg"))
    assert fast.shape == full.shape == (224, 224, 3)
    assert 0 < np.abs(fast - full).mean() < 0.03  # a few grey levels: another decode, not another image


def test_draft_leaves_other_formats_and_small_jpegs_alone(photo):
    png = str(photo / "p.png")
    np.testing.assert_array_equal(Preprocess(224, MEAN, STD, draft=True)(png), Preprocess(224, MEAN, STD)(png))
    jpg = str(photo / "p.jpg")  # a 480-px target needs the full 640x480 decode
    np.testing.assert_array_equal(Preprocess(480, MEAN, STD, draft=True)(jpg), Preprocess(480, MEAN, STD)(jpg))


def test_hybrid_view_drafts_global_views_only(photo):
    jpg = str(photo / "p.jpg")
    view, fast = HybridView(64, MEAN, STD), HybridView(64, MEAN, STD, draft=True)
    branches = set()
    for seed in range(8):
        local = view.is_local(np.random.default_rng(seed))
        same = np.array_equal(view(jpg, np.random.default_rng(seed)), fast(jpg, np.random.default_rng(seed)))
        assert same == local  # a local crop keeps the full decode; a global view differs slightly
        branches.add(local)
    assert branches == {True, False}


def test_uint8_pixels_normalise_to_the_float_values(photo):
    import jax.numpy as jnp

    jpg = str(photo / "p.jpg")
    pairs = [(Preprocess(224, MEAN, STD)(jpg), Preprocess(224, MEAN, STD, uint8=True)(jpg)),
             (HybridView(96, MEAN, STD)(jpg, np.random.default_rng(1)),
              HybridView(96, MEAN, STD, uint8=True)(jpg, np.random.default_rng(1)))]
    for floats, raw in pairs:
        assert raw.dtype == np.uint8 and floats.dtype == np.float32
        np.testing.assert_array_equal(normalise_pixels(raw, MEAN, STD), floats)
        np.testing.assert_allclose(np.asarray(normalise_pixels(jnp.asarray(raw), MEAN, STD)), floats, atol=1e-6)


def test_uint8_batches_train_as_float_batches(demo_root, tmp_path):
    """data.normalise_on_device: batches are uint8 (a quarter of the bytes), and the run's losses equal the float
    pipeline's: the train step normalises on the device."""
    config = tiny_config(demo_root, **{"data.normalise_on_device": True, "train.steps": 3})
    batch = next(iter(train_loader(config, caption_source(config, demo_root, "train"),
                                   make_tokenizer(config, demo_root))))
    assert batch["image"].dtype == np.uint8
    losses = {}
    for on_device in (False, True):
        workdir = tmp_path / str(on_device)
        train.train(tiny_config(demo_root, **{"data.normalise_on_device": on_device, "train.steps": 3}), workdir)
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        losses[on_device] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
