"""The ICLM router (causalattn.routing): shapes, each mode's gradients, the VQ loss, padding."""
import pytest
import torch

from causalattn.routing import ROUTE_MODES, Router, normalized_mutual_information, route_distribution


def _batch(seed: int = 0, batch: int = 4, length: int = 6, hidden: int = 8):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, :2] = False  # left padding
    return states, mask


def _router(mode: str, domains: int = 3) -> Router:
    torch.manual_seed(0)
    return Router(8, domains, mode=mode, code_dim=5, dtype=torch.float64)


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_shapes_of_every_mode(mode):
    states, mask = _batch()
    route = _router(mode)(states, mask, domain_ids=torch.tensor([0, 2, 1, 2]))
    assert route.weights.shape == (4, 3) and route.index.shape == (4,) and route.distances.shape == (4, 3)
    assert route.vq_loss.dim() == 0
    torch.testing.assert_close(route.weights.sum(1), torch.ones(4, dtype=torch.float64))
    if mode != "soft":
        assert torch.equal(route.weights.argmax(1), route.index)
        assert set(route.weights.unique().tolist()) <= {0.0, 1.0}
    if mode == "oracle":
        assert route.index.tolist() == [0, 2, 1, 2] and float(route.vq_loss) == 0.0


def test_vq_route_has_no_gradient_but_its_loss_trains_the_router():
    states, mask = _batch()
    router = _router("vq")
    route = router(states, mask)
    assert not route.weights.requires_grad
    route.vq_loss.backward()
    assert router.codebook.grad.abs().sum() > 0 and router.project.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["vq-ste", "soft"])
def test_straight_through_and_soft_routes_carry_router_gradients(mode):
    states, mask = _batch()
    router = _router(mode)
    route = router(states, mask)
    (route.weights * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    assert router.codebook.grad.abs().sum() > 0 and router.project.weight.grad.abs().sum() > 0


def test_vq_loss_and_distances_match_a_hand_computation():
    states, mask = _batch()
    router = _router("vq")
    route = router(states, mask)
    tokens = states[mask]                                   # (T, C) the valid tokens only
    projected = tokens @ router.project.weight.T + router.project.bias
    z = (projected - projected.mean(0)) / torch.sqrt(projected.var(0, unbiased=False) + router.norm.eps)
    z = z * router.norm.weight + router.norm.bias
    owner = mask.nonzero()[:, 0]
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for t in range(z.shape[0]):
        expected[owner[t]] += ((z[t] - router.codebook) ** 2).sum(1)
    torch.testing.assert_close(route.distances, expected)
    index = expected.argmin(1)
    chosen = router.codebook[index[owner]]
    loss = 0.25 * ((z - chosen) ** 2).mean() + ((chosen - z) ** 2).mean()
    torch.testing.assert_close(route.vq_loss, loss)
    assert torch.equal(route.index, index)


def test_padding_tokens_do_not_change_the_route():
    states, mask = _batch()
    router = _router("soft")
    first = router(states, mask)
    changed = states.clone()
    changed[~mask] = 1e3
    second = router(changed, mask)
    torch.testing.assert_close(first.distances, second.distances)
    torch.testing.assert_close(first.weights, second.weights)


def test_errors_name_the_argument():
    states, mask = _batch()
    with pytest.raises(ValueError, match="domain_ids"):
        _router("oracle")(states, mask)
    with pytest.raises(ValueError, match="mode"):
        Router(8, 2, mode="argmax")
    with pytest.raises(ValueError, match="domains"):
        Router(8, 1)
    with pytest.raises(ValueError, match="token_mask"):
        _router("vq")(states, mask[:, :3])


def test_route_statistics():
    assert route_distribution(torch.tensor([0, 0, 1, 2]), 4) == [0.5, 0.25, 0.25, 0.0]
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert normalized_mutual_information(torch.tensor([5, 5, 3, 3, 4, 4]), truth) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    assert normalized_mutual_information(torch.zeros(6), truth) == 0.0


def test_routes_in_full_precision_under_autocast():
    states, mask = _batch()
    router = Router(8, 3, mode="soft", code_dim=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        route = router(states.float(), mask)
    assert route.weights.dtype == route.vq_loss.dtype == torch.float32
    torch.testing.assert_close(route.distances, router(states.float(), mask).distances)
