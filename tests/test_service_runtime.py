"""The runtime's math against closed forms, and how it loads (or refuses) a model repository."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from service_support import settings_for

from service.model.errors import InvalidParameter, ModelNotFound, NotReady
from service.model.likelihood import Estimate, log_likelihoods
from service.model.mixture import (
    Posterior,
    bernoulli_log_prob,
    log_normal_diag,
    logsumexp,
    stratified_counts,
)
from service.model.runner import ModelRunner
from service.model.sessions import ProviderUnavailable, SessionFactory
from service.serving.runtime import Runtime, StartupError

# ---------------------------------------------------------------- densities


def test_bernoulli_log_prob_is_stable_and_exact() -> None:
    logits = np.array([[-1e4, -30.0, -1.0, 0.0, 2.0, 30.0, 1e4]])
    x = np.array([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    p = 1 / (1 + np.exp(-logits[0, 2:5]))
    expected = math.log(1 - p[0]) * 0 + math.log(p[0]) + math.log(p[1]) + math.log(1 - p[2])
    got = bernoulli_log_prob(x, logits)
    assert np.isfinite(got).all()
    # the saturated pixels agree with their target: they contribute ~0
    assert got[0] == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(bernoulli_log_prob(np.array([1.0]), np.array([-1e4])))
    assert bernoulli_log_prob(np.array([1.0]), np.array([-1e4])) == pytest.approx(-1e4)


def test_logsumexp_handles_minus_infinity_and_large_values() -> None:
    a = np.array([[-np.inf, -np.inf], [1e4, 1e4], [0.0, -np.inf]])
    with np.errstate(divide="ignore"):
        out = logsumexp(a, axis=1)
    assert out[0] == -np.inf
    assert out[1] == pytest.approx(1e4 + math.log(2))
    assert out[2] == 0.0


def test_log_normal_diag_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    z, mean, logvar = rng.normal(size=(3, 5))
    var = np.exp(logvar)
    expected = np.sum(-0.5 * np.log(2 * np.pi * var) - (z - mean) ** 2 / (2 * var))
    assert log_normal_diag(z, mean, logvar) == pytest.approx(expected)


@pytest.mark.parametrize(("S", "M"), [(1000, 4), (10, 3), (3, 3), (5000, 1), (7, 2)])
def test_stratified_counts(S: int, M: int) -> None:
    counts = stratified_counts(S, M)
    assert counts.sum() == S and counts.min() >= 1 and counts.max() - counts.min() <= 1


def _posterior(means: np.ndarray, logvars: np.ndarray, weights: np.ndarray) -> Posterior:
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(weights, dtype=np.float64))
    return Posterior(means.astype(np.float32), logvars.astype(np.float32), log_w)


def test_mixture_density_and_samples() -> None:
    means = np.array([[[-3.0, 0.0], [2.0, 1.0]]])
    logvars = np.array([[[0.0, -1.0], [0.5, 0.0]]])
    weights = np.array([[0.3, 0.7]])
    post = _posterior(means, logvars, weights)
    z = np.random.default_rng(1).normal(size=(1, 6, 2))
    direct = np.log(
        sum(
            weights[0, m] * np.exp(log_normal_diag(z[0], means[0, m], logvars[0, m]))
            for m in range(2)
        )
    )
    np.testing.assert_allclose(post.log_density(z)[0], direct, rtol=1e-10)
    np.testing.assert_allclose(post.mixture_mean()[0], 0.3 * means[0, 0] + 0.7 * means[0, 1])
    draws, components = post.sample(20000, np.random.default_rng(2))
    assert draws.shape == (1, 20000, 2)
    assert np.mean(components == 1) == pytest.approx(0.7, abs=0.015)
    picked = draws[0, components[0] == 0]
    np.testing.assert_allclose(picked.mean(0), means[0, 0], atol=0.05)
    np.testing.assert_allclose(picked.var(0), np.exp(logvars[0, 0]), rtol=0.08)


def test_sampling_never_picks_a_zero_weight_component() -> None:
    post = _posterior(np.zeros((2, 3, 1)), np.zeros((2, 3, 1)), [[1.0, 0.0, 0.0], [0, 0, 1.0]])
    _, components = post.sample(5000, np.random.default_rng(0))
    assert set(components[0].tolist()) == {0}
    assert set(components[1].tolist()) == {2}


# ---------------------------------------------------------------- log-likelihood


@pytest.fixture(scope="module")
def runners(tiny_model_repo: Path) -> dict[str, ModelRunner]:
    runtime = Runtime(settings_for(tiny_model_repo))
    runtime.load()
    return runtime.models


class _ConstantDecoder:
    """Stands in for the decoder: p(x|z) does not depend on z, so p(x) is known exactly."""

    def __init__(self, logits: np.ndarray) -> None:
        self.logits = logits.astype(np.float32)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.logits, (z.shape[0], *self.logits.shape)).copy()


def _constant_setup(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(0)
    spec = runner.manifest.input
    logits = rng.normal(0, 2, size=(spec.channels, spec.height, spec.width)).astype(np.float32)
    x = (rng.random((1, spec.channels, spec.height, spec.width)) > 0.5).astype(np.float32)
    monkeypatch.setattr(runner, "decode_logits", _ConstantDecoder(logits))
    exact = float(bernoulli_log_prob(x.reshape(1, -1), logits.reshape(1, -1).astype(np.float64))[0])
    return x, exact


def test_loglik_is_exact_when_the_posterior_is_the_prior(
    runners: dict[str, ModelRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q = p(z) and p(x|z) constant: every importance weight is p(x), so no Monte Carlo error."""
    runner = runners["tiny-recmix"]
    x, exact = _constant_setup(runner, monkeypatch)
    M, D = runner.mixture_order, runner.manifest.latent_dim
    post = Posterior(
        np.zeros((1, M, D), np.float32),
        np.zeros((1, M, D), np.float32),
        np.log(np.array([[0.2, 0.3, 0.5]])),
    )
    result = log_likelihoods(runner, [Estimate(x, post, 11, np.random.default_rng(0))])[0]
    assert result.log_likelihood[0] == pytest.approx(exact, abs=1e-9)
    assert result.elbo[0] == pytest.approx(exact, abs=1e-9)


def test_vae_elbo_matches_the_closed_form_kl(
    runners: dict[str, ModelRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Gaussian component, constant p(x|z): ELBO = log p(x) - KL(q || p), log p(x) exact."""
    runner = runners["tiny-vae"]
    x, exact = _constant_setup(runner, monkeypatch)
    D = runner.manifest.latent_dim
    # wider than the prior, so that the importance weights p/q are bounded
    mean = np.linspace(-0.5, 0.5, D)
    logvar = np.linspace(0.05, 0.3, D)
    post = Posterior(
        mean[None, None].astype(np.float32), logvar[None, None].astype(np.float32), np.zeros((1, 1))
    )
    kl = 0.5 * np.sum(np.exp(logvar) + mean**2 - 1 - logvar)
    result = log_likelihoods(runner, [Estimate(x, post, 5000, np.random.default_rng(1))])[0]
    # Monte Carlo error of the ELBO: sd of the log-ratio (about sqrt(2 KL)) / sqrt(S)
    assert result.elbo[0] == pytest.approx(exact - kl, abs=5 * math.sqrt(2 * kl / 5000))
    assert result.log_likelihood[0] == pytest.approx(exact, abs=0.02)
    assert result.log_likelihood[0] >= result.elbo[0]


def test_loglik_of_a_mixture_converges(
    runners: dict[str, ModelRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = runners["tiny-recmix"]
    x, exact = _constant_setup(runner, monkeypatch)
    M, D = runner.mixture_order, runner.manifest.latent_dim
    rng = np.random.default_rng(3)
    post = Posterior(
        rng.normal(0, 0.3, (1, M, D)).astype(np.float32),
        rng.normal(0.2, 0.05, (1, M, D)).astype(np.float32),
        np.log(np.array([[0.5, 0.3, 0.2]])),
    )
    result = log_likelihoods(runner, [Estimate(x, post, 5000, np.random.default_rng(4))])[0]
    assert result.log_likelihood[0] == pytest.approx(exact, abs=0.05)
    assert result.elbo[0] < exact


def test_loglik_grouping_and_chunking_change_nothing(
    runners: dict[str, ModelRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images share decoder calls, or a call is split in chunks: the same draws, the same answer."""
    runner = runners["tiny-recmix"]
    rng = np.random.default_rng(0)
    x = (rng.random((5, 1, 28, 28)) > 0.5).astype(np.float32)
    post = runner.encode(x)
    results = []
    for chunk in (300, 999, 5000):  # split calls, one image per call, all five in one call
        monkeypatch.setattr(runner, "decode_batch_size", chunk)
        results.append(
            log_likelihoods(runner, [Estimate(x, post, 999, np.random.default_rng(0))])[0]
        )
    for other in results[1:]:
        np.testing.assert_allclose(other.log_likelihood, results[0].log_likelihood, rtol=1e-6)
        np.testing.assert_allclose(other.elbo, results[0].elbo, rtol=1e-6)


def test_loglik_needs_a_sample_per_component(runners: dict[str, ModelRunner]) -> None:
    runner = runners["tiny-recmix"]
    x = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(InvalidParameter):
        log_likelihoods(runner, [Estimate(x, runner.encode(x), 2, np.random.default_rng(0))])[0]


# ---------------------------------------------------------------- loading


def _copy_repo(tiny_model_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_repo, repo)
    return repo


def test_runtime_states_and_model_choice(tiny_model_repo: Path) -> None:
    runtime = Runtime(settings_for(tiny_model_repo, default_model="absent"))
    with pytest.raises(NotReady):
        runtime.model(None)
    runtime.load()
    assert runtime.ready and runtime.default_model is None
    with pytest.raises(ModelNotFound, match="tiny-recmix"):
        runtime.model(None)
    assert runtime.model("tiny-vae").name == "tiny-vae"
    runtime.begin_draining()
    assert runtime.state == "draining" and not runtime.ready
    assert runtime.model("tiny-vae").name == "tiny-vae"  # draining still serves
    runtime.close()
    with pytest.raises(NotReady):
        runtime.model("tiny-vae")


def test_a_lone_model_is_the_default(tiny_model_repo: Path, tmp_path: Path) -> None:
    repo = _copy_repo(tiny_model_repo, tmp_path)
    shutil.rmtree(repo / "tiny-recmix")
    runtime = Runtime(settings_for(repo))
    runtime.load()
    assert runtime.default_model == "tiny-vae"


def test_a_tampered_model_stops_the_start(tiny_model_repo: Path, tmp_path: Path) -> None:
    repo = _copy_repo(tiny_model_repo, tmp_path)
    target = repo / "tiny-recmix" / "decoder.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(StartupError, match=r"tiny-recmix.*decoder\.onnx.*SHA-256"):
        Runtime(settings_for(repo)).load()
    runtime = Runtime(settings_for(repo, skip_bad_models=True))
    runtime.load()
    assert list(runtime.models) == ["tiny-vae"]


def test_a_graph_onnxruntime_cannot_run_stops_the_start(
    tiny_model_repo: Path, tmp_path: Path
) -> None:
    """Checksums that hold over a broken graph: refused when onnxruntime loads it."""
    import hashlib

    repo = _copy_repo(tiny_model_repo, tmp_path)
    folder = repo / "tiny-vae"
    (folder / "decoder.onnx").write_bytes(b"not a graph")
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "decoder.onnx":
            entry["sha256"] = hashlib.sha256(b"not a graph").hexdigest()
            entry["size_bytes"] = len(b"not a graph")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StartupError, match="onnxruntime cannot run it"):
        Runtime(settings_for(repo)).load()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("latent_dim", 5, r"tiny-vae.*encoder_1(\.int8)?\.onnx: output 'mean' has shape \[batch, 4\].*latent_dim 5"),
        ("input.height", 27, r"tiny-vae.*encoder_1(\.int8)?\.onnx: input 'x' has shape \[batch, 1, 28, 28\]"),
    ],
)  # fmt: skip
def test_a_manifest_that_contradicts_its_graphs_stops_the_start(
    tiny_model_repo: Path, tmp_path: Path, field: str, value: int, message: str
) -> None:
    """The graphs are checked against the manifest: /models must not say 5 where /encode gives 4."""
    repo = _copy_repo(tiny_model_repo, tmp_path)
    path = repo / "tiny-vae" / "manifest.json"
    manifest = json.loads(path.read_text())
    *parents, last = field.split(".")
    target = manifest
    for key in parents:
        target = target[key]
    target[last] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(StartupError, match=message):
        Runtime(settings_for(repo)).load()
    runtime = Runtime(settings_for(repo, skip_bad_models=True))
    runtime.load()
    assert list(runtime.models) == ["tiny-recmix"]


def test_an_empty_repository_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="no model folders"):
        Runtime(settings_for(tmp_path)).load()


def test_two_folders_with_one_name_stop_the_start(tiny_model_repo: Path, tmp_path: Path) -> None:
    repo = _copy_repo(tiny_model_repo, tmp_path)
    shutil.copytree(repo / "tiny-vae", repo / "tiny-vae-copy")
    with pytest.raises(StartupError, match="share a name"):
        Runtime(settings_for(repo)).load()


def test_cuda_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        SessionFactory.choose("cuda", 1)
    assert SessionFactory.choose("auto", 1).providers == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    factory = SessionFactory.choose("auto", 4)
    assert factory.on_gpu and factory.intra_op_threads == 1
    assert SessionFactory.choose("cpu", 4).providers == ["CPUExecutionProvider"]
