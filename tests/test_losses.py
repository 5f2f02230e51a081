"""The behavioral KL (llc/losses.py) against its definition: values and gradients bit for bit those of
autograd through the written-out expression (first and second order: the step-size checks take
Hessian-vector products through it), exact zero at θ*, and the conventions for zero reference mass
and broken outputs."""

import pytest
import torch

from tests.fixtures.device import on_test_device
from tl_degeneracy.llc.losses import per_sample_loss, reference_form


def _logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    return (scale * torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))).to(dtype)


def _identical(a, b):
    """Bit for bit on the CPU; on a GPU a reduction may be split differently for one chain's rows
    than for all chains' (llc/losses.py), so there: equal to float rounding."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    torch.testing.assert_close(a, b)
    return True


def _written_out(outputs, reference):
    """Σ p* (log p* − log softmax(z)), terms with p* = 0 selected out: the loss as it was written
    before it was fused, autograd doing the rest."""
    logp = torch.log_softmax(outputs, -1)
    zero_mass = reference == -torch.inf
    ref = torch.where(zero_mass, torch.zeros_like(reference), reference)
    return torch.where(zero_mass, torch.zeros_like(logp), ref.exp() * (ref - logp)).sum(-1)


def _masked_case(dtype):
    """Logits [3 chains, 40 positions, 301 classes] near a reference with some masked classes."""
    star = _logits(40, 301, dtype=dtype)
    star[:4, :9] = -torch.inf  # the reference puts no mass on these classes…
    z = star + 0.05 * _logits(3, 40, 301, seed=1, dtype=dtype)
    z[0, :2, :9] = 0.3  # …chain 0 puts some there at two positions, the others none (z = −inf)
    return on_test_device(z), on_test_device(reference_form("kl", star))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_values_and_gradients_are_those_of_the_written_out_form_bit_for_bit(dtype):
    z, ref = _masked_case(dtype)
    weights = on_test_device(_logits(3, 40, seed=2, dtype=dtype))  # a non-uniform upstream gradient
    results = []
    for loss in (lambda x: per_sample_loss("kl", x, ref), lambda x: _written_out(x, ref)):
        leaf = z.clone().requires_grad_(True)
        value = loss(leaf)
        (grad,) = torch.autograd.grad((value * weights).sum(), leaf)
        results.append((value.detach(), grad))
    (fused, fused_grad), (plain, plain_grad) = results
    assert fused.shape == (3, 40) and bool(torch.isfinite(fused).all()) and bool(torch.isfinite(fused_grad).all())
    assert _identical(fused, plain) and _identical(fused_grad, plain_grad)
    assert bool((fused > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_hessian_vector_products_are_those_of_the_written_out_form_bit_for_bit(dtype):
    z, ref = _masked_case(dtype)
    v = on_test_device(_logits(*z.shape, seed=3, dtype=dtype))
    results = []
    for loss in (lambda x: per_sample_loss("kl", x, ref), lambda x: _written_out(x, ref)):
        leaf = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(1.5 * leaf).sum(), leaf, create_graph=True)  # something upstream
        (hv,) = torch.autograd.grad((grad * v).sum(), leaf)
        results.append((grad.detach(), hv))
    assert _identical(results[0][0], results[1][0]) and _identical(results[0][1], results[1][1])


def test_kl_gradient_and_hessian_are_exact():
    ref = reference_form("kl", _logits(4, 9))
    z = _logits(2, 4, 9, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: per_sample_loss("kl", x, ref), (z,))
    assert torch.autograd.gradgradcheck(lambda x: per_sample_loss("kl", x, ref), (z,))


def test_kl_is_exactly_zero_at_the_reference_in_float32():
    star = on_test_device(_logits(16, 257, dtype=torch.float32))
    z = star.expand(3, 16, 257).clone()
    assert bool((per_sample_loss("kl", z, reference_form("kl", star)) == 0).all())


def test_zero_reference_mass_counts_zero_and_broken_values_stay_nan():
    ref = reference_form("kl", torch.tensor([[0.0, 1.0, -torch.inf], [0.5, 0.0, 0.2]], dtype=torch.float64))
    z = torch.tensor([[[0.5, 0.5, -torch.inf], [0.1, 0.2, 0.3]],
                      [[0.5, 0.5, 3.0], [0.5, 0.0, 0.2]]], dtype=torch.float64)
    value = per_sample_loss("kl", z, ref)
    # Chain 0 puts no mass on class 3 either: its KL is that of the first two classes alone…
    finite_part = _written_out(z[0, 0, :2], reference_form("kl", ref[0, :2]))
    torch.testing.assert_close(value[0, 0], finite_part, rtol=1e-12, atol=0)
    assert float(value[1, 0]) > float(value[0, 0])  # …chain 1 moves mass onto it, which costs
    assert float(value[1, 1]) == 0.0
    nan_z = z.clone()
    nan_z[0, 1, 0] = float("nan")
    out = per_sample_loss("kl", nan_z, ref)
    assert bool(out[0, 1].isnan()) and bool(torch.isfinite(out[1]).all())
    nan_ref = ref.clone()
    nan_ref[1, 2] = float("nan")
    assert bool(per_sample_loss("kl", z, nan_ref)[:, 1].isnan().all())


def test_half_precision_outputs_are_compared_in_float32():
    star = _logits(6, 33, dtype=torch.float32)
    ref = reference_form("kl", star)
    z = (star + 0.1 * _logits(2, 6, 33, seed=5, dtype=torch.float32)).to(torch.bfloat16)
    got = per_sample_loss("kl", z, ref)
    assert got.dtype == torch.float32
    assert torch.equal(got, _written_out(z.float(), ref))
