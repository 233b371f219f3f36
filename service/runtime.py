"""The inference runtime: onnxruntime sessions for every served model, and the mixture's math.

Nothing here knows of HTTP. A :class:`ModelRunner` holds one model's sessions (one per encoder
component, the decoder, and the fused encoder when exported) and computes, in numpy, what the
service answers (RecMix, Kim & Pavlovic, NeurIPS 2020; see the project's notes on the math):

- the posterior ``Q(z|x) = sum_m w_m(x) N(z; mu_m(x), diag sigma_m^2(x))``;
- samples ``z ~ Q(z|x)`` with the component each came from;
- reconstructions from the mixture mean ``sum_m w_m mu_m`` or from a sample;
- ``log p(x)`` by importance sampling with the mixture as proposal, stratified: ``n_m`` samples
  from component m, ``log p(x) ~= logsumexp_{m,s}[log w_m - log n_m + log p(x, z_ms) -
  log Q(z_ms|x)]``, and the mixture ELBO ``sum_m w_m mean_s[log p(x, z_ms) - log Q(z_ms|x)]``
  from the same samples.

:class:`Runtime` loads every model of the repository and runs requests on the one asked for. With
dynamic batching on (:mod:`service.batching`), concurrent requests for one model and operation
run as one batch (one encoder call, decoder calls shared); each request draws from its own
generator, so that its answer is the same whatever else shares its batch.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import onnxruntime as ort
from anyio import to_thread

from service.batching import Batcher, OnDispatch
from service.errors import InvalidParameter, ModelNotFound, NotReady
from service.manifest import Precision, log_weights
from service.preprocess import ImageInput, ImageLimits, preprocess
from service.repository import ModelFolder, ModelRepositoryError, discover, load_model_dir
from service.settings import EncodeMode, Settings

log = logging.getLogger("recmix.service")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_LOG_2PI = math.log(2.0 * math.pi)

State = Literal["starting", "ready", "draining", "stopped"]
T = TypeVar("T")

# With batching, a request's images are preprocessed on the event loop when they hold at most
# this many pixels in all, else in a worker thread. A 28x28 digit takes about 40 us here, less
# than a hand-off to a worker thread and back; five of them, about 0.2 ms, is as long as the
# event loop (every other request's I/O) should wait.
INLINE_PIXELS = 4096


class StartupError(Exception):
    """The runtime cannot start: no model, a bad model folder, a missing execution provider."""


class Observer(Protocol):
    """Receives timings and batch sizes (the service's metrics)."""

    def observe_stage(self, model: str, stage: str, seconds: float) -> None: ...

    def observe_batch(self, model: str, operation: str, size: int) -> None: ...

    def observe_queue(self, model: str, operation: str, seconds: float) -> None: ...

    def observe_run(self, model: str, operation: str, rows: int) -> None: ...


class _NullObserver:
    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        pass

    def observe_batch(self, model: str, operation: str, size: int) -> None:
        pass

    def observe_queue(self, model: str, operation: str, seconds: float) -> None:
        pass

    def observe_run(self, model: str, operation: str, rows: int) -> None:
        pass


# ---------------------------------------------------------------- densities, in log space


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


# ---------------------------------------------------------------- execution providers


@dataclass(frozen=True)
class SessionFactory:
    """Builds onnxruntime sessions on the chosen execution provider."""

    providers: list[Any]
    intra_op_threads: int

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == CUDA or (
            isinstance(self.providers[0], tuple) and self.providers[0][0] == CUDA
        )

    @classmethod
    def choose(cls, requested: str, intra_op_threads: int) -> SessionFactory:
        available = ort.get_available_providers()
        if requested == "cuda" and CUDA not in available:
            raise StartupError(
                f"provider 'cuda' asked for, but this onnxruntime offers only {available}; "
                "install onnxruntime-gpu or use provider 'auto' or 'cpu'"
            )
        if requested in ("auto", "cuda") and CUDA in available:
            options = {
                "device_id": 0,
                # grow the memory arena by what is asked, not in powers of two
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": True,
            }
            return cls([(CUDA, options), CPU], 1)
        return cls([CPU], intra_op_threads)

    def session(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1 if self.on_gpu else self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=self.providers)


# ---------------------------------------------------------------- one model


@dataclass(frozen=True)
class Reconstruction:
    probabilities: np.ndarray  # (B, C, H, W) Bernoulli means


@dataclass(frozen=True)
class Samples:
    z: np.ndarray  # (B, n, D)
    components: np.ndarray  # (B, n), 1-based
    probabilities: np.ndarray | None  # (B, n, C, H, W) when decoded


@dataclass(frozen=True)
class LogLikelihood:
    log_likelihood: np.ndarray  # (B,)
    elbo: np.ndarray  # (B,)
    num_samples: int


# One request's work, its images preprocessed: what a batch is made of. Each request draws from
# its own generator (seeded when asked), so its answer is the same alone or in a batch.


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


Operation = Literal["encode", "reconstruct", "sample", "loglik"]
OPERATIONS: tuple[Operation, ...] = ("encode", "reconstruct", "sample", "loglik")


@dataclass
class _LoglikItem:
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


class ModelRunner:
    """One model's sessions and its inference, on preprocessed float32 (B, C, H, W) inputs."""

    def __init__(
        self,
        folder: ModelFolder,
        factory: SessionFactory,
        encode_mode: EncodeMode,
        executor: ThreadPoolExecutor | None,
        observer: Observer,
        decode_batch_size: int = 2048,
        encoder_precision: Literal["auto", "float32", "int8"] = "float32",
    ) -> None:
        manifest = folder.manifest
        self.folder = folder
        self.manifest = manifest
        self.name = manifest.name
        self.observer = observer
        self.decode_batch_size = decode_batch_size
        self.precision: Precision = self._choose_precision(encoder_precision, factory.on_gpu)
        self.components = [
            factory.session(folder.path_of(f)) for f in manifest.components(self.precision)
        ]
        self.decoder = factory.session(folder.path_of(manifest.decoder()))
        fused_entry = manifest.fused(self.precision)
        self.fused = (
            factory.session(folder.path_of(fused_entry))
            if fused_entry is not None and encode_mode == "fused"
            else None
        )
        self.provider = self.decoder.get_providers()[0]
        self.amortized = manifest.weights.epsilon == "amortized"
        self._component_outputs = ["mean", "logvar"] + (["eps_logit"] if self.amortized else [])
        self._fixed_log_weights = (
            None if self.amortized else log_weights(manifest.weights, manifest.mixture_order)
        )
        # a lone component is the same work in every mode
        if manifest.mixture_order == 1:
            encode_mode = "sequential"
        elif encode_mode == "fused" and self.fused is None:
            encode_mode = "sequential"
            log.warning(
                "%s: exported without a fused graph; running the components one after another",
                self.name,
            )
        if encode_mode == "concurrent" and executor is None:
            raise ValueError("concurrent encoding needs an executor")
        self.encode_mode: EncodeMode = encode_mode
        self.executor = executor

    def _choose_precision(
        self, requested: Literal["auto", "float32", "int8"], on_gpu: bool
    ) -> Precision:
        shipped = "int8" in self.manifest.precisions()
        if requested == "int8" and not shipped:
            log.warning("%s: no int8 encoder graphs in the model folder; using float32", self.name)
        if requested == "int8" or (requested == "auto" and not on_gpu):
            # onnxruntime's CUDA provider has no kernel for the int8 matmuls: on GPU they would
            # run on the CPU, so auto keeps float32 there
            return "int8" if shipped else "float32"
        return "float32"

    @property
    def mixture_order(self) -> int:
        return self.manifest.mixture_order

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.observer.observe_stage(self.name, stage, time.perf_counter() - start)

    # ------------------------------------------------------------ encode

    def encode(self, x: np.ndarray) -> Posterior:
        """The mixture posterior of a preprocessed batch."""
        with self._timed("encode"):
            if self.encode_mode == "fused":
                assert self.fused is not None
                if self._fixed_log_weights is not None:
                    # the same for every image: the manifest's, in float64, not the graph's row
                    with self._timed("fused_encode"):
                        means, logvars = self.fused.run(["means", "logvars"], {"x": x})
                    log_w = np.broadcast_to(
                        self._fixed_log_weights, (x.shape[0], self.mixture_order)
                    )
                    return Posterior(means, logvars, log_w)
                with self._timed("fused_encode"):
                    means, logvars, log_w = self.fused.run(
                        ["means", "logvars", "log_weights"], {"x": x}
                    )
                log_w = log_w.astype(np.float64)
                # float32 weights from the graph: renormalize so they sum to 1 in float64
                return Posterior(means, logvars, log_w - logsumexp(log_w, axis=1)[:, None])
            if self.encode_mode == "concurrent":
                assert self.executor is not None
                futures = [
                    self.executor.submit(self._run_component, m, x)
                    for m in range(len(self.components))
                ]
                outputs = [f.result() for f in futures]
            else:
                outputs = [self._run_component(m, x) for m in range(len(self.components))]
            means = np.stack([o[0] for o in outputs], axis=1)  # (B, M, D)
            logvars = np.stack([o[1] for o in outputs], axis=1)
            if self.amortized:
                eps_logits = np.stack([o[2] for o in outputs], axis=1)  # (B, M)
                log_w = log_weights(self.manifest.weights, self.mixture_order, eps_logits)
            else:
                assert self._fixed_log_weights is not None
                log_w = np.broadcast_to(self._fixed_log_weights, (x.shape[0], self.mixture_order))
            return Posterior(means, logvars, log_w)

    def _run_component(self, index: int, x: np.ndarray) -> list[np.ndarray]:
        with self._timed(f"component_{index + 1}"):
            return self.components[index].run(self._component_outputs, {"x": x})

    def encode_batch(self, jobs: Sequence[EncodeJob]) -> list[Posterior]:
        return self._encode_each([job.x for job in jobs])

    def _encode_each(self, xs: Sequence[np.ndarray]) -> list[Posterior]:
        """Encode several input batches in one call; the posterior of each."""
        if len(xs) == 1:
            return [self.encode(xs[0])]
        posterior = self.encode(np.concatenate(xs))
        bounds = np.cumsum([0, *(len(x) for x in xs)])
        return [posterior[a:b] for a, b in itertools.pairwise(bounds)]

    # ------------------------------------------------------------ decode

    def decode_logits(self, z: np.ndarray) -> np.ndarray:
        """Bernoulli logits (N, C, H, W) of latent codes z (N, D), in decoder-sized chunks."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        chunks = []
        for start in range(0, z.shape[0], self.decode_batch_size):
            rows = z[start : start + self.decode_batch_size]
            with self._timed("decode"):
                chunks.append(self.decoder.run(["logits"], {"z": rows})[0])
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def reconstruct_batch(self, jobs: Sequence[ReconstructJob]) -> list[Reconstruction]:
        """Pixel probabilities decoded from each mixture mean, or from one sample of Q(z|x)."""
        posteriors = self._encode_each([job.x for job in jobs])
        z = [
            post.mixture_mean() if job.mode == "mean" else post.sample(1, _rng(job.seed))[0][:, 0]
            for job, post in zip(jobs, posteriors, strict=True)
        ]  # (B_j, D) each
        probabilities = sigmoid(self.decode_logits(np.concatenate(z)).astype(np.float64))
        return [Reconstruction(p) for p in _split(probabilities, [len(j.x) for j in jobs])]

    def sample_batch(self, jobs: Sequence[SampleJob]) -> list[Samples]:
        """n draws of Q(z|x) per image, with their components; decoded where asked."""
        posteriors = self._encode_each([job.x for job in jobs])
        draws = [
            post.sample(job.n, _rng(job.seed)) for job, post in zip(jobs, posteriors, strict=True)
        ]  # z (B_j, n_j, D), components (B_j, n_j)
        decoded = [k for k, job in enumerate(jobs) if job.decode]
        images: dict[int, np.ndarray] = {}
        if decoded:
            z = np.concatenate([draws[k][0].reshape(-1, draws[k][0].shape[-1]) for k in decoded])
            probabilities = sigmoid(self.decode_logits(z).astype(np.float64))  # (N, C, H, W)
            sizes = [draws[k][0].shape[0] * draws[k][0].shape[1] for k in decoded]
            for k, part in zip(decoded, _split(probabilities, sizes), strict=True):
                batch, n = draws[k][0].shape[:2]
                images[k] = part.reshape(batch, n, *part.shape[1:])  # (B_j, n_j, C, H, W)
        return [Samples(z, comps + 1, images.get(k)) for k, (z, comps) in enumerate(draws)]

    # ------------------------------------------------------------ log-likelihood

    def check_num_samples(self, num_samples: int) -> None:
        if num_samples < self.mixture_order:
            raise InvalidParameter(
                f"num_samples must be at least the mixture order {self.mixture_order} "
                "(one sample per component)"
            )

    def log_likelihood(
        self, x: np.ndarray, posterior: Posterior, num_samples: int, rng: np.random.Generator
    ) -> LogLikelihood:
        """Stratified importance-sampled log p(x) and the mixture ELBO, per input."""
        return self._log_likelihoods([(x, posterior, num_samples, rng)])[0]

    def log_likelihood_batch(self, jobs: Sequence[LoglikJob]) -> list[LogLikelihood]:
        posteriors = self._encode_each([job.x for job in jobs])
        return self._log_likelihoods(
            [
                (job.x, post, job.num_samples, _rng(job.seed))
                for job, post in zip(jobs, posteriors, strict=True)
            ]
        )

    def _log_likelihoods(
        self, requests: Sequence[tuple[np.ndarray, Posterior, int, np.random.Generator]]
    ) -> list[LogLikelihood]:
        """log p(x) and the ELBO for several input batches, their samples sharing decoder calls.

        Inputs are taken a few at a time (about one decoder chunk of samples), so that at most
        about ``decode_batch_size`` decoder rows are in memory, whatever S and the batch.
        Each input batch draws from its own generator, in input order, so the draws (and the
        answer) do not depend on what else shares the decoder calls.
        """
        num_components = self.mixture_order
        low, high = self.manifest.input.value_range
        items = []
        for x, posterior, num_samples, rng in requests:
            self.check_num_samples(num_samples)
            counts = stratified_counts(num_samples, num_components)
            batch = x.shape[0]
            items.append(
                _LoglikItem(
                    posterior=posterior,
                    rng=rng,
                    num_samples=num_samples,
                    counts=counts,
                    components=np.repeat(np.arange(num_components), counts),
                    starts=np.concatenate([[0], np.cumsum(counts)[:-1]]),
                    targets=((x.astype(np.float64) - low) / (high - low)).reshape(batch, -1),
                    log_px=np.empty(batch),
                    elbo=np.empty(batch),
                )
            )
        pending: list[tuple[_LoglikItem, slice, np.ndarray]] = []
        pending_rows = 0
        with self._timed("loglik"):
            for item in items:
                batch, num_samples = item.targets.shape[0], item.num_samples
                group = max(1, self.decode_batch_size // num_samples)
                for first in range(0, batch, group):
                    part = slice(first, min(first + group, batch))
                    rows = (part.stop - first) * num_samples
                    if pending and pending_rows + rows > self.decode_batch_size:
                        self._score(pending)
                        pending, pending_rows = [], 0
                    components = np.broadcast_to(item.components, (part.stop - first, num_samples))
                    z = item.posterior[part].draw(components, item.rng)  # (G, S, D)
                    pending.append((item, part, z))
                    pending_rows += rows
            if pending:
                self._score(pending)
        return [LogLikelihood(item.log_px, item.elbo, item.num_samples) for item in items]

    def _score(self, pending: Sequence[tuple[_LoglikItem, slice, np.ndarray]]) -> None:
        """Decode the samples of several input groups in one call; fill in their estimates."""
        z_all = np.concatenate([z.reshape(-1, z.shape[-1]) for _, _, z in pending])
        logits_all = self.decode_logits(z_all)  # (sum G*S, C, H, W)
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

    def run_batch(self, operation: Operation, jobs: Sequence[Any]) -> Sequence[Any]:
        """Run the jobs of one operation together: one result per job, in order."""
        if operation == "encode":
            return self.encode_batch(jobs)
        if operation == "reconstruct":
            return self.reconstruct_batch(jobs)
        if operation == "sample":
            return self.sample_batch(jobs)
        return self.log_likelihood_batch(jobs)

    def warm_up(self) -> float:
        """Run every session on every batch-size path once; the seconds it took."""
        start = time.perf_counter()
        spec = self.manifest.input
        samples = max(2 * self.mixture_order, 8)
        for batch in (1, 2):
            x = np.zeros((batch, spec.channels, spec.height, spec.width), dtype=np.float32)
            self.log_likelihood_batch([LoglikJob(x, samples, 0)])
            self.reconstruct_batch([ReconstructJob(x, "mean", 0)])
        return time.perf_counter() - start


def _split(array: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Consecutive parts of ``array`` along its first axis, of the given sizes."""
    return np.split(array, np.cumsum(sizes)[:-1])


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- every model


class Runtime:
    """Every served model, the requests run on them, and whether the service is ready."""

    def __init__(self, settings: Settings, observer: Observer | None = None) -> None:
        self.settings = settings
        self.observer: Observer = observer or _NullObserver()
        self.models: dict[str, ModelRunner] = {}
        self.default_model: str | None = None
        self.state: State = "starting"
        self.limits = ImageLimits(settings.max_pixels, settings.resize)
        self._executor: ThreadPoolExecutor | None = None
        self._batch_executor: ThreadPoolExecutor | None = None
        self._batchers: dict[tuple[str, Operation], Batcher[Any, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Check, load and warm up every model of the repository; then the runtime is ready."""
        settings = self.settings
        factory = SessionFactory.choose(settings.provider, settings.intra_op_threads)
        folders = discover(settings.model_dir)
        if not folders:
            raise StartupError(
                f"no model folders (sub-folders with a manifest.json) in {settings.model_dir}"
            )
        checked: list[ModelFolder] = []
        for path in folders:
            try:
                checked.append(load_model_dir(path))
            except ModelRepositoryError as exc:
                if not settings.skip_bad_models:
                    raise StartupError(f"refusing to start: {exc}") from exc
                log.error("skipping a bad model: %s", exc)
        if not checked:
            raise StartupError(f"no usable model in {settings.model_dir}")
        names = [folder.manifest.name for folder in checked]
        if len(set(names)) != len(names):
            raise StartupError(f"two model folders share a name: {sorted(names)}")
        largest = max(folder.manifest.mixture_order for folder in checked)
        if largest > 1 and settings.encode_mode == "concurrent":
            self._executor = ThreadPoolExecutor(largest, thread_name_prefix="recmix-component")
        for folder in checked:
            try:
                runner = ModelRunner(
                    folder,
                    factory,
                    settings.encode_mode,
                    self._executor,
                    self.observer,
                    settings.decode_batch_size,
                    settings.encoder_precision,
                )
                seconds = runner.warm_up()
            except Exception as exc:  # onnxruntime raises its own classes for a bad graph
                message = f"model folder {folder.root}: onnxruntime cannot run it: {exc}"
                if not settings.skip_bad_models:
                    raise StartupError(f"refusing to start: {message}") from exc
                log.error("skipping a bad model: %s", message)
                continue
            if settings.provider == "cuda" and runner.provider != CUDA:
                raise StartupError(
                    f"{runner.name}: CUDA asked for, but the session runs on {runner.provider}"
                )
            self.models[runner.name] = runner
            log.info(
                "loaded %s %s (%s, M=%d) on %s, %s encoder, encode mode %s, warmed up in %.3f s",
                runner.name,
                runner.manifest.version,
                runner.manifest.method,
                runner.mixture_order,
                runner.provider,
                runner.precision,
                runner.encode_mode,
                seconds,
            )
        if not self.models:
            raise StartupError(f"no usable model in {settings.model_dir}")
        if settings.max_queue_delay_ms > 0:
            self._start_batching()
        if settings.default_model in self.models:
            self.default_model = settings.default_model
        elif len(self.models) == 1:
            self.default_model = next(iter(self.models))
        else:
            log.warning(
                "default model %r is not loaded; requests must name one of %s",
                settings.default_model,
                sorted(self.models),
            )
        self.state = "ready"

    def begin_draining(self) -> None:
        with self._lock:
            if self.state in ("starting", "ready"):
                self.state = "draining"
                log.info("draining: /readyz now answers 503; in-flight requests finish")

    def _start_batching(self) -> None:
        """A batcher per model and operation; each runs one batch at a time, on its own thread."""
        batchers = [(runner, op) for runner in self.models.values() for op in OPERATIONS]
        self._batch_executor = ThreadPoolExecutor(len(batchers), thread_name_prefix="recmix-batch")
        for runner, operation in batchers:
            self._batchers[runner.name, operation] = Batcher(
                f"{runner.name} {operation}",
                partial(runner.run_batch, operation),
                max_batch_size=self.settings.max_batch_size,
                max_delay=self.settings.max_queue_delay_ms / 1e3,
                executor=self._batch_executor,
                on_dispatch=self._dispatch_observer(runner.name, operation),
            )
        log.info(
            "dynamic batching: up to %d images, waiting at most %g ms",
            self.settings.max_batch_size,
            self.settings.max_queue_delay_ms,
        )

    def _dispatch_observer(self, model: str, operation: Operation) -> OnDispatch:
        def on_dispatch(rows: int, waited: Sequence[float]) -> None:
            for seconds in waited:
                self.observer.observe_queue(model, operation, seconds)
            self.observer.observe_run(model, operation, rows)

        return on_dispatch

    def close(self) -> None:
        """Stop: fail whatever still waits for a batch, stop the threads, drop the sessions.

        Called on the event loop (the app's lifespan), after the server has let requests finish.
        """
        self.begin_draining()
        self.state = "stopped"
        for batcher in self._batchers.values():
            batcher.fail_waiting(NotReady("the service is shutting down"))
        self._batchers.clear()
        for executor in (self._batch_executor, self._executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self.models.clear()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def model(self, name: str | None) -> ModelRunner:
        """The model a request asks for (or the default one)."""
        if self.state == "starting":
            raise NotReady("the service is not ready: models are still loading")
        if self.state == "stopped":
            raise NotReady("the service is shutting down")
        if name is None:
            if self.default_model is None:
                raise ModelNotFound(
                    f"no default model; name one with ?model= (loaded: {sorted(self.models)})"
                )
            name = self.default_model
        runner = self.models.get(name)
        if runner is None:
            raise ModelNotFound(
                f"no model named {name!r}; loaded: {', '.join(sorted(self.models))}"
            )
        return runner

    # ------------------------------------------------------------ requests
    # Each takes a request's images and a ``convert`` for its result (the service builds its
    # answer there), and runs on the event loop: with batching, the request is prepared there
    # (in a worker thread when its images are large) and joins its model's batcher; without,
    # it is prepared, run and converted in a worker thread of its own.

    async def encode(
        self, runner: ModelRunner, images: Sequence[ImageInput], convert: Callable[[Posterior], T]
    ) -> T:
        return await self._submit(runner, "encode", images, EncodeJob, convert)

    async def reconstruct(
        self,
        runner: ModelRunner,
        images: Sequence[ImageInput],
        mode: Literal["mean", "sample"],
        seed: int | None,
        convert: Callable[[Reconstruction], T],
    ) -> T:
        return await self._submit(
            runner, "reconstruct", images, lambda x: ReconstructJob(x, mode, seed), convert
        )

    async def sample(
        self,
        runner: ModelRunner,
        images: Sequence[ImageInput],
        n: int,
        decode: bool,
        seed: int | None,
        convert: Callable[[Samples], T],
    ) -> T:
        if n > self.settings.max_samples_per_image:
            raise InvalidParameter(
                f"n={n} exceeds the limit of {self.settings.max_samples_per_image} per image"
            )
        return await self._submit(
            runner, "sample", images, lambda x: SampleJob(x, n, decode, seed), convert
        )

    async def log_likelihood(
        self,
        runner: ModelRunner,
        images: Sequence[ImageInput],
        num_samples: int | None,
        seed: int | None,
        convert: Callable[[LogLikelihood], T],
    ) -> T:
        samples = num_samples or self.settings.default_loglik_samples
        if samples > self.settings.max_loglik_samples:
            raise InvalidParameter(
                f"num_samples={samples} exceeds the limit of {self.settings.max_loglik_samples}"
            )
        runner.check_num_samples(samples)
        return await self._submit(
            runner, "loglik", images, lambda x: LoglikJob(x, samples, seed), convert
        )

    async def _submit(
        self,
        runner: ModelRunner,
        operation: Operation,
        images: Sequence[ImageInput],
        make_job: Callable[[np.ndarray], Any],
        convert: Callable[[Any], T],
    ) -> T:
        batcher = self._batchers.get((runner.name, operation))
        if batcher is None:
            return await to_thread.run_sync(
                self._run_alone, runner, operation, images, make_job, convert, time.perf_counter()
            )

        async def prepare() -> tuple[Any, int]:
            x = self._prepare(runner, operation, images, INLINE_PIXELS)
            if x is None:  # large images: decode them off the event loop
                x = await to_thread.run_sync(self._prepare, runner, operation, images)
            assert x is not None
            return make_job(x), len(x)

        return await batcher.submit(prepare(), convert)

    def _run_alone(
        self,
        runner: ModelRunner,
        operation: Operation,
        images: Sequence[ImageInput],
        make_job: Callable[[np.ndarray], Any],
        convert: Callable[[Any], T],
        submitted: float,
    ) -> T:
        """Batching off: one request, prepared, run and converted in this worker thread."""
        self.observer.observe_queue(runner.name, operation, time.perf_counter() - submitted)
        x = self._prepare(runner, operation, images)
        assert x is not None
        self.observer.observe_run(runner.name, operation, len(x))
        return convert(runner.run_batch(operation, [make_job(x)])[0])

    def _prepare(
        self,
        runner: ModelRunner,
        operation: Operation,
        images: Sequence[ImageInput],
        pixel_budget: int | None = None,
    ) -> np.ndarray | None:
        """The model's input; None, with nothing decoded, if the images exceed ``pixel_budget``."""
        start = time.perf_counter()
        x = preprocess(images, runner.manifest.input, self.limits, pixel_budget)
        if x is not None:
            self.observer.observe_batch(runner.name, operation, len(x))
            self.observer.observe_stage(runner.name, "preprocess", time.perf_counter() - start)
        return x
