"""The baselines' math: SA-VAE's steps climb the ELBO, IAF's log-determinant, SVI's gap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import ModelConfig
from training.iaf import MADE, IAFFlow
from training.methods import build_model
from training.objectives import importance_sampled_loglik, training_loss
from training.savae import gaussian_elbo, refine
from training.svi import amortization_gap

ROOT = Path(__file__).resolve().parents[1]
TINY = {"latent_dim": 4, "encoder_hidden": (32,), "decoder_hidden": (32,), "mixture_order": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests may share the machine with a benchmark; one thread keeps them predictable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(method: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(method=method, **{**TINY, **kw}))
    model.set_active(model.cfg.mixture_order)
    return model.eval()


def elbo_of(decoder, x, mean, logvar, n=500, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return gaussian_elbo(decoder, x, mean, logvar, n)


def test_savae_steps_raise_the_elbo(mnist_test_images):
    model = tiny("savae", savae_steps=5, savae_step_size=0.02, savae_clip=5.0)
    x = mnist_test_images[:32]
    with torch.no_grad():
        q0 = model.encode_amortized(x)
        refined = model.encode(x)  # the test-time steps run even under no_grad
    mean, logvar = refined.components.mean[:, 0], refined.components.logvar[:, 0]
    before = elbo_of(model.decoder, x, q0.mean, q0.logvar)
    after = elbo_of(model.decoder, x, mean, logvar)
    assert after.mean() > before.mean() + 1.0
    assert (after > before).float().mean() > 0.9
    # More steps climb further; the same steps with the sign flipped go down.
    more = refine(model.decoder, x, q0.mean, q0.logvar, 20, 0.02, 5.0)[:2]
    assert elbo_of(model.decoder, x, *more).mean() > after.mean()
    down = refine(model.decoder, x, q0.mean, q0.logvar, 5, -0.02, 5.0)[:2]
    assert elbo_of(model.decoder, x, *down).mean() < before.mean()


def test_savae_clip_bounds_every_step(mnist_test_images):
    model = tiny("savae")
    x = mnist_test_images[:16]
    q0 = model.encode_amortized(x)
    mean, logvar, _ = refine(model.decoder, x, q0.mean, q0.logvar, 1, 0.5, 2.0)
    step = torch.cat([mean - q0.mean, logvar - q0.logvar], dim=-1).norm(dim=-1)
    assert (step <= 0.5 * 2.0 + 1e-5).all()


def test_savae_training_backpropagates_through_the_steps(mnist_test_images):
    """The encoder's gradient includes second derivatives; the decoder's is the partial one."""
    model = tiny("savae", savae_steps=3, savae_step_size=0.05, savae_clip=0.0).train()
    x = mnist_test_images[:32]
    head = model.encoder.head.weight

    def grads(unrolled: bool):
        torch.manual_seed(0)
        q0 = model.encode_amortized(x)
        mean, logvar, _ = refine(
            lambda z: model.decoder(z), x, q0.mean, q0.logvar, 3, 0.05, 0.0, create_graph=True
        )
        if not unrolled:  # first-order: the steps as a constant shift of the encoder's output
            mean = q0.mean + (mean - q0.mean).detach()
            logvar = q0.logvar + (logvar - q0.logvar).detach()
        return torch.autograd.grad(gaussian_elbo(model.decoder, x, mean, logvar).sum(), head)[0]

    g_full, g_first = grads(True), grads(False)
    assert torch.isfinite(g_full).all() and not torch.allclose(g_full, g_first, rtol=1e-3)

    model.zero_grad()
    loss, stats = training_loss(model, x, "savae")
    loss.backward()
    assert torch.isfinite(loss) and set(stats) == {"elbo", "elbo_encoder"}
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters())


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


def test_made_is_autoregressive():
    made = MADE(dim=6, hidden=(20, 20), context_dim=3, activation="relu")
    randomize(made)
    z, h = torch.randn(6), torch.randn(3)
    for out in (0, 1):
        jac = torch.autograd.functional.jacobian(lambda v, o=out: made(v, h)[o], z)  # (6, 6)
        assert torch.all(jac.triu() == 0), "output i must not depend on z_j for j >= i"
        assert jac.tril(-1).abs().sum() > 0


@pytest.mark.parametrize("dim,steps", [(1, 2), (3, 1), (5, 3)])
def test_iaf_log_det_matches_the_autograd_jacobian(dim, steps):
    flow = IAFFlow(dim, steps, hidden=(16, 16), context_dim=3, act="elu").double()
    randomize(flow, seed=dim)
    z, h = torch.randn(4, dim, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    _, log_det = flow(z, h)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: flow(v, h[b])[0], z[b])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0
        torch.testing.assert_close(log_det[b], logabs, rtol=0, atol=1e-9)


def test_iaf_density_and_importance_sampling(mnist_test_images):
    """log q is the base density minus the log-det; the IS bound is at least the ELBO on average."""
    model = tiny("iaf", iaf_steps=2, iaf_hidden=(16,), iaf_context_dim=5)
    randomize(model.flow, seed=3)
    x = mnist_test_images[:32]
    q = model.encode(x)
    torch.manual_seed(0)
    z, log_q = q.rsample(3)
    torch.manual_seed(0)
    z0 = q.base.rsample(3)
    z_again, log_det = model.flow(z0, q.context)
    torch.testing.assert_close(z, z_again)
    torch.testing.assert_close(log_q, q.base.log_prob(z0) - log_det)
    torch.manual_seed(0)
    ll, elbo = importance_sampled_loglik(model, x, 200, chunk_rows=1000)
    assert ll.shape == elbo.shape == (32,)
    assert ll.mean() > elbo.mean()


@pytest.mark.parametrize("method", ["vae", "recmix", "savae", "iaf"])
def test_svi_reaches_at_least_the_encoders_elbo(method, mnist_test_images):
    model = tiny(method, iaf_hidden=(16,), iaf_context_dim=5)
    x = mnist_test_images[:16]
    r = amortization_gap(model, x, steps=60, lr=0.05, samples=2, eval_samples=200)
    assert r["gap"].shape == (16,)
    assert r["gap"].mean() > 1.0
    assert (r["gap"] > -0.5).all()
    torch.testing.assert_close(r["gap"], r["svi_elbo"] - r["encoder_elbo"])


def test_svi_from_scratch_climbs_from_the_prior(mnist_test_images):
    model = tiny("vae")
    x = mnist_test_images[:16]
    r = amortization_gap(model, x, steps=0, eval_samples=200, init="scratch")
    r2 = amortization_gap(model, x, steps=100, lr=0.05, eval_samples=200, init="scratch")
    assert r2["svi_elbo"].mean() > r["svi_elbo"].mean() + 5.0
    torch.testing.assert_close(r["encoder_elbo"], r2["encoder_elbo"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("method", ["savae", "iaf"])
def test_train_and_evaluate_a_baseline_from_the_command_line(method, tmp_path):
    tiny_flags = ["--latent-dim", "4", "--encoder-hidden", "16", "--decoder-hidden", "16"]
    tiny_flags += ["--iaf-hidden", "8", "--iaf-context-dim", "4", "--savae-steps", "2"]
    out = run_cli(
        "train",
        "--method",
        method,
        *tiny_flags,
        "--epochs",
        "1",
        "--limit-batches",
        "3",
        "--eval-samples",
        "6",
        "--eval-images",
        "10",
        "--epoch-eval-images",
        "20",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == method and results["test_log_likelihood"] > -2000
    out = run_cli(
        "evaluate",
        str(tmp_path / "model.pt"),
        "--samples",
        "4",
        "--num-images",
        "6",
        "--gap-images",
        "3",
        "--svi-steps",
        "5",
        "--svi-eval-samples",
        "8",
        "--timing-repeats",
        "3",
        "--out",
        str(tmp_path / "eval.json"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["num_test_images"] == 6 and ev["gap_images"] == 3
    assert ev["inference_seconds_per_image"] > 0
