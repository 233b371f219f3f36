"""Semi-amortized VAE (SA-VAE): the encoder's Gaussian refined by k steps of gradient ascent.

Y. Kim, S. Wiseman, A. C. Miller, D. Sontag and A. M. Rush, *Semi-Amortized Variational
Autoencoders*, ICML 2018. The encoder gives lambda_0 = (mean, logvar); then, at training and at
test time, lambda_{t+1} = lambda_t + alpha * clip(grad_lambda ELBO(lambda_t; x)). Training follows
their Algorithm 1: the decoder theta gets the partial derivative of ELBO(lambda_k; theta) (the
steps see a frozen copy of it), and the encoder phi gets the total derivative through the unrolled
steps (the graph of every step is kept: create_graph=True, second derivatives included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.config import ModelConfig
from training.distributions import DiagGaussian, GaussianMixture, bernoulli_log_prob
from training.model import BernoulliDecoder, GaussianEncoder
from training.objectives import _frozen, log_joint


def gaussian_elbo(
    decoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int = 1,
) -> torch.Tensor:
    """ELBO(N(mean, diag exp(logvar)); x) = E_q[log p(x|z)] - KL(q || N(0, I)): (B,).

    The expectation is a Monte Carlo estimate; the KL is in closed form (lower variance steps).
    """
    z = DiagGaussian(mean, logvar).rsample(num_samples)  # (n, B, D)
    reconstruction = bernoulli_log_prob(decoder(z), x).mean(0)  # (B,)
    kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum(-1)  # (B,)
    return reconstruction - kl


def refine(
    decoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    steps: int,
    step_size: float,
    clip: float,
    create_graph: bool = False,
    samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """k steps of gradient *ascent* on the ELBO over (mean, logvar), from the encoder's output.

    Each image's gradient (over mean and logvar together) is clipped to norm `clip` (0: off).
    With create_graph the steps stay differentiable with respect to the starting point.
    Returns the refined mean and logvar (B, D) and the ELBO estimate at the start (B,), or None
    when steps is 0.
    """
    if not create_graph:
        mean, logvar = mean.detach().requires_grad_(), logvar.detach().requires_grad_()
    first = None
    with torch.enable_grad():
        for _ in range(steps):
            elbo = gaussian_elbo(decoder, x, mean, logvar, samples)  # (B,)
            if first is None:
                first = elbo.detach()
            # Images are independent: the gradient of the sum is each image's own gradient.
            g_mean, g_logvar = torch.autograd.grad(
                elbo.sum(), (mean, logvar), create_graph=create_graph
            )
            if clip > 0:
                norm = torch.cat([g_mean, g_logvar], dim=-1).norm(dim=-1, keepdim=True)  # (B, 1)
                scale = (clip / norm.clamp_min(1e-12)).clamp(max=1.0)
                g_mean, g_logvar = g_mean * scale, g_logvar * scale
            mean = mean + step_size * g_mean
            logvar = logvar + step_size * g_logvar
            if not create_graph:
                mean, logvar = mean.detach().requires_grad_(), logvar.detach().requires_grad_()
    if not create_graph:
        mean, logvar = mean.detach(), logvar.detach()
    return mean, logvar, first


class SAVAE(nn.Module):
    """One Gaussian encoder, the shared Bernoulli decoder, and k refinement steps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.mixture_order = 1
        self.cfg = cfg
        self.encoder = GaussianEncoder(cfg, amortized_eps=False, eps_init=cfg.eps_init)
        self.decoder = BernoulliDecoder(cfg)

    # The trainer's RecMix schedule does not apply: one component, always active.
    num_active = 1

    def set_active(self, m: int) -> None:
        pass

    def encode_amortized(self, x: torch.Tensor) -> DiagGaussian:
        """The encoder's Gaussian before refinement."""
        mean, logvar, _ = self.encoder(x)
        return DiagGaussian(mean, logvar)

    def encode(self, x: torch.Tensor) -> GaussianMixture:
        """The refined Gaussian, as a mixture of one; the k steps run even under torch.no_grad."""
        q0 = self.encode_amortized(x)
        c = self.cfg
        mean, logvar, _ = refine(
            self.decoder, x, q0.mean, q0.logvar, c.savae_steps, c.savae_step_size, c.savae_clip
        )
        return GaussianMixture(
            mean.unsqueeze(1), logvar.unsqueeze(1), mean.new_zeros(mean.shape[0], 1)
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-ELBO(lambda_k): theta by its partial derivative, phi through the unrolled steps."""
        q0 = self.encode_amortized(x)
        c = self.cfg
        mean, logvar, first = refine(
            _frozen(self.decoder),
            x,
            q0.mean,
            q0.logvar,
            c.savae_steps,
            c.savae_step_size,
            c.savae_clip,
            create_graph=True,
        )
        q = DiagGaussian(mean, logvar)
        z = q.rsample()  # (B, D)
        elbo = log_joint(self.decoder, x, z) - q.log_prob(z)  # (B,)
        stats = {"elbo": elbo.mean().detach()}
        if first is not None:
            stats["elbo_encoder"] = first.mean()
        return -elbo.mean(), stats
