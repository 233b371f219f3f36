"""Which model class implements each inference method (`ModelConfig.method`)."""

from __future__ import annotations

from torch import nn

from training.config import ModelConfig
from training.iaf import IAFVAE
from training.model import RecMixVAE
from training.savae import SAVAE


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model class of cfg.method: RecMixVAE (vae, me, recmix), SAVAE or IAFVAE."""
    if cfg.method == "savae":
        return SAVAE(cfg)
    if cfg.method == "iaf":
        return IAFVAE(cfg)
    return RecMixVAE(cfg)
