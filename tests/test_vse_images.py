"""VSE-infinity's raw-image ("backbone") mode: grid drop as EncoderImageFull draws it, and a run on images whose
ResNet starts from torchvision weights (`convert ctl`) and keeps them at backbone_lr_scale 0 while the rest trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxretrieval import evaluate, train
from jaxretrieval.config import ConfigError, load_config
from jaxretrieval.models.vse import drop_grids
from jaxretrieval.sharding import make_mesh

CONFIG = REPO / "configs" / "demo" / "vse_infty_images_tiny.yaml"


def test_grid_drop_keeps_order_and_draws_the_originals_rates():
    features = jnp.broadcast_to(jnp.arange(1, 65, dtype=jnp.float32)[None, :, None], (4000, 64, 2))
    out, lengths = drop_grids(jax.random.key(0), features)
    out, lengths = np.asarray(out), np.asarray(lengths)
    assert (lengths >= 1).all()
    for row, length in zip(out[:50], lengths[:50], strict=True):
        assert np.all(np.diff(row[:length, 0]) > 0) and not row[length:].any()
    # 20% of images keep every grid; the rest drop each with rate 0.2 r, r ~ U(0.2, 1): 12% expected
    whole = (lengths == 64).mean()
    assert 0.19 < whole < 0.24  # a few others keep all by chance
    assert abs(1 - lengths[lengths < 64].mean() / 64 - 0.12) < 0.005


@pytest.fixture(scope="module")
def pedes_root(tmp_path_factory):
    from jaxretrieval.data.pedes_demo import write_pedes_demo

    return write_pedes_demo(tmp_path_factory.mktemp("pedes") / "data", num_train_ids=4, num_val_ids=0,
                            num_test_ids=4)


@pytest.fixture(scope="module")
def torchvision_backbone(tmp_path_factory):
    import torch
    from torchvision.models.resnet import Bottleneck, ResNet

    from convert.ctl import import_ctl

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resnet")
    torch.save(ResNet(Bottleneck, [1, 1, 1, 1]).state_dict(), folder / "resnet.pth")
    import_ctl(folder / "resnet.pth", folder / "converted")
    return folder


def test_a_torchvision_backbone_starts_the_image_side_and_its_lr_scale_holds_it(torchvision_backbone, pedes_root,
                                                                                  tmp_path):
    import torch

    overrides = [f"train.init_from={torchvision_backbone / 'converted'}", "vse_infty.backbone_layers=[1,1,1,1]",
                 "vse_infty.backbone_width=64", "vse_infty.backbone_lr_scale=0", "train.schedule=cosine",
                 "train.epochs=0", "train.steps=3", "train.warmup_steps=0", "vse_infty.hinge_warmup_epochs=0",
                 "train.progress_bar=false", f"data.root={pedes_root}", "eval.batch_size=16",
                 "model.image.image_size=32"]
    config = load_config(CONFIG, overrides)
    metrics = train.train(config, tmp_path / "run")
    assert 0 < metrics["rsum"] <= 600
    _, params, _ = evaluate.restore_params(config, tmp_path / "run" / "checkpoints" / "3", make_mesh(config.mesh))
    state = torch.load(torchvision_backbone / "resnet.pth", weights_only=True)
    np.testing.assert_array_equal(np.asarray(params["backbone"]["conv1"]["kernel"]),
                                  state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert int(params["updates"]) == 3
    with pytest.raises(ConfigError, match="image_source resnet with data.kind precomp"):
        load_config(CONFIG, [*overrides, "data.kind=precomp"])
