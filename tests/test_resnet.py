"""ResNet / ResNet-IBN-a against PyTorch references: eval and train mode, running-statistic updates, and batch norm
synchronised over 8 devices by sharding alone.

The reference below is written from Centroids-ReID's modelling/backbones (resnet.py, resnet_ibn_a.py) with a
`width` knob so the checks run on tiny models; torchvision's own ResNet-50 is checked in test_convert_ctl.py.
"""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python
from flax import nnx

torch = pytest.importorskip("torch")
nn = torch.nn

from convert.ctl import params_from_torchvision  # noqa: E402
from jaxretrieval.models.resnet import BatchNorm, ResNet  # noqa: E402

TINY = {"layers": (1, 2, 1, 1), "width": 8}
# One compile per model and mode; eager dispatch would compile every op separately.
forward = nnx.jit(lambda model, x, train: model(x, train=train), static_argnames="train")


class TorchIBN(nn.Module):
    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        return torch.cat([self.IN(x[:, :self.half]), self.BN(x[:, self.half:])], 1)


class TorchBottleneck(nn.Module):
    def __init__(self, d_in: int, planes: int, stride: int, ibn: bool):
        super().__init__()
        d_out = planes * 4
        self.conv1 = nn.Conv2d(d_in, planes, 1, bias=False)
        self.bn1 = TorchIBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, d_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(d_out)
        self.downsample = None
        if stride != 1 or d_in != d_out:
            self.downsample = nn.Sequential(nn.Conv2d(d_in, d_out, 1, stride=stride, bias=False), nn.BatchNorm2d(d_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    """The reference ResNet-50 family, written from the published definitions: Centroids-ReID's ResNet (stem without
    ReLU) or IBN-Net's ResNet-50-IBN-a (XingangPan/IBN-Net: stem ReLU, and in layers 1-3, whose planes are not 512,
    every bottleneck's first norm an IBN: InstanceNorm2d(affine) on the first half of the channels, BatchNorm2d on the
    rest), any width; `head` adds the unused ImageNet classifier IBN-Net's state dicts carry. Convolutions start as
    IBN-Net initialises them."""

    def __init__(self, layers, width: int, last_stride: int, stem_relu: bool, ibn: bool, head: bool = False):
        super().__init__()
        self.stem_relu = stem_relu
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        d_in = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, (1, 2, 2, last_stride)[i]
            stage = []
            for j in range(blocks):
                stage.append(TorchBottleneck(d_in, planes, stride if j == 0 else 1, ibn and planes != width * 8))
                d_in = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        if head:
            self.fc = nn.Linear(d_in, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, (2 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)

    def forward(self, x):
        """The feature map (the originals leave the pooling and the head out of forward)."""
        x = self.bn1(self.conv1(x))
        x = self.maxpool(torch.relu(x) if self.stem_relu else x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Kaiming convs and random affine norms and running statistics, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0, (2 / fan_out) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.1, generator=g)
                    m.running_var.uniform_(0.5, 1.5, generator=g)
    return module


def state_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def ported(reference: nn.Module, **kwargs) -> ResNet:
    """Our ResNet holding the reference's weights, built abstractly (random init would cost a compile per shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0), **kwargs)))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_torchvision(state_numpy(reference))))
    return nnx.merge(graphdef, state)


def images(batch: int, seed: int = 0, height: int = 64, width: int = 32) -> tuple[np.ndarray, jax.Array]:
    """(NCHW for torch, NHWC for us)."""
    x = np.random.default_rng(seed).normal(size=(batch, 3, height, width)).astype(np.float32)
    return x, jnp.asarray(x.transpose(0, 2, 3, 1))


def max_diff(ours: jax.Array, theirs) -> float:
    theirs = theirs.detach().numpy()
    if theirs.ndim == 4:
        theirs = theirs.transpose(0, 2, 3, 1)
    return float(np.abs(np.asarray(ours) - theirs).max())


@pytest.mark.parametrize(("stem_relu", "ibn", "last_stride"), [(False, False, 1), (True, True, 1), (True, False, 2)])
def test_eval_and_train_mode_match_the_reference(stem_relu: bool, ibn: bool, last_stride: int) -> None:
    kwargs = {**TINY, "last_stride": last_stride, "stem_relu": stem_relu, "ibn": ibn}
    reference = randomise(TorchResNet(**kwargs), seed=1)
    model = ported(reference, **kwargs)
    x_torch, x = images(4)

    with torch.no_grad():
        want_eval = reference.eval()(torch.from_numpy(x_torch))
        want_train = reference.train()(torch.from_numpy(x_torch))
    got_eval = forward(model, x, train=False)
    got_train = forward(model, x, train=True)
    assert got_eval.shape == (4, 4 // last_stride, 2 // last_stride, 32 * TINY["width"])  # 64x32 / 16 (or / 32)
    assert max_diff(got_eval, want_eval) < 1e-4
    assert max_diff(got_train, want_train) < 1e-4

    # One train-mode step moved every running mean and (unbiased) variance as torch's did.
    want_state = params_from_torchvision(state_numpy(reference))
    got_state = nnx.to_pure_dict(nnx.state(model))
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), got_state, want_state)
    assert max(jax.tree.leaves(diffs)) < 1e-5


def test_bf16_compute_keeps_fp32_parameters() -> None:
    kwargs = {**TINY, "stem_relu": True, "ibn": True}
    reference = randomise(TorchResNet(**kwargs, last_stride=1), seed=2)
    model = ported(reference, **kwargs, dtype=jnp.bfloat16)
    x_torch, x = images(2)
    got = forward(model, x, train=False)
    assert got.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    with torch.no_grad():
        want = reference.eval()(torch.from_numpy(x_torch)).numpy().transpose(0, 2, 3, 1)
    error = np.linalg.norm(np.asarray(got, np.float32) - want) / np.linalg.norm(want)
    assert error < 0.03  # bf16 keeps ~3 significant digits; we measured 1%
    forward(model, x, train=True)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}


def test_batch_norm_running_statistics_follow_torch() -> None:
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(5, 6)).astype(np.float32)
    ours = BatchNorm(6)
    theirs = nn.BatchNorm1d(6)
    for _ in range(3):
        got = ours(jnp.asarray(x), train=True)
        want = theirs.train()(torch.from_numpy(x))
        assert max_diff(got, want) < 1e-5
    np.testing.assert_allclose(ours.mean[...], theirs.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.running_var.numpy(), rtol=1e-6)  # unbiased: * 5 / 4
    with pytest.raises(ValueError, match="more than 1 value"):
        ours(jnp.asarray(x[:1]), train=True)


SYNCED_BN = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxretrieval.config import MeshConfig
    from jaxretrieval.models.resnet import ResNet
    from jaxretrieval.sharding import BATCH_AXES, make_mesh, under_mesh

    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 64, 32, 3)), jnp.float32)  # 2 rows per device
    step = nnx.jit(lambda model, x: model(x, train=True))

    def build():  # random weights without a compile per parameter shape
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: ResNet(layers=(1, 1, 1, 1), width=8, ibn=True, stem_relu=True, rngs=nnx.Rngs(0))))
        rng = np.random.default_rng(1)
        fill = lambda path, a: jnp.asarray(rng.normal(0, 0.2, a.shape) + (path[-1].key in ("scale", "var")),
                                           a.dtype)
        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
        return nnx.merge(graphdef, state)

    def run(x, sharded):
        model = build()
        y = (under_mesh(step, mesh) if sharded else step)(model, x)
        return y, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), len(y.sharding.device_set)

    y1, stats1, _ = run(x, False)
    y8, stats8, devices = run(jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES))), True)
    gap = lambda a, b: float(jnp.abs(a - b).max())
    print(json.dumps({"devices": devices, "output": gap(y1, y8),
                      "stats": max(jax.tree.leaves(jax.tree.map(gap, stats1, stats8)))}))
""")


def test_train_mode_batch_norm_is_synchronised_across_sharded_devices() -> None:
    result = json.loads(run_python(SYNCED_BN, devices=8).stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    # Per-device statistics (2 samples each) would differ from the global ones by O(1).
    assert result["output"] < 1e-4 and result["stats"] < 1e-5, result
