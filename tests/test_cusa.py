"""CUSA as a system: converted CLIP towers + CUSA heads against open_clip, the teacher features reaching the loss
(checked against the loss computed from independently looked-up teachers), its temperatures, its baseline, its
evaluation extras (text-text recall, COCO's 1K folds) and its errors."""

from __future__ import annotations

import json
import pickle

import jax
import numpy as np
import pytest
from conftest import tiny_overrides
from flax import nnx

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from test_convert_clip import IMAGE, inputs, open_clip_reference, randomise  # noqa: E402

import jaxretrieval  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402
from jaxretrieval import checkpoint, train  # noqa: E402
from jaxretrieval.config import load_config, to_dict  # noqa: E402
from jaxretrieval.data.demo_teachers import IMAGE_FILE, TEXT_FILE, write_demo_teachers  # noqa: E402
from jaxretrieval.data.pipeline import caption_source  # noqa: E402
from jaxretrieval.data.sources import DataError  # noqa: E402
from jaxretrieval.data.teacher_features import load_image_teachers, load_text_teachers, save_teachers  # noqa: E402
from jaxretrieval.evaluate import fold_recall, within_modality_recall  # noqa: E402
from jaxretrieval.losses.soft_label import SoftLabelLossConfig, cusa_losses  # noqa: E402
from jaxretrieval.models import abstract_model, init_params, parameter_roles  # noqa: E402
from jaxretrieval.retrieval import coco_recall  # noqa: E402
from jaxretrieval.sharding import make_mesh  # noqa: E402
from jaxretrieval.systems import get_system  # noqa: E402
from jaxretrieval.systems.cusa import temperature_plan  # noqa: E402
from jaxretrieval.tasks import make_task  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:the text tower has:UserWarning")


@pytest.fixture(scope="module")
def teachers(demo_root):
    write_demo_teachers(demo_root)
    return demo_root


def cusa_overrides(root, *extra: str, steps: int = 4) -> list[str]:
    return [*tiny_overrides(root, **{"train.steps": steps, "train.checkpoint_every": steps}), "system=cusa",
            "train.loss=cusa", f"cusa.image_teachers={IMAGE_FILE}", f"cusa.text_teachers={TEXT_FILE}", *extra]


def test_converted_clip_towers_and_cusa_heads_match_open_clip(tmp_path):
    """open_clip's tower outputs through the same LayerNorm + Linear heads in torch = our CUSA embeddings (1e-4)."""
    reference = randomise(open_clip_reference(quick_gelu=True, head_width=64, text_heads=2))
    (tmp_path / "sd").mkdir()
    torch.save(reference.state_dict(), tmp_path / "sd" / "ViT-small.pt")
    assert convert_main(["clip", str(tmp_path / "sd" / "ViT-small.pt"), str(tmp_path / "converted")]) == 0
    saved = checkpoint.read_meta_at(tmp_path / "converted")
    raw = {**saved["config"], "system": "cusa", "train": {**saved["config"]["train"], "loss": "cusa"}}
    config = load_config(None, ["data.kind=demo"], base=raw)
    params = get_system("cusa").init_from(config, str(tmp_path / "converted"), saved, abstract_model(config)[1],
                                          lambda: init_params(config, seed=5, precision="fp32"))
    rng = np.random.default_rng(0)  # every head leaf random (norm gains too), so no mapping error can hide
    for head in ("cross_image", "cross_text", "uni_image", "uni_text"):
        params[head] = jax.tree.map(lambda x: np.float32(0.3) * rng.normal(size=x.shape).astype(np.float32) + (
            np.float32(1.0) if x.ndim == 1 else 0), params[head])
    model = nnx.merge(abstract_model(config)[0], params)
    images, tokens = inputs(IMAGE, config.model.text.context_length, config.model.text.vocab_size)

    def torch_head(head: dict, x: torch.Tensor) -> np.ndarray:
        norm = torch.nn.LayerNorm(x.shape[-1], eps=1e-5)
        linear = torch.nn.Linear(x.shape[-1], x.shape[-1])
        with torch.no_grad():
            norm.weight.copy_(torch.tensor(np.asarray(head["norm"]["scale"])))
            norm.bias.copy_(torch.tensor(np.asarray(head["norm"]["bias"])))
            linear.weight.copy_(torch.tensor(np.asarray(head["proj"]["kernel"]).T))
            linear.bias.copy_(torch.tensor(np.asarray(head["proj"]["bias"])))
            return linear(norm(x)).numpy()

    with torch.no_grad():
        image = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
        text = reference.encode_text(torch.from_numpy(tokens).long())
    pairs = [(model.encode_image(images), torch_head(params["cross_image"], image)),
             (model.encode_text(tokens), torch_head(params["cross_text"], text)),
             (model.encode_image_uni(images), torch_head(params["uni_image"], image)),
             (model.encode_text_uni(tokens), torch_head(params["uni_text"], text))]
    for ours, theirs in pairs:
        assert np.abs(theirs).max() > 0.1
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    assert "logit_scale" not in params  # the CLIP checkpoint's scale is read and left out


def test_teachers_reach_the_loss_as_the_original_pairs_them(teachers):
    """The first batch's teacher rows equal an independent lookup (image_id -> image teacher, caption -> text
    teacher), and the train step's loss equals cusa_losses on the model's features with those teachers."""
    config = load_config(None, cusa_overrides(teachers))
    task = make_task(config, {})
    batch = next(iter(task.loader(0)))
    lines = (teachers / "train.jsonl").read_text().splitlines()
    records = [json.loads(lines[line - 1]) for _, line in batch["origin"].tolist()]
    image_table, text_table = load_image_teachers(teachers / IMAGE_FILE), load_text_teachers(teachers / TEXT_FILE)
    np.testing.assert_array_equal(batch["teacher_image"], image_table.lookup([str(r["image_id"]) for r in records]))
    np.testing.assert_array_equal(batch["teacher_text"], text_table.lookup([r["caption"] for r in records]))

    system = get_system("cusa")
    graphdef, _ = abstract_model(config)
    params = init_params(config, seed=0, precision="fp32")
    params = system.before_step(config)(params)
    inputs_ = {k: v for k, v in batch.items() if k != "origin"}
    loss, metrics, _, _ = jax.jit(system.grad_fn(config, graphdef, make_mesh(config.mesh)))(params, inputs_,
                                                                                               jax.random.key(0))
    model = nnx.merge(graphdef, params)
    f = model.features(inputs_["image"], inputs_["text"])
    t = model.temperature_values()
    temps = {"tau": t["tau"], "cross_tau_image": t["cross_tau"], "cross_tau_text": t["cross_tau"],
             "cross_soft_tau_image": t["cross_soft_tau"], "cross_soft_tau_text": t["cross_soft_tau"],
             "uni_tau_image": t["uni_tau_image"], "uni_tau_text": t["uni_tau_text"],
             "uni_soft_tau_image": t["cross_soft_tau"], "uni_soft_tau_text": t["cross_soft_tau"]}
    teacher_image = image_table.lookup([str(r["image_id"]) for r in records])
    teacher_text = text_table.lookup([r["caption"] for r in records])
    expected = cusa_losses(f["image_cross"], f["text_cross"], f["image_uni"], f["text_uni"], teacher_image,
                           teacher_text, inputs_["group"], temps, SoftLabelLossConfig())
    assert float(loss) == pytest.approx(float(expected["total"]), rel=1e-5)
    for term in ("contrastive", "cross", "uni"):
        assert float(metrics[f"loss_{term}"]) == pytest.approx(float(expected[term]), rel=1e-5)
        assert float(expected[term]) > 0


def test_gradient_caching_gives_cusas_full_batch_gradient(teachers):
    """train.micro_batches with accumulation=cache: the loss, every term and every gradient (towers, heads,
    temperatures) of the whole batch, from micro-batches of 4."""
    config = load_config(None, cusa_overrides(teachers))
    batch = {k: v for k, v in next(iter(make_task(config, {}).loader(0))).items() if k != "origin"}
    system, mesh = get_system("cusa"), make_mesh(config.mesh)
    graphdef, _ = abstract_model(config)
    params = system.before_step(config)(init_params(config, seed=0, precision="fp32"))
    results = []
    for micro in (1, 4):
        cached = load_config(None, cusa_overrides(teachers, f"train.micro_batches={micro}"))
        results.append(jax.jit(system.grad_fn(cached, graphdef, mesh))(params, batch, jax.random.key(0)))
    (loss, metrics, grads, _), (loss_c, metrics_c, grads_c, _) = results
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-5)
    for name in ("loss_contrastive", "loss_cross", "loss_uni", "cross_tau"):
        assert float(metrics_c[name]) == pytest.approx(float(metrics[name]), rel=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_c), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(np.abs(grads["temperatures"]["tau"])) > 0 and float(grads["temperatures"]["cross_soft_tau"]) == 0


def test_teacher_fields_travel_to_workers_as_memory_maps(teachers):
    """grain pickles the record transform into each worker: the teacher tables arrive memory-mapped, not copied,
    and give the same rows."""
    config = load_config(None, cusa_overrides(teachers))
    source = caption_source(config, teachers, "train")
    fields = get_system("cusa").record_fields(config, source)
    copy = pickle.loads(pickle.dumps(fields))
    assert isinstance(copy.text_features, np.memmap) and isinstance(copy.image_features, np.memmap)
    pickled = pickle.dumps(fields)
    assert fields.text_features[:4].tobytes() not in pickled and fields.image_features[:4].tobytes() not in pickled
    for record in source.records[:50]:
        for name, value in fields(record).items():
            np.testing.assert_array_equal(copy(record)[name], value)


def test_cusa_trains_through_the_loop_with_its_temperatures(teachers, tmp_path):
    config = load_config(None, cusa_overrides(teachers))
    result = train.train(config, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss_contrastive"] + r["loss_cross"] + r["loss_uni"], rel=1e-5)
        assert 0.01 <= r["tau"] <= 0.1 and 0.1 <= r["cross_tau"] <= 0.99 and r["cross_soft_tau"] == 1.0
    assert {"rsum", "uni_t2t_R1", "uni_t2t_R10"} <= result.keys()
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.system == "cusa" and to_dict(saved)["cusa"]["uni_rate"] == 0.5
    model, preprocess, tokenizer = jaxretrieval.load(tmp_path / "run")  # the cross heads, as retrieval ranks by
    image = np.stack([preprocess(str(p)) for p in sorted((teachers / "images").glob("test_*.png"))[:2]])
    text = tokenizer(["a red circle", "a blue square"])
    expected = nnx.merge(abstract_model(saved)[0], model.params)
    np.testing.assert_allclose(model.encode_image(image), expected.cross_image(expected.visual(image)), atol=1e-6)
    np.testing.assert_allclose(model.encode_text(text), expected.cross_text(expected.text(text)), atol=1e-6)
    with pytest.raises(AttributeError, match="temperatures"):
        _ = model.logit_scale


def test_temperature_plan_follows_the_seed_config_and_frozen_ones_are_state():
    params, ranges, uses = temperature_plan(load_config(None, ["system=cusa", "data.kind=demo"]).section)
    assert params == {"tau": (0.05, True), "cross_tau": (0.45, True), "cross_soft_tau": (1.0, False),
                      "uni_tau_image": (0.45, True), "uni_tau_text": (0.45, True)}
    assert ranges["cross_tau"] == (0.1, 0.99) and ranges["uni_tau_text"] == (0.1, 1.0)
    assert uses["uni_soft_tau_text"] == "cross_soft_tau" and uses["cross_tau_text"] == "cross_tau"
    roles = parameter_roles(load_config(None, ["system=cusa", "data.kind=demo", "model.name=tiny"]))
    assert roles["temperatures"] == {"tau": "param", "cross_tau": "param", "cross_soft_tau": "state",
                                     "uni_tau_image": "param", "uni_tau_text": "param"}


def test_only_contrastive_needs_no_teachers_and_has_no_uni_heads(demo_root, tmp_path):
    config = load_config(None, [*tiny_overrides(demo_root, **{"train.steps": 2, "train.checkpoint_every": 2}),
                                "system=cusa", "cusa.cross=false", "cusa.uni=false"])
    _, shapes = abstract_model(config)
    assert "uni_image" not in shapes and set(shapes["temperatures"]) == {"tau"}
    result = train.train(config, tmp_path / "run")
    assert "rsum" in result and "uni_t2t_R1" not in result


def test_teacher_errors_name_the_id_and_file(teachers, tmp_path):
    table = load_image_teachers(teachers / IMAGE_FILE)
    save_teachers(tmp_path / "partial.npz", table.ids[1:], table.features[1:])
    config = load_config(None, cusa_overrides(teachers, f"cusa.image_teachers={tmp_path / 'partial.npz'}"))
    with pytest.raises(DataError, match=rf"partial.npz.*'{table.ids[0]}'"):
        make_task(config, {})
    with pytest.raises(Exception, match="cusa.cross and cusa.uni need teacher features"):
        load_config(None, [*tiny_overrides(teachers), "system=cusa"])


def test_fold_recall_equals_the_full_matrix_reference():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
    t2i = np.repeat(np.arange(20), 3)[rng.permutation(60)]
    mesh = make_mesh(load_config(None).mesh)
    ours = fold_recall(images.astype(np.float32), texts.astype(np.float32), t2i, mesh, folds=2)
    reference = coco_recall(images @ texts.T, t2i, folds=2)
    assert ours == pytest.approx({k: v for k, v in reference.items() if k.startswith("1k_")}, abs=1e-9)


def test_within_modality_recall_leaves_each_query_out():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    groups = np.repeat(np.arange(10), 3)
    groups[-1] = 99  # a caption alone in its group: not a query
    got = within_modality_recall(x, groups, make_mesh(load_config(None).mesh), "t_")
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    queries = [i for i in range(30) if (groups == groups[i]).sum() > 1]
    for k in (1, 5, 10):
        top = np.argsort(-scores[queries], axis=1, kind="stable")[:, :k]
        expected = 100 * np.mean([(groups[row] == groups[q]).any() for q, row in zip(queries, top, strict=True)])
        assert got[f"t_R{k}"] == pytest.approx(expected)
    assert got["t_queries"] == len(queries)
