"""Centroids-ReID conversion: a Lightning checkpoint of the original CTL arrangement and torchvision ResNet-50 weights
give our models the original's features; malformed state dicts are refused by key."""

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

from convert import ConvertError  # noqa: E402
from convert.ctl import (  # noqa: E402
    ctl_layout,
    infer_ctl_sizes,
    params_from_lightning,
    params_from_torchvision,
    read_state,
)
from jaxretrieval.models.ctl import CTLModel  # noqa: E402
from jaxretrieval.models.resnet import FrozenParam, ResNet  # noqa: E402

NUM_CLASSES = 7


def randomise_norms(module: nn.Module, seed: int) -> None:
    """Random affine batch norms and running statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


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
    x = base.maxpool(base.relu(base.bn1(base.conv1(x))))
    return base.layer4(base.layer3(base.layer2(base.layer1(x))))


class TorchCTL(nn.Module):
    """The modules of the original CTLModel whose weights its checkpoints hold, under the same names."""

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        del base.fc  # the original ResNet has no ImageNet head
        self.backbone = nn.Module()
        self.backbone.base = base
        self.bn = nn.BatchNorm1d(2048)
        self.bn.bias.requires_grad_(False)
        self.fc_query = nn.Linear(2048, num_classes, bias=False)
        self.center_loss = nn.Module()
        self.center_loss.centers = nn.Parameter(torch.randn(num_classes, 2048))
        randomise_norms(self.bn, 5)

    def forward(self, x):
        f = feature_map(self.backbone.base, x).mean((2, 3))
        neck = self.bn(f)
        return f, neck, self.fc_query(neck)


def ported(make: Callable[[], nnx.Module], pure: dict) -> nnx.Module:
    """The module `make` builds, holding `pure` (built abstractly: no random init)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def images(batch: int = 2, height: int = 64, width: int = 32):
    x = np.random.default_rng(0).normal(size=(batch, 3, height, width)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def scaled_diff(ours, theirs) -> float:
    """max |ours - theirs| / max(1, max |theirs|). Random running statistics leave ResNet-50's activations in the
    hundreds, where float32 itself resolves ~1e-5; we measured 6e-7 to 1.2e-6."""
    theirs = np.asarray(theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs)
    return float(np.abs(np.asarray(ours) - theirs).max() / max(1.0, np.abs(theirs).max()))


def test_lightning_checkpoint_gives_the_original_features(tmp_path) -> None:
    reference = TorchCTL(torchvision_resnet50(stem_relu=False, seed=0), NUM_CLASSES).eval()
    path = tmp_path / "epoch=119.ckpt"
    torch.save({"epoch": 119, "global_step": 1000, "pytorch-lightning_version": "1.1.4",
                "state_dict": reference.state_dict(), "optimizer_states": [], "lr_schedulers": []}, path)

    state = read_state(path)
    sizes = infer_ctl_sizes(state)
    assert sizes == {"num_classes": NUM_CLASSES, "layers": (3, 4, 6, 3), "width": 64, "ibn": False,
                     "stem_relu": False, "last_stride": 1}
    model = ported(lambda: CTLModel(**sizes, rngs=nnx.Rngs(0)), params_from_lightning(state))
    assert isinstance(model.neck.bias, FrozenParam)
    np.testing.assert_array_equal(model.neck.bias[...], reference.bn.bias.detach().numpy())

    x_torch, x = images()
    got = nnx.jit(lambda model, x: model(x, train=False))(model, x)
    with torch.no_grad():
        features, neck, logits = reference(x_torch)
    assert scaled_diff(got["features"], features) < 1e-5
    assert scaled_diff(got["neck"], neck) < 1e-5
    assert scaled_diff(got["logits"], logits) < 1e-5
    # The retrieval embedding, L2-normalised bn(f): within 1e-4 absolute (measured ~1e-6).
    embedding = nnx.jit(lambda model, x: model.encode_image(x))(model, x)
    want = torch.nn.functional.normalize(neck, dim=1).numpy()
    assert np.abs(np.asarray(embedding) - want).max() < 1e-4


def test_torchvision_resnet50_weights_initialise_the_backbone() -> None:
    reference = torchvision_resnet50(stem_relu=True, seed=1)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = ported(lambda: ResNet(stem_relu=True, rngs=nnx.Rngs(0)), params_from_torchvision(state))
    x_torch, x = images()
    got = nnx.jit(lambda model, x: model(x, train=False))(model, x)
    with torch.no_grad():
        want = feature_map(reference, x_torch).permute(0, 2, 3, 1)
    assert got.shape == (2, 4, 2, 2048)
    assert scaled_diff(got, want) < 1e-5


def fake_state(num_classes: int, layers: tuple[int, ...], width: int, ibn: bool) -> dict[str, np.ndarray]:
    """A CTL state dict with every key the original writes (IBN-a's unused ImageNet head and the batch counters
    included), random values of the right shapes."""
    rng = np.random.default_rng(0)
    state = {key: rng.normal(size=shape).astype(np.float32)
             for key, (_, shape) in ctl_layout(num_classes, layers, width, ibn).items()}
    for key in list(state):
        if key.endswith(".running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.asarray(3)
    if ibn:
        state["backbone.base.fc.weight"] = np.zeros((1000, width * 32), np.float32)
        state["backbone.base.fc.bias"] = np.zeros((1000,), np.float32)
    return state


@pytest.mark.parametrize("ibn", [False, True])
def test_converted_tree_is_the_model_state(ibn: bool) -> None:
    state = fake_state(5, (2, 1, 3, 1), 8, ibn)
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
        assert layer1["IN"]["scale"].shape == layer1["BN"]["scale"].shape == (4,)
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
    state = fake_state(5, (1, 1, 1, 1), 8, False)
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
    state = fake_state(5, (1, 1, 1, 1), 8, False)
    change(state)
    with pytest.raises(ConvertError, match=message):
        params_from_lightning(state)


def test_malformed_torchvision_state_is_refused_by_key() -> None:
    state = {key.removeprefix("backbone.base."): value for key, value in fake_state(5, (1, 1, 1, 1), 8, False).items()
             if key.startswith("backbone.base.")}
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
