"""Shared fixtures: tiny models exported by the real export code, and the real MNIST test images."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_test_images():
    """The first 256 MNIST test images, binarized once as evaluation does: float (256, 1, 28, 28)."""
    from training.data import binarize_once, load_mnist, to_float

    images, _ = load_mnist("test")
    return binarize_once(to_float(images[:256]))


def make_tiny_model(method: str, mixture_order: int = 3, eps_mode: str = "global", seed: int = 0):
    """A small randomly initialised model (28x28 input, hidden 32, latent 4) with non-trivial weights."""
    import torch

    from training.config import ModelConfig
    from training.model import RecMixVAE

    torch.manual_seed(seed)
    cfg = ModelConfig(
        method=method,
        latent_dim=4,
        encoder_hidden=(32,),
        decoder_hidden=(32,),
        mixture_order=mixture_order,
        eps_mode=eps_mode,
    )
    model = RecMixVAE(cfg)
    model.set_active(cfg.mixture_order)
    with torch.no_grad():
        # Move the weights off their initial values so every weight path is exercised.
        for enc in model.encoders:
            if enc.eps_head is not None:
                enc.eps_head.weight.normal_(0, 0.3)
        if model.eps_logits.requires_grad:
            model.eps_logits.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_repo(tmp_path_factory, mnist_test_images) -> Path:
    """A model repository with `tiny-recmix` (M=3, amortized eps, fused graph) and `tiny-vae`."""
    from training.export import export_model

    root = tmp_path_factory.mktemp("models")
    export_model(
        make_tiny_model("recmix", 3, "amortized"),
        root / "tiny-recmix",
        description="tiny RecMix for tests",
        parity_images=mnist_test_images[:64],
    )
    export_model(
        make_tiny_model("vae", 1),
        root / "tiny-vae",
        description="tiny VAE for tests",
        parity_images=mnist_test_images[:64],
    )
    return root
