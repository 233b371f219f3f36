"""/loglik agrees with the training code's importance-sampled estimate on the same model and images.

A small RecMix model (M = 3, amortized eps) is built with the training code, exported with the
real export, and served. On four binarized MNIST test images both sides estimate log p(x) and the
ELBO with S stratified samples, several times with fresh draws, and their means must agree within
their Monte Carlo error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import settings_for

from service.http.app import create_app

torch = pytest.importorskip("torch")

NUM_SAMPLES = 999  # divisible by M = 3, as the training code's stratified estimator needs
REPEATS = 6


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, mnist_test_images: object
) -> tuple[object, Path, np.ndarray]:
    from training.config import ModelConfig
    from training.export import export_model
    from training.model import RecMixVAE

    torch.manual_seed(0)
    cfg = ModelConfig(
        method="recmix",
        mixture_order=3,
        eps_mode="amortized",
        latent_dim=4,
        encoder_hidden=(32,),
        decoder_hidden=(32,),
    )
    model = RecMixVAE(cfg)
    model.set_active(3)
    with torch.no_grad():
        # a gentler decoder than the random initialization: the posterior stays near the prior
        # and the importance weights' variance small enough for a sharp comparison
        model.decoder.net[-1].weight.mul_(0.2)
        for encoder in model.encoders:  # distinct, input-dependent weights
            encoder.eps_head.weight.normal_(0.0, 0.5)
    x = mnist_test_images[:4]  # (4, 1, 28, 28), binarized as evaluation does
    images = x[:, 0].numpy()
    repo = tmp_path_factory.mktemp("loglik-repo")
    export_model(model, repo / "tiny-recmix", name="tiny-recmix", parity_images=x)
    return model.eval(), repo, images


def test_loglik_agrees_with_the_training_estimate(
    exported: tuple[object, Path, np.ndarray],
) -> None:
    from training.objectives import importance_sampled_loglik

    model, repo, images = exported
    x = torch.from_numpy(images[:, None])
    train_ll, train_elbo = [], []
    for repeat in range(REPEATS):
        torch.manual_seed(100 + repeat)
        ll, elbo = importance_sampled_loglik(model, x, NUM_SAMPLES, sampling="stratified")
        train_ll.append(ll.numpy())
        train_elbo.append(elbo.numpy())

    body = {"images": [{"pixels": image.tolist()} for image in images]}
    service_ll, service_elbo = [], []
    with TestClient(create_app(settings_for(repo))) as client:
        for repeat in range(REPEATS):
            url = f"/loglik?num_samples={NUM_SAMPLES}&seed={repeat}"
            results = client.post(url, json=body).json()["results"]
            assert all(r["num_samples"] == NUM_SAMPLES for r in results)
            service_ll.append([r["log_likelihood"] for r in results])
            service_elbo.append([r["elbo"] for r in results])

    for name, ours, theirs in (
        ("log-likelihood", np.array(service_ll), np.array(train_ll)),
        ("ELBO", np.array(service_elbo), np.array(train_elbo)),
    ):
        # per image: the difference of the two means against its standard error (plus float32
        # rounding of the graphs); at least a hundredth of a nat of slack for a near-exact case
        difference = ours.mean(0) - theirs.mean(0)
        error = np.sqrt((ours.var(0, ddof=1) + theirs.var(0, ddof=1)) / REPEATS)
        bound = 5 * error + 0.01
        assert np.all(np.abs(difference) <= bound), (name, difference, bound)
        assert np.all(np.isfinite(ours))
    # Jensen on the same draws: the importance-sampled bound is at least the ELBO, every time
    assert np.all(np.array(service_ll) >= np.array(service_elbo))
