"""VSE-infinity's GPO pooling and hinge triplet loss against PyTorch references written here from vse_infty's
formulation (lib/modules/aggr/gpo.py, lib/loss.py): the positional encoding, the bidirectional GRU against
torch.nn.GRU over packed variable-length rows, GPO's pooled features and weights, and the loss in its sum and
hardest-negative forms, values and gradients."""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxretrieval.losses.hinge import vse_hinge_loss
from jaxretrieval.models.gpo import GPO, BiGRU, flat_from_torch, positional_encoding
from jaxretrieval.models.stacking import relayout
from jaxretrieval.sharding import path_name

torch = pytest.importorskip("torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


# References (torch) ----------------------------------------------------------------------------------------------

def ref_encoding(d: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """positional_encoding_1d(d, length) (float32 there): sin in the even columns, cos in the odd ones."""
    rates = torch.exp(torch.arange(0, d, 2, dtype=dtype) * -(math.log(10000.0) / d))
    angles = torch.arange(0, length).unsqueeze(1).to(dtype) * rates
    pe = torch.zeros(length, d, dtype=dtype)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angles), torch.cos(angles)
    return pe


def ref_bigru(gru: torch.nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h_n = gru(packed)
    return pad_packed_sequence(out, batch_first=True)[0], h_n


class RefGPO(torch.nn.Module):
    """vse_infty's GPO: a BiGRU over the encodings of the valid positions, directions averaged, a bias-free score,
    -10000 past the length, softmax at temperature 0.1; features sorted descending per dimension over the set,
    padding filled with -10000 before the sort and zeroed after, then the weighted sum."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = torch.nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = torch.nn.Linear(d_hidden, 1, bias=False)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        longest = int(lengths.max())
        keep = (torch.arange(longest)[None, :] < lengths.long()[:, None])[..., None]
        encodings = ref_encoding(self.d_pe, longest, features.dtype)[None].repeat(len(lengths), 1, 1)
        encodings = encodings.masked_fill(~keep, 0)
        out, _ = ref_bigru(self.gru, encodings, lengths)
        half = out.size(2) // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2)
        scores[torch.where(~keep)] = -10000
        weights = torch.softmax(scores / 0.1, 1)
        ranked = features[:, :longest].masked_fill(~keep, -10000).sort(dim=1, descending=True)[0]
        ranked = ranked.masked_fill(~keep, 0)
        return (ranked * weights).sum(1), weights


def ref_hinge(im: torch.Tensor, s: torch.Tensor, margin: float, max_violation: bool) -> torch.Tensor:
    """ContrastiveLoss.forward: both directions' clamped costs, diagonals cleared, summed (or each query's max)."""
    scores = im.mm(s.t())
    diagonal = scores.diag().view(-1, 1)
    eye = torch.eye(scores.size(0), dtype=torch.bool)
    cost_s = (margin + scores - diagonal.expand_as(scores)).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + scores - diagonal.t().expand_as(scores)).clamp(min=0).masked_fill(eye, 0)
    if max_violation:
        cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


# Helpers ---------------------------------------------------------------------------------------------------------

def close(ours, reference, **tol) -> None:
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    np.testing.assert_allclose(np.asarray(ours), reference, **(tol or TOL))


def flat_params(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load(module: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, relayout(flat, nnx.to_pure_dict(state)))
    nnx.update(module, state)
    return module


def torch_grads(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: p.grad for name, p in module.named_parameters()}


# Tests -----------------------------------------------------------------------------------------------------------

def test_positional_encoding_matches_vse_infty() -> None:
    close(positional_encoding(40, 32), ref_encoding(32, 40), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        positional_encoding(4, 3)


def test_bigru_matches_packed_torch_gru() -> None:
    """Unequal input / hidden widths (a transposed weight would not fit), lengths 1 and full among them."""
    torch.manual_seed(0)
    d_in, d_hidden, lengths = 6, 5, [7, 1, 4, 7, 2]
    gru = torch.nn.GRU(d_in, d_hidden, 1, batch_first=True, bidirectional=True)
    x = torch.randn(len(lengths), 7, d_in, requires_grad=True)
    out, h_n = ref_bigru(gru, x, torch.tensor(lengths))
    cot_out, cot_h = torch.randn(out.shape), torch.randn(h_n.shape)
    ((out * cot_out).sum() + (h_n * cot_h).sum()).backward()

    state = {"gru." + k: v for k, v in gru.state_dict().items()} | {"linear.weight": torch.zeros(1, d_hidden)}
    as_gru = lambda flat: {k[len("gru/"):]: v for k, v in flat.items() if k.startswith("gru/")}  # noqa: E731
    ours = load(BiGRU(d_in, d_hidden, rngs=nnx.Rngs(0)), as_gru(flat_from_torch(state)))
    graphdef, params = nnx.split(ours)

    @jax.jit
    def run(params, x):
        def objective(params, x):
            got_out, got_h = nnx.merge(graphdef, params)(x, jnp.asarray(lengths))
            loss = jnp.sum(got_out * cot_out.numpy()) + jnp.sum(got_h * cot_h.numpy())
            return loss, (got_out, got_h)
        return jax.grad(objective, argnums=(0, 1), has_aux=True)(params, x)

    (grad_params, grad_x), (got_out, got_h) = run(params, jnp.asarray(x.detach().numpy()))
    assert got_out.shape == (5, 7, 2 * d_hidden)
    close(got_out, out)  # pad_packed_sequence's zeros past each length included (max length = 7 here)
    close(got_h, h_n)
    close(grad_x, x.grad)
    want = as_gru(flat_from_torch(torch_grads(gru, "gru.") | {"linear.weight": torch.zeros(1, d_hidden)}))
    got = flat_params(nnx.to_pure_dict(grad_params))
    assert sorted(got) == sorted(want)
    for name in want:
        close(got[name], want[name])


def gpo_side_by_side(ref: RefGPO, features: np.ndarray, lengths: list[int], dtype: torch.dtype):
    """Both GPOs in `dtype` on the same features and weights, each pulled back along the same random cotangents of
    the pooled features and the weights: ({name: (ours, theirs)} of the values, {param path: (ours, theirs)} of
    the parameter gradients)."""
    ref = copy.deepcopy(ref).to(dtype)
    as_np = np.float64 if dtype == torch.float64 else np.float32
    x = torch.tensor(features, dtype=dtype, requires_grad=True)
    pooled, weights = ref(x, torch.tensor(lengths))
    generator = torch.Generator().manual_seed(2)
    cot_pooled = torch.randn(pooled.shape, generator=generator, dtype=dtype)
    cot_weights = torch.randn(weights.shape, generator=generator, dtype=dtype)
    ((pooled * cot_pooled).sum() + (weights * cot_weights).sum()).backward()

    ours = load(GPO(rngs=nnx.Rngs(0)), flat_from_torch(ref.state_dict(), dtype=as_np))
    graphdef, params = nnx.split(ours)
    longest, size = max(lengths), features.shape[1]
    cot_w = np.zeros((len(lengths), size, 1), as_np)
    cot_w[:, :longest] = cot_weights.numpy()

    def objective(params, x):
        got_pooled, got_weights = nnx.merge(graphdef, params)(x, jnp.asarray(lengths))
        return jnp.sum(got_pooled * cot_pooled.numpy()) + jnp.sum(got_weights * cot_w), (got_pooled, got_weights)

    run = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
    (grad_params, grad_x), (got_pooled, got_weights) = run(params, jnp.asarray(features, as_np))
    assert got_pooled.dtype == as_np and got_weights.shape == (len(lengths), size, 1)
    assert np.all(np.asarray(got_weights[:, longest:]) == 0)  # past every length: exactly 0
    values = {"pooled": (got_pooled, pooled), "weights": (got_weights[:, :longest], weights),
              "d features": (grad_x, x.grad)}
    want = flat_from_torch(torch_grads(ref), dtype=as_np)
    got = flat_params(nnx.to_pure_dict(grad_params))
    assert sorted(got) == sorted(want)
    return values, {name: (got[name], want[name]) for name in want}


@pytest.mark.parametrize("lengths,size", [([9, 1, 5, 3, 9, 2], 9), ([4, 1, 3], 6)])
def test_gpo_matches_vse_infty(lengths: list[int], size: int) -> None:
    """Pooled features, weights and the gradients w.r.t. the features and every GPO parameter, in float32 (to 1e-5)
    and in float64 (the same formula: to 1e-9). The second case's longest row is shorter than the set (the
    original trims to it; ours keeps the set, with zero weights there)."""
    torch.manual_seed(1)
    ref = RefGPO()
    with torch.no_grad():  # a sharper score than torch's small default init, so the weights are far from uniform
        ref.linear.weight.mul_(8.0)
    features = np.random.default_rng(1).normal(size=(len(lengths), size, 8))

    values, grads = gpo_side_by_side(ref, features.astype(np.float32), lengths, torch.float32)
    weights = values["weights"][1].detach().numpy()
    assert float(np.abs(weights[0, :, 0] - 1 / 9).max()) > 0.05  # not a plain mean
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    for ours, theirs in [*values.values(), *grads.values()]:
        close(ours, theirs)
    with jax.enable_x64(True):
        values, grads = gpo_side_by_side(ref, features, lengths, torch.float64)
        for ours, theirs in [*values.values(), *grads.values()]:
            close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_flat_from_torch_names_and_checks() -> None:
    state = RefGPO().state_dict()
    flat = flat_from_torch({f"module.img_enc.gpool.{k}": v for k, v in state.items()}, "module.img_enc.gpool.")
    assert flat["gru/backward/input_kernel"].shape == (32, 96)
    np.testing.assert_array_equal(flat["gru/backward/hidden_kernel"], state["gru.weight_hh_l0_reverse"].numpy().T)
    np.testing.assert_array_equal(flat["linear/kernel"], state["linear.weight"].numpy().T)
    with pytest.raises(ValueError, match="missing keys: gru.bias_hh_l0.*unplaced keys: extra"):
        flat_from_torch({k: v for k, v in state.items() if k != "gru.bias_hh_l0"} | {"extra": np.zeros(1)})


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("case", ["random", "separated"])
def test_hinge_loss_matches_vse_infty(max_violation: bool, case: str) -> None:
    """Random unit rows (many violations), and positives far ahead of every negative (all costs zero); values and
    gradients in float64 (to 1e-6 and far below) and in float32."""
    rng = np.random.default_rng(3)
    if case == "random":
        im, s = unit_rows(rng, 10, 6), unit_rows(rng, 10, 6)
        im[3] = s[3]  # one pair aligned, so some rows mix zero and positive costs
    else:
        im = np.eye(6, 16)
        s = im.copy()
    t_im, t_s = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (im, s))
    want = ref_hinge(t_im, t_s, 0.2, max_violation)
    want.backward()
    if case == "separated":
        assert want.item() == 0.0
    else:
        assert want.item() > 1.0

    loss = jax.value_and_grad(lambda a, b: vse_hinge_loss(a, b, 0.2, max_violation), argnums=(0, 1))
    with jax.enable_x64(True):
        got, (g_im, g_s) = jax.jit(loss)(jnp.asarray(im, jnp.float64), jnp.asarray(s, jnp.float64))
        assert got.dtype == jnp.float64
        close(got, want, rtol=1e-6, atol=1e-6)
        close(g_im, t_im.grad, rtol=1e-6, atol=1e-6)
        close(g_s, t_s.grad, rtol=1e-6, atol=1e-6)
        close(got, want, rtol=1e-12, atol=1e-12)
    got, (g_im, g_s) = jax.jit(loss)(jnp.asarray(im, jnp.float32), jnp.asarray(s, jnp.float32))
    assert got.dtype == jnp.float32
    close(got, want, rtol=1e-5, atol=1e-5)
    close(g_im, t_im.grad, rtol=1e-5, atol=1e-5)
    close(g_s, t_s.grad, rtol=1e-5, atol=1e-5)


def test_hinge_loss_hand_worked() -> None:
    """Three unit pairs (image i = caption i) with cross similarities 0.6, 0.8 and 0.96 and margin 0.5: the
    off-diagonal costs are 0.1, 0.3 and 0.46, each twice per direction. Sum: 2 x 2 x 0.86; hardest: per query
    0.3, 0.46, 0.46, in both directions. Margin 0.1 leaves only the 0.96 pair violating (0.06 each)."""
    rows = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    np.testing.assert_allclose(vse_hinge_loss(rows, rows, 0.5), 3.44, rtol=1e-6)
    np.testing.assert_allclose(vse_hinge_loss(rows, rows, 0.5, max_violation=True), 2.44, rtol=1e-6)
    for max_violation in (False, True):
        np.testing.assert_allclose(vse_hinge_loss(rows, rows, 0.1, max_violation), 0.24, rtol=1e-5)


def test_rank_pooling_equals_sorting_with_ties_and_padding_gradients_included():
    """GPO pools by ranks (no sort); with many tied values and padded rows it equals a descending stable sort."""
    from jaxretrieval.models.gpo import MASKED_SCORE, descending_ranks

    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, (3, 7, 5)).astype(np.float32))
    lengths = jnp.array([7, 4, 1])
    valid = (jnp.arange(7)[None, :] < lengths[:, None])[..., None]
    weights = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).standard_normal((3, 7, 1))), axis=1)

    def by_sort(x):
        ranked = -jnp.sort(-jnp.where(valid, x, MASKED_SCORE), axis=1, stable=True)
        return jnp.sum(jnp.where(valid, ranked, 0.0) * weights, axis=1)

    def by_rank(x):
        rank = descending_ranks(jnp.where(valid, x, MASKED_SCORE))
        return jnp.sum(jnp.where(valid, x * jnp.take_along_axis(jnp.broadcast_to(weights, x.shape), rank, 1), 0), 1)

    np.testing.assert_allclose(by_rank(x), by_sort(x), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: (by_rank(v) ** 2).sum())(x),
                               jax.grad(lambda v: (by_sort(v) ** 2).sum())(x), atol=1e-6)
    ranks = np.asarray(descending_ranks(x))
    assert all(sorted(ranks[b, :, d]) == list(range(7)) for b in range(3) for d in range(5))
