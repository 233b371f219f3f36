"""The math of the training core: weights, mixture density, KL estimator, importance sampling."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_tiny_model
from training.distributions import (
    DiagGaussian,
    GaussianMixture,
    bernoulli_log_prob,
    recursive_log_weights,
)
from training.objectives import importance_sampled_loglik, log_joint, training_loss


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 1e4])
def test_recursive_weights_sum_to_one_for_any_eps(scale):
    torch.manual_seed(0)
    logits = torch.randn(64, 5, dtype=torch.float64) * scale
    log_w = recursive_log_weights(logits)
    assert torch.isfinite(log_w).all()
    assert torch.allclose(log_w.exp().sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-10)


def test_recursive_weights_match_the_recursion():
    eps = torch.tensor([0.7, 0.2, 0.5, 0.1], dtype=torch.float64)  # eps_1 ignored (fixed to 1)
    log_w = recursive_log_weights(torch.logit(eps))
    # Q_1 = q_1; Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m, expanded by hand.
    w = torch.tensor([1.0])
    for m in range(1, 4):
        w = torch.cat([w * (1 - eps[m]), eps[m : m + 1]])
    assert torch.allclose(log_w.exp(), w.double(), atol=1e-12)


def test_mixture_log_prob_equals_brute_force():
    torch.manual_seed(1)
    B, M, D = 3, 4, 2
    mean, logvar = torch.randn(B, M, D), torch.randn(B, M, D)
    log_w = torch.log_softmax(torch.randn(B, M), -1)
    z = torch.randn(7, B, D)
    mix = GaussianMixture(mean, logvar, log_w)
    brute = torch.zeros(7, B)
    for s in range(7):
        for b in range(B):
            total = 0.0
            for m in range(M):
                var = logvar[b, m].exp()
                dens = torch.exp(-0.5 * (z[s, b] - mean[b, m]) ** 2 / var) / torch.sqrt(
                    2 * math.pi * var
                )
                total += log_w[b, m].exp() * dens.prod()
            brute[s, b] = torch.log(total)
    assert torch.allclose(mix.log_prob(z), brute, atol=1e-5)


def test_kl_estimator_converges_to_closed_form():
    """Monte Carlo log q(z) - log Q(z), z ~ q, against KL of two Gaussians in closed form."""
    torch.manual_seed(2)
    q = DiagGaussian(torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.5]))
    p = DiagGaussian(torch.tensor([-0.3, 0.4]), torch.tensor([-0.1, 0.3]))
    z = q.rsample(400_000)
    mc = (
        q.log_prob(z)
        - GaussianMixture(p.mean[None, None], p.logvar[None, None], torch.zeros(1, 1)).log_prob(
            z[:, None]
        )[:, 0]
    ).mean()
    var_q, var_p = q.logvar.exp(), p.logvar.exp()
    closed = 0.5 * (p.logvar - q.logvar + (var_q + (q.mean - p.mean) ** 2) / var_p - 1).sum()
    assert abs(mc.item() - closed.item()) < 0.01


def _model(method="recmix", M=3):
    return make_tiny_model(method, M, seed=3)


def test_importance_sampling_with_one_sample_is_the_single_sample_elbo():
    model = _model("vae", 1)
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3))
    torch.manual_seed(10)
    ll, elbo = importance_sampled_loglik(model, x, 1, "stratified")
    torch.manual_seed(10)
    q = model.encode(x).components
    z = q.rsample(1).transpose(1, 2)  # same draw as the estimator: (1, M, B, D)
    single = (
        log_joint(model.decoder, x, z) - q.log_prob(z.squeeze(0).unsqueeze(-2)).squeeze(-1)[None]
    )[0, 0]
    assert torch.allclose(ll, single, atol=1e-4)
    assert torch.allclose(elbo, single, atol=1e-4)
    torch.manual_seed(11)
    ll_m, elbo_m = importance_sampled_loglik(_model("recmix", 3), x, 1, "mixture")
    assert torch.allclose(ll_m, elbo_m)


@pytest.mark.parametrize("sampling", ["stratified", "mixture"])
def test_importance_sampled_estimate_is_on_average_at_least_the_elbo(sampling):
    model = _model("recmix", 3)
    x = torch.bernoulli(torch.full((20, 1, 28, 28), 0.2))
    torch.manual_seed(4)
    ll, elbo = importance_sampled_loglik(model, x, 600, sampling, chunk_rows=1000)
    assert (ll.mean() - elbo.mean()).item() > 0.0
    # More samples: the bound tightens (on average over images).
    ll_small, _ = importance_sampled_loglik(model, x, 6, sampling)
    assert ll.mean() > ll_small.mean()


def test_chunking_does_not_change_the_estimate():
    model = _model("recmix", 3)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))
    torch.manual_seed(5)
    a = importance_sampled_loglik(model, x, 90, "stratified", chunk_rows=10**6)
    torch.manual_seed(5)
    b = importance_sampled_loglik(model, x, 90, "stratified", chunk_rows=13)
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)


def test_log_space_stays_finite_for_extreme_inputs():
    logits = torch.tensor([[-1e4, 1e4, 0.0, 80.0, -80.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    lp = bernoulli_log_prob(logits, x)
    assert torch.isfinite(lp).all() and lp.item() < -1e4
    mix = GaussianMixture(
        torch.zeros(1, 2, 2),
        torch.tensor([[[-30.0, -30.0], [30.0, 30.0]]]),
        torch.log(torch.tensor([[0.5, 0.5]])),
    )
    far = torch.full((1, 2), 1e6)
    assert torch.isfinite(mix.log_prob(far)).all()
    assert torch.isfinite(recursive_log_weights(torch.tensor([[0.0, 1e6, -1e6]]))).all()


@pytest.mark.parametrize("kl_form", ["bounded", "clipped"])
def test_recmix_criterion_stays_finite_over_hundreds_of_steps(kl_form, mnist_test_images):
    torch.manual_seed(6)
    model = _model("recmix", 3)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = mnist_test_images
    for step in range(300):
        x = data[torch.randint(0, len(data), (32,))]
        loss, stats = training_loss(model, x, "recmix", lam=0.5, kl_form=kl_form)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"step {step}: {stats}"
    means = model.encode(data[:64]).components.mean
    assert means.abs().max() < 100


def test_recmix_routes_gradients_to_the_right_parts():
    """Decoder: mixture ELBO only; component 2: its own criterion only."""
    model = _model("recmix", 2)
    model.train()
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3))
    torch.manual_seed(7)
    loss, _ = training_loss(model, x, "recmix")
    loss.backward()
    assert model.eps_logits.grad is not None and model.eps_logits.grad[1] != 0
    for enc in model.encoders:
        assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.decoder.parameters())
