"""Helpers shared by the service tests: test images and apps built on a model repository."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.settings import Settings


def digit(seed: int = 0, size: int = 28) -> np.ndarray:
    """A uint8 grayscale test image: a bright blob on black, like an MNIST digit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)
    noise = rng.uniform(0, 0.3, size=(size, size))
    return np.clip((blob + noise) * 255, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "PNG", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **save)
    return out.getvalue()


def png(seed: int = 0, size: int = 28) -> bytes:
    return encoded(digit(seed, size))


def settings_for(repo: Path, **overrides: Any) -> Settings:
    """Settings for tests: the given repository, its recmix model as default, no env leaks."""
    values: dict[str, Any] = {
        "model_dir": repo,
        "default_model": "tiny-recmix",
        "drain_seconds": 0.0,
        **overrides,
    }
    return Settings(**values)
