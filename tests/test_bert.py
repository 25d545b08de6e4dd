"""models.bert against transformers' BERT with the same random weights (fp32): hidden states and pooler, padding,
cross-attention fusion layers (every layer and every other one, Q-Former style), the MLM head, and the weight
mapping both ways (convert/bert.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.bert import BertSizes, flat_from_hf, hf_from_flat, name_pairs, sizes_from_hf
from jaxretrieval.models.bert import Bert, ITMHead, MLMHead, layer_path
from jaxretrieval.models.stacking import relayout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 99, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 48,
        "max_position_embeddings": 40, "type_vocab_size": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12}


def hf_bert(layers: int, *, cross_from: int | None = None, cross_every: int = 1, mlm: bool = False, causal=False,
            seed: int = 0):
    """A transformers BERT with random weights (norms and biases too). Cross-attention layers need a decoder config
    in transformers, which makes self-attention causal; `causal=False` turns that back off per layer (the
    bidirectional fusion BERT of ALBEF / X-VLM)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=layers, is_decoder=cross_from is not None,
                                     add_cross_attention=cross_from is not None, attn_implementation="eager", **TINY)
    model = (transformers.BertForMaskedLM if mlm else transformers.BertModel)(config).eval()
    bert = model.bert if mlm else model
    for i, layer in enumerate(bert.encoder.layer):
        if cross_from is not None and not (i >= cross_from and (i - cross_from) % cross_every == 0):
            del layer.crossattention  # transformers puts it in every layer; the state then lacks it here
            layer.is_decoder = False  # which is what makes a layer use it
        for module in layer.modules():
            if hasattr(module, "is_causal") and cross_from is not None and not causal:
                module.is_causal = False
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    if not causal:
        model.config.is_decoder = False  # the model's masks then stay bidirectional; the layers keep cross-attention
    return model


def state_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ours_from(model, sizes: BertSizes, prefix: str = "", mlm: bool = False, causal: bool = False):
    """Our Bert (and MLM head) holding the converted weights."""
    rngs = nnx.Rngs(0)
    bert = Bert(**sizes.model_kwargs(), causal=causal, rngs=rngs)
    head = MLMHead(sizes.width, sizes.vocab_size, rngs=rngs) if mlm else None
    flat = flat_from_hf(state_of(model), sizes, prefix, mlm)
    template = {"bert": nnx.to_pure_dict(nnx.state(bert))}
    if mlm:
        template["mlm"] = nnx.to_pure_dict(nnx.state(head))
    flat = {(k if k.startswith("mlm/") else f"bert/{k}"): v for k, v in flat.items()}
    params = relayout(flat, template)
    nnx.update(bert, params["bert"])
    if mlm:
        nnx.update(head, params["mlm"])
    return bert, head, params


def inputs(batch: int = 3, length: int = 11, seed: int = 1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], (batch, length))
    lengths = np.array([length, 6, 2][:batch])
    keep = np.arange(length)[None] < lengths[:, None]
    types = rng.integers(0, 2, (batch, length))
    return tokens, keep, types


def test_hidden_states_and_pooler_match_bert_model_with_padding():
    model = hf_bert(2)
    sizes = sizes_from_hf(model.config.to_dict(), state_of(model), "")
    assert sizes.fusion_from == 2
    bert, _, _ = ours_from(model, sizes)
    tokens, keep, types = inputs()
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(keep, dtype=torch.long),
                     token_type_ids=torch.tensor(types))
    hidden = bert(jnp.asarray(tokens), jnp.asarray(keep), token_types=jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-5)  # padded rows too
    np.testing.assert_allclose(np.asarray(bert.pool(hidden)), want.pooler_output.numpy(), atol=1e-5)


@pytest.mark.parametrize(("layers", "cross_from", "cross_every", "causal"),
                         [(4, 2, 1, False), (4, 0, 2, False), (3, 1, 1, True)])
def test_fusion_layers_match_every_layer_of_transformers(layers, cross_from, cross_every, causal):
    """ALBEF / X-VLM arrangement (text layers, then layers that cross-attend), Q-Former's every other layer, and a
    causal decoder; image tokens with their own padding; every layer's output compared."""
    model = hf_bert(layers, cross_from=cross_from, cross_every=cross_every, causal=causal)
    sizes = sizes_from_hf(model.config.to_dict(), state_of(model), "")
    assert (sizes.fusion_from, sizes.cross_every) == (cross_from, cross_every)
    bert, _, _ = ours_from(model, sizes, causal=causal)
    tokens, keep, _ = inputs()
    image = np.random.default_rng(2).standard_normal((3, 7, 32)).astype(np.float32)
    image_keep = np.arange(7)[None] < np.array([7, 5, 1])[:, None]
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(keep, dtype=torch.long),
                     encoder_hidden_states=torch.tensor(image),
                     encoder_attention_mask=torch.tensor(image_keep, dtype=torch.long), output_hidden_states=True)
    # Every layer: the first n layers (at unit boundaries) of the same weights give transformers' hidden state n.
    for n in range(1, layers + 1):
        if n > cross_from and (n - cross_from) % cross_every:
            continue
        prefix = dataclasses.replace(sizes, layers=n, fusion_from=min(cross_from, n))
        bert, _, _ = ours_from(model, prefix, causal=causal)
        hidden = bert.encode_text(jnp.asarray(tokens), jnp.asarray(keep))
        if n > cross_from:
            hidden = bert.fuse(hidden, jnp.asarray(keep), jnp.asarray(image), jnp.asarray(image_keep))
        np.testing.assert_allclose(np.asarray(hidden), want.hidden_states[n].numpy(), atol=1e-5, err_msg=f"layer {n}")
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-5)


def test_mlm_logits_match_bert_for_masked_lm():
    model = hf_bert(2, mlm=True)
    state = state_of(model)
    sizes = sizes_from_hf(model.config.to_dict(), state, "bert.")
    bert, head, _ = ours_from(model, sizes, prefix="bert.", mlm=True)
    tokens, keep, _ = inputs()
    with torch.no_grad():
        want = model(torch.tensor(tokens), attention_mask=torch.tensor(keep, dtype=torch.long)).logits.numpy()
    logits = head(bert(jnp.asarray(tokens), jnp.asarray(keep)), bert.embeddings.word)
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5)


def test_weights_map_back_exactly_and_layers_are_where_layer_path_says():
    model = hf_bert(4, cross_from=0, cross_every=2)
    state = state_of(model)
    sizes = sizes_from_hf(model.config.to_dict(), state, "")
    _, _, params = ours_from(model, sizes)
    per_layer = relayout(params["bert"], {ours: 0 for ours, _, _ in name_pairs(sizes)})
    back = hf_from_flat(per_layer, sizes)
    assert back.keys() <= state.keys()
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    # HF layer 3 is the second layer of the second unit: fusion/layers[1].rest[0]
    assert layer_path(3, layers=4, fusion_from=0, cross_every=2) == ("fusion/layers", 1, "rest/0")
    stacked = params["bert"]["fusion"]["layers"]["rest"][0]["intermediate"]["kernel"]
    np.testing.assert_array_equal(stacked[1], state["encoder.layer.3.intermediate.dense.weight"].T)


def test_itm_heads_and_bf16():
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(0), (5, 32))
    assert ITMHead(32, rngs=rngs)(x).shape == (5, 2)
    head = ITMHead(32, 64, rngs=rngs)
    hidden = x @ head.hidden.kernel[...] + head.hidden.bias[...]
    mean, var = hidden.mean(-1, keepdims=True), hidden.var(-1, keepdims=True)
    normed = (hidden - mean) / jnp.sqrt(var + 1e-5) * head.norm.scale[...] + head.norm.bias[...]
    want = jax.nn.gelu(normed, approximate=False) @ head.out.kernel[...] + head.out.bias[...]
    np.testing.assert_allclose(np.asarray(head(x)), np.asarray(want), atol=1e-5)
    bert = Bert(vocab_size=50, width=32, layers=2, heads=4, ffn_dim=48, max_positions=16, fusion_from=1, rngs=rngs,
                dtype=jnp.bfloat16)
    tokens = jnp.ones((2, 8), jnp.int32)
    out = bert(tokens, None, jnp.ones((2, 3, 32)))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 8, 32)
    with pytest.raises(ValueError, match="give the image tokens"):
        bert(tokens)
    with pytest.raises(ValueError, match="do not split into units of 2"):
        Bert(vocab_size=50, width=32, layers=3, heads=4, ffn_dim=48, max_positions=16, fusion_from=0, cross_every=2,
             rngs=rngs)


@pytest.mark.parametrize("mlm", [False, True])
def test_convert_command_round_trips_a_hugging_face_folder(tmp_path, mlm):
    from convert.__main__ import main as convert_main

    model = hf_bert(2, mlm=True) if mlm else hf_bert(4, cross_from=2)
    model.save_pretrained(tmp_path / "hf")
    assert convert_main(["bert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert convert_main(["bert-export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    from safetensors.numpy import load_file

    back, want = load_file(tmp_path / "back" / "model.safetensors"), state_of(model)
    assert set(back) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    if mlm:  # transformers reads the export back as the same model
        reread = transformers.BertForMaskedLM.from_pretrained(tmp_path / "back").eval()
        tokens = torch.tensor(inputs()[0])
        with torch.no_grad():
            np.testing.assert_allclose(reread(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-6)
    assert convert_main(["bert", str(tmp_path), str(tmp_path / "other")]) == 2  # no config.json there
    assert not (tmp_path / "other").exists()
