"""`python -m convert xvlm` against a tiny X2-VLM / CFACK assembled from timm's BEiT and transformers' BERT with
random weights: ITC features, ITM and MLM logits and the momentum features of the converted checkpoint equal the
torch composition; a checkpoint without momentum copies gets the online weights; missing and unknown keys are
named; --image-size resamples the relative position tables."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_beit = pytest.importorskip("timm.models.beit")
pytest.importorskip("transformers")

from test_beit2 import timm_model  # noqa: E402
from test_bert import TINY, hf_bert  # noqa: E402

import jaxretrieval  # noqa: E402
from convert import ConvertError  # noqa: E402
from convert.__main__ import main  # noqa: E402
from convert.bert import BertSizes  # noqa: E402
from convert.xvlm import XVLMSizes, build_config, import_xvlm  # noqa: E402
from jaxretrieval.checkpoint import read_meta_at  # noqa: E402
from jaxretrieval.evaluate import restore_params, saved_config  # noqa: E402
from jaxretrieval.models.beit2 import resize_rel_pos_bias_table  # noqa: E402
from jaxretrieval.sharding import make_mesh  # noqa: E402

SIZE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, TINY["hidden_size"], 2, 2  # vision: 2 heads; text (TINY): 4
TEXT_LAYERS, FUSION, EMBED = 3, 2, 16
TOL = 1e-4


def beit(seed: int):
    """timm's BEiT in X2-VLM's arrangement (mean pooling: fc_norm, no final norm), every tensor random."""
    return timm_model(size=SIZE, patch=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, seed=seed)


class Towers(torch.nn.Module):
    """X2-VLM's retrieval parts in its attribute names (the state dict then has its keys)."""

    def __init__(self, seed: int, mlm: bool):
        super().__init__()
        self.vision_encoder = beit(seed)
        bert = hf_bert(TEXT_LAYERS, cross_from=FUSION, mlm=mlm, seed=seed)
        self.text_encoder = bert
        torch.manual_seed(seed + 100)
        self.vision_proj = torch.nn.Linear(WIDTH, EMBED)
        self.text_proj = torch.nn.Linear(WIDTH, EMBED)

    def image_tokens(self, pixels: np.ndarray) -> torch.Tensor:
        """X2-VLM's VisionTransformer.forward: CLS dropped, fc_norm per patch, their mean in front."""
        hidden = self.vision_encoder.forward_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        patches = self.vision_encoder.fc_norm(hidden[:, 1:])
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)

    def text(self, ids: np.ndarray, image: torch.Tensor):
        bert = getattr(self.text_encoder, "bert", self.text_encoder)
        return bert(torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0).long(),
                    encoder_hidden_states=image, output_hidden_states=True)

    def features(self, pixels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
        image = self.image_tokens(pixels)
        out = self.text(ids, image)
        v = torch.nn.functional.normalize(self.vision_proj(image[:, 0]), dim=-1)
        t = torch.nn.functional.normalize(self.text_proj(out.hidden_states[FUSION][:, 0]), dim=-1)
        return v.numpy(), t.numpy(), out.last_hidden_state


@dataclasses.dataclass
class Release:
    online: Towers
    momentum: Towers
    itm_head: torch.nn.Sequential
    cfack: Path  # {'model': everything, 'config': ...}, momentum copies and parts we leave out
    x2vlm: Path  # a bare state dict: BertModel text tower, no MLM head, no momentum copies
    vocab: Path
    cfack_log: str


def save(state: dict, path: Path, **extra) -> Path:
    torch.save({"model": state, **extra} if extra else state, path)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    folder = tmp_path_factory.mktemp("xvlm")
    online, momentum = Towers(0, mlm=True).eval(), Towers(1, mlm=False).eval()
    torch.manual_seed(7)
    itm = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.LayerNorm(2 * WIDTH), torch.nn.GELU(),
                              torch.nn.Linear(2 * WIDTH, 2))
    with torch.no_grad():
        for p in itm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    heads = {f"itm_head.{k}": v for k, v in itm.state_dict().items()} | {"temp": torch.tensor(0.05)}
    sd = {**online.state_dict(), **heads}
    # Buffers X2-VLM's modules keep: BEiT's index tables and BERT's position ids.
    for i in range(DEPTH):
        sd[f"vision_encoder.blocks.{i}.attn.relative_position_index"] = timm_beit.gen_relative_position_index(
            (SIZE // PATCH,) * 2)
    sd["text_encoder.bert.embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
    moment = {k.replace("_encoder.", "_encoder_m.", 1).replace("_proj.", "_proj_m.", 1): v
              for k, v in momentum.state_dict().items()}
    extra = {"cnn_encoder.fc.weight": torch.zeros(EMBED, 8), "pret_model.stem.0.weight": torch.zeros(8, 3, 4, 4)}
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                               [f"word{i}" for i in range(TINY["vocab_size"] - 5)]) + "\n")
    cfack = save({**sd, **moment, **extra}, folder / "cfack.th",
                 config={"max_tokens": 16, "max_words": 30, "use_momentum": True, "momentum": 0.99})
    bare = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in sd.items()
            if not k.startswith("text_encoder.cls.")}
    x2vlm = save(bare, folder / "x2vlm.th")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert main(["xvlm", str(cfack), str(folder / "cfack"), "--vocab", str(vocab), "--heads", "4"]) == 0
    return Release(online, momentum, itm, folder / "cfack", x2vlm, vocab, log.getvalue())


def pixels(size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, size, size, 3)).astype(np.float32)


def token_ids(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(5, TINY["vocab_size"], (3, 12))
    ids[:, 0] = 2  # [CLS]
    ids[np.arange(12)[None] >= np.array([12, 6, 3])[:, None]] = 0  # trailing [PAD]
    return ids


def diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def test_itc_itm_mlm_and_momentum_match_the_torch_model(release):
    model, _, tokenizer = jaxretrieval.load(release.cfack)
    xvlm, x, ids = model.module, pixels(), token_ids()
    with torch.no_grad():
        v, t, fused = release.online.features(x, ids)
        itm = release.itm_head(fused[:, 0]).numpy()
        positions = np.array([[1, 3], [2, 4], [1, 2]])
        logits = release.online.text_encoder(torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0).long(),
                                             encoder_hidden_states=release.online.image_tokens(x)).logits.numpy()
        v_m, t_m, _ = release.momentum.features(x, ids)
    assert diff(model.encode_image(x), v) < TOL and diff(model.encode_text(ids), t) < TOL
    image_tokens, text_hidden = xvlm.image_tokens(x), xvlm.text_hidden(ids)
    assert diff(xvlm.match_logits(text_hidden, xvlm.keep(ids), image_tokens), itm) < TOL
    ours = xvlm.mlm_logits(ids, xvlm.keep(ids), image_tokens, positions)
    assert diff(ours, np.take_along_axis(logits, positions[..., None], axis=1)) < TOL
    ours_m = xvlm.momentum_features(x, ids)
    assert diff(ours_m[0], v_m) < TOL and diff(ours_m[1], t_m) < TOL
    assert float(xvlm.temp[...]) == pytest.approx(0.05)
    assert tokenizer.vocab_size == TINY["vocab_size"] and tokenizer.context_length == 16


def test_metadata_and_ignored_keys(release):
    meta = read_meta_at(release.cfack)
    config = saved_config(release.cfack)
    assert config.system == "cfack" and config.model.family == "xvlm" and config.model.name == "custom"
    image, text = config.model.image, config.model.text
    assert (image.image_size, image.patch_size, image.width, image.layers, image.heads) == (SIZE, PATCH, WIDTH,
                                                                                           DEPTH, HEADS)
    assert (text.vocab_size, text.width, text.layers, text.heads, text.context_length) == (99, WIDTH, 3, 4, 16)
    assert text.mlp_ratio * text.width == TINY["intermediate_size"] and config.model.embed_dim == EMBED
    s = config.section
    assert (s.fusion_from, s.max_positions, s.mlm, s.momentum, s.itm_hidden) == (FUSION, 40, True, 0.99, 0)
    assert config.data.tokenizer_kind == "wordpiece" and config.data.max_words == 30
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["converted_from"]["format"] == "cfack"
    assert "partial" not in meta  # complete: train.init_from reads it straight
    # 2 index tables and the position ids, the tied decoder's weight and bias, the momentum BERT's fusion layer
    # (self- and cross-attention, feed-forward: 26 tensors) and its pooler (transformers adds one), the CNN branch.
    assert "ignored 35 keys: " in release.cfack_log
    for part in ("3 index buffers", "2 tied MLM decoder", "26 momentum fusion layers", "2 pooler", "1 cnn_encoder.*",
                 "1 pret_model.*"):
        assert part in release.cfack_log


def restore(path: Path) -> dict:
    config = saved_config(path)
    return jax.tree.map(np.asarray, restore_params(config, path, make_mesh(config.mesh))[1])


def test_without_momentum_copies_the_online_weights(release, tmp_path):
    out = tmp_path / "x2vlm"
    assert main(["xvlm", str(release.x2vlm), str(out), "--heads", "4"]) == 0
    params = restore(out)
    assert "mlm_head" not in params and not saved_config(out).section.mlm
    assert "tokenizer" not in read_meta_at(out)
    m = params["momentum"]
    online = {"vision": params["vision"], "vision_proj": params["vision_proj"], "text_proj": params["text_proj"],
              "text": {"embeddings": params["text"]["embeddings"], "text": params["text"]["text"]}}
    assert jax.tree.structure(m) == jax.tree.structure(online)
    jax.tree.map(np.testing.assert_array_equal, m, online)
    # The online weights are those of the CFACK release's towers.
    cfack = restore(release.cfack)
    jax.tree.map(np.testing.assert_array_equal, params["vision"], cfack["vision"])
    jax.tree.map(np.testing.assert_array_equal, params["text"], cfack["text"])


def test_image_size_resamples_the_tables(release, tmp_path):
    out = tmp_path / "big"
    assert main(["xvlm", str(release.x2vlm), str(out), "--heads", "4", "--image-size", "48"]) == 0
    assert saved_config(out).model.image.image_size == 48
    params = restore(out)
    tables = params["vision"]["blocks"]["attn"]["relative_position_bias_table"]
    assert tables.shape == (DEPTH, 11 * 11 + 3, HEADS)
    torch_table = release.online.vision_encoder.blocks[1].attn.relative_position_bias_table.detach().numpy()
    np.testing.assert_allclose(tables[1], resize_rel_pos_bias_table(torch_table, 6), atol=1e-6)
    np.testing.assert_array_equal(params["momentum"]["vision"]["blocks"]["attn"]["relative_position_bias_table"],
                                  tables)
    with pytest.raises(ConvertError, match="multiple of the patch size"):
        import_xvlm(release.x2vlm, tmp_path / "odd", image_size=50, heads=4)


def test_missing_and_unknown_keys_are_named(release, tmp_path, capsys):
    state = torch.load(release.x2vlm, map_location="cpu", weights_only=True)
    less = save({k: v for k, v in state.items() if k != "itm_head.3.bias"}, tmp_path / "less.th")
    with pytest.raises(ConvertError, match=r"1 required keys missing: itm_head\.3\.bias"):
        import_xvlm(less, tmp_path / "a", heads=4)
    more = save({**state, "mystery_head.weight": torch.zeros(2)}, tmp_path / "more.th")
    assert main(["xvlm", str(more), str(tmp_path / "b"), "--heads", "4"]) == 2
    assert "unexpected keys" in capsys.readouterr().err and not (tmp_path / "b").exists()
    with pytest.raises(ConvertError, match="mystery_head.weight"):
        import_xvlm(more, tmp_path / "c", heads=4)
    partial = save({**state, "vision_proj_m.weight": state["vision_proj.weight"]}, tmp_path / "partial.th")
    # One momentum part makes every part required: the first 20 missing named, and how many in all.
    with pytest.raises(ConvertError, match=r"required keys missing: text_encoder_m\.embeddings\..* \(\d+ in all\)"):
        import_xvlm(partial, tmp_path / "d", heads=4)
    with pytest.raises(ConvertError, match="--heads"):
        import_xvlm(release.x2vlm, tmp_path / "e")  # width 32: no 64-wide heads to assume


def test_base_sizes_name_the_preset():
    text = BertSizes(vocab_size=30522, width=768, layers=18, heads=12, ffn_dim=3072, max_positions=512,
                     type_vocab_size=2, fusion_from=12, encoder_width=768, pooler=False)
    sizes = XVLMSizes(image_size=384, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, embed_dim=256,
                      itm_hidden=1536, text=text, mlm=True, momentum=True)
    config = build_config(sizes, {"max_tokens": 40})
    assert config.model.name == "x2vlm_base" and config.section.fusion_from == 12
    assert build_config(dataclasses.replace(sizes, image_size=224)).model.name == "custom"
