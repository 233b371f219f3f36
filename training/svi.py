"""Per-instance stochastic variational inference (SVI), and the amortization gap it measures.

SVI: M. D. Hoffman, D. M. Blei, C. Wang and J. Paisley, *Stochastic Variational Inference*, JMLR
2013: the variational parameters of each image are optimized on their own, by gradient ascent on
that image's ELBO, with the decoder fixed. The amortization gap (C. Cremer, X. Li and D. Duvenaud,
*Inference Suboptimality in Variational Autoencoders*, ICML 2018) is ELBO(q*) - ELBO(q_phi): how
much ELBO the encoder leaves behind against the best member of its own family for that image.

The family of each method, and the parameters SVI optimizes, starting from the encoder's output:
  - VAE, ME, RecMix (and SA-VAE, a refined Gaussian): a mixture of diagonal Gaussians, every
    component's mean and log-variance and the mixture's weight logits;
  - IAF: the flow's base Gaussian and its context h, with the flow's weights shared and fixed.
`init="scratch"` instead optimizes one Gaussian starting from the prior N(0, I), whatever the
method: plain SVI, the reference of Fig. 3 of the authors' blog post.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from training.config import EvalConfig
from training.distributions import DiagGaussian, GaussianMixture
from training.iaf import IAFPosterior
from training.objectives import _frozen, log_joint, mixture_elbo_terms

ElboFn = Callable[[Sequence[torch.Tensor], int], torch.Tensor]


def optimize(
    elbo: ElboFn, params: Sequence[torch.Tensor], steps: int, lr: float, samples: int
) -> list[torch.Tensor]:
    """Adam ascent on sum_b ELBO_b over per-image parameters (leading dimension B).

    Adam's update is element-wise, so optimizing the sum optimizes every image on its own.
    """
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(-elbo(params, samples).sum(), params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
    return [p.detach() for p in params]


def mixture_elbo(decoder: Callable, x: torch.Tensor) -> ElboFn:
    """ELBO of a Gaussian mixture with parameters (mean, logvar (B, M, D), weight logits (B, M)).

    Stratified: n samples from every component, each weighted by w_m (as the training objective).
    """

    def elbo(params: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        mean, logvar, logits = params
        mix = GaussianMixture(mean, logvar, torch.log_softmax(logits, dim=-1))
        z = mix.stratified_rsample(n).transpose(1, 2)  # (n, M, B, D)
        return mixture_elbo_terms(mix, log_joint(decoder, x, z), z)  # (B,)

    return elbo


def iaf_elbo(decoder: Callable, x: torch.Tensor, flow: torch.nn.Module) -> ElboFn:
    """ELBO of the IAF posterior with parameters (base mean, base logvar (B, D), context (B, C))."""

    def elbo(params: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        mean, logvar, context = params
        z, log_q = IAFPosterior(DiagGaussian(mean, logvar), context, flow).rsample(n)
        return (log_joint(decoder, x, z) - log_q).mean(0)  # (B,)

    return elbo


@torch.no_grad()
def mean_elbo(elbo: ElboFn, params: Sequence[torch.Tensor], n: int, chunk: int) -> torch.Tensor:
    """The ELBO estimated with n samples, drawn `chunk` at a time to bound memory: (B,)."""
    total = 0.0
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        total = total + elbo(params, c) * (c / n)
    return total  # type: ignore[return-value]


def family(model: torch.nn.Module, x: torch.Tensor) -> tuple[ElboFn, list[torch.Tensor]]:
    """The ELBO function of the model's posterior family and the encoder's parameters for x."""
    with torch.no_grad():
        posterior = model.encode(x)
    decoder = _frozen(model.decoder)
    if isinstance(posterior, GaussianMixture):
        c = posterior.components
        return mixture_elbo(decoder, x), [c.mean, c.logvar, posterior.log_weights]
    if isinstance(posterior, IAFPosterior):
        b = posterior.base
        flow = _frozen(model.flow)
        return iaf_elbo(decoder, x, flow), [b.mean, b.logvar, posterior.context]
    raise TypeError(f"no SVI family for the posterior {type(posterior).__name__}")


def amortization_gap(
    model: torch.nn.Module,
    x: torch.Tensor,
    steps: int = 500,
    lr: float = 1e-2,
    samples: int = 4,
    eval_samples: int = 500,
    init: str = "encoder",
    seed: int = 0,
    chunk_rows: int = 65536,
) -> dict[str, torch.Tensor]:
    """Per image: the encoder's ELBO, the ELBO after SVI, and the gap between them: (B,) each.

    Both ELBOs are estimated with `eval_samples` samples and the same random numbers, so their
    difference has little noise.
    """
    elbo_fn, params = family(model, x)
    if init == "encoder":
        svi_fn, start = elbo_fn, params
    elif init == "scratch":
        B, D = x.shape[0], model.cfg.latent_dim
        svi_fn = mixture_elbo(_frozen(model.decoder), x)
        start = [x.new_zeros(B, 1, D), x.new_zeros(B, 1, D), x.new_zeros(B, 1)]
    else:
        raise ValueError(f"unknown SVI init {init!r}: use encoder or scratch")
    optimized = optimize(svi_fn, start, steps, lr, samples)
    rows_per_sample = x.shape[0] * params[0].shape[1] if params[0].dim() == 3 else x.shape[0]
    chunk = max(1, chunk_rows // rows_per_sample)
    torch.manual_seed(seed)
    encoder_elbo = mean_elbo(elbo_fn, params, eval_samples, chunk)
    torch.manual_seed(seed)
    svi_elbo = mean_elbo(svi_fn, optimized, eval_samples, chunk)
    return {"encoder_elbo": encoder_elbo, "svi_elbo": svi_elbo, "gap": svi_elbo - encoder_elbo}


def gap_summary(model: torch.nn.Module, x: torch.Tensor, cfg: EvalConfig) -> dict[str, Any]:
    """Means over the images x of the encoder's ELBO, the ELBO after SVI and their gap."""
    sums = {"encoder_elbo": 0.0, "svi_elbo": 0.0, "gap": 0.0}
    negative = 0
    for i in range(0, len(x), cfg.batch_size):
        r = amortization_gap(
            model,
            x[i : i + cfg.batch_size],
            steps=cfg.svi_steps,
            lr=cfg.svi_lr,
            samples=cfg.svi_samples,
            eval_samples=cfg.svi_eval_samples,
            init=cfg.svi_init,
            seed=cfg.seed,
            chunk_rows=cfg.chunk_rows,
        )
        for k in sums:
            sums[k] += r[k].sum().item()
        negative += int((r["gap"] < 0).sum())
    n = len(x)
    return {
        "gap_encoder_elbo": sums["encoder_elbo"] / n,
        "gap_svi_elbo": sums["svi_elbo"] / n,
        "amortization_gap": sums["gap"] / n,
        "gap_images": n,
        "gap_images_negative": negative,
        "svi_init": cfg.svi_init,
        "svi_steps": cfg.svi_steps,
    }
