"""CUSA's loss terms against a float64 PyTorch reference written from the original's formulas (lerogo/aaai24_itr_cusa,
unire/model.py: get_similarity, ContrastiveLoss, KLContrastiveSimLoss, clamp_tau, forward), and the gathered
cross-device variant against the single-device losses.

JAX computes in float32 from the same float32 inputs; differences are scaled as |jax - torch| / max(1, |torch|)
(a gradient with respect to tau = 0.01 is in the thousands). The multi-device check runs in a fresh interpreter
with 8 simulated CPU devices (JAX fixes its device count at start-up) and prints one JSON line of differences.
"""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jaxretrieval.losses.soft_label import (
    TEMPERATURE_KEYS,
    SoftLabelLossConfig,
    clamp_temperatures,
    cusa_losses,
    sharded_cusa_losses,
    soft_label_kl,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-5
TERMS = ("contrastive", "cross", "uni", "total")
REPEATS, UNIQUE = [0, 0, 1, 2, 2, 2, 3, 4], [5, 1, 7, 0, 3, 2, 6, 4]
RANGES = {"tau": (0.01, 0.10), "cross_tau_image": (0.10, 0.99), "cross_tau_text": (0.10, 0.99),
          "cross_soft_tau_image": (0.10, 1.00), "cross_soft_tau_text": (0.10, 1.00),
          "uni_tau_image": (0.10, 1.00), "uni_tau_text": (0.10, 1.00),
          "uni_soft_tau_image": (0.10, 1.00), "uni_soft_tau_text": (0.10, 1.00)}  # configs/vitb32/coco/cusa.yaml
SEPARATE = {key: (key,) for key in TEMPERATURE_KEYS}
# cusa.yaml: one cross tau (use_same_tau) and one soft-label tau shared by cross and uni; shared taus are clamped
# to the mean of the image and text ranges.
SHARED = {"tau": ("tau",), "cross_tau": ("cross_tau_image", "cross_tau_text"),
          "soft_tau": ("cross_soft_tau_image", "cross_soft_tau_text", "uni_soft_tau_image", "uni_soft_tau_text"),
          "uni_tau_image": ("uni_tau_image",), "uni_tau_text": ("uni_tau_text",)}
INSIDE = dict(tau=0.05, cross_tau_image=0.45, cross_tau_text=0.3, cross_soft_tau_image=1.0, cross_soft_tau_text=0.7,
              uni_tau_image=0.45, uni_tau_text=0.6, uni_soft_tau_image=0.8, uni_soft_tau_text=0.5)
AT_CLAMPS = dict(tau=0.01, cross_tau_image=0.99, cross_tau_text=0.10, cross_soft_tau_image=0.10,
                 cross_soft_tau_text=1.00, uni_tau_image=0.10, uni_tau_text=1.00, uni_soft_tau_image=1.00,
                 uni_soft_tau_text=0.10)
BEYOND = dict(tau=0.002, cross_tau_image=1.7, cross_tau_text=0.03, cross_soft_tau_image=0.01, cross_soft_tau_text=4.0,
              uni_tau_image=0.05, uni_tau_text=2.5, uni_soft_tau_image=9.0, uni_soft_tau_text=0.02)


def clamp_ranges(sharing: dict) -> dict:
    """Each learnable temperature's range: the mean of those of the keys it stands for."""
    return {name: tuple(float(np.mean([RANGES[k][i] for k in keys])) for i in (0, 1))
            for name, keys in sharing.items()}


def expand(sharing: dict, params: dict) -> dict:
    return {key: params[name] for name, keys in sharing.items() for key in keys}


def make_inputs(seed: int, batch: int, teacher_dims: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(batch, 16)).astype(np.float32) for _ in range(4)]
    return features, [rng.normal(size=(batch, d)).astype(np.float32) for d in teacher_dims]


def torch_losses(features, teachers, ids, temps, config: SoftLabelLossConfig) -> dict:
    """The original's forward in float64: each term as it computes it, from the (already clamped) temperatures."""
    image_cross, text_cross, image_uni, text_uni = features
    unit = lambda x: x / x.norm(dim=1, keepdim=True)
    cos_sim = lambda a, b: F.normalize(a, p=2, dim=1) @ F.normalize(b, p=2, dim=1).T  # sentence_transformers
    reduce = lambda x, mode: x.mean(dim=1) if mode == "mean" else x.sum(dim=1)

    def soft_label(logits, soft, tau, soft_tau, use_loss, mode):
        targets, inputs = F.softmax(soft / soft_tau, dim=1), F.log_softmax(logits / tau, dim=1)
        if use_loss == "kl":
            return F.kl_div(inputs, targets, reduction="batchmean")
        return -reduce(inputs * targets, mode).mean()

    with torch.no_grad():
        image_sim, text_sim = cos_sim(teachers[0], teachers[0]), cos_sim(teachers[1], teachers[1])
    out = dict.fromkeys(TERMS[:3], torch.zeros((), dtype=torch.float64))
    per_image = unit(image_cross) @ unit(text_cross).T
    per_text = per_image.T
    if config.contrastive_on:
        positives = (ids.view(-1, 1) == ids.view(1, -1)).double()
        targets = positives / positives.sum(1, keepdim=True)
        i2t = -reduce(F.log_softmax(per_image / temps["tau"], dim=1) * targets, config.contrastive_mode).mean()
        t2i = -reduce(F.log_softmax(per_text / temps["tau"], dim=1) * targets, config.contrastive_mode).mean()
        out["contrastive"] = (i2t + t2i) / 2.0 * config.rate_con
    if config.cross_on:
        loss = soft_label(per_image, image_sim, temps["cross_tau_image"], temps["cross_soft_tau_image"],
                          config.cross_use_loss, config.cross_mode)
        loss = loss + soft_label(per_text, text_sim, temps["cross_tau_text"], temps["cross_soft_tau_text"],
                                 config.cross_use_loss, config.cross_mode)
        out["cross"] = loss / 2.0 * config.rate_cross
    if config.uni_on:
        image_image, text_text = unit(image_uni) @ unit(image_uni).T, unit(text_uni) @ unit(text_uni).T
        loss = soft_label(image_image, image_sim, temps["uni_tau_image"], temps["uni_soft_tau_image"],
                          config.uni_use_loss, config.uni_mode)
        loss = loss + soft_label(text_text, text_sim, temps["uni_tau_text"], temps["uni_soft_tau_text"],
                                 config.uni_use_loss, config.uni_mode)
        out["uni"] = loss / 2.0 * config.rate_uni
    out["total"] = out["contrastive"] + out["cross"] + out["uni"]
    return out


def scaled(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def uni_inputs(features: list, config: SoftLabelLossConfig) -> list:
    return features if config.uni_on else [*features[:2], None, None]


def jax_values_and_grads(features, teachers, ids, params, config, sharing):
    """Each term and its gradients with respect to the features, the teacher features and the raw temperatures.
    Op by op: every case runs once, and jit would compile each config anew (twice as slow in all)."""
    def losses(features, teachers, params):
        temps = expand(sharing, clamp_temperatures(params, clamp_ranges(sharing)))
        return cusa_losses(*uni_inputs(features, config), *teachers, ids, temps, config)
    return losses(features, teachers, params), jax.jacrev(losses, argnums=(0, 1, 2))(features, teachers, params)


CASES = {
    "default-repeats": (SoftLabelLossConfig(), REPEATS, INSIDE, (12, 20), SEPARATE),
    "default-unique": (SoftLabelLossConfig(), UNIQUE, INSIDE, (20, 12), SEPARATE),
    "no-ids": (SoftLabelLossConfig(), None, INSIDE, (12, 20), SEPARATE),
    "at-clamps": (SoftLabelLossConfig(), REPEATS, AT_CLAMPS, (12, 20), SEPARATE),
    "beyond-clamps": (SoftLabelLossConfig(), REPEATS, BEYOND, (12, 20), SEPARATE),
    "yaml-sharing-beyond": (SoftLabelLossConfig(), REPEATS, BEYOND, (12, 20), SHARED),
    "contrastive-sum": (SoftLabelLossConfig(contrastive_mode="sum"), REPEATS, INSIDE, (12, 20), SEPARATE),
    "soft-ce-mean-sum": (SoftLabelLossConfig(cross_use_loss="contrastive", uni_use_loss="contrastive",
                                             uni_mode="sum", rate_cross=0.3), REPEATS, INSIDE, (12, 20), SEPARATE),
    "soft-ce-sum-mean": (SoftLabelLossConfig(cross_use_loss="contrastive", cross_mode="sum", uni_use_loss="contrastive",
                                             contrastive_mode="sum", rate_uni=0.7), UNIQUE, BEYOND, (20, 12), SEPARATE),
    "contrastive-only": (SoftLabelLossConfig(cross_on=False, uni_on=False), REPEATS, INSIDE, (12, 20), SEPARATE),
    "cross-only": (SoftLabelLossConfig(contrastive_on=False, uni_on=False), REPEATS, INSIDE, (12, 20), SEPARATE),
    "uni-only": (SoftLabelLossConfig(contrastive_on=False, cross_on=False), REPEATS, INSIDE, (12, 20), SEPARATE),
    "all-off": (SoftLabelLossConfig(contrastive_on=False, cross_on=False, uni_on=False), REPEATS, INSIDE, (12, 20),
                SEPARATE),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torch_reference(case):
    config, ids, values, teacher_dims, sharing = CASES[case]
    features, teachers = make_inputs(0, 8, teacher_dims)
    initial, ranges = {name: values[keys[0]] for name, keys in sharing.items()}, clamp_ranges(sharing)

    t_features = [torch.tensor(f, dtype=torch.float64, requires_grad=True) for f in features]
    t_teachers = [torch.tensor(t, dtype=torch.float64) for t in teachers]
    t_params = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in initial.items()}
    with torch.no_grad():  # clamp_tau, before the step
        for name, (low, high) in ranges.items():
            t_params[name].clamp_(min=low, max=high)
    t_ids = torch.arange(8) if ids is None else torch.tensor(ids)
    want = torch_losses(t_features, t_teachers, t_ids, expand(sharing, t_params), config)

    params = {name: jnp.float32(value) for name, value in initial.items()}
    got, grads = jax_values_and_grads([jnp.asarray(f) for f in features], [jnp.asarray(t) for t in teachers],
                                      None if ids is None else jnp.asarray(ids), params, config, sharing)
    inputs = [*t_features, *t_params.values()]
    for term in TERMS:
        assert scaled(got[term], want[term].detach()) <= TOL, (term, float(got[term]), float(want[term].detach()))
        feature_grads, teacher_grads, param_grads = grads[term]
        if want[term].requires_grad:
            expected = torch.autograd.grad(want[term], inputs, allow_unused=True, retain_graph=True)
        else:
            expected = [None] * len(inputs)
        names = ["image_cross", "text_cross", "image_uni", "text_uni", *t_params]
        for name, g, w in zip(names, [*feature_grads, *(param_grads[n] for n in t_params)], expected, strict=True):
            w = np.zeros(np.shape(g)) if w is None else w.numpy()
            assert scaled(g, w) <= TOL, (term, name, scaled(g, w))
        assert all(float(jnp.abs(g).max()) == 0.0 for g in teacher_grads), "teacher features must get no gradient"


def test_mean_mode_divides_each_row_by_n():
    """The original's "mean" contrastive mode averages log-probabilities over a row's N columns: 1/N of "sum"."""
    features, teachers = make_inputs(1, 8, (12, 20))
    args = (*map(jnp.asarray, features), *map(jnp.asarray, teachers), jnp.asarray(REPEATS), INSIDE)
    only = dict(cross_on=False, uni_on=False)
    mean = cusa_losses(*args, SoftLabelLossConfig(**only))["contrastive"]
    total = cusa_losses(*args, SoftLabelLossConfig(contrastive_mode="sum", **only))["contrastive"]
    np.testing.assert_allclose(mean * 8, total, rtol=1e-6)


def test_soft_label_kl_is_batchmean():
    logits, soft = np.random.default_rng(2).normal(size=(2, 5, 7))
    t_logits, t_soft = torch.tensor(logits), torch.tensor(soft)
    want = F.kl_div(F.log_softmax(t_logits / 0.3, dim=1), F.softmax(t_soft / 0.8, dim=1), reduction="batchmean")
    got = soft_label_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(soft, jnp.float32), 0.3, 0.8)
    assert abs(float(got) - float(want)) <= TOL
    sums = soft_label_kl(jnp.asarray(logits), jnp.asarray(soft), 0.3, 0.8, use_loss="contrastive", mode="sum")
    means = soft_label_kl(jnp.asarray(logits), jnp.asarray(soft), 0.3, 0.8, use_loss="contrastive", mode="mean")
    np.testing.assert_allclose(sums, 7 * means, rtol=1e-6)


def test_clamp_temperatures_clips_listed_keys_with_straight_through_gradients():
    temps = {"tau": jnp.float32(0.5), "free": jnp.float32(7.0), "low": jnp.float32(-1.0)}
    ranges = {"tau": (0.01, 0.1), "low": (0.2, 0.3), "absent": (0.0, 1.0)}
    clamped = clamp_temperatures(temps, ranges)
    assert set(clamped) == set(temps)
    np.testing.assert_allclose([clamped["tau"], clamped["free"], clamped["low"]], [0.1, 7.0, 0.2], rtol=1e-6)
    grads = jax.grad(lambda t: sum(v ** 2 for v in clamp_temperatures(t, ranges).values()))(temps)
    np.testing.assert_allclose([grads["tau"], grads["free"], grads["low"]], [0.2, 14.0, 0.4], rtol=1e-6)


def test_rejects_unknown_modes_and_variants():
    with pytest.raises(ValueError, match="contrastive_mode"):
        SoftLabelLossConfig(contrastive_mode="max")
    with pytest.raises(ValueError, match="cross_use_loss"):
        SoftLabelLossConfig(cross_use_loss="mse")
    with pytest.raises(ValueError, match="only 'gathered'"):
        sharded_cusa_losses(None, variant="ring")


GATHERED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxretrieval.config import MeshConfig
    from jaxretrieval.losses.soft_label import SoftLabelLossConfig, TEMPERATURE_KEYS, cusa_losses, sharded_cusa_losses
    from jaxretrieval.sharding import make_mesh

    mesh = make_mesh(MeshConfig(4, 2, 1))  # both batch axes: 8 devices, 2 rows each
    rng = np.random.default_rng(0)
    n = 16
    features = [jnp.asarray(rng.normal(size=(n, 16)), jnp.float32) for _ in range(4)]
    teachers = [jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for d in (12, 20)]
    temps = {k: jnp.float32(v) for k, v in zip(TEMPERATURE_KEYS, rng.uniform(0.1, 1.0, len(TEMPERATURE_KEYS)))}
    temps["tau"] = jnp.float32(0.03)
    cases = {
        "default": (SoftLabelLossConfig(), jnp.asarray(rng.integers(0, 6, n))),  # groups span devices
        "sums-no-uni": (SoftLabelLossConfig(contrastive_mode="sum", cross_use_loss="contrastive", cross_mode="sum",
                                            uni_on=False), None),
    }
    out = {}
    for case, (config, ids) in cases.items():
        uni = lambda f: f if config.uni_on else [*f[:2], None, None]
        def run(fn):
            losses = lambda f, t, temps: fn(*uni(f), *t, ids, temps, config)
            both = lambda *a: (losses(*a), jax.jacrev(losses, argnums=(0, 1, 2))(*a))
            return jax.jit(both)(features, teachers, temps)
        (got, got_grads), (want, want_grads) = run(sharded_cusa_losses(mesh)), run(cusa_losses)
        scaled = lambda g, w: float(jnp.abs(g - w).max() / jnp.maximum(1.0, jnp.abs(w).max()))
        out[case] = {"values": max(scaled(got[t], want[t]) for t in want),
                      "grads": max(jax.tree.leaves(jax.tree.map(scaled, got_grads, want_grads)))}
    print(json.dumps(out))
""")


def test_gathered_matches_local():
    out = json.loads(run_python(GATHERED, devices=8).stdout.strip().splitlines()[-1])
    assert set(out) == {"default", "sums-no-uni"}
    for case, diffs in out.items():
        assert diffs["values"] <= TOL and diffs["grads"] <= TOL, (case, diffs)
