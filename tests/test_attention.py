"""model.attention: which kernel each tower asks for, and the cuDNN form of padding (key lengths in place of a
boolean mask) giving what the mask gives. cuDNN itself needs a GPU (benchmarks/gpu.sh compares it there); here its
call is stood in for by XLA's with the same arguments, so what our code hands it is checked."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.config import load_config
from jaxretrieval.errors import ConfigError
from jaxretrieval.models import create_model, layers
from jaxretrieval.models.layers import attend, attention_implementation
from jaxretrieval.resume import FROZEN_ON_RESUME


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU backend as far as the choice is concerned, and cuDNN's call run by XLA with the arguments it got."""
    real = jax.nn.dot_product_attention
    calls = []

    def stand_in(*args, implementation=None, **kwargs):
        calls.append((implementation, sorted(k for k, v in kwargs.items() if v is not None)))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(layers.jax.nn, "dot_product_attention", stand_in)
    return calls


def test_auto_takes_cudnn_only_where_its_kernel_applies(fake_gpu):
    assert attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention_implementation("auto", jnp.float16, 128) == "cudnn"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 60) == "xla"
    assert attention_implementation("auto", jnp.bfloat16, 256) == "xla"
    assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"


def test_auto_is_xla_off_gpu_and_a_forced_cudnn_says_why_not():
    assert attention_implementation("auto", jnp.bfloat16, 64) == "xla"
    with pytest.raises(ConfigError, match=r"backend is cpu.*float32.*head dim is 60"):
        attention_implementation("cudnn", jnp.float32, 60)
    with pytest.raises(ConfigError, match="auto, xla, cudnn"):
        load_config(None, ["model.attention=flash"])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_as_key_lengths_equals_the_mask(fake_gpu, causal):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 10, 2, 8)), jnp.float32) for _ in range(3))
    lengths = np.array([10, 4, 1])
    keep = jnp.asarray(np.arange(10)[None] < lengths[:, None])
    masked = attend(q, k, v, keep=keep, causal=causal, implementation="xla")
    fused = attend(q, k, v, keep=keep, causal=causal, implementation="cudnn")
    implementation, given = fake_gpu[-1]
    assert implementation == "cudnn" and "key_value_seq_lengths" in given and "mask" not in given
    np.testing.assert_allclose(np.asarray(fused), np.asarray(masked), atol=1e-6)
    # The mask is what decides: dropping it changes rows with padding.
    assert not np.allclose(np.asarray(attend(q, k, v, causal=causal)), np.asarray(masked), atol=1e-3)


@pytest.mark.parametrize("name", ["tiny", "beit3_tiny"])
def test_towers_ask_for_cudnn_in_bf16_and_compute_what_xla_does(fake_gpu, name):
    """Every attention of a bf16 model built on a GPU asks for cuDNN, and gives XLA's numbers: text with padding
    for BEiT-3, the causal text tower and the image tower for CLIP."""
    overrides = [f"model.name={name}", "model.text.context_length=12"]
    config = load_config(None, overrides)
    cudnn = create_model(config, seed=0, precision="bf16")
    xla = create_model(load_config(None, [*overrides, "model.attention=xla"]), seed=0, precision="bf16")
    chosen = {m.implementation for _, m in nnx.iter_graph(cudnn) if hasattr(m, "implementation")}
    assert chosen == {"cudnn"}
    tokens = np.random.default_rng(1).integers(3, 60, (2, 12)).astype(np.int32)
    tokens[0, 5:] = 1 if name == "beit3_tiny" else 0  # padding after 5 tokens in row 0
    if name == "tiny":
        tokens[:, 4] = config.model.text.vocab_size - 1  # CLIP pools at its end-of-text token
    images = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    for encode, x in ((type(cudnn).encode_text, tokens), (type(cudnn).encode_image, images)):
        fake_gpu.clear()
        fused = np.asarray(encode(cudnn, jnp.asarray(x)), np.float32)
        assert fake_gpu and {implementation for implementation, _ in fake_gpu} == {"cudnn"}
        np.testing.assert_allclose(fused, np.asarray(encode(xla, jnp.asarray(x)), np.float32), atol=1e-6)


def test_a_resumed_run_may_change_the_kernel_but_not_the_model():
    frozen = [re.compile(pattern) for pattern in FROZEN_ON_RESUME]
    assert not any(p.search("model.attention") for p in frozen)
    assert any(p.search("model.image.width") for p in frozen)
