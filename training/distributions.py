"""Distributions used by the RecMix VAE, written as objects with `log_prob` and `rsample`.

Kim & Pavlovic, *Recursive Inference for Variational Autoencoders*, NeurIPS 2020: the posterior is
a mixture Q(z|x) = sum_m w_m(x) q_m(z|x) of diagonal Gaussians whose weights follow the recursion
Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m. Everything here works in log space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.model import mixture

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class DiagGaussian:
    """N(mean, diag(exp(logvar))) over the last dimension; leading dimensions are batch dimensions."""

    mean: torch.Tensor  # (..., D)
    logvar: torch.Tensor  # (..., D)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def rsample(self, n: int | None = None) -> torch.Tensor:
        """Reparameterized samples: (..., D), or (n, ..., D) when n is given."""
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        eps = torch.randn(shape, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mean, var) summed over D; z broadcasts against the batch shape."""
        return -0.5 * (LOG_2PI + self.logvar + (z - self.mean) ** 2 * torch.exp(-self.logvar)).sum(
            -1
        )

    def detach(self) -> DiagGaussian:
        return DiagGaussian(self.mean.detach(), self.logvar.detach())


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(logits)) summed over all pixels: x*l - softplus(l), stable for any l."""
    return (
        -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        .flatten(start_dim=logits.dim() - x.dim() + 1)
        .sum(-1)
    )


def recursive_log_weights(eps_logits: torch.Tensor) -> torch.Tensor:
    """Log mixture weights of the recursion Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m.

    eps_logits: (..., M), the logit of eps_m; eps_1 is fixed to 1 whatever its logit.
    Returns (..., M): log w_m = log eps_m + sum_{j>m} log(1 - eps_j), by the one formula the
    service and the export share (:func:`service.model.mixture.recursive_log_weights`).
    """
    return mixture.recursive_log_weights(F.logsigmoid(eps_logits), F.logsigmoid(-eps_logits), torch)


class GaussianMixture:
    """Q(z|x) = sum_m w_m N(z; mean_m, diag var_m) for a batch of inputs.

    mean, logvar: (B, M, D); log_weights: (B, M), normalized (logsumexp over M is 0).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, log_weights: torch.Tensor):
        self.components = DiagGaussian(mean, logvar)
        self.log_weights = log_weights

    @property
    def order(self) -> int:
        return self.log_weights.shape[-1]

    def component_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """log q_m(z) for every component: z (..., B, D) -> (..., B, M)."""
        return self.components.log_prob(z.unsqueeze(-2))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log Q(z|x) = logsumexp_m [log w_m + log q_m(z)]: z (..., B, D) -> (..., B)."""
        return torch.logsumexp(self.log_weights + self.component_log_probs(z), dim=-1)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples: component index k ~ w, then z ~ q_k. Returns z (n, B, D), k (n, B)."""
        B, M, D = self.components.mean.shape
        k = torch.distributions.Categorical(logits=self.log_weights).sample((n,))  # (n, B)
        idx = k.unsqueeze(-1).unsqueeze(-1).expand(n, B, 1, D)
        mean = torch.gather(self.components.mean.expand(n, B, M, D), 2, idx).squeeze(2)
        logvar = torch.gather(self.components.logvar.expand(n, B, M, D), 2, idx).squeeze(2)
        z = DiagGaussian(mean, logvar).rsample()
        return z, k

    def stratified_rsample(self, n_per_component: int) -> torch.Tensor:
        """n samples from every component: (n, B, M, D), reparameterized."""
        return self.components.rsample(n_per_component)

    def mean(self) -> torch.Tensor:
        """The mixture's mean sum_m w_m mean_m: (B, D)."""
        return (self.log_weights.exp().unsqueeze(-1) * self.components.mean).sum(-2)
