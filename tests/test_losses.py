"""CAT loss (docs/math.md §2), XG variance (docs/math.md §3) and the CAT amplitude schedule against independent code."""
import math

import pytest
import torch

from causalattn import Adapter, CausalMask, attention_dense, cat_amp, cat_loss, xg_variance

DIM = 16


def generator(seed):
    return torch.Generator().manual_seed(seed)


def supervision_problem(seed, batch=3, n=12):
    """A raw random adjacency (upper triangle and padding included: the mask must drop them) and its mask."""
    gen = generator(seed)
    dense = torch.rand(batch, n, n, generator=gen) < 0.35
    key_mask = torch.ones(batch, n, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding
    key_mask[2, 9:] = False  # right padding
    return dense, key_mask, CausalMask.from_dense(dense, key_mask)


def loop_cat_loss(mass_layers, dense, key_mask, alpha, kind, heads="mean"):
    """docs/math.md §2 row by row: m̄ = mean over layers and heads, n1/n0 over visible keys, threshold, mean over valid
    rows; with heads="each", the row loss of every (layer, head) mass, averaged, in place of the loss of m̄."""
    if heads == "each":
        num_layers, _, num_heads, _ = mass_layers.shape
        return sum(loop_cat_loss(mass_layers[l:l + 1, :, h:h + 1], dense, key_mask, alpha, kind)
                   for l in range(num_layers) for h in range(num_heads)) / (num_layers * num_heads)
    num_layers, batch, heads, n = mass_layers.shape
    total, valid = 0.0, 0
    for b in range(batch):
        for i in range(n):
            visible = [j for j in range(i + 1) if key_mask[b, j]]
            n1 = sum(bool(dense[b, i, j]) for j in visible)
            n0 = len(visible) - n1
            if n1 == 0 or n0 == 0:
                continue
            valid += 1
            mean_mass = sum(float(mass_layers[l, b, h, i]) for l in range(num_layers) for h in range(heads)) / (num_layers * heads)
            if kind == "mass":  # no alpha cut-off: every valid row pulls
                total += -math.log(mean_mass)
                continue
            a1, a0 = mean_mass / n1, (1 - mean_mass) / n0
            if a1 / a0 >= alpha:
                continue
            if kind == "div":
                total += -math.log(1 + a1) / math.log(1 + a0)
            elif kind == "div2":
                total += -math.log(1 + a1 / (1 + a0))
            elif kind == "nll":
                total += -a1 / (a1 + a0)
            else:
                total += alpha - a1 / a0
    return total / max(valid, 1)


@pytest.mark.parametrize("kind", ["div", "div2", "nll", "hinge", "mass"])
@pytest.mark.parametrize("alpha", [2.0, 5.0])
def test_cat_loss_matches_row_loop(kind, alpha):
    dense, key_mask, mask = supervision_problem(seed=0)
    gen = generator(1)
    mass_layers = torch.rand(3, 3, 2, 12, generator=gen, dtype=torch.float64)  # (L, B, Hq, N)
    expected = loop_cat_loss(mass_layers, dense, key_mask, alpha, kind)
    # The threshold must matter in this case: some valid rows cost something, some cost nothing.
    mean_mass = mass_layers.mean(dim=(0, 2))
    ratio = (mean_mass / mask.cause_count.clamp_min(1)) / ((1 - mean_mass) / mask.non_cause_count.clamp_min(1))
    assert (mask.valid_rows() & (ratio < alpha)).any() and (mask.valid_rows() & (ratio >= alpha)).any()

    assert cat_loss(mass_layers, mask, alpha=alpha, kind=kind).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    as_list = cat_loss(list(mass_layers), mask, alpha=alpha, kind=kind)
    assert as_list.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    one_layer = cat_loss(mass_layers[0], mask, alpha=alpha, kind=kind)
    assert one_layer.item() == pytest.approx(loop_cat_loss(mass_layers[:1], dense, key_mask, alpha, kind), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("kind", ["div", "hinge", "mass"])
def test_cat_loss_each_head_matches_row_loop(kind):
    dense, key_mask, mask = supervision_problem(seed=10)
    mass_layers = torch.rand(3, 3, 4, 12, generator=generator(11), dtype=torch.float64)
    expected = loop_cat_loss(mass_layers, dense, key_mask, 2.0, kind, heads="each")
    assert cat_loss(mass_layers, mask, kind=kind, heads="each").item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # one layer of one head: the two reductions are the same loss
    single = mass_layers[:1, :, :1]
    assert cat_loss(single, mask, kind=kind, heads="each").item() == pytest.approx(
        cat_loss(single, mask, kind=kind).item(), rel=1e-12, abs=1e-12)


def test_cat_loss_each_head_penalises_a_head_that_looks_elsewhere():
    # The same head-mean mass, once spread evenly and once with one head off the causes: "mean" cannot tell
    # them apart, "each" (-log is convex) costs the second more.
    dense, _, mask = supervision_problem(seed=12)
    even = torch.full((1, 3, 4, 12), 0.5, dtype=torch.float64)
    one_off = even.clone()
    one_off[:, :, 0], one_off[:, :, 1:] = 0.05, 0.65
    assert cat_loss(even, mask, kind="mass").item() == pytest.approx(cat_loss(one_off, mask, kind="mass").item())
    assert cat_loss(one_off, mask, kind="mass", heads="each") > cat_loss(even, mask, kind="mass", heads="each") + 0.3
    mass = (torch.rand(2, 3, 4, 12, generator=generator(13), dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: cat_loss(m, mask, kind="mass", heads="each"), (mass,), eps=1e-6, atol=1e-7)


def test_cat_loss_float32_mass_matches_loop():
    dense, key_mask, mask = supervision_problem(seed=2)
    mass = torch.rand(2, 3, 4, 12, generator=generator(3))
    expected = loop_cat_loss(mass.double(), dense, key_mask, 2.0, "div")
    assert cat_loss(mass, mask).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["div", "div2", "nll", "hinge", "mass"])
def test_cat_loss_gradient_through_attention_is_finite(kind):
    # Real masses from attention, with padding rows, rows without causes and inactive rows in the graph.
    dense, key_mask, mask = supervision_problem(seed=4)
    gen = generator(5)
    q = torch.randn(3, 4, 12, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 12, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 12, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    masses = [attention_dense(q * scale, k, v, key_mask=key_mask, supervision=mask).mass for scale in (1.0, 0.5)]
    loss = cat_loss(masses, mask, kind=kind, alpha=3.0)
    assert loss.item() < 0 if kind not in ("hinge", "mass") else loss.item() > 0
    q_grad, k_grad, v_grad = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    assert torch.isfinite(q_grad).all() and torch.isfinite(k_grad).all()
    assert q_grad.abs().sum() > 0 and k_grad.abs().sum() > 0
    assert v_grad is None  # the mass does not depend on the values


def test_mass_kind_gradient_matches_float64_finite_differences():
    # Through attention (so padding, cause-free and valid rows are all in the graph), the whole
    # -log m-bar path: layer/head mean, row selection, mean over valid rows.
    dense, key_mask, mask = supervision_problem(seed=7)
    gen = generator(8)
    q = torch.randn(3, 4, 12, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 12, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 12, DIM, generator=gen, dtype=torch.float64)

    def loss_of(q, k):
        masses = [attention_dense(q * scale, k, v, key_mask=key_mask, supervision=mask).mass for scale in (1.0, 0.5)]
        return cat_loss(masses, mask, kind="mass")

    assert torch.autograd.gradcheck(loss_of, (q, k), eps=1e-6, atol=1e-7, rtol=1e-5)
    # and directly on the mass, where -d/dm log m = -1/m is easy to state
    mass = torch.rand(2, 3, 4, 12, generator=generator(9), dtype=torch.float64).mul(0.9).add(0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: cat_loss(m, mask, kind="mass"), (mass,), eps=1e-6, atol=1e-7)


def test_cat_loss_without_valid_rows_is_zero_and_differentiable():
    mask = CausalMask.from_dense(torch.zeros(2, 6, 6, dtype=torch.bool))
    mass = torch.rand(2, 3, 6, generator=generator(6), requires_grad=True)
    loss = cat_loss(mass, mask)
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(mass.grad, torch.zeros_like(mass))


@pytest.mark.parametrize("mass, options, message", [
    (torch.rand(2, 3, 6), {"kind": "kl"}, "kind"),
    (torch.rand(2, 3, 6), {"alpha": 0.0}, "alpha"),
    (torch.rand(2, 3, 6), {"heads": "max"}, "heads"),
    (torch.rand(2, 3, 6), {"alpha": float("inf")}, "alpha"),
    (torch.rand(2, 3, 7), {}, "mass"),
    (torch.rand(3, 3, 6), {}, "mass"),
    (torch.rand(6), {}, "mass"),
    ([], {}, "mass"),
    ([torch.rand(2, 3, 6), torch.rand(2, 2, 6)], {}, "mass"),
], ids=["kind", "heads", "alpha-zero", "alpha-inf", "length", "batch", "dims", "no-layers", "mixed-layers"])
def test_cat_loss_rejects_bad_arguments(mass, options, message):
    mask = CausalMask.from_dense(torch.ones(2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        cat_loss(mass, mask, **options)


# ---------------------------------------------------------------------- XG variance
def loop_xg_variance(layers, weights):
    """docs/math.md §3: per sample X_b = W concat_h(xg_b) (or concat_h alone), unbiased variance over b,
    mean over features (and positions), mean over layers."""
    per_layer = []
    for stat, weight in zip(layers, weights):
        batch, heads = stat.shape[:2]
        positions = [None] if stat.dim() == 3 else range(stat.shape[2])
        variances = []
        for i in positions:
            samples = []
            for b in range(batch):
                concat = torch.cat([stat[b, h] if i is None else stat[b, h, i] for h in range(heads)])
                samples.append(concat if weight is None else weight @ concat)
            mean = sum(samples) / batch
            variances.append(sum((x - mean) ** 2 for x in samples) / (batch - 1))
        per_layer.append(torch.stack(variances).mean())
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("pool", ["sample", "position"])
@pytest.mark.parametrize("space", ["output", "head"])
def test_xg_variance_matches_loop(pool, space):
    gen = generator(7)
    batch, heads, n, width = 4, 3, 5, 10
    shape = (batch, heads, DIM) if pool == "sample" else (batch, heads, n, DIM)
    layers = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    per_layer_weights = [torch.randn(width, heads * DIM, generator=gen, dtype=torch.float64) for _ in range(3)]
    if space == "head":
        expected = loop_xg_variance(layers, [None] * 3)
        assert xg_variance(layers, space="head").item() == pytest.approx(expected.item(), rel=1e-12)
        return
    expected = loop_xg_variance(layers, per_layer_weights)
    assert xg_variance(layers, per_layer_weights).item() == pytest.approx(expected.item(), rel=1e-12)
    shared = loop_xg_variance(layers, [per_layer_weights[0]] * 3)
    assert xg_variance(layers, per_layer_weights[0]).item() == pytest.approx(shared.item(), rel=1e-12)
    single = loop_xg_variance(layers[:1], per_layer_weights[:1])
    assert xg_variance(layers[0], per_layer_weights[0]).item() == pytest.approx(single.item(), rel=1e-12)


def test_xg_variance_of_attention_output_is_differentiable():
    gen = generator(8)
    q = torch.randn(3, 2, 7, DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 1, 7, DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    keys, values = (torch.randn(1, 4, DIM, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    xg = attention_dense(q, k, v, adapter=Adapter(keys, values, gate), xg_tokens=2).xg
    weight = torch.randn(8, 2 * DIM, generator=gen, dtype=torch.float64)
    penalty = xg_variance(xg, weight)
    assert penalty.item() == pytest.approx(loop_xg_variance([xg], [weight]).item(), rel=1e-12)
    keys_grad, values_grad, gate_grad = torch.autograd.grad(penalty, (keys, values, gate))
    assert values_grad[:, 2:].abs().sum() == 0  # only the first xg_tokens values are read
    assert values_grad[:, :2].abs().sum() > 0 and keys_grad.abs().sum() > 0 and gate_grad.abs().sum() > 0


def test_xg_variance_of_one_sample_is_zero_with_warning():
    xg = torch.randn(1, 2, DIM, generator=generator(9), requires_grad=True)
    with pytest.warns(UserWarning, match="one sample"):
        penalty = xg_variance(xg, torch.randn(4, 2 * DIM))
    assert penalty.item() == 0
    penalty.backward()
    assert torch.equal(xg.grad, torch.zeros_like(xg))


@pytest.mark.parametrize("xg, weight, options, message", [
    (torch.randn(2, 2, DIM), torch.randn(4, 2 * DIM), {"space": "input"}, "space"),
    (torch.randn(2, 2, DIM), None, {}, "o_proj_weight"),
    ([torch.randn(2, 2, DIM)] * 2, [torch.randn(4, 2 * DIM)] * 3, {}, "o_proj_weight"),
    (torch.randn(2, 2, DIM), torch.randn(4, 3 * DIM), {}, r"o_proj_weight\[0\]"),
    ([], None, {"space": "head"}, "xg"),
    ([torch.randn(2, DIM)], None, {"space": "head"}, "xg"),
], ids=["space", "no-weight", "weight-count", "weight-shape", "no-layers", "dims"])
def test_xg_variance_rejects_bad_arguments(xg, weight, options, message):
    with pytest.raises(ValueError, match=message):
        xg_variance(xg, weight, **options)


# ---------------------------------------------------------------------- amplitude schedule
@pytest.mark.parametrize("epoch", [0, 0.5, 1, 3])
@pytest.mark.parametrize("rate", [1.0, 0.3, 0.0])
def test_cat_amp(epoch, rate):
    assert cat_amp(epoch, rate) == pytest.approx(math.exp(-rate * epoch), rel=1e-15)


def test_cat_amp_default_rate_and_errors():
    assert cat_amp(0) == 1.0
    assert cat_amp(2) == pytest.approx(math.exp(-2), rel=1e-15)
    with pytest.raises(ValueError, match="rate"):
        cat_amp(1, rate=-0.5)
