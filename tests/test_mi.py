"""ICLM's mutual-information term (causalattn.losses.mutual_information): values, gradients, zeros."""
import numpy as np
import pytest
import torch

from causalattn.losses import MI_KINDS, mutual_information


def _direct(u: np.ndarray, w: np.ndarray, kind: str) -> float:
    p = np.exp(u - u.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(w - w.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    joint = np.mean([np.outer(p[b], q[b]) for b in range(len(p))], axis=0)
    product = np.outer(p.mean(0), q.mean(0))
    if kind == "code":
        return float((product * (np.log(product) - np.log(joint))).sum())
    return float((joint * (np.log(joint) - np.log(product))).sum())


@pytest.mark.parametrize("kind", MI_KINDS)
def test_values_match_a_direct_float64_computation(kind):
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2
    w = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2
    got = mutual_information(u, w, kind=kind)
    assert got.item() == pytest.approx(_direct(u.numpy(), w.numpy(), kind), rel=1e-10)
    assert got.item() > 0


@pytest.mark.parametrize("kind", MI_KINDS)
def test_gradcheck_in_float64(kind):
    generator = torch.Generator().manual_seed(2)
    u = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mutual_information(a, b, kind=kind), (u, w))


@pytest.mark.parametrize("kind", MI_KINDS)
def test_zero_for_independent_read_outs(kind):
    generator = torch.Generator().manual_seed(3)
    u = torch.randn(1, 7, generator=generator, dtype=torch.float64).expand(5, 7)  # identical rows
    w = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    assert mutual_information(u, w, kind=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_low_precision_inputs_give_an_fp32_value():
    u, w = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(4, 6, dtype=torch.bfloat16)
    assert mutual_information(u, w).dtype == torch.float32


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind"):
        mutual_information(torch.zeros(2, 3), torch.zeros(2, 3), kind="jsd")
    with pytest.raises(ValueError, match="invariant, domain"):
        mutual_information(torch.zeros(2, 3), torch.zeros(2, 4))
