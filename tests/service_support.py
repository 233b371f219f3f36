"""Helpers shared by the service tests: test images, settings, and the real server process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
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


HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m service`` (what ``recmix-serve`` runs) on a free loopback port."""

    def __init__(self, repo: Path | None, *flags: str) -> None:
        """``repo=None``: no model flags at all, from the repository root (the shipped models)."""
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECMIX_")}
        command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(self.port)]
        if repo is not None:
            command += ["--model-dir", str(repo), "--default-model", "tiny-recmix"]
        self.process = subprocess.Popen(
            [*command, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            cwd=ROOT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready in time")

    def output(self) -> str:
        if self.process.poll() is None:
            self.stop()
        assert self.process.stdout is not None
        return self.process.stdout.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
