"""Centroids-ReID conversion against PyTorch models written from the published definitions: Lightning checkpoints of
the original CTLModel around torchvision's ResNet-50 and IBN-Net's ResNet-50-IBN-a, converted by `python -m convert ctl`
and loaded by `jaxretrieval.load`, give the original's features and embeddings; ImageNet backbones of both kinds
initialise ours; malformed state dicts are refused by key."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

from test_resnet import TorchResNet  # noqa: E402

import jaxretrieval  # noqa: E402
from convert import ConvertError  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402
from convert.ctl import infer_ctl_sizes, params_from_lightning, params_from_torchvision, read_state  # noqa: E402
from jaxretrieval.evaluate import saved_config  # noqa: E402
from jaxretrieval.models.ctl import CTLModel  # noqa: E402
from jaxretrieval.models.resnet import FrozenParam, ResNet  # noqa: E402

NUM_CLASSES = 7
IMAGE_SIZE = (64, 32)
# README (Convert > Centroids-ReID): f, bn(f) and logits within this of the original, relative to their magnitude
# (random running statistics put ResNet-50's activations in the hundreds, where float32 resolves ~1e-5).
RELATIVE_TOL = 2e-6
EMBEDDING_TOL = 1e-6  # README: the L2-normalised embeddings, absolute


def randomise_norms(module: nn.Module, seed: int) -> None:
    """Random affine norms and running statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def resnet50_ibn_a(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = TorchResNet((3, 4, 6, 3), 64, last_stride=1, stem_relu=True, ibn=True, head=True)
    randomise_norms(model, seed)
    return model.eval()


def torchvision_resnet50(*, stem_relu: bool, seed: int) -> nn.Module:
    """torchvision's ResNet-50, random, with the original's last stride 1; without the stem ReLU it is the
    original's modelling/backbones/resnet.py (the same modules and keys, its `self.relu` commented out)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    randomise_norms(model, seed)
    model.layer4[0].conv2.stride = (1, 1)
    model.layer4[0].downsample[0].stride = (1, 1)
    if not stem_relu:
        model.relu = nn.Identity()
    return model.eval()


def feature_map(base: nn.Module, x):
    """The original ResNet.forward: everything before the pooling and ImageNet head."""
    if isinstance(base, TorchResNet):
        return base(x)
    x = base.maxpool(base.relu(base.bn1(base.conv1(x))))
    return base.layer4(base.layer3(base.layer2(base.layer1(x))))


class TorchCTL(nn.Module):
    """The modules of the original CTLModel whose weights its checkpoints hold, under the same names."""

    def __init__(self, base: nn.Module, num_classes: int, seed: int = 5):
        super().__init__()
        if not isinstance(base, TorchResNet):
            del base.fc  # the original's plain ResNet has no ImageNet head; its ResNet_IBN keeps one
        features = base.layer4[0].conv3.out_channels
        self.backbone = nn.Module()
        self.backbone.base = base
        self.bn = nn.BatchNorm1d(features)
        self.bn.bias.requires_grad_(False)
        self.fc_query = nn.Linear(features, num_classes, bias=False)
        self.center_loss = nn.Module()
        self.center_loss.centers = nn.Parameter(torch.randn(num_classes, features))
        randomise_norms(self.bn, seed)

    def forward(self, x):
        f = feature_map(self.backbone.base, x).mean((2, 3))
        neck = self.bn(f)
        return f, neck, self.fc_query(neck)


def save_lightning(reference: TorchCTL, path, backbone_name: str) -> None:
    """As Lightning writes the original's checkpoints (the yacs config as plain dicts here)."""
    hyper_parameters = {"MODEL": {"NAME": backbone_name, "LAST_STRIDE": 1, "BACKBONE_EMB_SIZE": 2048},
                        "num_classes": NUM_CLASSES}
    torch.save({"epoch": 119, "global_step": 1000, "pytorch-lightning_version": "1.1.4",
                "state_dict": reference.state_dict(), "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": hyper_parameters}, path)


def ported(make: Callable[[], nnx.Module], pure: dict) -> nnx.Module:
    """The module `make` builds, holding `pure` (built abstractly: no random init)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def images(batch: int = 2, height: int = IMAGE_SIZE[0], width: int = IMAGE_SIZE[1]):
    x = np.random.default_rng(0).normal(size=(batch, 3, height, width)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def scaled_diff(ours, theirs) -> float:
    """max |ours - theirs| / max(1, max |theirs|)."""
    theirs = np.asarray(theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs)
    return float(np.abs(np.asarray(ours) - theirs).max() / max(1.0, np.abs(theirs).max()))


BACKBONES = {"resnet50": lambda seed: torchvision_resnet50(stem_relu=False, seed=seed),
             "resnet50_ibn_a": resnet50_ibn_a}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_lightning_checkpoint_gives_the_original_features(backbone: str, tmp_path) -> None:
    """`python -m convert ctl` on the saved .ckpt, then `jaxretrieval.load`, against the PyTorch model in eval mode."""
    reference = TorchCTL(BACKBONES[backbone](0), NUM_CLASSES).eval()
    src, out = tmp_path / "epoch=119.ckpt", tmp_path / "converted"
    save_lightning(reference, src, backbone)
    assert convert_main(["ctl", str(src), str(out), "--input-size", *map(str, IMAGE_SIZE)]) == 0

    config = saved_config(out).model
    ibn = backbone == "resnet50_ibn_a"
    assert (config.name, config.family, config.num_classes) == (f"{backbone}_ctl", "ctl", NUM_CLASSES)
    assert (tuple(config.resnet.layers), config.resnet.width, config.resnet.ibn) == ((3, 4, 6, 3), 64, ibn)
    assert (config.resnet.stem_relu, config.resnet.last_stride) == (ibn, 1)
    model, preprocess, tokenizer = jaxretrieval.load(out)
    assert tokenizer is None and tuple(preprocess.size) == IMAGE_SIZE
    assert isinstance(model.module.neck.bias, FrozenParam)
    np.testing.assert_array_equal(model.module.neck.bias[...], reference.bn.bias.detach().numpy())

    x_torch, x = images()
    got = nnx.jit(lambda module, x: module(x, train=False))(model.module, x)
    embedding = model.encode_image(x, normalize=True)
    with torch.no_grad():
        features, neck, logits = reference(x_torch)
    want = torch.nn.functional.normalize(neck, dim=1).numpy()
    diffs = {"features": scaled_diff(got["features"], features), "neck": scaled_diff(got["neck"], neck),
             "logits": scaled_diff(got["logits"], logits)}
    embedding_diff = float(np.abs(np.asarray(embedding) - want).max())
    print(f"{backbone}: relative {diffs}, embedding max |diff| {embedding_diff:.1e}, "
          f"max |f| {features.abs().max():.0f}")
    assert min(float(features.abs().max()), float(neck.abs().max())) > 1  # not a degenerate comparison
    assert np.abs(want[0] - want[1]).max() > 1e-3  # the two images embed apart
    assert max(diffs.values()) <= RELATIVE_TOL, diffs
    assert embedding_diff <= EMBEDDING_TOL


@pytest.mark.parametrize("backbone", ["torchvision", "ibn_net"])
def test_imagenet_resnet50_weights_initialise_the_backbone(backbone: str) -> None:
    """torchvision's and IBN-Net's ImageNet ResNet-50 state dicts (ImageNet head and all) -> our ResNet."""
    ibn = backbone == "ibn_net"
    reference = resnet50_ibn_a(seed=1) if ibn else torchvision_resnet50(stem_relu=True, seed=1)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = ported(lambda: ResNet(stem_relu=True, ibn=ibn, rngs=nnx.Rngs(0)), params_from_torchvision(state))
    x_torch, x = images()
    got = nnx.jit(lambda model, x: model(x, train=False))(model, x)
    with torch.no_grad():
        want = feature_map(reference, x_torch).permute(0, 2, 3, 1)
    assert got.shape == (2, 4, 2, 2048)
    assert scaled_diff(got, want) <= RELATIVE_TOL


def original_state(num_classes: int, layers: tuple[int, ...], width: int, ibn: bool) -> dict[str, np.ndarray]:
    """The state dict the original writes for a small CTLModel (its ResNet_IBN keeps the unused ImageNet head and
    the batch-norm counters are included), from the PyTorch modules above, not from the converter's layout."""
    torch.manual_seed(0)
    base = TorchResNet(layers, width, last_stride=1, stem_relu=ibn, ibn=ibn, head=ibn)
    model = TorchCTL(base, num_classes)
    randomise_norms(model, 1)
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("ibn", [False, True])
def test_converted_tree_is_the_model_state(ibn: bool) -> None:
    state = original_state(5, (2, 1, 3, 1), 8, ibn)
    assert ("backbone.base.layer3.2.bn1.IN.weight" in state) == ibn
    assert ("backbone.base.fc.weight" in state) == ibn
    assert "backbone.base.layer4.0.bn1.running_mean" in state  # layer 4 is plain in IBN-a too
    sizes = infer_ctl_sizes(state)
    assert sizes == {"num_classes": 5, "layers": (2, 1, 3, 1), "width": 8, "ibn": ibn, "stem_relu": ibn,
                     "last_stride": 1}
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: CTLModel(**sizes, rngs=nnx.Rngs(0)))))
    converted = params_from_lightning(state)
    assert jax.tree.structure(converted) == jax.tree.structure(abstract)
    assert jax.tree.map(lambda a: a.shape, converted) == jax.tree.map(lambda a: a.shape, abstract)
    layer1 = converted["backbone"]["layer1"][0]["bn1"]
    assert set(layer1) == ({"IN", "BN"} if ibn else {"scale", "bias", "mean", "var"})
    if ibn:  # InstanceNorm on the first half of the channels, BatchNorm on the rest; layer 4 plain
        key = "backbone.base.layer1.0.bn1"
        for ours, theirs in [(layer1["IN"]["scale"], f"{key}.IN.weight"), (layer1["IN"]["bias"], f"{key}.IN.bias"),
                             (layer1["BN"]["scale"], f"{key}.BN.weight"), (layer1["BN"]["bias"], f"{key}.BN.bias"),
                             (layer1["BN"]["mean"], f"{key}.BN.running_mean"),
                             (layer1["BN"]["var"], f"{key}.BN.running_var")]:
            assert ours.shape == (4,)
            np.testing.assert_array_equal(ours, state[theirs])
        assert "scale" in converted["backbone"]["layer4"][0]["bn1"]
    np.testing.assert_array_equal(converted["classifier"]["kernel"], state["fc_query.weight"].T)
    np.testing.assert_array_equal(converted["backbone"]["layer2"][0]["conv2"]["kernel"],
                                  state["backbone.base.layer2.0.conv2.weight"].transpose(2, 3, 1, 0))


def importable_class(monkeypatch, qualified: str, base: type = object) -> type:
    """A class pickle can save by the name `qualified` (a package the test machine lacks)."""
    module, _, name = qualified.rpartition(".")
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module})
    setattr(sys.modules[module], name, cls)
    return cls


def test_lightning_1_1_checkpoint_with_hyper_parameters_is_read(tmp_path, monkeypatch) -> None:
    """The original's checkpoints keep yacs CfgNodes in a Lightning AttributeDict and key callback states by class:
    all refused by torch.load(weights_only=True), read here as inert stand-ins."""
    cfg_node = importable_class(monkeypatch, "yacs.config.CfgNode", dict)
    attribute_dict = importable_class(monkeypatch, "pytorch_lightning.utilities.parsing.AttributeDict", dict)
    callback = importable_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    model = cfg_node(NAME="resnet50", LAST_STRIDE=1)
    model.__dict__["__immutable__"] = False
    state = original_state(5, (1, 1, 1, 1), 8, False)
    path = tmp_path / "epoch=119.ckpt"
    torch.save({"epoch": 119, "state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                "hyper_parameters": attribute_dict(MODEL=model, num_classes=5),
                "callbacks": {callback: {"best_model_score": np.float64(0.9), "scores": np.arange(3.0)}}}, path)
    for name in ("yacs", "yacs.config", "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, name)  # reading must not need them
    read = read_state(path)
    assert read.keys() == state.keys()
    np.testing.assert_array_equal(read["center_loss.centers"], state["center_loss.centers"])


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("backbone.base.layer3.0.bn2.running_var"), "missing key 'backbone.base.layer3.0.bn2.running_var'"),
    (lambda s: s.pop("center_loss.centers"), "missing key 'center_loss.centers'"),
    (lambda s: s.update({"backbone.base.layer1.0.se.weight": np.zeros(3)}),
     "unexpected key 'backbone.base.layer1.0.se.weight'"),
    (lambda s: s.update({"bn.weight": np.zeros(7, np.float32)}), r"'bn.weight' has shape \(7,\), expected \(256,\)"),
    (lambda s: s.update({"backbone.base.layer1.0.conv2.weight": np.zeros((8, 8, 1, 1), np.float32)}),
     r"'backbone.base.layer1.0.conv2.weight' has shape \(8, 8, 1, 1\), expected \(8, 8, 3, 3\)"),
])
def test_malformed_lightning_state_is_refused_by_key(change, message: str) -> None:
    state = original_state(5, (1, 1, 1, 1), 8, False)
    change(state)
    with pytest.raises(ConvertError, match=message):
        params_from_lightning(state)


def test_malformed_torchvision_state_is_refused_by_key() -> None:
    state = {key.removeprefix("backbone.base."): value
             for key, value in original_state(5, (1, 1, 1, 1), 8, False).items() if key.startswith("backbone.base.")}
    params_from_torchvision({**state, "fc.weight": np.zeros((1000, 256)), "fc.bias": np.zeros(1000)})
    with pytest.raises(ConvertError, match="unexpected key 'avgpool.weight'"):
        params_from_torchvision({**state, "avgpool.weight": np.zeros(1)})
    with pytest.raises(ConvertError, match="missing key 'conv1.weight'"):
        params_from_torchvision({k: v for k, v in state.items() if k != "conv1.weight"})
    with pytest.raises(ConvertError, match="missing key 'layer4.0.conv1.weight'"):
        params_from_torchvision({k: v for k, v in state.items() if not k.startswith("layer4.")})


def test_ctl_model_initialisation_and_frozen_neck_bias() -> None:
    # Non-partitionable threefry: the same distributions, compiled in a quarter of the time on CPU.
    with jax.threefry_partitionable(False):
        model = nnx.jit(lambda: CTLModel(50, layers=(1, 1, 1, 1), width=4, rngs=nnx.Rngs(0)))()
    assert abs(float(jnp.std(model.classifier.kernel[...])) - 0.001) < 1e-4  # weights_init_classifier
    assert abs(float(jnp.std(model.center_loss.centers[...])) - 1.0) < 0.05  # CenterLoss: torch.randn
    for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0)):
        np.testing.assert_array_equal(getattr(model.neck, name)[...], value)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "bias" not in params["neck"] and "bias" in nnx.to_pure_dict(nnx.state(model))["neck"]

    _, x = images(4)

    def loss(model: CTLModel) -> jax.Array:
        out = model(x, train=True)
        return -jnp.mean(jax.nn.log_softmax(out["logits"])[jnp.arange(4), jnp.arange(4)]) + jnp.mean(out["neck"])

    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model))
    assert "bias" not in grads["neck"] and float(jnp.abs(grads["neck"]["scale"]).max()) > 0

    embedding, raw = nnx.jit(lambda model, x: (model.encode_image(x), model.encode_image(x, normalize=False)))(model, x)
    np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embedding, raw / jnp.linalg.norm(raw, axis=-1, keepdims=True), atol=1e-6)
