"""Evaluation: test log-likelihood by importance sampling, test ELBO, and inference time."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from training.model import RecMixVAE
from training.objectives import importance_sampled_loglik


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def inference_times(
    model: RecMixVAE, x: torch.Tensor, batch: int, repeats: int, warmup: int = 10
) -> list[float]:
    """Seconds of each of `repeats` posterior inferences for `batch` images, after a warm-up.

    Inference is `model.encode` (all components and weights; SA-VAE's refinement steps included),
    or `model.infer` where a model has one (IAF: the encoder and one sample through the flow).
    """
    model.eval()
    infer = getattr(model, "infer", model.encode)
    xb = x[:batch]
    for _ in range(min(warmup, repeats)):
        infer(xb)
    _sync(xb.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        infer(xb)
        _sync(xb.device)
        times.append(time.perf_counter() - t0)
    return times


def time_inference(model: RecMixVAE, x: torch.Tensor, batch: int, repeats: int) -> float:
    """Median seconds of one posterior inference (all components and weights) for `batch` images."""
    return statistics.median(inference_times(model, x, batch, repeats))


@torch.no_grad()
def evaluate(
    model: RecMixVAE,
    test_x: torch.Tensor,
    num_samples: int = 5000,
    num_images: int = 0,
    sampling: str = "stratified",
    batch_size: int = 100,
    chunk_rows: int = 65536,
    seed: int = 1234,
    timing_repeats: int = 200,
) -> dict[str, Any]:
    """Mean test log-likelihood (S importance samples) and ELBO over the first num_images images.

    With num_samples = 0 only the inference time is measured.
    """
    model.eval()
    torch.manual_seed(seed)
    xs = test_x[:num_images] if num_images else test_x
    ll_sum = elbo_sum = math.nan
    t0 = time.perf_counter()
    if num_samples > 0:
        ll_sum = elbo_sum = 0.0
    for i in range(0, len(xs) if num_samples > 0 else 0, batch_size):
        ll, elbo = importance_sampled_loglik(
            model, xs[i : i + batch_size], num_samples, sampling, chunk_rows
        )
        ll_sum += ll.sum().item()
        elbo_sum += elbo.sum().item()
    eval_seconds = time.perf_counter() - t0
    return {
        "test_log_likelihood": ll_sum / len(xs),
        "test_elbo": elbo_sum / len(xs),
        "num_samples": num_samples,
        "sampling": sampling,
        "num_test_images": len(xs),
        "eval_seconds": eval_seconds,
        "inference_seconds_per_image": time_inference(model, xs, 1, timing_repeats),
        "inference_seconds_per_batch_128": time_inference(
            model, xs, 128, max(10, timing_repeats // 4)
        ),
        "active_components": model.num_active,
    }
