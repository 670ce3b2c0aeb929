"""Invariants of the residual quantizer and k-means (modules/quantizer.py, modules/kmeans.py)."""
from __future__ import annotations

import pytest
import torch

from modules.kmeans import kmeans
from modules.quantizer import GRADIENTS, ResidualQuantizer, rotation_trick


def hierarchical_quantizer(gradient: str = "rotation", levels: int = 3, size: int = 8, dim: int = 6):
    """Random codebooks whose scale shrinks 100x per level, so greedy lookup recovers any code tuple."""
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(levels, size, dim, gradient=gradient, init="random")
    with torch.no_grad():
        for level in range(levels):
            quantizer.codebooks[level] = torch.randn(size, dim) * 100.0 ** -level
    return quantizer


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_a_codebook_vector_returns_its_own_code(gradient):
    quantizer = hierarchical_quantizer(gradient)
    first_level = quantizer.codebooks[0].detach()
    assert torch.equal(quantizer(first_level).codes[:, 0], torch.arange(8))
    tuples = torch.randint(8, (20, 3))
    x = sum(quantizer.codebooks[l].detach()[tuples[:, l]] for l in range(3))
    out = quantizer(x)
    assert torch.equal(out.codes, tuples)
    torch.testing.assert_close(out.quantized, x)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_level_quantized_vectors_sum_to_the_output(gradient):
    quantizer = hierarchical_quantizer(gradient)
    x = torch.randn(16, 6)
    out = quantizer(x)
    torch.testing.assert_close(out.level_quantized.sum(1), out.quantized)
    torch.testing.assert_close(out.level_residuals[:, 0], x)
    torch.testing.assert_close(out.level_residuals[:, 1], x - out.level_quantized[:, 0])


def test_straight_through_passes_the_gradient_unchanged():
    quantizer = hierarchical_quantizer("straight_through")
    x = torch.randn(5, 6, requires_grad=True)
    weights = torch.randn(5, 6)
    (quantizer(x).quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


def test_rotation_trick_is_the_linear_map_taking_x_onto_q():
    torch.manual_seed(1)
    x, q = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(rotation_trick(x[None], q[None])[0], q)
    jacobian = torch.autograd.functional.jacobian(lambda v: rotation_trick(v[None], q[None])[0], x)
    # The gradient flows through a scaled rotation M with M x = q and M^T M = (|q|/|x|)^2 I.
    torch.testing.assert_close(jacobian @ x, q, atol=1e-5, rtol=1e-5)
    scale2 = (q.norm() / x.norm()) ** 2
    torch.testing.assert_close(jacobian.T @ jacobian, scale2 * torch.eye(6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_losses_move_codebooks_and_encoder_separately(gradient):
    quantizer = hierarchical_quantizer(gradient)
    x = torch.randn(8, 6, requires_grad=True)
    out = quantizer(x)
    out.codebook_loss.backward(retain_graph=True)
    assert x.grad is None and quantizer.codebooks.grad.abs().sum() > 0
    quantizer.codebooks.grad = None
    out.commitment_loss.backward()
    assert x.grad.abs().sum() > 0 and quantizer.codebooks.grad is None


def clustered_data(n_clusters: int = 16, per_cluster: int = 40, dim: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(n_clusters, dim, generator=generator) * 5
    return (centres[:, None] + 0.1 * torch.randn(n_clusters, per_cluster, dim, generator=generator)).reshape(-1, dim)


def test_kmeans_initialisation_lowers_quantisation_error():
    x = clustered_data()
    errors = {}
    for init in ("random", "kmeans"):
        torch.manual_seed(0)
        quantizer = ResidualQuantizer(1, 16, 8, init=init)
        if init == "kmeans":
            quantizer.initialise(x, torch.Generator().manual_seed(0))
        errors[init] = (quantizer(x).quantized - x).pow(2).mean().item()
    assert errors["kmeans"] < 0.1 * errors["random"]


def test_kmeans_recovers_well_separated_clusters():
    x = clustered_data(n_clusters=5, per_cluster=30)
    centroids = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    true_centres = x.reshape(5, 30, -1).mean(1)
    nearest = torch.cdist(true_centres, centroids).min(1).values
    assert nearest.max() < 0.1


def test_uninitialised_kmeans_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="initialise"):
        ResidualQuantizer(2, 4, 3, init="kmeans")(torch.randn(2, 3))


def test_dead_codes_are_reset_and_come_back_into_use():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    quantizer = ResidualQuantizer(1, 8, 4, init="random", dead_code_steps=3)
    with torch.no_grad():
        quantizer.codebooks[0, :4] = torch.randn(4, 4)
        quantizer.codebooks[0, 4:] = 1000.0  # far from every point: never chosen
    quantizer.train()
    for _ in range(3):
        out = quantizer(x)
    assert not torch.isin(torch.arange(4, 8), out.codes).any()
    live_codes = quantizer.codebooks[0, :4].detach().clone()
    assert quantizer.reset_dead_codes(out.level_residuals) == [4]
    assert torch.equal(quantizer.codebooks[0, :4], live_codes)  # only the dead codes move
    codes_after = quantizer(x).codes
    assert torch.isin(torch.arange(4, 8), codes_after).all()
    assert quantizer.steps_since_used[0, 4:].max() == 0
    # Nothing idle any more: a second reset changes nothing.
    assert quantizer.reset_dead_codes(quantizer(x).level_residuals) == [0]


def test_eval_mode_does_not_touch_usage_counters():
    quantizer = hierarchical_quantizer()
    quantizer.eval()
    quantizer(torch.randn(4, 6))
    assert quantizer.steps_since_used.sum() == 0
