"""`python -m convert blip2` against a tiny LAVIS BLIP-2 (pretrain_vitL layout) assembled from open_clip's ViT and
transformers' Blip2QFormerModel with random weights: the converted checkpoint's image features (every query), text
features and ITM logits equal the torch composition (LAVIS's truncated ViT forward, ln_vision, the Q-Former, the
heads; the joint ITM path by LAVIS's formulas); a checkpoint without its ViT takes one from --vision; missing and
unexpected keys are named; an existing OUT is refused before reading; transformers' Q-Former folders convert."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from open_clip.model import QuickGELU  # noqa: E402
from open_clip.transformer import VisionTransformer as TorchViT  # noqa: E402
from test_lavis_vit import lavis_interpolate, lavis_reference  # noqa: E402
from test_qformer import randomise  # noqa: E402

import jaxretrieval  # noqa: E402
from convert import ConvertError  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.blip2 import import_blip2  # noqa: E402
from jaxretrieval.checkpoint import read_meta_at  # noqa: E402
from jaxretrieval.config import load_config  # noqa: E402
from jaxretrieval.evaluate import restore_params, saved_config  # noqa: E402
from jaxretrieval.models import init_params  # noqa: E402
from jaxretrieval.models.qformer import flat_from_hf  # noqa: E402
from jaxretrieval.models.stacking import relayout  # noqa: E402
from jaxretrieval.sharding import make_mesh  # noqa: E402

F = torch.nn.functional
CONFIG = load_config(REPO / "configs" / "demo" / "blip2_tiny.yaml", ["blip2.query_tokens=32"], notices=False)
IMAGE, TEXT, QUERIES = CONFIG.model.image, CONFIG.model.text, CONFIG.section.query_tokens
EMBED, FFN = CONFIG.model.embed_dim, int(TEXT.mlp_ratio * TEXT.width)
TOL = 1e-4


def vit(layers: int) -> TorchViT:
    """open_clip's ViT in OpenAI's form (QuickGELU, ln_post, proj), every tensor random."""
    model = TorchViT(image_size=IMAGE.image_size, patch_size=IMAGE.patch_size, width=IMAGE.width, layers=layers,
                     heads=IMAGE.heads, mlp_ratio=IMAGE.mlp_ratio, output_dim=EMBED, act_layer=QuickGELU)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5 if p.ndim >= 2 else
                    (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


def qformer_config(**extra):
    return dict(vocab_size=TEXT.vocab_size, hidden_size=TEXT.width, num_hidden_layers=TEXT.layers,
                num_attention_heads=TEXT.heads, intermediate_size=FFN,
                max_position_embeddings=CONFIG.section.max_positions, cross_attention_frequency=2,
                encoder_hidden_size=IMAGE.width, use_qformer_text_input=True, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, **extra)


def lavis_names(key: str) -> str:
    """transformers' Blip2QFormerModel / Blip2TextEmbeddings key -> LAVIS's Qformer.bert.* key."""
    if key.startswith("layernorm."):
        key = key.replace("layernorm.", "embeddings.LayerNorm.")
    return "Qformer.bert." + key.replace(".attention.attention.", ".attention.self.").replace(
        ".crossattention.attention.", ".crossattention.self.")


@dataclasses.dataclass
class Release:
    vit: TorchViT  # 3 blocks: LAVIS's ViT runs the first 2 (all but the last, as clip_L's 23 of 24)
    qformer: torch.nn.Module
    embeddings: torch.nn.Module
    heads: dict[str, torch.Tensor]
    state: dict[str, torch.Tensor]  # LAVIS's checkpoint["model"]
    folder: Path
    out: Path
    vocab: Path
    log: str


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    folder = tmp_path_factory.mktemp("blip2")
    visual = vit(IMAGE.layers + 1)
    config = transformers.Blip2QFormerConfig(**qformer_config())
    config._attn_implementation = "eager"
    qformer = transformers.Blip2QFormerModel(config).eval()
    embeddings = transformers.models.blip_2.modeling_blip_2.Blip2TextEmbeddings(config).eval()
    randomise(qformer, 0)
    randomise(embeddings, 1)
    g = torch.Generator().manual_seed(2)
    normal = lambda *shape: 0.3 * torch.randn(*shape, generator=g)  # noqa: E731
    heads = {"query_tokens": normal(1, QUERIES, TEXT.width), "temp": torch.tensor(0.05),
             "ln_vision.weight": 1 + normal(IMAGE.width), "ln_vision.bias": normal(IMAGE.width),
             "vision_proj.weight": normal(EMBED, TEXT.width), "vision_proj.bias": normal(EMBED),
             "text_proj.weight": normal(EMBED, TEXT.width), "text_proj.bias": normal(EMBED),
             "itm_head.weight": normal(2, TEXT.width), "itm_head.bias": normal(2)}
    blocks = f"transformer.resblocks.{IMAGE.layers}."
    state = {f"visual_encoder.{k}": v for k, v in visual.state_dict().items()
             if not k.startswith(("ln_post.", "proj", blocks))}
    text = {**qformer.state_dict(), **{f"embeddings.{k}": v for k, v in embeddings.state_dict().items()}}
    state |= {lavis_names(k): v for k, v in text.items()}
    state |= heads
    # What LAVIS's Blip2Qformer also saves: the captioning head, the position-id buffer.
    state |= {"Qformer.cls.predictions.bias": torch.zeros(TEXT.vocab_size),
              "Qformer.cls.predictions.transform.dense.weight": torch.zeros(TEXT.width, TEXT.width),
              "Qformer.bert.embeddings.position_ids": torch.arange(CONFIG.section.max_positions)[None]}
    src = folder / "blip2_pretrained_vitL.pth"
    torch.save({"model": state, "config": {"model": {"arch": "pretrain", "max_txt_len": 24}}}, src)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                               [f"word{i}" for i in range(TEXT.vocab_size - 6)] + ["[DEC]"]) + "\n")
    out, log = folder / "converted", io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["blip2", str(src), str(out), "--vocab", str(vocab), "--heads", "2", "--vision-heads", "2"]) == 0
    return Release(visual, qformer, embeddings, heads, state, folder, out, vocab, log.getvalue())


def restore(path: Path) -> dict:
    config = saved_config(path)
    return jax.tree.map(np.asarray, restore_params(config, path, make_mesh(config.mesh))[1])


def diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def lavis_itm(r: Release, tokens, keep, image) -> torch.Tensor:
    """LAVIS's ITM: BertModel(text, query_embeds, encoder_hidden_states) written out (LayerNorm(cat(queries, word +
    position)), -10000 additive masks, self-attention over all, then cross-attention every other layer and the query
    FFN for the queries, the text FFN for the text), itm_head on the query positions, averaged."""
    heads, width = TEXT.heads, TEXT.width

    def attention(module, x, context, mask):
        split = lambda y: y.view(*y.shape[:2], heads, width // heads).transpose(1, 2)  # noqa: E731
        a = module.attention
        scores = split(a.query(x)) @ split(a.key(context)).transpose(-1, -2) / (width // heads) ** 0.5 + mask
        mixed = (scores.softmax(-1) @ split(a.value(context))).transpose(1, 2).reshape(x.shape)
        return module.output.LayerNorm(x + module.output.dense(mixed))

    def ffn(intermediate, output, x):
        return output.LayerNorm(x + output.dense(F.gelu(intermediate.dense(x))))

    queries = r.heads["query_tokens"].expand(tokens.shape[0], -1, -1)
    word = r.embeddings.word_embeddings(tokens) + r.embeddings.position_embeddings(torch.arange(tokens.shape[1]))
    x = r.qformer.layernorm(torch.cat([queries, word], 1))
    mask = (1.0 - torch.cat([torch.ones(queries.shape[:2]), keep.float()], 1))[:, None, None] * -10000.0
    for i, layer in enumerate(r.qformer.encoder.layer):
        x = attention(layer.attention, x, x, mask)
        q, text = x[:, :QUERIES], x[:, QUERIES:]
        if i % 2 == 0:
            q = attention(layer.crossattention, q, image, 0.0)  # LAVIS: every image token kept
        x = torch.cat([ffn(layer.intermediate_query, layer.output_query, q),
                       ffn(layer.intermediate, layer.output, text)], 1)
    return F.linear(x[:, :QUERIES], r.heads["itm_head.weight"], r.heads["itm_head.bias"]).mean(1)


def test_features_and_itm_match_the_torch_composition(release):
    model, _, tokenizer = jaxretrieval.load(release.out)
    blip2 = model.module
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, IMAGE.image_size, IMAGE.image_size, 3)).astype(np.float32)
    ids = rng.integers(5, TEXT.vocab_size, (3, 12))
    ids[:, 0] = 2  # [CLS]
    ids[np.arange(12)[None] >= np.array([12, 7, 3])[:, None]] = 0  # trailing [PAD]
    h = release.heads
    with torch.no_grad():
        tokens = torch.from_numpy(lavis_reference(release.vit, pixels, IMAGE.layers))
        image = F.layer_norm(tokens, (IMAGE.width,), h["ln_vision.weight"], h["ln_vision.bias"], eps=1e-5)
        queries = release.qformer(query_embeds=h["query_tokens"].expand(3, -1, -1),
                                  encoder_hidden_states=image).last_hidden_state
        image_feats = F.normalize(F.linear(queries, h["vision_proj.weight"], h["vision_proj.bias"]), dim=-1)
        t, keep = torch.from_numpy(ids), torch.from_numpy(ids != 0)
        text = release.qformer(query_embeds=release.embeddings(input_ids=t), query_length=0,
                               attention_mask=keep.long()).last_hidden_state
        text_feat = F.normalize(F.linear(text[:, 0], h["text_proj.weight"], h["text_proj.bias"]), dim=-1)
        itm = lavis_itm(release, t, keep, image)
    image_tokens = blip2.image_tokens(pixels)
    ours_image = blip2.image_features(image_tokens)
    ours_text = blip2.text_features(blip2.text_hidden(ids))
    ours_itm = blip2.match_logits(ids, blip2.keep(ids), image_tokens)
    assert ours_image.shape == (3, QUERIES, EMBED) and ours_text.shape == (3, EMBED) and ours_itm.shape == (3, 2)
    diffs = {"image tokens": diff(image_tokens, image), "image features": diff(ours_image, image_feats),
             "text features": diff(ours_text, text_feat), "itm logits": diff(ours_itm, itm),
             "encode_image": diff(model.encode_image(pixels), image_feats)}
    print(f"max abs differences: {diffs}")
    assert max(diffs.values()) < TOL, diffs
    assert np.abs(itm.numpy()).max() > 0.1 and float(blip2.temp[...]) == pytest.approx(0.05)
    assert tokenizer.vocab_size == TEXT.vocab_size and tokenizer.context_length == 24  # LAVIS's max_txt_len


def test_config_metadata_and_summary(release):
    config = saved_config(release.out)
    # Every size as the tiny demo model's but the caption length (LAVIS's max_txt_len, so not named after the
    # preset: a checkpoint without a saved config is, below); the layout matches a fresh model's.
    assert config.system == "blip2" and config.model.name == "custom"
    assert config.model.image == CONFIG.model.image and config.model.activation == "quick_gelu"
    assert dataclasses.replace(config.model.text, context_length=32) == CONFIG.model.text
    s = config.section
    assert (s.query_tokens, s.cross_every, s.max_positions) == (QUERIES, 2, CONFIG.section.max_positions)
    assert config.data.tokenizer_kind == "wordpiece" and config.data.resize == "squash"
    params = restore(release.out)
    fresh = init_params(CONFIG, seed=0, precision="fp32")
    assert jax.tree.structure(params) == jax.tree.structure(jax.tree.map(np.asarray, fresh))
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, np.shape(b)), params, fresh)
    vision = params["vision"]
    np.testing.assert_array_equal(vision["ln_post"]["scale"], np.ones(IMAGE.width))
    np.testing.assert_array_equal(vision["ln_post"]["bias"], np.zeros(IMAGE.width))
    np.testing.assert_array_equal(vision["proj"], np.zeros((IMAGE.width, EMBED)))
    meta = read_meta_at(release.out)
    assert meta["converted_from"]["format"] == "lavis_blip2" and "partial" not in meta
    assert "ignored 3 keys: " in release.log
    assert "2 captioning head (Qformer.cls.*)" in release.log and "1 position_ids buffers" in release.log
    assert "identity LayerNorm and a zero projection" in release.log


def save_without_vit(release: Release, path: Path) -> Path:
    torch.save({"model": {k: v for k, v in release.state.items() if not k.startswith("visual_encoder.")}}, path)
    return path


def test_vision_from_a_clip(release, tmp_path):
    src = save_without_vit(release, tmp_path / "frozen_vit.pth")
    with pytest.raises(ConvertError, match="no ViT .*--vision"):
        import_blip2(src, tmp_path / "a", heads=2)
    clip = tmp_path / "clip.pt"  # an OpenAI-layout CLIP (image tower, and a stand-in for the rest)
    torch.save({**{f"visual.{k}": v for k, v in release.vit.state_dict().items()}, "logit_scale": torch.tensor(4.6)},
               clip)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        import_blip2(src, tmp_path / "b", vision=clip, heads=2, vision_heads=2)
    # 1 block after LAVIS's (12 tensors), ln_post and proj (3), the logit scale; and what the Q-Former side skips.
    assert "12 image blocks after the first 2" in log.getvalue() and "3 image ln_post / proj" in log.getvalue()
    assert "1 the CLIP's text tower and logit scale" in log.getvalue()
    converted = restore(tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, converted, restore(release.out))
    assert saved_config(tmp_path / "b").model.name == "blip2_tiny"  # no saved config: LAVIS's 32-token captions
    # --image-size: LAVIS's resize of the position grid (bicubic, corners aligned); --vision-layers: fewer blocks.
    assert main(["blip2", str(src), str(tmp_path / "big"), "--vision", str(clip), "--heads", "2", "--vision-heads",
                 "2", "--image-size", "48", "--vision-layers", "1"]) == 0
    config, big = saved_config(tmp_path / "big"), restore(tmp_path / "big")
    assert (config.model.image.image_size, config.model.image.layers) == (48, 1)
    table = release.vit.positional_embedding.detach().numpy()
    np.testing.assert_allclose(big["vision"]["positional_embedding"], lavis_interpolate(table, 6), atol=1e-5)
    np.testing.assert_array_equal(big["vision"]["transformer"]["blocks"]["ln_1"]["scale"],
                                  converted["vision"]["transformer"]["blocks"]["ln_1"]["scale"][:1])
    with pytest.raises(ConvertError, match="leave out --vision"):
        import_blip2(release.folder / "blip2_pretrained_vitL.pth", tmp_path / "c", vision=clip, heads=2)


def test_missing_and_unexpected_keys_and_existing_out(release, tmp_path, capsys):
    state = release.state
    for gone in ("Qformer.bert.encoder.layer.1.output_query.dense.bias", "visual_encoder.ln_pre.weight"):
        path = tmp_path / "less.pth"
        torch.save({"model": {k: v for k, v in state.items() if k != gone}}, path)
        with pytest.raises(ConvertError, match=gone.replace(".", r"\.")):
            import_blip2(path, tmp_path / "a", heads=2, vision_heads=2)
    for extra in ("mystery_head.weight", "visual_encoder.ln_post.weight"):
        path = tmp_path / "more.pth"
        torch.save({"model": {**state, extra: torch.zeros(IMAGE.width)}}, path)
        with pytest.raises(ConvertError, match=f"unexpected.*{extra.replace('.', r'.')}"):
            import_blip2(path, tmp_path / "b", heads=2, vision_heads=2)
    assert main(["blip2", str(path), str(tmp_path / "c"), "--heads", "2", "--vision-heads", "2"]) == 2
    assert "visual_encoder.ln_post.weight" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with pytest.raises(ConvertError, match="--heads"):
        import_blip2(release.folder / "blip2_pretrained_vitL.pth", tmp_path / "d")  # 32 wide: no 64-wide heads
    # OUT exists: refused before SRC is read (it does not even exist).
    assert main(["blip2", str(tmp_path / "nowhere.pth"), str(release.out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "nowhere" not in err


def hf_retrieval(folder: Path) -> Path:
    """A transformers Blip2ForImageTextRetrieval (its EVA-style vision model, Q-Former, heads) saved to `folder`."""
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=IMAGE.width, intermediate_size=2 * IMAGE.width, num_hidden_layers=1,
                           num_attention_heads=2, image_size=IMAGE.image_size, patch_size=IMAGE.patch_size),
        qformer_config=qformer_config(), num_query_tokens=QUERIES, image_text_hidden_size=EMBED)
    model = transformers.Blip2ForImageTextRetrieval(config).eval()
    randomise(model, 5)
    model.save_pretrained(folder)
    return folder


def test_hugging_face_qformer(release, tmp_path):
    folder = hf_retrieval(tmp_path / "hf")
    from convert.sources import load_hf_weights

    state = load_hf_weights(folder)
    want = flat_from_hf(state, "qformer.", embeddings="embeddings.")
    # (a) --qformer-hf: the folder's Q-Former and heads in the LAVIS conversion; temp and ln_vision stay LAVIS's.
    import_blip2(release.folder / "blip2_pretrained_vitL.pth", tmp_path / "mixed", qformer_hf=folder, vision_heads=2)
    mixed, lavis = restore(tmp_path / "mixed"), restore(release.out)
    template = {k: 0 for k in want}
    per_layer = relayout(mixed["retrieval"]["qformer"], template)
    for key, value in want.items():
        np.testing.assert_array_equal(per_layer[key], value, err_msg=key)
    np.testing.assert_array_equal(mixed["retrieval"]["itm_head"]["out"]["kernel"], state["itm_head.weight"].T)
    np.testing.assert_array_equal(mixed["retrieval"]["query_tokens"], state["query_tokens"])
    for same in ("temp", "ln_vision"):
        jax.tree.map(np.testing.assert_array_equal, mixed["retrieval"][same], lavis["retrieval"][same])
    jax.tree.map(np.testing.assert_array_equal, mixed["vision"], lavis["vision"])
    # (b) the folder as SRC: a partial checkpoint, the ViT from --vision, ln_vision and temp left fresh.
    clip = tmp_path / "clip.pt"
    torch.save({f"visual.{k}": v for k, v in release.vit.state_dict().items()}, clip)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["blip2", str(folder), str(tmp_path / "partial"), "--vision", str(clip), "--vision-heads", "2",
                     "--vocab", str(release.vocab)]) == 0
    assert "ln_vision, temp start fresh" in log.getvalue() and "vision_model.* (EVA ViT-g" in log.getvalue()
    meta = read_meta_at(tmp_path / "partial")
    assert meta["partial"] and meta["converted_from"]["format"] == "hf_Blip2ForImageTextRetrieval"
    config = saved_config(tmp_path / "partial")
    assert (config.model.text.heads, config.section.query_tokens, config.model.embed_dim) == (2, QUERIES, EMBED)
    fresh = init_params(config, seed=0, precision="fp32")
    from jaxretrieval.checkpoint import load_model

    params, _ = load_model(tmp_path / "partial", fresh, partial=True)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params["vision"]), lavis["vision"])
    np.testing.assert_array_equal(np.asarray(params["retrieval"]["qformer"]["embeddings"]["word"]["embedding"]),
                                  want["embeddings/word/embedding"])
    np.testing.assert_array_equal(np.asarray(params["retrieval"]["ln_vision"]["scale"]),
                                  np.asarray(fresh["retrieval"]["ln_vision"]["scale"]))
