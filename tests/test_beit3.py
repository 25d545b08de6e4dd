"""BEiT-3 against torchscale's BEiT3 (the encoder unilm's retrieval model wraps), every tensor randomised."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    # torchscale imports timm's old module path.
    warnings.simplefilter("ignore", FutureWarning)
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchBEiT3

from jaxretrieval.config import load_config  # noqa: E402
from jaxretrieval.models import create_model  # noqa: E402
from jaxretrieval.models.beit3 import BEiT3Retrieval, params_from_torchscale  # noqa: E402
from jaxretrieval.models.stacking import relayout  # noqa: E402

CONFIG = load_config(None, ["model.name=beit3_tiny", "model.drop_path=0.2"]).model
TINY = {"layers": CONFIG.multiway.layers, "width": CONFIG.multiway.width, "heads": CONFIG.multiway.heads,
        "ffn_dim": CONFIG.multiway.ffn_dim, "image_size": CONFIG.image.image_size,
        "patch_size": CONFIG.image.patch_size, "vocab_size": CONFIG.text.vocab_size,
        "max_text_positions": CONFIG.multiway.max_text_positions}
BATCH, TEXT_LEN = 3, 7
TOL = 1e-4


class TorchRetrieval(torch.nn.Module):
    """unilm's BEiT3ForRetrieval, reduced to what its state dict and its CLS-then-head forward need."""

    def __init__(self, args: EncoderConfig):
        super().__init__()
        width = args.encoder_embed_dim
        self.beit3 = TorchBEiT3(args)
        self.vision_head = torch.nn.Linear(width, width, bias=False)
        self.language_head = torch.nn.Linear(width, width, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.beit3(textual_tokens=None, visual_tokens=pixels)["encoder_out"][:, 0]
        return cls, torch.nn.functional.normalize(self.vision_head(cls), dim=-1)

    def text(self, tokens: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.beit3(textual_tokens=tokens, visual_tokens=None, text_padding_position=padding)["encoder_out"]
        cls = cls[:, 0]
        return cls, torch.nn.functional.normalize(self.language_head(cls), dim=-1)


def torch_config(**overrides) -> EncoderConfig:
    # unilm's _get_base_config with the tiny sizes; subln and the multiway final norm are EncoderConfig defaults.
    sizes = {"encoder_layers": TINY["layers"], "encoder_embed_dim": TINY["width"],
             "encoder_attention_heads": TINY["heads"], "encoder_ffn_embed_dim": TINY["ffn_dim"],
             "img_size": TINY["image_size"], "patch_size": TINY["patch_size"], "vocab_size": TINY["vocab_size"],
             "max_source_positions": TINY["max_text_positions"]}
    return EncoderConfig(**{**sizes, **overrides}, multiway=True, layernorm_embedding=False, normalize_output=True,
                         no_output_layer=True)


def randomised(config: EncoderConfig, seed: int = 0) -> TorchRetrieval:
    """Every tensor random, LayerNorm gains and biases included, so no mapping error can hide."""
    torch.manual_seed(seed)
    reference = TorchRetrieval(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.3))
        for module in reference.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(1.0)
        reference.logit_scale.fill_(2.3)
    return reference


@pytest.fixture(scope="module")
def pair() -> tuple[TorchRetrieval, BEiT3Retrieval]:
    reference = randomised(torch_config(drop_path_rate=0.2))
    model = create_model(CONFIG)
    assert isinstance(model, BEiT3Retrieval)
    graphdef, state = nnx.split(model)
    params = relayout(params_from_torchscale(reference.state_dict()), nnx.to_pure_dict(state))  # layers stacked
    assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return reference, nnx.merge(graphdef, state)


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(BATCH, TINY["image_size"], TINY["image_size"], 3)).astype(np.float32)
    tokens = rng.integers(3, TINY["vocab_size"], size=(BATCH, TEXT_LEN))
    lengths = np.array([TEXT_LEN, 4, 2])
    padding = (np.arange(TEXT_LEN)[None] >= lengths[:, None]).astype(np.int64)
    return pixels, tokens, padding


def nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def close(ours: jax.Array, theirs: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def test_image_tower_matches_torchscale(pair):
    reference, model = pair
    pixels, _, _ = inputs()
    with torch.no_grad():
        cls, embedding = reference.image(nchw(pixels))
    assert close(model.image_features(jnp.asarray(pixels)), cls) < TOL
    assert close(model.encode_image(jnp.asarray(pixels), True), embedding) < TOL


def test_text_tower_matches_torchscale_with_padding(pair):
    reference, model = pair
    _, tokens, padding = inputs()
    with torch.no_grad():
        cls, embedding = reference.text(torch.from_numpy(tokens), torch.from_numpy(padding).bool())
    assert close(model.text_features(jnp.asarray(tokens), jnp.asarray(padding)), cls) < TOL
    assert close(model.encode_text(jnp.asarray(tokens), True, padding_mask=jnp.asarray(padding)), embedding) < TOL
    # What sits under the padding must not matter.
    scrambled = np.where(padding == 1, 1, tokens)
    np.testing.assert_allclose(model.encode_text(jnp.asarray(scrambled), padding_mask=jnp.asarray(padding)),
                               model.encode_text(jnp.asarray(tokens), padding_mask=jnp.asarray(padding)), atol=1e-6)
    # Without an explicit mask the pads are the positions holding model.multiway.pad_id, as the tokenizers pad.
    padded = np.where(padding == 1, CONFIG.multiway.pad_id, tokens)
    assert close(model.encode_text(jnp.asarray(padded), True), embedding) < TOL


def test_joint_sequence_matches_torchscale(pair):
    reference, model = pair
    pixels, tokens, padding = inputs(1)
    with torch.no_grad():
        out = reference.beit3(textual_tokens=torch.from_numpy(tokens), visual_tokens=nchw(pixels),
                              text_padding_position=torch.from_numpy(padding).bool())["encoder_out"]
    ours = model.beit3(jnp.asarray(pixels), jnp.asarray(tokens), jnp.asarray(padding))
    assert ours.shape == tuple(out.shape)
    assert close(ours, out) < TOL


def test_heads_scale_and_drop_path(pair):
    reference, model = pair
    pixels, tokens, padding = inputs()
    image, text, scale = model(jnp.asarray(pixels), jnp.asarray(np.where(padding == 1, CONFIG.multiway.pad_id,
                                                                          tokens)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), math.exp(2.3), rtol=1e-6)
    fresh = create_model(CONFIG, seed=1)
    np.testing.assert_allclose(float(fresh.logit_scale[...]), math.log(1 / 0.07), rtol=1e-6)
    # Drop path rates rise linearly from 0 at the first layer (which therefore has none) to the last.
    assert model.beit3.drop_path_rates[0] == 0
    assert model.beit3.drop_path_rates[-1] == pytest.approx(0.2)
    x = jnp.asarray(pixels)
    dropped = [model.image_features(x, rngs=nnx.Rngs(dropout=s)) for s in range(4)]
    assert any(float(jnp.max(jnp.abs(d - model.image_features(x)))) > 1e-3 for d in dropped)
