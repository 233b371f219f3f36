"""Importance-sampled ``log p(x)`` with the mixture posterior as proposal, and the mixture ELBO.

Stratified (RecMix, Kim & Pavlovic, NeurIPS 2020): ``n_m`` samples from component m,
``log p(x) ~= logsumexp_{m,s}[log w_m - log n_m + log p(x, z_ms) - log Q(z_ms|x)]``, and the
mixture ELBO ``sum_m w_m mean_s[log p(x, z_ms) - log Q(z_ms|x)]`` from the same samples.
Samples are decoded in chunks of about ``decode_batch_size`` rows, whatever S and the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.model.mixture import (
    Posterior,
    bernoulli_log_prob,
    log_standard_normal,
    logsumexp,
    stratified_counts,
)
from service.model.runner import ModelRunner


@dataclass(frozen=True)
class LogLikelihood:
    log_likelihood: np.ndarray  # (B,)
    elbo: np.ndarray  # (B,)
    num_samples: int


@dataclass(frozen=True)
class Estimate:
    """What to estimate: a preprocessed batch, its posterior, S, and the generator to draw with."""

    x: np.ndarray  # (B, C, H, W)
    posterior: Posterior
    num_samples: int
    rng: np.random.Generator


@dataclass
class _Item:
    """One input batch of a log-likelihood run and what is known of it before decoding."""

    posterior: Posterior
    rng: np.random.Generator
    num_samples: int
    counts: np.ndarray  # (M,) samples per component
    components: np.ndarray  # (S,) 0-based component of each sample, sorted
    starts: np.ndarray  # (M,) first sample of each component
    targets: np.ndarray  # (B, P) pixels in [0, 1], float64
    log_px: np.ndarray  # (B,) filled in as the decoder runs
    elbo: np.ndarray  # (B,)


def log_likelihoods(runner: ModelRunner, estimates: Sequence[Estimate]) -> list[LogLikelihood]:
    """log p(x) and the ELBO for several input batches, their samples sharing decoder calls.

    Inputs are taken a few at a time (about one decoder chunk of samples), so that at most
    about ``decode_batch_size`` decoder rows are in memory. Each input batch draws from its own
    generator, in input order, so the draws (and the answer) do not depend on what else shares
    the decoder calls.
    """
    num_components = runner.mixture_order
    low, high = runner.manifest.input.value_range
    items = []
    for est in estimates:
        runner.check_num_samples(est.num_samples)
        counts = stratified_counts(est.num_samples, num_components)
        batch = est.x.shape[0]
        items.append(
            _Item(
                posterior=est.posterior,
                rng=est.rng,
                num_samples=est.num_samples,
                counts=counts,
                components=np.repeat(np.arange(num_components), counts),
                starts=np.concatenate([[0], np.cumsum(counts)[:-1]]),
                targets=((est.x.astype(np.float64) - low) / (high - low)).reshape(batch, -1),
                log_px=np.empty(batch),
                elbo=np.empty(batch),
            )
        )
    chunk = runner.decode_batch_size
    pending: list[tuple[_Item, slice, np.ndarray]] = []
    pending_rows = 0
    with runner.timed("loglik"):
        for item in items:
            batch, num_samples = item.targets.shape[0], item.num_samples
            group = max(1, chunk // num_samples)
            for first in range(0, batch, group):
                part = slice(first, min(first + group, batch))
                rows = (part.stop - first) * num_samples
                if pending and pending_rows + rows > chunk:
                    _score(runner, pending)
                    pending, pending_rows = [], 0
                components = np.broadcast_to(item.components, (part.stop - first, num_samples))
                z = item.posterior[part].draw(components, item.rng)  # (G, S, D)
                pending.append((item, part, z))
                pending_rows += rows
        if pending:
            _score(runner, pending)
    return [LogLikelihood(item.log_px, item.elbo, item.num_samples) for item in items]


def _score(runner: ModelRunner, pending: Sequence[tuple[_Item, slice, np.ndarray]]) -> None:
    """Decode the samples of several input groups in one call; fill in their estimates."""
    z_all = np.concatenate([z.reshape(-1, z.shape[-1]) for _, _, z in pending])
    logits_all = runner.decode_logits(z_all)  # (sum G*S, C, H, W)
    offset = 0
    for item, part, z in pending:
        size, num_samples = z.shape[:2]
        logits = logits_all[offset : offset + size * num_samples]
        offset += size * num_samples
        logits = logits.reshape(size, num_samples, -1).astype(np.float64)  # (G, S, P)
        post = item.posterior[part]
        log_lik = bernoulli_log_prob(item.targets[part, None, :], logits)  # (G, S)
        log_ratio = log_lik + log_standard_normal(z) - post.log_density(z)  # (G, S)
        log_w = post.log_weights[:, item.components] - np.log(item.counts[item.components])
        item.log_px[part] = logsumexp(log_w + log_ratio, axis=1)
        component_means = np.add.reduceat(log_ratio, item.starts, axis=1) / item.counts
        item.elbo[part] = np.sum(post.weights * component_means, axis=1)  # (G,)
