"""VAE whose posterior is the encoder's Gaussian followed by an inverse autoregressive flow (IAF).

D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever and M. Welling, *Improving
Variational Inference with Inverse Autoregressive Flow*, NeurIPS 2016. The encoder gives
(mean, logvar) and a context h; z_0 = mean + std * eps, then T steps, each a MADE-style masked
autoregressive network (Germain et al. 2015) with h added to its first hidden layer:
    [m_t, s_t] = AR_t(z_{t-1}, h),  sigma_t = sigmoid(s_t),
    z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t
(their numerically stable form, eq. 14). Output i depends on z_{<i} only, so the Jacobian is
triangular with diagonal sigma_t and log |det dz_t/dz_{t-1}| = sum_i log sigma_t,i; the order of
z is reversed between steps. log q(z_T|x) = log N(z_0; mean, var) - sum_t sum_i log sigma_t,i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig
from training.distributions import DiagGaussian
from training.model import ACTIVATIONS, BernoulliDecoder, GaussianEncoder
from training.objectives import log_joint

# s_t starts near +2, so sigma_t = sigmoid(s_t) is close to 1 and each step starts near the
# identity (the paper's advice: "sufficiently positive, close to +1 or +2").
SIGMA_BIAS_INIT = 2.0


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """(z, h) -> (m, s), where m_i and s_i depend on z_1..z_{i-1} and the context h only."""

    def __init__(self, dim: int, hidden: tuple[int, ...], context_dim: int, activation: str):
        super().__init__()
        d_in = torch.arange(1, dim + 1)  # degree of input i: i
        # Hidden degrees cycle through 1..D-1 (0 when D = 1: no input reaches them).
        d_hidden = [torch.arange(h) % max(1, dim - 1) + min(1, dim - 1) for h in hidden]
        layers: list[nn.Module] = []
        prev_size, prev_deg = dim, d_in
        for size, deg in zip(hidden, d_hidden, strict=True):
            layers.append(MaskedLinear(prev_size, size, deg[:, None] >= prev_deg[None, :]))
            prev_size, prev_deg = size, deg
        self.hidden = nn.ModuleList(layers)
        self.context = nn.Linear(context_dim, hidden[0])
        self.act = ACTIVATIONS[activation]()
        # Output i (for m and for s) sees hidden units of degree < i only: strictly autoregressive.
        out_mask = (d_in[:, None] > prev_deg[None, :]).repeat(2, 1)  # (2D, H)
        self.out = MaskedLinear(prev_size, 2 * dim, out_mask)
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias[dim:] = SIGMA_BIAS_INIT

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., B, D), h (B, C) -> m, s (..., B, D)."""
        a = self.act(self.hidden[0](z) + self.context(h))
        for layer in self.hidden[1:]:
            a = self.act(layer(a))
        m, s = self.out(a).chunk(2, dim=-1)
        return m, s


class IAFFlow(nn.Module):
    """T IAF steps; returns z_T and log |det dz_T/dz_0| = sum_t sum_i log sigma_t,i."""

    def __init__(self, dim: int, steps: int, hidden: tuple[int, ...], context_dim: int, act: str):
        super().__init__()
        self.steps = nn.ModuleList(MADE(dim, hidden, context_dim, act) for _ in range(steps))

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = z.new_zeros(z.shape[:-1])  # (..., B)
        for t, made in enumerate(self.steps):
            if t > 0:
                z = z.flip(-1)  # reverse the order between steps (a permutation: |det| = 1)
            m, s = made(z, h)
            sigma = torch.sigmoid(s)
            z = sigma * z + (1.0 - sigma) * m
            log_det = log_det + F.logsigmoid(s).sum(-1)
        return z, log_det


@dataclass
class IAFPosterior:
    """q(z|x): the encoder's Gaussian pushed through the flow with the encoder's context."""

    base: DiagGaussian  # (B, D)
    context: torch.Tensor  # (B, C)
    flow: IAFFlow

    def rsample(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized z_T (..., B, D) and log q(z_T|x) (..., B); n adds a leading dim."""
        z0 = self.base.rsample(n)
        z, log_det = self.flow(z0, self.context)
        return z, self.base.log_prob(z0) - log_det


class IAFVAE(nn.Module):
    """Gaussian encoder with a context head, T IAF steps, and the shared Bernoulli decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.mixture_order = 1
        self.cfg = cfg
        self.encoder = GaussianEncoder(cfg, amortized_eps=False, eps_init=cfg.eps_init)
        self.context_head = nn.Linear(cfg.encoder_hidden[-1], cfg.iaf_context_dim)
        self.flow = IAFFlow(
            cfg.latent_dim, cfg.iaf_steps, cfg.iaf_hidden, cfg.iaf_context_dim, cfg.activation
        )
        self.decoder = BernoulliDecoder(cfg)

    num_active = 1

    def set_active(self, m: int) -> None:
        pass

    def encode(self, x: torch.Tensor) -> IAFPosterior:
        h = self.encoder.trunk(x.flatten(1))  # (B, H)
        mean, logvar = self.encoder.head(h).chunk(2, dim=-1)  # (B, D) each
        return IAFPosterior(DiagGaussian(mean, logvar), self.context_head(h), self.flow)

    def infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What inference costs: the encoder, then one sample through every flow step."""
        return self.encode(x).rsample()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, log_q = self.encode(x).rsample()  # (B, D), (B,)
        elbo = log_joint(self.decoder, x, z) - log_q
        return -elbo.mean(), {"elbo": elbo.mean().detach()}

    @torch.no_grad()
    def importance_sampled_loglik(
        self, x: torch.Tensor, num_samples: int, chunk_rows: int = 65536
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x) ~ logsumexp_s [log p(x, z_s) - log q(z_s|x)] - log S with the flow's density,
        and the ELBO from the same samples: (B,), (B,)."""
        q = self.encode(x)
        chunk = max(1, chunk_rows // x.shape[0])
        parts = []
        for start in range(0, num_samples, chunk):
            z, log_q = q.rsample(min(chunk, num_samples - start))  # (c, B, D), (c, B)
            parts.append(log_joint(self.decoder, x, z) - log_q)  # (c, B)
        lw = torch.cat(parts, dim=0)  # (S, B)
        return torch.logsumexp(lw, dim=0) - math.log(num_samples), lw.mean(0)
