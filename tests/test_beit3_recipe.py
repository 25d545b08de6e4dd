"""LHP's optimiser recipe on BEiT-3 against unilm's parameter groups, and the large config at full size."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from jaxretrieval.config import ConfigError, load_config
from jaxretrieval.models import abstract_model, layer_depth
from jaxretrieval.models.beit3 import params_from_torchscale
from jaxretrieval.optim import decay_mask, layer_lr_scales, make_optimizer

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    pytest.importorskip("torchscale")
    from test_beit3 import CONFIG, TorchRetrieval, torch_config

LARGE = REPO / "configs" / "pab" / "beit3_large_patch16_384.yaml"
UNILM_SKIP = {"pos_embed", "cls_token", "beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token",
              "logit_scale"}  # BEiT3ForRetrieval.no_weight_decay()


def unilm_layer_id(name: str, num_max_layer: int) -> int:
    """unilm beit3/optim_factory.get_num_layer_for_vit, retyped."""
    if "embed" in name or name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if "layers." in name:
        return int(name.split("layers.")[1].split(".")[0]) + 1
    return num_max_layer - 1


def unilm_groups(decay: float) -> tuple[dict, dict]:
    """Per parameter, unilm's lr scale and weight-decay flag, each as a state dict of constant tensors."""
    module = TorchRetrieval(torch_config())
    layers = module.beit3.encoder.num_layers
    values = [decay ** (layers + 1 - i) for i in range(layers + 2)]
    scales, decays = {}, {}
    for name, p in module.state_dict().items():
        scales[name] = torch.full_like(p, values[unilm_layer_id(name, len(values))])
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in UNILM_SKIP
        decays[name] = torch.full_like(p, float(not no_decay))
    return scales, decays


def test_layer_decay_equals_unilm_parameter_groups():
    depth = layer_depth(CONFIG)
    scales, _ = unilm_groups(0.85)
    expected = params_from_torchscale(scales)  # each of our parameters filled with its unilm lr scale
    ours = layer_lr_scales(expected, depth, 0.85)
    for (path, value), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(ours),
                                  strict=True):
        assert got == pytest.approx(float(np.ravel(value)[0]), rel=1e-6), jax.tree_util.keystr(path)


def test_weight_decay_mask_equals_unilm_skip_list():
    recipe = load_config(LARGE).train
    _, decays = unilm_groups(0.85)
    expected = params_from_torchscale(decays)
    mask = decay_mask(expected, recipe.no_decay)
    for (path, value), decayed in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(mask),
                                      strict=True):
        name = jax.tree_util.keystr(path)
        if "mask_token" in name:
            # unilm decays its (1, 1, D) mask token; it never reaches the retrieval loss, ours is a vector.
            assert not decayed
            continue
        assert decayed == bool(np.ravel(value)[0]), name


def test_layer_decay_scales_the_whole_adamw_update():
    cfg = load_config(None, ["model.name=beit3_tiny", "train.layer_decay=0.5", "train.grad_clip=0",
                             "train.warmup_steps=0", "train.weight_decay=0.1"])
    _, shapes = abstract_model(cfg.model)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    depth = layer_depth(cfg.model)
    plain = load_config(None, ["model.name=beit3_tiny", "train.grad_clip=0", "train.warmup_steps=0",
                               "train.weight_decay=0.1"]).train
    tx, reference = make_optimizer(cfg.train, depth), make_optimizer(plain)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected, _ = reference.update(grads, reference.init(params), params)
    scales = layer_lr_scales(params, depth, 0.5)
    jax.tree.map(lambda u, e, s: np.testing.assert_allclose(u, e * s, rtol=1e-6), updates, expected, scales)
    top = cfg.model.multiway.layers + 1
    assert scales["beit3"]["text_embed"]["embedding"] == 0.5 ** top
    # stacked layers: layer i (id i + 1) at 0.5 ** (top - i - 1), along the layer axis
    layer_scales = np.asarray(scales["beit3"]["layers"]["ffn"]["A"]["fc1"]["kernel"]).ravel()
    np.testing.assert_allclose(layer_scales, 0.5 ** (top - np.arange(1, top)), rtol=1e-6)
    assert scales["vision_head"]["kernel"] == scales["logit_scale"] == 1.0


@pytest.mark.parametrize(("override", "message"), [
    ("model.drop_path=0.1", "model.drop_path does not apply to system clip"),
    ("train.layer_decay=0.9", "train.layer_decay does not apply to system clip"),
    ("train.no_decay=['(']", "train.no_decay"),
])
def test_recipe_knobs_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["model.name=tiny", override])
    with pytest.raises(ConfigError, match="max_text_positions"):
        load_config(None, ["model.name=beit3_tiny", "model.text.context_length=40"])


def test_large_config_train_step_shapes_without_allocating():
    from jaxretrieval.train import make_train_step

    config = load_config(LARGE)
    assert (config.model.multiway.layers, config.model.multiway.width, config.model.image.image_size) == (24, 1024,
                                                                                                          384)
    graphdef, shapes = abstract_model(config.model, precision=config.train.precision)
    with torch.device("meta"):
        reference = TorchRetrieval(torch_config(
            encoder_layers=24, encoder_embed_dim=1024, encoder_attention_heads=16, encoder_ffn_embed_dim=4096,
            img_size=384, patch_size=16, vocab_size=64010, max_source_positions=1024))
    assert sum(s.size for s in jax.tree.leaves(shapes)) == sum(p.numel() for p in reference.parameters())
    tx = make_optimizer(config.train, layer_depth(config.model))
    batch = {"image": jax.ShapeDtypeStruct((config.train.batch_size, 384, 384, 3), jnp.float32),
             "text": jax.ShapeDtypeStruct((config.train.batch_size, 64), jnp.int32),
             "group": jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32)}
    opt_state = jax.eval_shape(tx.init, shapes)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    new_params, new_opt, metrics = jax.eval_shape(make_train_step(graphdef, tx, 16), shapes, opt_state, batch, step)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), new_params) == jax.tree.map(lambda s: (s.shape, s.dtype),
                                                                                  shapes)
    assert jax.tree.structure(new_opt) == jax.tree.structure(opt_state)
    assert metrics["loss"].shape == () and isinstance(tx, optax.GradientTransformation)
