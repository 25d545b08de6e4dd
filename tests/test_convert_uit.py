"""`python -m convert uit` against a tiny CMP / UIT composed in PyTorch (benchmarks/uit_torch.py: timm's Swin,
transformers' BERT with cross-attention from layer 2, CMP's heads and SimMIM) with random weights and non-trivial
batch-norm statistics, saved in the original's checkpoint layout: ITC features, ITM and MLM logits and SimMIM's
reconstruction equal the torch model's; missing, unexpected and inconsistent keys are named; OUT is checked first.
`python -m convert swin` of a timm and of a Microsoft-layout Swin gives timm's features, and with `--bert` the
text layers of a Hugging Face BERT."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("timm.models.swin_transformer")
pytest.importorskip("transformers")

sys.path.insert(0, str(REPO / "benchmarks"))
from test_bert import TINY, hf_bert  # noqa: E402
from test_swin import pixels as swin_pixels  # noqa: E402
from test_swin import run_timm, timm_model  # noqa: E402
from uit_torch import CMPTorch, ms_swin_state  # noqa: E402

import jaxretrieval  # noqa: E402
from convert import ConvertError  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.bert import BertSizes  # noqa: E402
from convert.sources import save_safetensors  # noqa: E402
from convert.uit import SwinSizes, build_config, import_swin, import_uit  # noqa: E402
from jaxretrieval.checkpoint import load_model, read_meta_at  # noqa: E402
from jaxretrieval.config import load_config  # noqa: E402
from jaxretrieval.evaluate import saved_config  # noqa: E402
from jaxretrieval.models import create_model  # noqa: E402
from jaxretrieval.models.swin import SwinTransformer  # noqa: E402
from jaxretrieval.models.uit import pixel_shuffle  # noqa: E402
from jaxretrieval.systems import get_system  # noqa: E402

SIZE = 64
SWIN = {"image_size": SIZE, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4,
        "drop_path_rate": 0.0}
BERT = {"vocab_size": 99, "width": 32, "layers": 4, "heads": 4, "ffn_dim": 48, "max_positions": 40,
        "type_vocab_size": 2, "fusion_from": 2, "dropout": 0.0}
EMBED, CONTEXT = 24, 16
TOL = 1e-4
F = torch.nn.functional


def randomised(seed: int = 0) -> CMPTorch:
    """Every tensor random, the batch norms' running statistics too (so evaluation mode is told apart)."""
    torch.manual_seed(seed)
    model = CMPTorch(SWIN, BERT, embed_dim=EMBED, mim_block=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position" in name:
                p.copy_(torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and ("norm" in name.lower() or name.startswith(("itm_head.1", "vision_proj.0",
                                                                                         "text_proj.0"))):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
        model.temp.fill_(0.05)
        for proj in (model.vision_proj, model.text_proj):
            proj[0].running_mean.copy_(0.5 * torch.randn_like(proj[0].running_mean))
            proj[0].running_var.copy_(0.5 + torch.rand_like(proj[0].running_var))
            proj[0].num_batches_tracked.fill_(7)
    return model.eval()


@dataclasses.dataclass
class Release:
    torch_model: CMPTorch
    state: dict
    path: Path  # {'model': CMP state dict, 'config': ...}
    converted: Path
    vocab: Path
    log: str


def save(state: dict, path: Path, **extra) -> Path:
    torch.save({"model": state, **extra} if extra else state, path)
    return path


def write_vocab(path: Path, size: int) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"word{i}" for i in range(size - 5)])
                    + "\n")
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    folder = tmp_path_factory.mktemp("uit")
    model = randomised()
    state = model.state_dict_cmp()
    path = save(state, folder / "cmp.pth", config={"h": SIZE, "w": SIZE, "max_tokens": CONTEXT, "max_words": 30,
                                                   "label_smooth": 0.2, "k_test": 128})
    vocab = write_vocab(folder / "vocab.txt", BERT["vocab_size"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["uit", str(path), str(folder / "out"), "--vocab", str(vocab), "--heads", "4"]) == 0
    return Release(model, state, path, folder / "out", vocab, log.getvalue())


def images(batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, SIZE, SIZE, 3)).astype(np.float32)


def token_ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(5, BERT["vocab_size"], (3, 12))
    ids[:, 0] = 2  # [CLS]
    ids[np.arange(12)[None] >= np.array([12, 6, 3])[:, None]] = 0  # trailing [PAD]
    return ids


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def test_itc_itm_mlm_match_the_torch_model(release):
    model, _, tokenizer = jaxretrieval.load(release.converted)
    uit, m, x, ids = model.module, release.torch_model, images(), token_ids()
    positions = np.array([[1, 3], [2, 4], [1, 2]])
    t_ids, t_atts = torch.from_numpy(ids), torch.from_numpy((ids != 0).astype(np.int64))
    with torch.no_grad():
        image_embeds = m.image_embeds(nchw(x))
        text_embeds = m.text_embeds(t_ids, t_atts)
        v = F.normalize(m.image_feat(image_embeds), dim=-1).numpy()
        t = F.normalize(m.text_feat(text_embeds), dim=-1).numpy()
        itm = m.itm_logits(image_embeds, text_embeds, t_atts).numpy()
        mlm = m.mlm_logits(t_ids, t_atts, image_embeds, torch.from_numpy(positions)).numpy()
    image_tokens, text_hidden = uit.image_tokens(x), uit.text_hidden(ids)
    diffs = {"image tokens": diff(image_tokens, image_embeds.numpy()), "text states": diff(text_hidden, text_embeds),
             "v": diff(model.encode_image(x), v), "t": diff(model.encode_text(ids), t),
             "itm": diff(uit.match_logits(text_hidden, uit.keep(ids), image_tokens), itm),
             "mlm": diff(uit.mlm_logits(ids, uit.keep(ids), image_tokens, positions), mlm)}
    print("max abs differences:", {k: f"{d:.1e}" for k, d in diffs.items()})
    assert all(d < TOL for d in diffs.values()), diffs
    copy = CMPTorch(SWIN, BERT, embed_dim=EMBED, mim_block=16).eval()
    copy.load_state_dict_cmp(release.state)  # the inverse of state_dict_cmp (a released checkpoint into torch)
    with torch.no_grad():
        assert torch.equal(copy.itm_logits(copy.image_embeds(nchw(x)), copy.text_embeds(t_ids, t_atts), t_atts),
                           torch.from_numpy(itm))
    assert float(uit.temp[...]) == pytest.approx(0.05)
    assert tokenizer.vocab_size == BERT["vocab_size"] and tokenizer.context_length == CONTEXT


def test_mim_reconstruction_matches_simmim(release):
    model, _, _ = jaxretrieval.load(release.converted)
    uit, m, x = model.module, release.torch_model, images(seed=1)
    mask = (np.random.default_rng(2).random((1, SIZE // 4, SIZE // 4)) < 0.5).astype(np.float32)
    with torch.no_grad():
        want = m.mim_reconstruction(nchw(x), torch.from_numpy(mask)).permute(0, 2, 3, 1).numpy()
        loss = float(m.mim_loss(nchw(x), torch.from_numpy(mask)))
    tokens, _ = uit.vision(x, masked=mask, mask_token=uit.mask_token[...])
    rows, cols = uit.vision.resolution
    ours = pixel_shuffle(uit.mim_decoder(tokens).reshape(len(x), rows, cols, -1), uit.mim_stride)
    # SimMIM divides the batch's summed error by one image's masked pixels: the sum of our per-image errors
    error = float(np.sum(uit.mim_error(x, mask)))
    print(f"max abs differences: reconstruction {diff(ours, want):.1e}, loss {abs(error - loss):.1e}")
    assert diff(ours, want) < TOL and error == pytest.approx(loss, rel=1e-5)


def test_config_metadata_and_skipped_keys(release):
    config, meta = saved_config(release.converted), read_meta_at(release.converted)
    assert config.system == "uit" and config.model.family == "uit" and config.model.name == "custom"
    image, text, s = config.model.image, config.model.text, config.section
    assert (image.image_size, image.patch_size, image.width, image.mlp_ratio) == (SIZE, 4, 16, 4.0)
    assert (text.vocab_size, text.width, text.layers, text.heads, text.context_length) == (99, 32, 4, 4, CONTEXT)
    assert text.mlp_ratio * text.width == BERT["ffn_dim"] and config.model.embed_dim == EMBED
    assert (s.swin_depths, s.swin_heads, s.swin_window, s.fusion_from, s.max_positions) == ([2, 2], [2, 4], 4, 2, 40)
    assert (s.chunks, s.mlm, s.mim, s.itm_hidden) == (3, True, True, 0)
    assert config.eval.rerank_k == 10 and config.data.max_words == 30 and config.data.tokenizer_kind == "wordpiece"
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["converted_from"]["format"] == "cmp"
    assert "partial" not in meta
    swin_buffers = 4 + 2  # every block's relative_position_index, the two shifted blocks' attn_mask
    vision_keys = sum(k.startswith("vision_encoder.") for k in release.state)
    for part in (f"{swin_buffers} Swin index / mask buffers", "1 BERT index buffers", "2 tied MLM decoder",
                 "2 batch-norm counters", f"{vision_keys} SimMIM's copy of vision_encoder",
                 f"image size {SIZE} from the saved config"):
        assert part in release.log, release.log


def test_image_size_from_attention_masks_else_224(release, tmp_path):
    bare = save(release.state, tmp_path / "bare.pth")
    assert main(["uit", str(bare), str(tmp_path / "a"), "--heads", "4"]) == 0
    assert saved_config(tmp_path / "a").model.image.image_size == SIZE
    unmasked = save({k: v for k, v in release.state.items() if not k.endswith("attn_mask")}, tmp_path / "u.pth")
    out = import_uit(unmasked, tmp_path / "b", heads=4)
    assert saved_config(out).model.image.image_size == 224  # the tables are per window: they load at any size


def test_missing_unexpected_and_inconsistent_keys_are_named(release, tmp_path, capsys):
    state = release.state
    less = save({k: v for k, v in state.items() if k != "itm_head.3.bias"}, tmp_path / "less.pth")
    with pytest.raises(ConvertError, match=r"1 required keys missing: itm_head\.3\.bias"):
        import_uit(less, tmp_path / "a", heads=4)
    more = save({**state, "mystery_head.weight": torch.zeros(2)}, tmp_path / "more.pth")
    assert main(["uit", str(more), str(tmp_path / "b"), "--heads", "4"]) == 2
    assert "mystery_head.weight" in capsys.readouterr().err and not (tmp_path / "b").exists()
    key = "simmim.encoder.encoder.norm.weight"
    apart = save({**state, key: state[key] + 1}, tmp_path / "apart.pth")
    with pytest.raises(ConvertError, match=f"'{key}' differs"):
        import_uit(apart, tmp_path / "c", heads=4)
    with pytest.raises(ConvertError, match="--heads"):
        import_uit(release.path, tmp_path / "d")  # width 32: no 64-wide heads to assume
    # OUT is checked before SRC is read
    assert main(["uit", str(tmp_path / "no_such.pth"), str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["swin", str(release.path), str(tmp_path / "e")]) == 2
    assert "convert uit" in capsys.readouterr().err


def swin_config() -> dict:
    return {k: v for k, v in SWIN.items() if k != "drop_path_rate"}


def our_swin(checkpoint: Path) -> SwinTransformer:
    model = SwinTransformer(patch_size=4, **swin_config(), rngs=nnx.Rngs(0))
    params, _ = load_model(checkpoint, {"vision": nnx.to_pure_dict(nnx.state(model))}, partial=True)
    nnx.update(model, params["vision"])
    return model


@pytest.fixture(scope="module")
def timm_swin():
    return timm_model(swin_config(), seed=3)


@pytest.mark.parametrize("layout", ["timm", "microsoft"])
def test_swin_features_equal_timm(timm_swin, layout, tmp_path):
    if layout == "timm":
        src = tmp_path / "swin.pth"
        torch.save(timm_swin.state_dict(), src)
    else:  # swin_base_patch4_window7_224_22k.pth's arrangement, its 21k-class head included
        head = {"head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}
        src = save({**ms_swin_state(timm_swin), **head}, tmp_path / "ms.pth")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["swin", str(src), str(tmp_path / "out")]) == 0
    meta = read_meta_at(tmp_path / "out")
    assert meta["partial"] and meta["swin"]["depths"] == [2, 2] and meta["converted_from"]["format"] == (
        "ms_swin" if layout == "microsoft" else "timm_swin")
    x = swin_pixels(SIZE)
    tokens, pooled = our_swin(tmp_path / "out")(x)
    want_tokens, want_pooled = run_timm(timm_swin, x)
    diffs = diff(tokens, want_tokens), diff(pooled, want_pooled)
    print(f"{layout}: max abs differences tokens {diffs[0]:.1e}, pooled {diffs[1]:.1e}")
    assert max(diffs) < TOL
    if layout == "microsoft":
        assert "2 classifier (head.*)" in log.getvalue() and "6 Swin index / mask buffers" in log.getvalue()


def test_swin_missing_and_unexpected_keys_are_named(timm_swin, tmp_path):
    state = ms_swin_state(timm_swin)
    less = save({k: v for k, v in state.items() if k != "layers.0.downsample.norm.bias"}, tmp_path / "less.pth")
    with pytest.raises(ConvertError, match=r"1 required keys missing: layers\.0\.downsample\.norm\.bias"):
        import_swin(less, tmp_path / "a")
    more = save({**state, "absolute_pos_embed": torch.zeros(1, 256, 16)}, tmp_path / "more.pth")
    with pytest.raises(ConvertError, match="1 unexpected keys .*: absolute_pos_embed"):
        import_swin(more, tmp_path / "b")
    with pytest.raises(ConvertError, match="needs --bert"):
        import_swin(save(state, tmp_path / "ok.pth"), tmp_path / "c", fusion_from=2)
    assert not any((tmp_path / name).exists() for name in "abc")


def bert_base_like_folder(folder: Path):
    """A tiny BertForMaskedLM saved as bert-base-uncased's files are: TF-era LayerNorm.gamma / .beta names, a pooler
    and the NSP head beside the MLM head, and a vocab.txt."""
    model = hf_bert(4, mlm=True, seed=5)
    model.save_pretrained(folder)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
             v.detach().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    state.update({"bert.pooler.dense.weight": rng.standard_normal((32, 32), np.float32),
                  "bert.pooler.dense.bias": np.zeros(32, np.float32),
                  "cls.seq_relationship.weight": np.zeros((2, 32), np.float32),
                  "cls.seq_relationship.bias": np.zeros(2, np.float32)})
    save_safetensors(state, folder / "model.safetensors")
    write_vocab(folder / "vocab.txt", TINY["vocab_size"])
    return model


def test_swin_with_bert_initialises_the_text_tower(timm_swin, tmp_path, capsys):
    folder = tmp_path / "bert"
    model_mlm = bert_base_like_folder(folder)
    bert = model_mlm.bert
    src = save(ms_swin_state(timm_swin), tmp_path / "ms.pth")
    assert main(["swin", str(src), str(tmp_path / "out"), "--bert", str(folder), "--fusion-from", "2"]) == 0
    log = capsys.readouterr().out
    assert all(part in log for part in ("2 pooler", "2 NSP head", "2 MLM decoder (tied")), log
    meta = read_meta_at(tmp_path / "out")
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["bert"]["fusion_from"] == 2 and meta["mlm"]
    overrides = ["model.text.vocab_size=99", "model.text.heads=4", "model.text.mlp_ratio=1.5",  # uit_tiny's otherwise
                 "model.text.context_length=16", "uit.max_positions=40"]
    config = load_config(REPO / "configs" / "demo" / "uit_tiny.yaml", overrides, notices=False)
    model = create_model(config, seed=1)
    fresh = nnx.to_pure_dict(nnx.state(model))
    params = get_system("uit").init_from(config, str(tmp_path / "out"), meta, None, lambda: fresh)
    nnx.update(model, params)
    ids = token_ids()
    with torch.no_grad():
        hidden = bert(torch.from_numpy(ids), attention_mask=torch.from_numpy((ids != 0).astype(np.int64)),
                      output_hidden_states=True).hidden_states
    text = diff(model.text_hidden(ids), hidden[2].numpy())
    x = swin_pixels(SIZE)
    vision = diff(model.vision(x)[0], run_timm(timm_swin, x)[0])
    print(f"with --bert: max abs differences text layers {text:.1e}, Swin tokens {vision:.1e}")
    assert text < TOL and vision < TOL
    fusion = params["text"]["fusion"]["layers"]["cross"]
    np.testing.assert_array_equal(fusion["intermediate"]["kernel"][1],
                                  bert.encoder.layer[3].intermediate.dense.weight.detach().numpy().T)
    jax.tree.map(np.testing.assert_array_equal, fusion["crossattention"],  # not in bert-base: stays fresh
                 fresh["text"]["fusion"]["layers"]["cross"]["crossattention"])
    jax.tree.map(np.testing.assert_array_equal, params["vision_proj"], fresh["vision_proj"])
    np.testing.assert_array_equal(params["mlm_head"]["transform"]["kernel"],
                                  model_mlm.cls.predictions.transform.dense.weight.detach().numpy().T)


def test_swin_b_and_bert_base_sizes_name_the_preset():
    swin = SwinSizes(image_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                     window=7, mlp_ratio=4.0, microsoft=True)
    text = BertSizes(vocab_size=30522, width=768, layers=12, heads=12, ffn_dim=3072, max_positions=512,
                     type_vocab_size=2, fusion_from=6, encoder_width=1024, pooler=False)
    config = build_config(swin, text, 2048, {"max_tokens": 56, "h": 224, "w": 224})
    assert config.model.name == "uit_swinb" and config.section.fusion_from == 6 and config.eval.rerank_k == 10
    assert build_config(swin, text, 1024).model.name == "custom"
    assert build_config(dataclasses.replace(swin, depths=(2, 2, 6, 2)), text, 2048).model.name == "custom"


def test_torch_train_losses_run_with_gradients():
    """The benchmark's torch step: every term finite, the total CMP's sum, gradients reaching every head."""
    torch.manual_seed(0)
    m = CMPTorch({**SWIN, "drop_path_rate": 0.1}, {**BERT, "dropout": 0.1}, embed_dim=EMBED, mim_block=16,
                 loop_negatives=True).train()
    ids = torch.from_numpy(np.concatenate([token_ids(), token_ids(1)]))
    atts = (ids != 0).long()
    masked, masked_ids = ids.clone(), torch.full((6, 3), -100)
    masked[:, 1:3], masked_ids[:, :2] = 4, ids[:, 1:3]  # [MASK] at positions 1 and 2; the third slot unused
    batch = {"image": nchw(images(6)), "text_ids": ids, "text_atts": atts, "text_ids_eda": ids.flip(1),
             "text_atts_eda": atts.flip(1), "text_ids_masked": masked,
             "masked_pos": torch.tensor([[1, 2, 0]] * 6), "masked_ids": masked_ids,
             "idx": torch.tensor([0, 1, 2, 0, 3, 4])}
    out = m.train_losses(batch)
    terms = [float(out[k].detach()) for k in ("loss_itc", "loss_itm", "loss_mlm", "loss_mim")]
    assert all(np.isfinite(terms)) and float(out["loss"].detach()) == pytest.approx(sum(terms[:3]) + 0.1356 * terms[3])
    out["loss"].backward()
    for p in (m.mask_token, m.itm_head[0].weight, m.vision_proj[2].weight,
              m.text_encoder.bert.encoder.layer[3].crossattention.self.key.weight,
              m.text_encoder.cls.predictions.transform.dense.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
