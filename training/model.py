"""The VAE with a recursive mixture of amortized encoders (RecMix).

Kim & Pavlovic, *Recursive Inference for Variational Autoencoders*, NeurIPS 2020. Read from the
smallest part up: an MLP, one Gaussian encoder component, the Bernoulli decoder, then the model
holding M components whose weights follow Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m.
A plain VAE is the case M = 1; ME (a mixture of encoders trained jointly) shares this model and
differs only in how it is trained (see `objectives.py`).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from training.config import ModelConfig
from training.distributions import DiagGaussian, GaussianMixture, recursive_log_weights

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with `activation` between them (none after the last), Kaiming-uniform init."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(a, b)
        nonlinearity = "relu" if activation in ("relu", "elu", "softplus") else "tanh"
        nn.init.kaiming_uniform_(linear.weight, nonlinearity=nonlinearity)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """One component q_m(z|x) = N(mean(x), diag exp(logvar(x))), optionally with an eps_m(x) head."""

    def __init__(self, cfg: ModelConfig, amortized_eps: bool, eps_init: float):
        super().__init__()
        in_dim = math.prod(cfg.image_shape)
        hidden = list(cfg.encoder_hidden)
        self.trunk = nn.Sequential(
            mlp([in_dim, *hidden], cfg.activation), ACTIVATIONS[cfg.activation]()
        )
        self.head = nn.Linear(hidden[-1], 2 * cfg.latent_dim)
        nn.init.kaiming_uniform_(self.head.weight, nonlinearity="linear")
        nn.init.zeros_(self.head.bias)
        self.eps_head: nn.Linear | None = None
        if amortized_eps:
            # Starts at eps_init for every input; trained by the mixture ELBO only (see objectives).
            self.eps_head = nn.Linear(hidden[-1], 1)
            nn.init.zeros_(self.eps_head.weight)
            nn.init.constant_(self.eps_head.bias, math.log(eps_init / (1.0 - eps_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.trunk(x.flatten(1))  # (B, H)
        mean, logvar = self.head(h).chunk(2, dim=-1)  # (B, D) each
        eps_logit = None
        if self.eps_head is not None:
            # The weight head reads the features without moving them: the component's encoder is
            # trained by its own criterion, the weights by the mixture ELBO.
            eps_logit = self.eps_head(h.detach()).squeeze(-1)  # (B,)
        return mean, logvar, eps_logit


class BernoulliDecoder(nn.Module):
    """p_theta(x|z): Bernoulli pixels with logits f_theta(z)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        self.net = mlp(
            [cfg.latent_dim, *cfg.decoder_hidden, math.prod(cfg.image_shape)], cfg.activation
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> logits (..., C, H, W)."""
        return self.net(z).unflatten(-1, self.image_shape)


class RecMixVAE(nn.Module):
    """Decoder plus M encoder components; `active` of them currently form the mixture."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.method == "vae":
            cfg.mixture_order = 1
        self.cfg = cfg
        M = cfg.mixture_order
        amortized = cfg.eps_mode == "amortized" and M > 1
        # ME starts from equal weights (eps_m = 1/m); RecMix gives a joining component eps_init.
        init = [1.0 / (m + 1) for m in range(M)] if cfg.method == "me" else [cfg.eps_init] * M
        self.encoders = nn.ModuleList(GaussianEncoder(cfg, amortized, init[m]) for m in range(M))
        self.decoder = BernoulliDecoder(cfg)
        logits = torch.tensor([math.log(p / (1.0 - p)) if p < 1 else 0.0 for p in init])
        logits[0] = 0.0  # eps_1 is fixed to 1; its logit is unused.
        self.eps_logits = nn.Parameter(logits, requires_grad=not amortized and M > 1)
        # Number of components in the mixture now (the RecMix schedule grows it); saved with the model.
        self.register_buffer("active", torch.tensor(M if cfg.method != "recmix" else 1))

    @property
    def amortized(self) -> bool:
        return self.encoders[0].eps_head is not None

    @property
    def num_active(self) -> int:
        return int(self.active)

    def set_active(self, m: int) -> None:
        self.active.fill_(max(1, min(m, self.cfg.mixture_order)))

    def encode_components(
        self, x: torch.Tensor, m: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means (B, m, D), log-variances (B, m, D) and eps logits (B, m) of the first m components."""
        m = self.num_active if m is None else m
        outs = [enc(x) for enc in self.encoders[:m]]
        mean = torch.stack([o[0] for o in outs], dim=1)  # (B, m, D)
        logvar = torch.stack([o[1] for o in outs], dim=1)  # (B, m, D)
        if self.amortized:
            eps_logits = torch.stack([o[2] for o in outs], dim=1)  # (B, m)
        else:
            eps_logits = self.eps_logits[:m].expand(x.shape[0], m)  # (B, m)
        return mean, logvar, eps_logits

    def encode(self, x: torch.Tensor, m: int | None = None) -> GaussianMixture:
        """Q(z|x) over the first m (default: the active) components."""
        mean, logvar, eps_logits = self.encode_components(x, m)
        return GaussianMixture(mean, logvar, recursive_log_weights(eps_logits))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @staticmethod
    def reparameterize(q: DiagGaussian) -> torch.Tensor:
        return q.rsample()
