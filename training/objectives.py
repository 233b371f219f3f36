"""Objectives: component ELBO, mixture ELBO, the RecMix component criterion, and the
importance-sampled log-likelihood (Kim & Pavlovic, NeurIPS 2020; see RECMIX.md for the derivation).

RecMix routes gradients so that each part of the model gets exactly its own objective:
  - the decoder theta and the mixing weights: the mixture ELBO
      L(Q; x) = sum_m w_m E_{q_m}[log p(x, z) - log Q(z|x)], components held fixed;
  - component 1: its own ELBO; component m > 1: J = ELBO(q_m) + lam * KL(q_m || Q),
      with the decoder, the weights and the earlier components held fixed.
ME trains everything jointly by the mixture ELBO; the VAE is ME with M = 1.
The baselines SA-VAE and IAF bring their own objectives (savae.py, iaf.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from training.distributions import (
    DiagGaussian,
    GaussianMixture,
    bernoulli_log_prob,
    recursive_log_weights,
    standard_normal_log_prob,
)
from training.model import RecMixVAE


def log_joint(decoder: torch.nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x, z) = log p(x|z) + log p(z): x (B, C, H, W), z (..., B, D) -> (..., B)."""
    return bernoulli_log_prob(decoder(z), x) + standard_normal_log_prob(z)


def _frozen(module: torch.nn.Module):
    """The module as a function whose parameters get no gradient (inputs still do)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return lambda *args: functional_call(module, params, args)


def component_elbo(model: RecMixVAE, x: torch.Tensor, m: int) -> torch.Tensor:
    """Single-sample estimate of ELBO(q_m; x): (B,)."""
    mean, logvar, _ = model.encode_components(x, m + 1)
    q = DiagGaussian(mean[:, m], logvar[:, m])
    z = q.rsample()  # (B, D)
    return log_joint(model.decoder, x, z) - q.log_prob(z)


def mixture_elbo_terms(mix: GaussianMixture, log_p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Stratified mixture ELBO from z (n, M, B, D) with log p(x, z) (n, M, B): returns (B,)."""
    lw = log_p - mix.log_prob(z)  # (n, M, B)
    return (mix.log_weights.T.exp() * lw.mean(0)).sum(0)


def training_loss(
    model: RecMixVAE,
    x: torch.Tensor,
    method: str,
    lam: float = 0.5,
    kl_form: str = "bounded",
    kl_clip: float = 10.0,
    refine: str = "own",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one mini-batch (to minimize) and its statistics (detached scalars)."""
    if method in ("savae", "iaf"):
        return model.training_loss(x)  # savae.py, iaf.py
    m = model.num_active
    mean, logvar, eps_logits = model.encode_components(x, m)  # (B, m, D), (B, m, D), (B, m)
    log_w = recursive_log_weights(eps_logits)  # (B, m)
    q = DiagGaussian(mean, logvar)
    z = q.rsample().transpose(0, 1)  # (m, B, D): one reparameterized sample per component
    stats: dict[str, torch.Tensor] = {}

    if method in ("vae", "me") or (m == 1 and method != "recmix"):
        mix = GaussianMixture(mean, logvar, log_w)
        elbo = mixture_elbo_terms(mix, log_joint(model.decoder, x, z).unsqueeze(0), z.unsqueeze(0))
        stats["elbo"] = elbo.mean().detach()
        return -elbo.mean(), stats
    if method != "recmix":
        raise ValueError(f"unknown method {method!r}")

    # (a) Decoder and weights by the mixture ELBO, components (and their samples) held fixed,
    # unless refine == "joint", where the components follow the mixture ELBO too.
    if refine == "joint":
        z_fixed, mix_fixed = z, GaussianMixture(mean, logvar, log_w)
    else:
        z_fixed = z.detach()
        mix_fixed = GaussianMixture(mean.detach(), logvar.detach(), log_w)
    mix_elbo = mixture_elbo_terms(
        mix_fixed, log_joint(model.decoder, x, z_fixed).unsqueeze(0), z_fixed.unsqueeze(0)
    )  # (B,)

    # (b) Each component by its own criterion, decoder and weights held fixed.
    log_p = log_joint(_frozen(model.decoder), x, z)  # (m, B)
    own = q.log_prob(z.transpose(0, 1)).T  # (m, B): log q_j(z_j)
    others = DiagGaussian(mean.detach(), logvar.detach()).log_prob(z.unsqueeze(-2))  # (m, B, m)
    eps_fixed = eps_logits.detach()
    criterion = log_p[0] - own[0]  # component 1: its ELBO
    stats["elbo_q1"] = criterion.mean().detach()
    for j in range(1, m):
        elbo_j = log_p[j] - own[j]
        # log Q_{j-1}(z_j): the mixture of the earlier components, fixed.
        log_prev = torch.logsumexp(
            recursive_log_weights(eps_fixed[:, :j]) + others[j, :, :j], dim=-1
        )
        if kl_form == "bounded":
            # KL(q_j || Q_j), Q_j = (1 - eps_j) Q_{j-1} + eps_j q_j: at most log(1 / eps_j).
            log_q_new = torch.logaddexp(
                F.logsigmoid(-eps_fixed[:, j]) + log_prev, F.logsigmoid(eps_fixed[:, j]) + own[j]
            )
            kl = own[j] - log_q_new
        elif kl_form == "literal":
            kl = own[j] - log_prev
        elif kl_form == "clipped":
            kl = (own[j] - log_prev).clamp(-kl_clip, kl_clip)
        else:
            raise ValueError(f"unknown kl_form {kl_form!r}")
        criterion = criterion + elbo_j + lam * kl
        stats[f"elbo_q{j + 1}"] = elbo_j.mean().detach()
        stats[f"kl_q{j + 1}"] = kl.mean().detach()
    stats["elbo"] = mix_elbo.mean().detach()
    return -(mix_elbo.mean() + criterion.mean()), stats


@torch.no_grad()
def importance_sampled_loglik(
    model: RecMixVAE,
    x: torch.Tensor,
    num_samples: int,
    sampling: str = "stratified",
    chunk_rows: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) ~ log (1/S) sum_s p(x, z_s) / Q(z_s|x), and the ELBO from the same samples: (B,), (B,).

    stratified: S/M samples from every component, log p(x) ~ logsumexp_{m,s}[log w_m - log(S/M)
    + log p(x, z_ms) - log Q(z_ms|x)]; mixture: S ancestral samples from Q. Chunked over samples so
    at most `chunk_rows` decoder rows are in memory; every reduction is a logsumexp.
    """
    if hasattr(model, "importance_sampled_loglik"):
        return model.importance_sampled_loglik(x, num_samples, chunk_rows)  # a flow (iaf.py)
    mix = model.encode(x)
    B, M, _ = mix.components.mean.shape
    if sampling == "stratified":
        if num_samples % M:
            raise ValueError(f"stratified sampling needs S divisible by M={M}, got S={num_samples}")
        n = num_samples // M
        chunk = max(1, chunk_rows // (B * M))
        parts = []
        for start in range(0, n, chunk):
            z = mix.stratified_rsample(min(chunk, n - start)).transpose(1, 2)  # (c, M, B, D)
            parts.append(log_joint(model.decoder, x, z) - mix.log_prob(z))  # (c, M, B)
        lw = torch.cat(parts, dim=0)  # (n, M, B)
        log_w = mix.log_weights.T  # (M, B)
        ll = torch.logsumexp(lw + log_w - math.log(n), dim=(0, 1))
        elbo = (log_w.exp() * lw.mean(0)).sum(0)
        return ll, elbo
    if sampling == "mixture":
        chunk = max(1, chunk_rows // B)
        parts = []
        for start in range(0, num_samples, chunk):
            z, _ = mix.sample(min(chunk, num_samples - start))  # (c, B, D)
            parts.append(log_joint(model.decoder, x, z) - mix.log_prob(z))  # (c, B)
        lw = torch.cat(parts, dim=0)  # (S, B)
        return torch.logsumexp(lw, dim=0) - math.log(num_samples), lw.mean(0)
    raise ValueError(f"unknown sampling {sampling!r}")
