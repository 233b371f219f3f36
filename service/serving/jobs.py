"""Jobs: one request's work, its images preprocessed, and how a batch of them runs on a model.

A batch is the jobs of one model and one operation; they share one encoder call and their
decoder calls. Each job draws from its own generator (seeded when asked), so its answer is the
same alone or in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.model.likelihood import Estimate, LogLikelihood, log_likelihoods
from service.model.runner import ModelRunner

Operation = Literal["encode", "reconstruct", "sample", "loglik"]
OPERATIONS: tuple[Operation, ...] = ("encode", "reconstruct", "sample", "loglik")


@dataclass(frozen=True)
class EncodeJob:
    x: np.ndarray  # (B, C, H, W)


@dataclass(frozen=True)
class ReconstructJob:
    x: np.ndarray
    mode: Literal["mean", "sample"]
    seed: int | None = None


@dataclass(frozen=True)
class SampleJob:
    x: np.ndarray
    n: int
    decode: bool
    seed: int | None = None


@dataclass(frozen=True)
class LoglikJob:
    x: np.ndarray
    num_samples: int
    seed: int | None = None


@dataclass(frozen=True)
class Reconstruction:
    probabilities: np.ndarray  # (B, C, H, W) Bernoulli means


@dataclass(frozen=True)
class Samples:
    z: np.ndarray  # (B, n, D)
    components: np.ndarray  # (B, n), 1-based
    probabilities: np.ndarray | None  # (B, n, C, H, W) when decoded


def run_batch(runner: ModelRunner, operation: Operation, jobs: Sequence[Any]) -> Sequence[Any]:
    """Run the jobs of one operation together: one result per job, in order."""
    if operation == "encode":
        return runner.encode_each([job.x for job in jobs])
    if operation == "reconstruct":
        return reconstruct(runner, jobs)
    if operation == "sample":
        return sample(runner, jobs)
    return loglik(runner, jobs)


def reconstruct(runner: ModelRunner, jobs: Sequence[ReconstructJob]) -> list[Reconstruction]:
    """Pixel probabilities decoded from each mixture mean, or from one sample of Q(z|x)."""
    posteriors = runner.encode_each([job.x for job in jobs])
    z = [
        post.mixture_mean() if job.mode == "mean" else post.sample(1, _rng(job.seed))[0][:, 0]
        for job, post in zip(jobs, posteriors, strict=True)
    ]  # (B_j, D) each
    probabilities = runner.decode(np.concatenate(z))
    return [Reconstruction(p) for p in _split(probabilities, [len(j.x) for j in jobs])]


def sample(runner: ModelRunner, jobs: Sequence[SampleJob]) -> list[Samples]:
    """n draws of Q(z|x) per image, with their components; decoded where asked."""
    posteriors = runner.encode_each([job.x for job in jobs])
    draws = [
        post.sample(job.n, _rng(job.seed)) for job, post in zip(jobs, posteriors, strict=True)
    ]  # z (B_j, n_j, D), components (B_j, n_j)
    decoded = [k for k, job in enumerate(jobs) if job.decode]
    images: dict[int, np.ndarray] = {}
    if decoded:
        z = np.concatenate([draws[k][0].reshape(-1, draws[k][0].shape[-1]) for k in decoded])
        probabilities = runner.decode(z)  # (N, C, H, W)
        sizes = [draws[k][0].shape[0] * draws[k][0].shape[1] for k in decoded]
        for k, part in zip(decoded, _split(probabilities, sizes), strict=True):
            batch, n = draws[k][0].shape[:2]
            images[k] = part.reshape(batch, n, *part.shape[1:])  # (B_j, n_j, C, H, W)
    return [Samples(z, comps + 1, images.get(k)) for k, (z, comps) in enumerate(draws)]


def loglik(runner: ModelRunner, jobs: Sequence[LoglikJob]) -> list[LogLikelihood]:
    posteriors = runner.encode_each([job.x for job in jobs])
    return log_likelihoods(
        runner,
        [
            Estimate(job.x, post, job.num_samples, _rng(job.seed))
            for job, post in zip(jobs, posteriors, strict=True)
        ],
    )


def warm_up(runner: ModelRunner) -> float:
    """Run every session on every batch-size path once; the seconds it took."""
    start = time.perf_counter()
    samples = max(2 * runner.mixture_order, 8)
    for batch in (1, 2):
        x = np.zeros((batch, *runner.input_shape), dtype=np.float32)
        loglik(runner, [LoglikJob(x, samples, 0)])
        reconstruct(runner, [ReconstructJob(x, "mean", 0)])
    return time.perf_counter() - start


def _split(array: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive parts of ``array`` along its first axis, of the given sizes."""
    return np.split(array, np.cumsum(sizes)[:-1])


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)
