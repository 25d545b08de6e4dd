"""`python -m convert clip` and `clip-export` against the PyTorch models themselves: every released format in,
open_clip and Hugging Face out, exact round trips, and inputs that must be refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, resize_pos_embed  # noqa: E402

import jaxretrieval  # noqa: E402
from convert.__main__ import main  # noqa: E402
from jaxretrieval.evaluate import saved_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:the text tower has:UserWarning")

EMBED, IMAGE, PATCH, V_WIDTH, V_LAYERS = 48, 32, 8, 192, 2
CONTEXT, VOCAB, T_WIDTH, T_LAYERS = 16, 100, 128, 3
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
OPENAI_NORM = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def randomise(model, seed: int = 0):
    """Every tensor random (biases, norm gains and logit_scale included), so no mapping error can hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(3.3)
    return model.eval()


def open_clip_reference(quick_gelu: bool, head_width: int, text_heads: int, image: int = IMAGE):
    vision = CLIPVisionCfg(layers=V_LAYERS, width=V_WIDTH, patch_size=PATCH, image_size=image, head_width=head_width)
    text = CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=T_WIDTH, heads=text_heads, layers=T_LAYERS)
    return CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)


def hf_reference(act: str, eos: int = VOCAB - 1):
    config = transformers.CLIPConfig(
        text_config={"vocab_size": VOCAB, "hidden_size": T_WIDTH, "intermediate_size": 4 * T_WIDTH,
                     "num_hidden_layers": T_LAYERS, "num_attention_heads": 4, "max_position_embeddings": CONTEXT,
                     "hidden_act": act, "bos_token_id": VOCAB - 2, "eos_token_id": eos},
        vision_config={"hidden_size": V_WIDTH, "intermediate_size": 4 * V_WIDTH, "num_hidden_layers": V_LAYERS,
                       "num_attention_heads": 6, "image_size": IMAGE, "patch_size": PATCH, "hidden_act": act},
        projection_dim=EMBED)
    return randomise(transformers.CLIPModel(config), seed=1)


def inputs(image: int, context: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = np.zeros((4, context), np.int32)
    for row, n in enumerate([1, 5, 9, context - 1]):  # EOT the largest id, the last row's in the last slot
        tokens[row, :n] = rng.integers(1, vocab - 1, size=n)
        tokens[row, n] = vocab - 1
    return rng.normal(size=(3, image, image, 3)).astype(np.float32), tokens


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def torch_features(model, images: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    pixels, ids = torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long()
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            image, text = model.get_image_features(pixel_values=pixels), model.get_text_features(input_ids=ids)
            image, text = (getattr(x, "pooler_output", x) for x in (image, text))  # tensors before transformers 5
        else:
            image, text = model.encode_image(pixels), model.encode_text(ids)
        image, text, scale = image.numpy(), text.numpy(), float(model.logit_scale.exp())
    return [image, text, scale * unit(image) @ unit(text).T]


def our_features(model, images: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    image, text = np.asarray(model.encode_image(images)), np.asarray(model.encode_text(tokens))
    return [image, text, model.logit_scale * unit(image) @ unit(text).T]


def assert_same_outputs(ours: list[np.ndarray], reference: list[np.ndarray]) -> None:
    for name, a, b in zip(("image", "text", "logits"), ours, reference, strict=True):
        assert np.abs(b).max() > 0.1, f"{name}: a degenerate comparison"
        assert np.abs(a - b).max() <= 1e-4, f"{name}: max abs diff {np.abs(a - b).max()}"


def convert(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Name -> (SRC, extra CLI args, reference model, activation, (image heads, text heads), (mean, std))."""
    root = tmp_path_factory.mktemp("sources")
    openai = randomise(open_clip_reference(quick_gelu=True, head_width=64, text_heads=T_WIDTH // 64))
    gelu = randomise(open_clip_reference(quick_gelu=False, head_width=32, text_heads=4), seed=2)
    hf = hf_reference("gelu")
    for name in ("jit", "sd", "oc", "ocbin", "hf", "hfbin"):
        (root / name).mkdir()

    scripted = open_clip_reference(quick_gelu=True, head_width=64, text_heads=T_WIDTH // 64)
    scripted.load_state_dict(openai.state_dict())
    for key, value in (("input_resolution", IMAGE), ("context_length", CONTEXT), ("vocab_size", VOCAB)):
        if hasattr(scripted, key):
            delattr(scripted, key)
        scripted.register_buffer(key, torch.tensor(value))  # the size scalars OpenAI's archives carry
    torch.jit.script(scripted.eval()).save(str(root / "jit" / "ViT-small.pt"))
    torch.save(openai.state_dict(), root / "sd" / "ViT-small.pt")

    model_cfg = {"embed_dim": EMBED, "vision_cfg": {"image_size": IMAGE, "layers": V_LAYERS, "width": V_WIDTH,
                                                    "patch_size": PATCH, "head_width": 32},
                 "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": T_WIDTH, "heads": 4,
                              "layers": T_LAYERS}}
    safetensors_torch.save_file(gelu.state_dict(), str(root / "oc" / "open_clip_model.safetensors"))
    hub = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (root / "oc" / "open_clip_config.json").write_text(json.dumps(hub))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in gelu.state_dict().items()}},
               root / "ocbin" / "epoch_3.pt")
    (root / "ocbin" / "ViT-small.json").write_text(json.dumps(model_cfg))

    hf.save_pretrained(root / "hf")
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    torch.save(hf.state_dict(), root / "hfbin" / "pytorch_model.bin")
    shutil.copy(root / "hf" / "config.json", root / "hfbin" / "config.json")

    openai_case = (openai, "quick_gelu", (3, 2), OPENAI_NORM)
    gelu_case, hf_case = (gelu, "gelu", (6, 4), (MEAN, STD)), (hf, "gelu", (6, 4), (MEAN, STD))
    return {
        "openai-torchscript": (root / "jit" / "ViT-small.pt", [], *openai_case),
        "openai-state-dict": (root / "sd" / "ViT-small.pt", [], *openai_case),
        "open_clip-safetensors": (root / "oc" / "open_clip_model.safetensors", [], *gelu_case),
        "open_clip-folder": (root / "oc", [], *gelu_case),
        "open_clip-training-checkpoint": (root / "ocbin" / "epoch_3.pt",
                                          ["--format", "open_clip", "--config", root / "ocbin" / "ViT-small.json"],
                                          gelu, "gelu", (6, 4), OPENAI_NORM),
        "hf-folder": (root / "hf", [], *hf_case),
        "hf-bin": (root / "hfbin", ["--format", "hf"], hf, "gelu", (6, 4), OPENAI_NORM),
    }


@pytest.mark.parametrize("case", ["openai-torchscript", "openai-state-dict", "open_clip-safetensors",
                                  "open_clip-folder", "open_clip-training-checkpoint", "hf-folder", "hf-bin"])
def test_import_matches_pytorch(case: str, sources: dict, tmp_path: Path) -> None:
    src, args, reference, activation, heads, (mean, std) = sources[case]
    assert convert("clip", src, tmp_path / "out", *args) == 0
    model, preprocess, tokenizer = jaxretrieval.load(tmp_path / "out")
    config = saved_config(tmp_path / "out").model
    assert (config.name, config.activation, config.image.heads, config.text.heads) == ("custom", activation, *heads)
    assert (config.image.image_size, config.text.context_length, config.text.vocab_size) == (IMAGE, CONTEXT, VOCAB)
    assert (list(preprocess.mean), list(preprocess.std)) == (pytest.approx(mean), pytest.approx(std))
    texts = ["a photo of a cat", "two dogs playing in the snow"]
    np.testing.assert_array_equal(tokenizer(texts), open_clip.tokenize(texts, context_length=CONTEXT).numpy())
    images, tokens = inputs(IMAGE, CONTEXT, VOCAB)
    assert_same_outputs(our_features(model, images, tokens), torch_features(reference, images, tokens))


def test_vit_b32_torchscript(tmp_path: Path) -> None:
    reference = randomise(CLIP(**open_clip.get_model_config("ViT-B-32"), quick_gelu=True))
    torch.jit.script(reference).save(str(tmp_path / "ViT-B-32.pt"))
    assert convert("clip", tmp_path / "ViT-B-32.pt", tmp_path / "out") == 0
    model, _, _ = jaxretrieval.load(tmp_path / "out")
    assert saved_config(tmp_path / "out").model.name == "vit_b32"
    images, tokens = inputs(224, 77, 49408)
    assert_same_outputs(our_features(model, images, tokens), torch_features(reference, images, tokens))
    assert convert("clip-export", tmp_path / "out", tmp_path / "back", "--format", "open_clip") == 0
    exported = safetensors_torch.load_file(str(tmp_path / "back" / "open_clip_model.safetensors"))
    original = reference.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[key], original[key]) for key in original)


def flat_params(out: Path) -> dict[str, np.ndarray]:
    params = jaxretrieval.load(out)[0].params
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_params_identical(a: Path, b: Path) -> None:
    first, second = flat_params(a), flat_params(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and np.array_equal(first[key], second[key]), key


@pytest.mark.parametrize(("case", "fmt"), [("openai-state-dict", "open_clip"), ("open_clip-folder", "open_clip"),
                                           ("hf-folder", "hf")])
def test_export_round_trips_exactly(case: str, fmt: str, sources: dict, tmp_path: Path) -> None:
    src, args, reference, *_ = sources[case]
    assert convert("clip", src, tmp_path / "ours", *args) == 0
    assert convert("clip-export", tmp_path / "ours", tmp_path / "theirs", "--format", fmt) == 0
    weights = "model.safetensors" if fmt == "hf" else "open_clip_model.safetensors"
    exported, original = safetensors_torch.load_file(str(tmp_path / "theirs" / weights)), reference.state_dict()
    assert exported.keys() == original.keys()  # export(import(sd)) == sd, key for key, bit for bit
    for key in original:
        assert exported[key].dtype == original[key].dtype and torch.equal(exported[key], original[key]), key
    assert convert("clip", tmp_path / "theirs", tmp_path / "again") == 0  # import(export(x)) == x
    assert_params_identical(tmp_path / "ours", tmp_path / "again")
    assert saved_config(tmp_path / "ours") == saved_config(
        tmp_path / "again")


def test_exports_load_in_open_clip_and_transformers(sources: dict, tmp_path: Path) -> None:
    """An OpenAI-layout QuickGELU model exported both ways, loaded by each library's own loader."""
    src, _, reference, *_ = sources["openai-state-dict"]
    assert convert("clip", src, tmp_path / "ours") == 0
    images, tokens = inputs(IMAGE, CONTEXT, VOCAB)
    expected = torch_features(reference, images, tokens)
    assert convert("clip-export", tmp_path / "ours", tmp_path / "oc", "--format", "open_clip") == 0
    assert convert("clip-export", tmp_path / "ours", tmp_path / "hf", "--format", "hf") == 0
    loaded_oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    loaded_hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    for loaded in (loaded_oc, loaded_hf):
        assert_same_outputs(torch_features(loaded, images, tokens), expected)
    assert convert("clip", tmp_path / "hf", tmp_path / "again") == 0  # QuickGELU and heads from an HF config
    assert saved_config(tmp_path / "again") == saved_config(tmp_path / "ours")


def test_image_size_resamples_the_position_grid(sources: dict, tmp_path: Path) -> None:
    src, _, reference, *_ = sources["openai-state-dict"]
    assert convert("clip", src, tmp_path / "out", "--image-size", "48") == 0
    model, preprocess, _ = jaxretrieval.load(tmp_path / "out")
    assert preprocess.image_size == 48
    resized = open_clip_reference(quick_gelu=True, head_width=64, text_heads=2, image=48)
    state = reference.state_dict()
    resize_pos_embed(state, resized)  # open_clip's own resampling of the same table
    resized.load_state_dict(state)
    np.testing.assert_array_equal(model.params["visual"]["positional_embedding"],
                                  state["visual.positional_embedding"].numpy())
    images, tokens = inputs(48, CONTEXT, VOCAB)
    assert_same_outputs(our_features(model, images, tokens), torch_features(resized.eval(), images, tokens))
    assert convert("clip", src, tmp_path / "odd", "--image-size", "50") == 2


class Payload:
    """Unpickling this would create a file: proof of whether pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def edited_state_dict(sources: dict, edit: str) -> dict:
    state = dict(sources["openai-state-dict"][2].state_dict())
    if edit == "missing":
        del state["visual.ln_post.bias"]
    elif edit == "extra":
        state["visual.extra.weight"] = torch.zeros(3, 4)
    else:
        state["transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(T_WIDTH, T_WIDTH + 1)
    return state


@pytest.mark.parametrize(("edit", "expected"), [
    ("missing", "missing key 'visual.ln_post.bias' (expected shape (192,))"),
    ("extra", "unexpected key 'visual.extra.weight' of shape (3, 4)"),
    ("shape", "key 'transformer.resblocks.1.attn.out_proj.weight' has shape (128, 129), expected (128, 128)"),
], ids=["missing", "extra", "shape"])
def test_bad_state_dicts_name_the_key(edit: str, expected: str, sources: dict, tmp_path: Path, capsys) -> None:
    torch.save(edited_state_dict(sources, edit), tmp_path / "bad.pt")
    assert convert("clip", tmp_path / "bad.pt", tmp_path / "out") == 2
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.pt"]  # no OUT, no staging folder


def test_refused_inputs_leave_nothing(sources: dict, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "pickled.pt")
    safetensors_torch.save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "unknown.safetensors"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    hf_reference("gelu", eos=49407).save_pretrained(tmp_path / "hf_eos")  # transformers' default eos, small vocab
    torch.save(sources["hf-folder"][2].state_dict(), tmp_path / "hf_without_config.bin")
    open_clip_weights = sources["open_clip-safetensors"][0]
    config = json.loads((open_clip_weights.parent / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["layers"] = 2
    (tmp_path / "wrong_layers.json").write_text(json.dumps(config))
    config["model_cfg"]["text_cfg"].update(layers=T_LAYERS, qk_norm=True)
    (tmp_path / "qk_norm.json").write_text(json.dumps(config))
    cases = [
        ([tmp_path / "pickled.pt"], "weights_only=True"),
        ([tmp_path / "unknown.safetensors"], "cannot tell the format"),
        ([tmp_path / "text.pt"], "cannot read"),
        ([tmp_path / "absent.pt"], "does not exist"),
        ([tmp_path / "hf_eos"], "eos_token_id=49407"),
        ([tmp_path / "hf_without_config.bin"], "need their model config"),
        ([open_clip_weights, "--config", tmp_path / "wrong_layers.json"], "text_cfg.layers=2 but the weights have 3"),
        ([open_clip_weights, "--config", tmp_path / "qk_norm.json"], "text_cfg.qk_norm=True"),
        ([open_clip_weights, "--format", "hf"], "hf weights need their model config"),
    ]
    before = set(tmp_path.iterdir())
    capsys.readouterr()
    for (src, *args), message in cases:
        assert convert("clip", src, tmp_path / "out", *args) == 2, src
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err), err
    assert not marker.exists()
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(SystemExit) as exit_info:
        convert("clip", sources["openai-state-dict"][0], tmp_path / "out", "--format", "caffe")
    assert exit_info.value.code == 2
    (tmp_path / "taken").mkdir()
    assert convert("clip", sources["openai-state-dict"][0], tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
