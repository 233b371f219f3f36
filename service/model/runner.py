"""One served model: its onnxruntime sessions, and the posterior, decoding and sampling on them.

A :class:`ModelRunner` holds a checked model folder's sessions (one per encoder component, the
decoder, and the fused encoder when exported) and works on preprocessed float32 ``(B, C, H, W)``
inputs. Encoding runs the M components as one fused graph, one after another, or on threads
(``encode_mode``); the weights come from the manifest's recursion (:mod:`service.model.mixture`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import numpy as np

from service.model.errors import InvalidParameter
from service.model.graphs import check_session
from service.model.manifest import FileEntry, Precision
from service.model.mixture import Posterior, log_weights, logsumexp, sigmoid
from service.model.repository import ModelFolder
from service.model.sessions import SessionFactory

log = logging.getLogger("recmix.service")

EncodeMode = Literal["fused", "concurrent", "sequential"]
PrecisionChoice = Literal["auto", "float32", "int8"]


class StageObserver(Protocol):
    """Receives the time of each inference stage (the service's metrics)."""

    def observe_stage(self, model: str, stage: str, seconds: float) -> None: ...


class NullObserver:
    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        pass


class ModelRunner:
    """One model's sessions and its inference, on preprocessed float32 (B, C, H, W) inputs."""

    def __init__(
        self,
        folder: ModelFolder,
        factory: SessionFactory,
        encode_mode: EncodeMode = "fused",
        executor: Executor | None = None,
        observer: StageObserver | None = None,
        decode_batch_size: int = 2048,
        encoder_precision: PrecisionChoice = "float32",
    ) -> None:
        manifest = folder.manifest
        self.folder = folder
        self.manifest = manifest
        self.name = manifest.name
        self.observer = observer or NullObserver()
        self.decode_batch_size = decode_batch_size
        self.precision: Precision = self._choose_precision(encoder_precision, factory.on_gpu)
        self.components = [self._session(factory, f) for f in manifest.components(self.precision)]
        self.decoder = self._session(factory, manifest.decoder())
        fused_entry = manifest.fused(self.precision)
        self.fused = (
            self._session(factory, fused_entry)
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

    def _session(self, factory: SessionFactory, entry: FileEntry) -> Any:
        """A file's session, its tensors checked against the manifest."""
        session = factory.session(self.folder.path_of(entry))
        check_session(self.folder.root, self.manifest, entry, session)
        return session

    def _choose_precision(self, requested: PrecisionChoice, on_gpu: bool) -> Precision:
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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.manifest.input
        return spec.channels, spec.height, spec.width

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.observer.observe_stage(self.name, stage, time.perf_counter() - start)

    # ------------------------------------------------------------ encode

    def encode(self, x: np.ndarray) -> Posterior:
        """The mixture posterior of a preprocessed batch."""
        with self.timed("encode"):
            if self.encode_mode == "fused":
                return self._encode_fused(x)
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

    def _encode_fused(self, x: np.ndarray) -> Posterior:
        assert self.fused is not None
        if self._fixed_log_weights is not None:
            # the same for every image: the manifest's, in float64, not the graph's row
            with self.timed("fused_encode"):
                means, logvars = self.fused.run(["means", "logvars"], {"x": x})
            log_w = np.broadcast_to(self._fixed_log_weights, (x.shape[0], self.mixture_order))
            return Posterior(means, logvars, log_w)
        with self.timed("fused_encode"):
            means, logvars, log_w = self.fused.run(["means", "logvars", "log_weights"], {"x": x})
        log_w = log_w.astype(np.float64)
        # float32 weights from the graph: renormalize so they sum to 1 in float64
        return Posterior(means, logvars, log_w - logsumexp(log_w, axis=1)[:, None])

    def _run_component(self, index: int, x: np.ndarray) -> list[np.ndarray]:
        with self.timed(f"component_{index + 1}"):
            return self.components[index].run(self._component_outputs, {"x": x})

    def encode_each(self, xs: Sequence[np.ndarray]) -> list[Posterior]:
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
            with self.timed("decode"):
                chunks.append(self.decoder.run(["logits"], {"z": rows})[0])
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Pixel probabilities (N, C, H, W), float64, of latent codes z (N, D)."""
        return sigmoid(self.decode_logits(z).astype(np.float64))

    def check_num_samples(self, num_samples: int) -> None:
        if num_samples < self.mixture_order:
            raise InvalidParameter(
                f"num_samples must be at least the mixture order {self.mixture_order} "
                "(one sample per component)"
            )
