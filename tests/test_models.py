"""The CLIP towers: preset sizes against open_clip, forward-pass properties, and numeric parity."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.config import load_config
from jaxretrieval.models import abstract_model

# ours -> open_clip model config name
PRESETS = {"vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14"}


def param_count(tree) -> int:
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count_matches_open_clip(preset: str) -> None:
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP as TorchCLIP

    oc_config = open_clip.get_model_config(PRESETS[preset])
    assert oc_config is not None, f"open_clip has no config {PRESETS[preset]}"
    with torch.device("meta"):  # shapes only, nothing allocated
        reference = TorchCLIP(**oc_config, quick_gelu=True)
    expected = sum(p.numel() for p in reference.parameters())

    config = load_config(None, [f"model.name={preset}"])
    _, abstract = abstract_model(config.model)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    assert param_count(abstract) == expected

    # Same head counts as open_clip (which derives vision heads from head_width 64); heads add no parameters.
    vision, text = oc_config["vision_cfg"], oc_config["text_cfg"]
    assert config.model.image.heads == vision["width"] // vision.get("head_width", 64)
    assert config.model.text.heads == text["heads"]
    assert config.model.text.context_length == text["context_length"]
    assert config.model.embed_dim == oc_config["embed_dim"]


# ---------------------------------------------------------------------------------------------------------
# Forward pass on the tiny preset


def random_params(abstract, seed: int, logit_scale: float) -> dict:
    """Random parameters of the given shapes (fan-in scaled matrices, norm gains near 1, non-zero biases).

    Built with numpy: initialising through the library would compile its initialisers, which is slow on CPU.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(path[-1].key)
        if name == "logit_scale":
            return np.float32(logit_scale)
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
        std = x.shape[-2] ** -0.5 if len(x.shape) >= 2 else 0.1  # fan-in, stacked layers or not
        return (std * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


BATCH = 4  # one batch shape everywhere, so each jitted function compiles once


@pytest.fixture(scope="module")
def tiny():
    # The tiny preset with one block per tower, to keep compilation short (the parity test below covers
    # stacked blocks).
    config = load_config(None, ["model.name=tiny", "model.image.layers=1", "model.text.layers=1"])
    graphdef, abstract = abstract_model(config.model)
    params = random_params(abstract, seed=0, logit_scale=config.model.init_logit_scale)

    @jax.jit
    def encode(params, pixels, tokens):
        m = nnx.merge(graphdef, params)
        return m.encode_image(pixels), m.encode_text(tokens), m(pixels, tokens)

    return config.model, params, encode


def tiny_tokens(cfg, rng: np.random.Generator, lengths: list[int]) -> np.ndarray:
    """Rows of [words..., EOT, pads...], EOT = the largest id; pads are 0."""
    eot = cfg.text.vocab_size - 1
    tokens = np.zeros((len(lengths), cfg.text.context_length), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, eot - 1, size=n)
        tokens[row, n] = eot
    return tokens


def tiny_images(cfg, rng: np.random.Generator, batch: int) -> np.ndarray:
    size = cfg.image.image_size
    return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def test_forward_shapes_and_normalisation(tiny) -> None:
    cfg, params, encode = tiny
    rng = np.random.default_rng(0)
    images = tiny_images(cfg, rng, BATCH)
    tokens = tiny_tokens(cfg, rng, [3, 7, 0, cfg.text.context_length - 1])
    image, text, (image_n, text_n, scale) = encode(params, images, tokens)
    assert image.shape == (BATCH, cfg.embed_dim) and text.shape == (BATCH, cfg.embed_dim)
    assert image_n.shape == (BATCH, cfg.embed_dim) and text_n.shape == (BATCH, cfg.embed_dim)
    assert scale.shape == ()
    for x in (image, text, image_n, text_n, scale):
        assert x.dtype == jnp.float32
        assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(image_n, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_n, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(image_n, image / np.linalg.norm(image, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text_n, text / np.linalg.norm(text, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, np.exp(cfg.init_logit_scale), rtol=1e-6)
    # Rows are encoded independently of the rest of the batch.
    other_images = tiny_images(cfg, rng, BATCH)
    other_tokens = tiny_tokens(cfg, rng, [1, 2, 4, 8])
    other_images[0], other_tokens[0] = images[0], tokens[0]
    image_0, text_0, _ = encode(params, other_images, other_tokens)
    np.testing.assert_allclose(image_0[0], image[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(text_0[0], text[0], rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(np.asarray(image_0[1:]) - np.asarray(image[1:]))) > 1e-3


def test_text_embedding_depends_only_on_tokens_up_to_eot(tiny) -> None:
    cfg, params, encode = tiny
    rng = np.random.default_rng(1)
    length, eot = cfg.text.context_length, cfg.text.vocab_size - 1
    images = tiny_images(cfg, rng, BATCH)
    base = np.repeat(tiny_tokens(cfg, rng, [5]), BATCH, axis=0)  # EOT at position 5 in every row
    variants = base.copy()
    # row 1: junk after the EOT, all below the EOT id so the EOT stays the argmax
    variants[1, 6:] = rng.integers(1, eot - 1, size=length - 6)
    # row 2: a different word before the EOT
    variants[2, 2] = variants[2, 2] % (eot - 2) + 1
    assert variants[2, 2] != base[2, 2]
    # row 3: the same words, the EOT one slot later (the pooled position moves)
    variants[3, 5], variants[3, 6] = 7, eot
    _, text, _ = encode(params, images, variants)
    text = np.asarray(text)
    np.testing.assert_allclose(text[1], text[0], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(text[2] - text[0])) > 1e-3
    assert np.max(np.abs(text[3] - text[0])) > 1e-3


def test_image_embedding_is_sensitive_to_patch_positions(tiny) -> None:
    cfg, params, encode = tiny
    rng = np.random.default_rng(2)
    images = np.repeat(tiny_images(cfg, rng, 1), BATCH, axis=0)
    tokens = tiny_tokens(cfg, rng, [3] * BATCH)
    p = cfg.image.patch_size
    original = images[0].copy()
    # row 1: top-left and bottom-right patches swapped (same pixels, other positions)
    images[1, :p, :p], images[1, -p:, -p:] = original[-p:, -p:], original[:p, :p]
    # row 2: two pixels swapped inside one patch (same patch set, other layout within the patch)
    images[2, 0, 0], images[2, 1, 2] = original[1, 2], original[0, 0]
    image, _, _ = encode(params, images, tokens)
    image = np.asarray(image)
    np.testing.assert_allclose(image[3], image[0], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(image[1] - image[0])) > 1e-3
    assert np.max(np.abs(image[2] - image[0])) > 1e-3


def test_bf16_compute_close_to_fp32(tiny) -> None:
    cfg, params, encode = tiny
    graphdef_bf16, abstract = abstract_model(cfg, precision="bf16")
    # bf16 compute keeps fp32 parameters with the same structure, so the fp32 params drop straight in.
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))

    @jax.jit
    def encode_bf16(params, pixels, tokens):
        return nnx.merge(graphdef_bf16, params)(pixels, tokens)

    rng = np.random.default_rng(3)
    images, tokens = tiny_images(cfg, rng, BATCH), tiny_tokens(cfg, rng, [2, 5, 9, 20])
    _, _, (image32, text32, scale32) = encode(params, images, tokens)
    image16, text16, scale16 = encode_bf16(params, images, tokens)
    assert image16.dtype == jnp.float32 and text16.dtype == jnp.float32 and scale16.dtype == jnp.float32
    assert np.all(np.isfinite(image16)) and np.all(np.isfinite(text16))
    np.testing.assert_allclose(image16, image32, atol=5e-2)
    np.testing.assert_allclose(text16, text32, atol=5e-2)
    assert np.min(np.sum(np.asarray(image16) * np.asarray(image32), axis=-1)) > 0.99
    assert np.min(np.sum(np.asarray(text16) * np.asarray(text32), axis=-1)) > 0.99
    np.testing.assert_allclose(scale16, scale32)
    # ... and it really computed in bf16, not silently in fp32.
    assert np.max(np.abs(np.asarray(image16) - np.asarray(image32))) > 1e-4


def test_logit_scale_is_clamped(tiny) -> None:
    cfg, params, encode = tiny
    rng = np.random.default_rng(4)
    images, tokens = tiny_images(cfg, rng, BATCH), tiny_tokens(cfg, rng, [3] * BATCH)
    for value, expected in [
        (10.0, cfg.max_logit_scale),
        (cfg.max_logit_scale + 1e-3, cfg.max_logit_scale),
        (1.5, 1.5),
        (-2.0, -2.0),
    ]:
        changed = {**params, "logit_scale": np.float32(value)}
        _, _, (_, _, scale) = encode(changed, images, tokens)
        np.testing.assert_allclose(scale, np.exp(expected), rtol=1e-6)
    np.testing.assert_allclose(np.exp(cfg.max_logit_scale), 100.0, rtol=1e-4)

    # Past the clamp the scale gets no gradient (as in CLIP, which clamps the parameter).
    graphdef, _ = abstract_model(cfg)

    def scale_of(t):
        return nnx.merge(graphdef, {**params, "logit_scale": t}).scale()

    assert float(jax.grad(scale_of)(jnp.float32(10.0))) == 0.0
    np.testing.assert_allclose(jax.grad(scale_of)(jnp.float32(1.0)), np.exp(1.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Numeric parity with open_clip, through `convert`: a random-weight open_clip CLIP of a small custom configuration,
# saved as open_clip releases it on the hub (open_clip_model.safetensors + open_clip_config.json), converted by
# `python -m convert clip`, loaded by `jaxretrieval.load`. README: embeddings within 1e-4 (fp32).

EMBED, VISION_WIDTH, PATCH, IMAGE, HEAD_WIDTH, LAYERS = 32, 64, 8, 32, 32, 2
CONTEXT, VOCAB, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS = 16, 100, 64, 2, 3
PARITY_TOL = 1e-4
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.filterwarnings("ignore:the text tower has:UserWarning")
def test_numeric_parity_with_open_clip(activation: str, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from open_clip.model import CLIP as TorchCLIP

    import jaxretrieval
    from convert.__main__ import main as convert_main
    from jaxretrieval.evaluate import saved_config

    model_cfg = {
        "embed_dim": EMBED,
        "quick_gelu": activation == "quick_gelu",
        "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": VISION_WIDTH, "patch_size": PATCH,
                       "head_width": HEAD_WIDTH},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": TEXT_WIDTH, "heads": TEXT_HEADS,
                     "layers": TEXT_LAYERS},
    }
    torch.manual_seed(0)
    reference = TorchCLIP(**model_cfg).eval()
    with torch.no_grad():  # random everything: non-zero biases, non-unit norm gains, so no mapping hides
        for name, p in reference.named_parameters():
            if name != "logit_scale":
                p.add_(0.1 * torch.randn_like(p))
        reference.logit_scale.fill_(2.0)
    release = tmp_path / "release"
    release.mkdir()
    safetensors_torch.save_file(reference.state_dict(), str(release / "open_clip_model.safetensors"))
    (release / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}))

    assert convert_main(["clip", str(release), str(tmp_path / "converted")]) == 0
    model, preprocess, _ = jaxretrieval.load(tmp_path / "converted")
    config = saved_config(tmp_path / "converted").model
    assert (config.activation, config.embed_dim) == (activation, EMBED)
    assert (config.image.heads, config.text.heads, config.text.layers) == (VISION_WIDTH // HEAD_WIDTH, TEXT_HEADS,
                                                                           TEXT_LAYERS)
    assert (list(preprocess.mean), list(preprocess.std)) == (pytest.approx(MEAN), pytest.approx(STD))
    assert sum(p.numel() for p in reference.parameters()) == param_count(model.params)

    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)  # NHWC
    tokens = np.zeros((4, CONTEXT), np.int64)
    for row, n in enumerate([1, 5, 9, CONTEXT - 1]):  # EOT = the max id, last row with EOT in the last slot
        tokens[row, :n] = rng.integers(1, VOCAB - 1, size=n)
        tokens[row, n] = VOCAB - 1

    with torch.no_grad():
        ref_image = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_text = reference.encode_text(torch.from_numpy(tokens)).numpy()
        ref_scale = reference.logit_scale.exp().item()

    ours_image = np.asarray(model.encode_image(images))
    ours_text = np.asarray(model.encode_text(tokens.astype(np.int32)))
    image_diff, text_diff = np.abs(ours_image - ref_image).max(), np.abs(ours_text - ref_text).max()
    print(f"{activation}: max |diff| image {image_diff:.1e} text {text_diff:.1e}")
    assert np.abs(ref_image).max() > 0.1 and np.abs(ref_text).max() > 0.1  # not a degenerate comparison
    assert np.abs(ref_text[0] - ref_text[1]).max() > 10 * PARITY_TOL  # rows differ by far more than the tolerance
    assert image_diff <= PARITY_TOL and text_diff <= PARITY_TOL
    assert model.logit_scale == pytest.approx(ref_scale, rel=1e-6)
