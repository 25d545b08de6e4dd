"""models.qformer against transformers' Blip2QFormerModel with the same random weights (fp32, every layer): the
queries reading the image (with and without image padding), the text alone (also against a BertModel holding the
same weights), queries + text fused (the ITM path, also against LAVIS's formulas written out in torch), and
Blip2Retrieval loaded from LAVIS key names (ITC features and scores, ITM logits, the mapping and its errors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.models.qformer import Blip2Retrieval, QFormer, flat_from_hf, flat_from_lavis, lavis_pairs, load_flat
from jaxretrieval.models.stacking import relayout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

SIZES = {"vocab_size": 99, "width": 64, "layers": 4, "heads": 4, "ffn_dim": 128, "max_positions": 40,
         "cross_every": 2, "encoder_width": 48}
QUERIES, BATCH, LENGTH, IMAGE_TOKENS = 8, 3, 11, 7


def randomise(module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = "LayerNorm" in name or "layernorm" in name
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm and name.endswith("weight") else
                    0.1 * torch.randn_like(p) if norm else 0.12 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf():
    """(Blip2QFormerModel, Blip2TextEmbeddings, our QFormer with their weights)."""
    config = transformers.Blip2QFormerConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, cross_attention_frequency=2, encoder_hidden_size=48, use_qformer_text_input=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    model = transformers.Blip2QFormerModel(config).eval()
    embeddings = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(config).eval()
    randomise(model, 0)
    randomise(embeddings, 1)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state |= {f"embeddings.{k}": v.numpy() for k, v in embeddings.state_dict().items()}
    ours = QFormer(**SIZES, rngs=nnx.Rngs(0))
    load_flat(ours, flat_from_hf(state, embeddings="embeddings."))
    return model, embeddings, ours


def data(seed: int = 2):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 99, (BATCH, LENGTH))
    keep = np.arange(LENGTH)[None] < np.array([LENGTH, 6, 2])[:, None]
    image = rng.standard_normal((BATCH, IMAGE_TOKENS, 48)).astype(np.float32)
    image_keep = np.arange(IMAGE_TOKENS)[None] < np.array([IMAGE_TOKENS, 5, 1])[:, None]
    queries = rng.standard_normal((BATCH, QUERIES, 64)).astype(np.float32)
    return tokens, keep, image, image_keep, queries


def every_layer(qformer: QFormer, x, keep, image, image_keep, queries: int) -> list[np.ndarray]:
    """Each layer's output, the stacked units taken apart."""
    graphdef, state = nnx.split(qformer.encoder.layers)
    outputs = []
    for u in range(SIZES["layers"] // SIZES["cross_every"]):
        unit = nnx.merge(graphdef, jax.tree.map(lambda a, u=u: a[u], state))
        for layer in [unit.cross, *unit.rest]:
            x = layer(x, keep, image, image_keep, queries)
            outputs.append(np.asarray(x))
    return outputs


def compare_layers(ours_embedded, ours_layers, theirs) -> None:
    np.testing.assert_allclose(np.asarray(ours_embedded), theirs.hidden_states[0].numpy(), atol=1e-5)
    assert len(theirs.hidden_states) == len(ours_layers) + 1
    for n, got in enumerate(ours_layers, 1):
        np.testing.assert_allclose(got, theirs.hidden_states[n].numpy(), atol=1e-5, err_msg=f"layer {n}")


def t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x))


@pytest.mark.parametrize("padded_image", [False, True])
def test_queries_match_every_layer_of_blip2_qformer_model(hf, padded_image):
    model, _, ours = hf
    _, _, image, image_keep, queries = data()
    image_keep = image_keep if padded_image else None
    with torch.no_grad():
        want = model(query_embeds=t(queries), encoder_hidden_states=t(image), output_hidden_states=True,
                     encoder_attention_mask=None if image_keep is None else t(image_keep).long())
    keep_j = None if image_keep is None else jnp.asarray(image_keep)
    x = ours.embeddings(queries=jnp.asarray(queries))
    compare_layers(x, every_layer(ours, x, None, jnp.asarray(image), keep_j, QUERIES), want)
    got = ours.queries(jnp.asarray(queries), jnp.asarray(image), keep_j)
    np.testing.assert_allclose(np.asarray(got), want.last_hidden_state.numpy(), atol=1e-5)


def test_text_matches_qformer_without_queries_and_a_bert_model_of_the_same_weights(hf):
    model, embeddings, ours = hf
    tokens, keep, *_ = data()
    with torch.no_grad():
        want = model(query_embeds=embeddings(input_ids=t(tokens)), query_length=0, attention_mask=t(keep).long(),
                     output_hidden_states=True)
    x = ours.embeddings(jnp.asarray(tokens))
    compare_layers(x, every_layer(ours, x, jnp.asarray(keep), None, None, 0), want)
    got = np.asarray(ours.text(jnp.asarray(tokens), jnp.asarray(keep)))
    np.testing.assert_allclose(got, want.last_hidden_state.numpy(), atol=1e-5)  # padded rows too
    # LAVIS's text-only forward is a plain BERT: positions from 0, no token types (a zero table), the text FFN.
    config = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    source = model.state_dict()
    state = {"embeddings.word_embeddings.weight": embeddings.word_embeddings.weight,
             "embeddings.position_embeddings.weight": embeddings.position_embeddings.weight,
             "embeddings.token_type_embeddings.weight": torch.zeros(1, 64),
             "embeddings.LayerNorm.weight": source["layernorm.weight"],
             "embeddings.LayerNorm.bias": source["layernorm.bias"]}
    for key in bert.state_dict():
        if key.startswith("encoder."):
            state[key] = source[key.replace(".attention.self.", ".attention.attention.")]
    bert.load_state_dict(state, strict=True)
    with torch.no_grad():
        plain = bert(t(tokens), attention_mask=t(keep).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(got, plain, atol=1e-5)


def lavis_fused(model, embeddings, queries, tokens, keep, image, image_keep) -> list[torch.Tensor]:
    """Each layer's output of LAVIS's BertModel(text, query_embeds, encoder_hidden_states) written out in torch:
    LayerNorm(cat(queries, word + position)), additive -10000 masks, per layer self-attention over everything, then
    for the queries cross-attention (every other layer) and the query FFN, for the text the text FFN."""
    def attention(module, x, context, mask):
        heads = lambda y: y.view(*y.shape[:2], 4, 16).transpose(1, 2)  # noqa: E731
        a = module.attention
        scores = heads(a.query(x)) @ heads(a.key(context)).transpose(-1, -2) / 4.0 + mask
        mixed = (scores.softmax(-1) @ heads(a.value(context))).transpose(1, 2).reshape(x.shape)
        return module.output.LayerNorm(x + module.output.dense(mixed))

    def ffn(intermediate, output, x):
        return output.LayerNorm(x + output.dense(F.gelu(intermediate.dense(x))))

    word = embeddings.word_embeddings(tokens) + embeddings.position_embeddings(torch.arange(tokens.shape[1]))
    x = model.layernorm(torch.cat([queries, word], 1))
    mask = (1.0 - torch.cat([torch.ones(queries.shape[:2]), keep.float()], 1))[:, None, None] * -10000.0
    image_mask = (1.0 - image_keep.float())[:, None, None] * -10000.0
    outputs = []
    for i, layer in enumerate(model.encoder.layer):
        x = attention(layer.attention, x, x, mask)
        q, text = x[:, :QUERIES], x[:, QUERIES:]
        if i % 2 == 0:
            q = attention(layer.crossattention, q, image, image_mask)
        x = torch.cat([ffn(layer.intermediate_query, layer.output_query, q), ffn(layer.intermediate, layer.output,
                                                                              text)], 1)
        outputs.append(x)
    return outputs


def test_fused_queries_and_text_match_lavis_formulas_and_blip2_itm_path(hf):
    """Padded image tokens against LAVIS's formulas; transformers' own joint path (Blip2ForImageTextRetrieval's ITM
    call) with every image token kept, as it calls it: transformers 5.x builds a padded encoder mask over the whole
    sequence and fails on the query-only cross-attention (size mismatch), so it cannot take one here."""
    model, embeddings, ours = hf
    tokens, keep, image, image_keep, queries = data()
    full_keep = np.concatenate([np.ones((BATCH, QUERIES), bool), keep], 1)
    with torch.no_grad():
        written = lavis_fused(model, embeddings, t(queries), t(tokens), t(keep), t(image), t(image_keep))
        joint = embeddings(input_ids=t(tokens), query_embeds=t(queries))
        want = model(query_embeds=joint, query_length=QUERIES, attention_mask=t(full_keep).long(),
                     encoder_hidden_states=t(image), output_hidden_states=True)
    x = ours.embeddings(jnp.asarray(tokens), jnp.asarray(queries))
    for kept, reference in ((None, None), (image_keep, written)):
        layers = every_layer(ours, x, jnp.asarray(full_keep), jnp.asarray(image),
                             None if kept is None else jnp.asarray(kept), QUERIES)
        if reference is None:
            compare_layers(x, layers, want)
            final = want.last_hidden_state.numpy()
        else:
            for n, (got, mine) in enumerate(zip(layers, reference, strict=True), 1):
                np.testing.assert_allclose(got, mine.numpy(), atol=1e-5, err_msg=f"layer {n} vs LAVIS's formulas")
            final = reference[-1].numpy()
        got = ours.fused(jnp.asarray(queries), jnp.asarray(tokens), jnp.asarray(keep), jnp.asarray(image),
                         None if kept is None else jnp.asarray(kept))
        assert got.shape == (BATCH, QUERIES + LENGTH, 64)
        np.testing.assert_allclose(np.asarray(got), final, atol=1e-5)


def lavis_state(hf_state: dict[str, torch.Tensor], seed: int = 3) -> dict[str, np.ndarray]:
    """A LAVIS Blip2Qformer state dict written from transformers' names, with the heads and what is not ours."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in hf_state.items():
        if key.startswith("layernorm."):
            key = key.replace("layernorm.", "embeddings.LayerNorm.")
        else:
            key = key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                                    ".crossattention.self.")
        state[f"Qformer.bert.{key}"] = value.numpy()
    normal = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    state |= {"query_tokens": normal(1, QUERIES, 64), "temp": np.float32(0.05), "ln_vision.weight": 1 + normal(48),
              "ln_vision.bias": normal(48), "vision_proj.weight": normal(16, 64), "vision_proj.bias": normal(16),
              "text_proj.weight": normal(16, 64), "text_proj.bias": normal(16), "itm_head.weight": normal(2, 64),
              "itm_head.bias": normal(2), "visual_encoder.blocks.0.attn.qkv.weight": normal(3, 3),
              "Qformer.cls.predictions.bias": normal(99), "Qformer.bert.embeddings.position_ids": np.arange(40)[None]}
    return state


def test_blip2_retrieval_from_lavis_names(hf):
    model, embeddings, _ = hf
    source = {**model.state_dict(), **{f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}}
    state = lavis_state(source)
    flat = flat_from_lavis(state)
    blip2 = Blip2Retrieval(qformer=SIZES, query_tokens=QUERIES, embed_dim=16, rngs=nnx.Rngs(5))
    load_flat(blip2, flat)
    # the mapping back: every LAVIS tensor where lavis_pairs puts it, layer 3 the second layer of unit 1
    params = nnx.to_pure_dict(nnx.state(blip2, nnx.Param))
    per_layer = relayout(params, {ours: 0 for ours, _, _ in lavis_pairs(4, 2)})
    for ours, theirs, transposed in lavis_pairs(4, 2):
        want = state[theirs].T if transposed else state[theirs]
        np.testing.assert_array_equal(np.asarray(per_layer[ours]), want, err_msg=theirs)
    np.testing.assert_array_equal(np.asarray(blip2.qformer.encoder.layers.rest[0].intermediate_query.kernel[1]),
                                  state["Qformer.bert.encoder.layer.3.intermediate_query.dense.weight"].T)

    tokens, keep, vit, _, _ = data(4)
    s = {k: torch.tensor(v) for k, v in state.items()}
    with torch.no_grad():
        image = F.layer_norm(t(vit), (48,), s["ln_vision.weight"], s["ln_vision.bias"], eps=1e-5)
        q = s["query_tokens"].expand(BATCH, -1, -1)
        query_out = model(query_embeds=q, encoder_hidden_states=image).last_hidden_state
        image_feats = F.normalize(F.linear(query_out, s["vision_proj.weight"], s["vision_proj.bias"]), dim=-1)
        text_out = model(query_embeds=embeddings(input_ids=t(tokens)), query_length=0,
                         attention_mask=t(keep).long()).last_hidden_state
        text_feat = F.normalize(F.linear(text_out[:, 0], s["text_proj.weight"], s["text_proj.bias"]), dim=-1)
        joint = model(query_embeds=embeddings(input_ids=t(tokens), query_embeds=q), query_length=QUERIES,
                      attention_mask=torch.cat([torch.ones(BATCH, QUERIES, dtype=torch.long), t(keep).long()], 1),
                      encoder_hidden_states=image).last_hidden_state
        itm = F.linear(joint[:, :QUERIES], s["itm_head.weight"], s["itm_head.bias"]).mean(1)
    image_embeds = blip2.encode_image_embeds(jnp.asarray(vit))
    np.testing.assert_allclose(np.asarray(image_embeds), image.numpy(), atol=1e-5)
    ours_image = blip2.image_features(image_embeds)
    ours_text = blip2.text_features(blip2.text_hidden(jnp.asarray(tokens), jnp.asarray(keep)))
    assert ours_image.shape == (BATCH, QUERIES, 16) and ours_text.shape == (BATCH, 16)
    np.testing.assert_allclose(np.asarray(ours_image), image_feats.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_text), text_feat.numpy(), atol=1e-5)
    sims = torch.einsum("iqd,td->itq", image_feats, text_feat)
    np.testing.assert_allclose(np.asarray(blip2.itc_scores(ours_image, ours_text)), sims.max(-1).values.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(blip2.itc_scores(ours_image, ours_text, reduce="first")),
                               sims[..., 0].numpy(), atol=1e-5)
    logits = blip2.match_logits(jnp.asarray(tokens), jnp.asarray(keep), image_embeds)
    assert logits.shape == (BATCH, 2)
    np.testing.assert_allclose(np.asarray(logits), itm.numpy(), atol=1e-5)
    np.testing.assert_allclose(float(blip2.temp[...]), 0.05)
    with pytest.raises(ValueError, match="reduce must be"):
        blip2.itc_scores(ours_image, ours_text, reduce="mean")

    broken = dict(state)
    del broken["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    broken["Qformer.bert.encoder.layer.0.surprise.weight"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing .*layer\.1\.output_query\.dense\.bias.*1 unplaced .*surprise"):
        flat_from_lavis(broken)
    with pytest.raises(ValueError, match="cross_every"):
        QFormer(**{**SIZES, "layers": 3}, rngs=nnx.Rngs(0))
