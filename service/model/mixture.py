"""The mixture posterior and its densities, in log space, in numpy (and the weight recursion
for numpy and torch alike).

RecMix (Kim & Pavlovic, *Recursive Inference for Variational Autoencoders*, NeurIPS 2020): the
posterior is ``Q(z|x) = sum_m w_m(x) N(z; mu_m(x), diag sigma_m^2(x))``, with weights from the
recursion ``Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m``. ``log p(x)`` is estimated by importance
sampling with the mixture as proposal, stratified: ``n_m`` samples from component m (see
:mod:`service.model.likelihood`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.model.manifest import WeightSpec

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------- mixture weights


def recursive_log_weights(log_eps: Any, log_keep: Any, xp: Any) -> Any:
    """log w_m = log eps_m + sum_{j>m} log(1 - eps_j), with eps_1 = 1, over the last axis.

    ``log_eps`` and ``log_keep`` are log eps_m and log(1 - eps_m), ``(..., M)``; ``xp`` is the
    array module they belong to (numpy, or torch for training and the ONNX export: the loop over
    the small M unrolls into a handful of graph nodes). Only additions, so gradients flow. The
    weights sum to 1.
    """
    num_components = log_eps.shape[-1]
    tail = xp.zeros_like(log_eps[..., 0])
    columns = []
    for m in range(num_components - 1, -1, -1):
        head = log_eps[..., m] if m > 0 else xp.zeros_like(tail)  # eps_1 = 1: log eps_1 = 0
        columns.append(head + tail)
        tail = tail + log_keep[..., m]
    return xp.stack(columns[::-1], -1)


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log(sigmoid(x)) = -softplus(-x), stable for |x| up to the float range."""
    return -np.logaddexp(0.0, -x)


def log_weights(weights: WeightSpec, M: int, eps_logits: np.ndarray | None = None) -> np.ndarray:
    """A manifest's log mixture weights, ``(M,)``, or ``(batch, M)`` for amortized epsilon.

    ``eps_logits`` is the encoders' ``eps_logit`` outputs stacked to ``(batch, M)``; it is needed
    for ``epsilon="amortized"`` and ignored otherwise. The first component's logit never matters.
    """
    if weights.form == "single":
        if M != 1:
            raise ValueError("weights form 'single' needs M = 1")
        return np.zeros(1, dtype=np.float64)
    if weights.form == "softmax":
        logits = np.asarray(weights.logits, dtype=np.float64)
        if logits.shape != (M,):
            raise ValueError(f"softmax weights need {M} logits, got shape {logits.shape}")
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())
    if weights.epsilon == "amortized":
        if eps_logits is None:
            raise ValueError("amortized epsilon needs the encoders' eps_logits")
        logits = np.asarray(eps_logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != M:
            raise ValueError(f"eps_logits must have shape (batch, {M}), got {logits.shape}")
    else:
        logits = np.asarray(weights.eps_logits, dtype=np.float64)
        if logits.shape != (M,):
            raise ValueError(f"global epsilon needs {M} logits, got shape {logits.shape}")
    return recursive_log_weights(log_sigmoid(logits), log_sigmoid(-logits), np)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- densities


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return np.squeeze(peak, axis) + np.log(np.sum(np.exp(a - peak), axis=axis))


def log_normal_diag(z: np.ndarray, mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """log N(z; mean, diag exp(logvar)), summed over the last axis."""
    return -0.5 * np.sum(_LOG_2PI + logvar + (z - mean) ** 2 * np.exp(-logvar), axis=-1)


def log_standard_normal(z: np.ndarray) -> np.ndarray:
    """log N(z; 0, I), summed over the last axis."""
    return -0.5 * np.sum(_LOG_2PI + z**2, axis=-1)


def bernoulli_log_prob(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """log Bernoulli(x; sigmoid(logits)) summed over the last axis: x*l - softplus(l), stable."""
    return np.sum(x * logits - np.logaddexp(0.0, logits), axis=-1)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


def stratified_counts(num_samples: int, num_components: int) -> np.ndarray:
    """Samples per component: S split as evenly as possible, every component at least one."""
    base, extra = divmod(num_samples, num_components)
    return np.array([base + (m < extra) for m in range(num_components)], dtype=np.int64)


@dataclass(frozen=True)
class Posterior:
    """The mixture posterior of a batch: means and log-variances (B, M, D), log-weights (B, M)."""

    means: np.ndarray
    logvars: np.ndarray
    log_weights: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        return np.exp(self.log_weights)

    @property
    def variances(self) -> np.ndarray:
        return np.exp(self.logvars.astype(np.float64))

    def mixture_mean(self) -> np.ndarray:
        """sum_m w_m mu_m, (B, D)."""
        return np.einsum("bm,bmd->bd", self.weights, self.means.astype(np.float64))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n draws per input: z (B, n, D) and the 0-based component of each (B, n)."""
        batch, num_components, _ = self.means.shape
        cdf = np.cumsum(self.weights, axis=1)  # (B, M)
        u = rng.random((batch, n)) * cdf[:, -1:]  # scaled so rounding never leaves the last bin
        components = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(-1), num_components - 1)
        return self.draw(components, rng), components

    def draw(self, components: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """z_bs ~ q_{components[b, s]}(z | x_b), reparameterized, (B, S, D) float64."""
        rows = np.arange(components.shape[0])[:, None]
        mean = self.means[rows, components].astype(np.float64)  # (B, S, D)
        std = np.exp(0.5 * self.logvars[rows, components].astype(np.float64))
        return mean + std * rng.standard_normal(mean.shape)

    def log_density(self, z: np.ndarray) -> np.ndarray:
        """log Q(z|x) = logsumexp_m[log w_m + log q_m(z|x)] for z (B, S, D), giving (B, S)."""
        means = self.means.astype(np.float64)
        logvars = self.logvars.astype(np.float64)
        per_component = np.stack(
            [
                log_normal_diag(z, means[:, m, None, :], logvars[:, m, None, :])
                for m in range(means.shape[1])
            ],
            axis=-1,
        )  # (B, S, M)
        return logsumexp(self.log_weights[:, None, :] + per_component, axis=-1)

    def __getitem__(self, index: slice) -> Posterior:
        return Posterior(self.means[index], self.logvars[index], self.log_weights[index])
