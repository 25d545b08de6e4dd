"""Mesh construction, partition rules and per-leaf shardings.

JAX fixes its device count when it starts, and other test files start it with one CPU device, so the
multi-device checks run in a fresh interpreter with 8 forced host devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxretrieval.config import MeshConfig
from jaxretrieval.sharding import (
    MESH_AXES,
    RULE_SETS,
    fsdp_spec,
    make_mesh,
    partition_rules,
    path_name,
    spec_for,
    tree_shardings,
)

REPO = Path(__file__).resolve().parents[1]

RULES = [
    ["attn/qkv/kernel", [None, "tensor"]],  # first match wins over the general kernel rule below
    ["kernel", ["fsdp", None]],
    ["embedding", ["tensor"]],  # shorter than the rank: trailing dims replicated
    ["bias", None],  # null: replicated
]


# ---------------------------------------------------------------------------------------------------------
# In this process (whatever the device count)


def test_make_mesh_resolves_minus_one_on_local_devices() -> None:
    n = len(jax.devices())
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    assert mesh.axis_names == MESH_AXES
    assert mesh.devices.shape == (n, 1, 1)
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}


def test_make_mesh_rejects_a_size_that_does_not_match() -> None:
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {n + 1} devices, found {n}"):
        make_mesh(MeshConfig(data=n + 1, fsdp=1, tensor=1))
    with pytest.raises(ValueError, match="only one axis may be -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1, tensor=1))


def test_make_mesh_uses_the_given_devices() -> None:
    devices = jax.devices()[:1]
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    assert mesh.devices.shape == (1, 1, 1)
    assert mesh.devices.flat[0] == devices[0]


def test_spec_for_first_match_wins() -> None:
    assert spec_for("visual/transformer/blocks/0/attn/qkv/kernel", (4, 8), RULES) == PartitionSpec(None, "tensor")
    assert spec_for("visual/transformer/blocks/0/mlp/fc/kernel", (4, 8), RULES) == PartitionSpec("fsdp", None)
    # Swapping the rule order changes the answer for the qkv kernel: order matters, not specificity.
    swapped = [RULES[1], RULES[0]]
    assert spec_for("visual/transformer/blocks/0/attn/qkv/kernel", (4, 8), swapped) == PartitionSpec("fsdp", None)


def test_spec_for_search_semantics_null_and_no_match() -> None:
    assert spec_for("text/token_embedding/embedding", (4, 8), RULES) == PartitionSpec("tensor")
    assert spec_for("text/ln_final/bias", (4,), RULES) == PartitionSpec()  # null spec
    assert spec_for("logit_scale", (), RULES) == PartitionSpec()  # nothing matches: replicated
    assert spec_for("a/b", (4, 8), []) == PartitionSpec()
    # re.search, anchors honoured
    assert spec_for("x/proj", (4, 8), [["^proj$", ["fsdp"]], ["proj$", ["tensor"]]]) == PartitionSpec("tensor")


def test_spec_for_rank_error_is_clear() -> None:
    with pytest.raises(ValueError) as info:
        spec_for("visual/class_embedding", (4,), [["class_embedding", ["fsdp", "tensor"]]])
    message = str(info.value)
    assert "visual/class_embedding" in message and "rank 1" in message and "class_embedding" in message
    with pytest.raises(ValueError, match="rank 0"):
        spec_for("logit_scale", (), [[".*", ["data"]]])


def test_fsdp_spec_takes_the_largest_dimension_that_divides() -> None:
    assert fsdp_spec((512, 2048), 4) == PartitionSpec(None, "fsdp")
    assert fsdp_spec((2048, 512), 4) == PartitionSpec("fsdp", None)
    assert fsdp_spec((6, 1024), 4) == PartitionSpec(None, "fsdp")
    assert fsdp_spec((1026, 512), 4) == PartitionSpec(None, "fsdp")  # 1026 does not divide by 4: next largest
    assert fsdp_spec((3, 5), 4) == PartitionSpec()  # nothing divides: replicated
    assert fsdp_spec((), 4) == PartitionSpec()
    assert fsdp_spec((512, 2048), 1) == PartitionSpec()  # no fsdp axis to use


def test_named_rule_sets() -> None:
    assert partition_rules("fsdp") == [[".*", "fsdp"]]
    assert partition_rules([["a", ["data"]]]) == [["a", ["data"]]]
    with pytest.raises(ValueError, match="unknown sharding rule set 'fdsp'.*fsdp_tensor"):
        partition_rules("fdsp")
    rules, mesh = RULE_SETS["fsdp_tensor"], {"fsdp": 2, "tensor": 2}
    # Megatron's split: first MLP layer and BEiT-3's q/k/v by column (heads), output projections by row.
    for name in ("visual/transformer/blocks/0/mlp/fc/kernel", "beit3/layers/0/ffn/A/fc1/kernel",
                 "beit3/layers/0/self_attn/k_proj/B/kernel"):
        assert spec_for(name, (64, 256), rules, mesh) == PartitionSpec("fsdp", "tensor"), name
    assert spec_for("beit3/layers/0/ffn/B/fc1/bias", (256,), rules, mesh) == PartitionSpec("tensor")
    for name in ("text/transformer/blocks/1/mlp/proj/kernel", "visual/transformer/blocks/0/attn/out/kernel",
                 "beit3/layers/3/self_attn/out_proj/A/kernel", "beit3/layers/0/ffn/A/fc2/kernel"):
        assert spec_for(name, (256, 64), rules, mesh) == PartitionSpec("tensor", "fsdp"), name
    # CLIP's fused qkv and everything else: FSDP only.
    assert spec_for("visual/transformer/blocks/0/attn/qkv/kernel", (64, 192), rules, mesh) == \
        PartitionSpec(None, "fsdp")
    assert spec_for("text/token_embedding/embedding", (1000, 64), rules, mesh) == PartitionSpec("fsdp", None)


def test_tree_shardings_on_a_small_dict() -> None:
    mesh = make_mesh(MeshConfig(data=-1))
    tree = {
        "visual": {
            "blocks": {0: {"attn": {"qkv": {"kernel": np.zeros((4, 12)), "bias": np.zeros(12)}}}},
            "proj": np.zeros((4, 8)),
        },
        "text": {"token_embedding": {"embedding": np.zeros((10, 4))}, "mlp": [np.zeros((4, 4))]},
        "logit_scale": np.zeros(()),
    }
    out = tree_shardings(tree, mesh, RULES + [["proj", ["data", "tensor"]]])
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(out))
    assert out["visual"]["blocks"][0]["attn"]["qkv"]["kernel"].spec == PartitionSpec(None, "tensor")
    assert out["visual"]["blocks"][0]["attn"]["qkv"]["bias"].spec == PartitionSpec()
    assert out["visual"]["proj"].spec == PartitionSpec("data", "tensor")
    assert out["text"]["token_embedding"]["embedding"].spec == PartitionSpec("tensor")
    assert out["text"]["mlp"][0].spec == PartitionSpec()
    assert out["logit_scale"].spec == PartitionSpec()


def test_path_name_joins_keys() -> None:
    tree = {"a": {"blocks": [{"w": 0}, {"w": 0}], "b": {3: {"x": 0}}}}
    names = sorted(path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))
    assert names == ["a/b/3/x", "a/blocks/0/w", "a/blocks/1/w"]


# ---------------------------------------------------------------------------------------------------------
# 8 forced CPU devices, in a subprocess

MULTI_DEVICE = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec
    from jaxretrieval.config import MeshConfig
    from jaxretrieval.sharding import global_batch, make_mesh, tree_shardings

    out = {"devices": len(jax.devices())}

    def shape_or_error(**sizes):
        try:
            return list(make_mesh(MeshConfig(**sizes)).devices.shape)
        except ValueError as e:
            return "error: " + str(e)

    out["default"] = shape_or_error()
    out["fsdp2_tensor2"] = shape_or_error(data=-1, fsdp=2, tensor=2)
    out["tensor_rest"] = shape_or_error(data=2, fsdp=1, tensor=-1)
    out["explicit"] = shape_or_error(data=2, fsdp=2, tensor=2)
    out["not_divisible"] = shape_or_error(data=-1, fsdp=3, tensor=1)
    out["too_many"] = shape_or_error(data=4, fsdp=4, tensor=1)
    out["too_few"] = shape_or_error(data=2, fsdp=1, tensor=1)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tree = {"blocks": {"0": {"qkv": {"kernel": np.arange(8 * 12.0).reshape(8, 12)}}}, "scale": np.ones(3)}
    shardings = tree_shardings(tree, mesh, [["qkv/kernel", ["fsdp", "tensor"]]])
    placed = jax.device_put(tree, shardings)
    kernel = placed["blocks"]["0"]["qkv"]["kernel"]
    out["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
    out["kernel_roundtrip"] = bool(np.array_equal(np.asarray(kernel), tree["blocks"]["0"]["qkv"]["kernel"]))
    out["scale_shard_shape"] = list(placed["scale"].addressable_shards[0].data.shape)

    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    rows = np.arange(16 * 3).reshape(16, 3)
    batch = global_batch({"x": rows}, mesh)["x"]
    out["batch_spec"] = list(batch.sharding.spec[0])
    out["batch_shard_rows"] = sorted({s.data.shape[0] for s in batch.addressable_shards})
    out["batch_roundtrip"] = bool(np.array_equal(np.asarray(batch), rows))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 8
    return out


def test_multi_device_minus_one_resolution(eight_devices) -> None:
    assert eight_devices["default"] == [8, 1, 1]
    assert eight_devices["fsdp2_tensor2"] == [2, 2, 2]
    assert eight_devices["tensor_rest"] == [2, 1, 4]
    assert eight_devices["explicit"] == [2, 2, 2]


def test_multi_device_size_errors(eight_devices) -> None:
    assert eight_devices["not_divisible"].startswith("error:")
    assert "8 devices" in eight_devices["not_divisible"] and "3" in eight_devices["not_divisible"]
    for key, needed in (("too_many", 16), ("too_few", 2)):
        message = eight_devices[key]
        assert message.startswith("error:"), key
        assert f"needs {needed} devices, found 8" in message


def test_multi_device_shardings_place_shards(eight_devices) -> None:
    assert eight_devices["kernel_shard_shape"] == [4, 6]  # (8, 12) over fsdp=2, tensor=2
    assert eight_devices["kernel_roundtrip"]
    assert eight_devices["scale_shard_shape"] == [3]  # unmatched: replicated
    assert eight_devices["batch_spec"] == ["data", "fsdp"]
    assert eight_devices["batch_shard_rows"] == [2]  # 16 rows over data*fsdp = 8
    assert eight_devices["batch_roundtrip"]


def test_make_mesh_rejects_zero_axis_size() -> None:
    with pytest.raises(ValueError, match="fsdp"):
        make_mesh(MeshConfig(data=-1, fsdp=0, tensor=1))
