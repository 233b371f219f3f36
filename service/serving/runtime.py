"""The runtime: every model of the repository, its life cycle, and requests run on the models.

:meth:`Runtime.load` checks, loads and warms up every model folder; then the runtime is ready,
until :meth:`Runtime.begin_draining` (SIGTERM) and :meth:`Runtime.close`. Requests are submitted
with their images: with dynamic batching on (:mod:`service.serving.batching`), concurrent
requests for one model and operation run as one batch (one encoder call, decoder calls shared);
without, each runs alone in a worker thread. Nothing here knows of HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
from anyio import to_thread

from service.model.errors import InvalidParameter, ModelNotFound, NotReady, OverBudget
from service.model.likelihood import LogLikelihood
from service.model.mixture import Posterior
from service.model.preprocess import ImageInput, ImageLimits, Prepared, preprocess
from service.model.repository import ModelFolder, ModelRepositoryError, discover, load_model_dir
from service.model.runner import EncodeMode, ModelRunner, PrecisionChoice, StageObserver
from service.model.sessions import CUDA, ProviderUnavailable, SessionFactory
from service.serving.batching import Batcher, OnDispatch
from service.serving.jobs import (
    OPERATIONS,
    EncodeJob,
    LoglikJob,
    Operation,
    Reconstruction,
    ReconstructJob,
    SampleJob,
    Samples,
    run_batch,
    warm_up,
)

log = logging.getLogger("recmix.service")

State = Literal["starting", "ready", "draining", "stopped"]
Inputs = Sequence[ImageInput] | Prepared  # a request's images, or a tensor already preprocessed
T = TypeVar("T")

# With batching, a request's images are preprocessed on the event loop when they hold at most
# this many pixels in all, else in a worker thread. A 28x28 digit takes about 40 us here, less
# than a hand-off to a worker thread and back; five of them, about 0.2 ms, is as long as the
# event loop (every other request's I/O) should wait.
INLINE_PIXELS = 4096


class StartupError(Exception):
    """The runtime cannot start: no model, a bad model folder, a missing execution provider."""


def count(images: Inputs) -> int:
    """How many images a request holds."""
    return images.x.shape[0] if isinstance(images, Prepared) else len(images)


def _check_work(images: int, per_image: int, limit: int, parameter: str, what: str) -> None:
    """Refuse, before any work, a request of more than ``limit`` images x ``per_image``."""
    if images * per_image > limit:
        fits = max(1, limit // per_image)
        raise OverBudget(
            f"{images} images x {parameter}={per_image} is {images * per_image} {what}, more "
            f"than the limit of {limit} per request: send at most {fits} images per request "
            f"at this {parameter}, or a smaller {parameter}",
            limit=limit,
        )


class RuntimeConfig(Protocol):
    """What the runtime reads of the service's settings (:class:`service.settings.Settings`)."""

    model_dir: Path
    default_model: str
    skip_bad_models: bool
    provider: Literal["auto", "cpu", "cuda"]
    encode_mode: EncodeMode
    encoder_precision: PrecisionChoice
    intra_op_threads: int
    max_batch_size: int
    max_queue_delay_ms: float
    decode_batch_size: int
    max_pixels: int
    resize: Literal["allow", "refuse"]
    default_loglik_samples: int
    max_loglik_samples: int
    max_samples_per_image: int
    max_request_pixels: int
    max_loglik_work: int
    max_sample_draws: int


class Observer(StageObserver, Protocol):
    """Receives timings and batch sizes (the service's metrics)."""

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


class Runtime:
    """Every served model, the requests run on them, and whether the service is ready."""

    def __init__(self, settings: RuntimeConfig, observer: Observer | None = None) -> None:
        self.settings = settings
        self.observer: Observer = observer or _NullObserver()
        self.models: dict[str, ModelRunner] = {}
        self.default_model: str | None = None
        self.state: State = "starting"
        self.limits = ImageLimits(settings.max_pixels, settings.resize, settings.max_request_pixels)
        self._executor: ThreadPoolExecutor | None = None
        self._batch_executor: ThreadPoolExecutor | None = None
        self._batchers: dict[tuple[str, Operation], Batcher[Any, Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Check, load and warm up every model of the repository; then the runtime is ready."""
        settings = self.settings
        try:
            factory = SessionFactory.choose(settings.provider, settings.intra_op_threads)
        except ProviderUnavailable as exc:
            raise StartupError(str(exc)) from exc
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
                seconds = warm_up(runner)
            except Exception as exc:  # onnxruntime raises its own classes for a bad graph
                message = (
                    str(exc)
                    if isinstance(exc, ModelRepositoryError)  # its graphs contradict the manifest
                    else f"model folder {folder.root}: onnxruntime cannot run it: {exc}"
                )
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
                partial(run_batch, runner, operation),
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
        self, runner: ModelRunner, images: Inputs, convert: Callable[[Posterior], T]
    ) -> T:
        return await self._submit(runner, "encode", images, EncodeJob, convert)

    async def reconstruct(
        self,
        runner: ModelRunner,
        images: Inputs,
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
        images: Inputs,
        n: int,
        decode: bool,
        seed: int | None,
        convert: Callable[[Samples], T],
    ) -> T:
        if n > self.settings.max_samples_per_image:
            raise InvalidParameter(
                f"n={n} exceeds the limit of {self.settings.max_samples_per_image} per image"
            )
        _check_work(count(images), n, self.settings.max_sample_draws, "n", "draws")
        return await self._submit(
            runner, "sample", images, lambda x: SampleJob(x, n, decode, seed), convert
        )

    async def log_likelihood(
        self,
        runner: ModelRunner,
        images: Inputs,
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
        _check_work(count(images), samples, self.settings.max_loglik_work, "num_samples", "samples")
        return await self._submit(
            runner, "loglik", images, lambda x: LoglikJob(x, samples, seed), convert
        )

    async def _submit(
        self,
        runner: ModelRunner,
        operation: Operation,
        images: Inputs,
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
        images: Inputs,
        make_job: Callable[[np.ndarray], Any],
        convert: Callable[[Any], T],
        submitted: float,
    ) -> T:
        """Batching off: one request, prepared, run and converted in this worker thread."""
        self.observer.observe_queue(runner.name, operation, time.perf_counter() - submitted)
        x = self._prepare(runner, operation, images)
        assert x is not None
        self.observer.observe_run(runner.name, operation, len(x))
        return convert(run_batch(runner, operation, [make_job(x)])[0])

    def _prepare(
        self,
        runner: ModelRunner,
        operation: Operation,
        images: Inputs,
        pixel_budget: int | None = None,
    ) -> np.ndarray | None:
        """The model's input; None, with nothing decoded, if the images exceed ``pixel_budget``."""
        start = time.perf_counter()
        if isinstance(images, Prepared):
            x: np.ndarray | None = images.x
        else:
            x = preprocess(images, runner.manifest.input, self.limits, pixel_budget)
        if x is not None:
            self.observer.observe_batch(runner.name, operation, len(x))
            self.observer.observe_stage(runner.name, "preprocess", time.perf_counter() - start)
        return x
