"""BEiT-3's drop path (stochastic depth) by value, against torchscale's in train mode: one keep / drop draw per
sample for each residual branch, kept branches scaled by exactly 1 / (1 - p), the keep rate 1 - p, and the rate
rising linearly over the layers (`model.drop_path` is the last layer's)."""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm's old module path
    pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.component.droppath import DropPath
    from torchscale.model.BEiT3 import BEiT3 as TorchBEiT3

from jaxretrieval.config import load_config  # noqa: E402
from jaxretrieval.models import create_model  # noqa: E402
from jaxretrieval.models.beit3 import drop_path  # noqa: E402

RATE, LAYERS = 0.4, 5
# One module per layer, so a layer can be called on its own (the scanned stack runs the same layer code).
CONFIG = load_config(None, ["model.name=beit3_tiny", f"model.drop_path={RATE}",
                            f"model.multiway.layers={LAYERS}", "model.scan_layers=false"]).model


def keep_bound(n: int, keep: float) -> float:
    """Five binomial standard deviations of a keep fraction over n draws (a false alarm ~ 1 in 1.7 million)."""
    return 5 * np.sqrt(keep * (1 - keep) / n)


@pytest.fixture(scope="module")
def model():
    return create_model(CONFIG, seed=0)


def test_drop_path_rates_rise_linearly_like_torchscales(model):
    args = EncoderConfig(encoder_layers=LAYERS, encoder_embed_dim=32, encoder_attention_heads=2,
                         encoder_ffn_embed_dim=64, img_size=16, patch_size=8, vocab_size=20, multiway=True,
                         drop_path_rate=RATE, layernorm_embedding=False, normalize_output=True, no_output_layer=True)
    reference = TorchBEiT3(args)
    theirs = [layer.drop_path.drop_prob if layer.drop_path is not None else 0.0 for layer in reference.encoder.layers]
    ours = model.beit3.drop_path_rates
    np.testing.assert_allclose(ours, np.linspace(0.0, RATE, LAYERS), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert ours[0] == 0  # no stochastic depth on the first layer


def per_sample_factors(out: np.ndarray, branch: np.ndarray) -> np.ndarray:
    """out = factor_i * branch for each sample i; the factor read off the sample's largest entry."""
    flat_out, flat_branch = out.reshape(len(out), -1), branch.reshape(len(branch), -1)
    index = np.abs(flat_branch).argmax(axis=1)
    rows = np.arange(len(out))
    factors = flat_out[rows, index] / flat_branch[rows, index]
    np.testing.assert_allclose(flat_out, factors[:, None] * flat_branch, rtol=1e-5, atol=1e-6)  # whole-sample
    return factors


def test_drop_path_on_a_branch_matches_torchscales_per_sample_rule(model):
    """On one residual branch in train mode both implementations zero a whole sample or scale it by exactly
    1 / (1 - p); the kept fraction over many samples is 1 - p (five-sigma bound)."""
    p = model.beit3.drop_path_rates[-1]
    branch = np.random.default_rng(0).normal(size=(4000, 3, 8)).astype(np.float32)
    ours = np.asarray(drop_path(jnp.asarray(branch), jnp.float32(p), jax.random.key(1)))
    torch.manual_seed(1)
    module = DropPath(p).train()
    with torch.no_grad():
        theirs = module(torch.from_numpy(branch)).numpy()
    for out in (ours, theirs):
        factors = per_sample_factors(out, branch)
        kept = factors != 0
        np.testing.assert_allclose(factors[kept], 1 / (1 - p), rtol=1e-6)
        assert abs(kept.mean() - (1 - p)) < keep_bound(len(kept), 1 - p), kept.mean()
    # Evaluation (no rngs) leaves the branch as it is.
    np.testing.assert_array_equal(np.asarray(drop_path(jnp.asarray(branch), jnp.float32(p), None)), branch)


def test_encoder_layer_in_train_mode_drops_each_samples_branches(model):
    """The last encoder layer (p = model.drop_path) in train mode: every sample's output is one of the four
    combinations x + a * A(x) then h + f * F(h) with a, f in {0, 1 / (1 - p)}, computed here from the layer's own
    sub-modules; over many draws each branch is kept for a fraction 1 - p of the samples."""
    layer = model.beit3.layers[-1]
    p = model.beit3.drop_path_rates[-1]
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 6, CONFIG.multiway.width)).astype(np.float32))
    split = x.shape[1]  # vision tokens only
    attn = layer.self_attn(layer.self_attn_layer_norm(x, split), split, None)

    def candidate(a: float, f: float) -> np.ndarray:
        h = x + a * attn
        return np.asarray(h + f * layer.ffn(layer.final_layer_norm(h, split), split))

    scale = 1 / (1 - p)
    candidates = {(a, f): candidate(a * scale, f * scale) for a, f in itertools.product((0, 1), repeat=2)}
    # Without rngs (evaluation) both branches are added as they are: the sub-modules reproduce the layer.
    rate = jnp.float32(p)
    np.testing.assert_allclose(np.asarray(layer(x, split, None, rate, None)), candidate(1.0, 1.0), rtol=1e-5,
                               atol=1e-5)
    run = nnx.jit(lambda module, y, key: module(y, split, None, rate, key))
    draws = []
    for seed in range(25):
        out = np.asarray(run(layer, x, jax.random.key(seed)))
        for i in range(len(out)):
            errors = {key: float(np.abs(out[i] - value[i]).max()) for key, value in candidates.items()}
            best = min(errors, key=errors.get)
            assert errors[best] < 1e-4, (seed, i, errors)
            draws.append(best)
    draws = np.array(draws)
    n = len(draws)
    for branch in range(2):
        assert abs(draws[:, branch].mean() - (1 - p)) < keep_bound(n, 1 - p), (branch, draws[:, branch].mean())
    both_kept = np.mean(draws.all(axis=1))  # the two branches draw independently
    assert abs(both_kept - (1 - p) ** 2) < keep_bound(n, (1 - p) ** 2)


def test_model_forward_is_deterministic_without_rngs_and_stochastic_with(model):
    pixels = jnp.asarray(np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32))
    plain = np.asarray(model.image_features(pixels))
    np.testing.assert_array_equal(np.asarray(model.image_features(pixels)), plain)
    dropped = [np.asarray(model.image_features(pixels, rngs=nnx.Rngs(dropout=s))) for s in range(3)]
    assert all(np.abs(d - plain).max() > 1e-3 for d in dropped)
