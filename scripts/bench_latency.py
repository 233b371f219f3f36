"""Latency of /encode and /loglik at batch 1 over HTTP on loopback, two models interleaved.

Starts ``recmix-serve`` on a free loopback port (or uses ``--url``), then sends one image per
request, alternating between the models on one keep-alive connection each, so both see the same
machine state; reports p50 and p99 per model and their ratio.

    python scripts/bench_latency.py      # serves models/, compares mnist-recmix with mnist-vae
    python scripts/bench_latency.py --model-dir DIR --models A B --requests 2000 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

HOST = "127.0.0.1"


def test_image(path: Path | None) -> bytes:
    """The image to send: a file, or a fixed synthetic digit-like 28x28 PNG."""
    if path is not None:
        return path.read_bytes()
    yy, xx = np.mgrid[:28, :28] / 28
    ring = np.exp(-((np.hypot(yy - 0.5, xx - 0.5) - 0.28) ** 2) / 0.004)
    out = io.BytesIO()
    Image.fromarray((ring * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(
    model_dir: Path, port: int, extra: list[str], source: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m service`` on ``port``; from the checkout at ``source`` when given (its
    ``service`` package comes first on the path), to compare two versions in one run."""
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir.resolve())]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning"]
    command += ["--drain-seconds", "0", *extra]
    process = subprocess.Popen(command, cwd=source)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> float:
    """One request; its wall time in seconds (the answer is read in full and checked)."""
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status}: {payload[:300]!r}")
    return elapsed


def measure(
    host: str, port: int, models: list[str], path: str, body: bytes, requests: int, warmup: int
) -> dict[str, dict[str, float]]:
    connections = {m: http.client.HTTPConnection(host, port, timeout=60) for m in models}
    times: dict[str, list[float]] = {m: [] for m in models}
    for i in range(warmup + requests):
        # alternate which model goes first, so neither always follows the other
        order = models if i % 2 == 0 else models[::-1]
        for model in order:
            elapsed = post(
                connections[model], f"{path}{'&' if '?' in path else '?'}model={model}", body
            )
            if i >= warmup:
                times[model].append(elapsed)
    for conn in connections.values():
        conn.close()
    out = {}
    for model, values in times.items():
        ms = np.array(values) * 1e3
        out[model] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "requests": len(values),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs=2, default=["mnist-recmix", "mnist-vae"])
    parser.add_argument("--requests", type=int, default=2000, help="per model, for /encode")
    parser.add_argument("--loglik-requests", type=int, default=200, help="per model, for /loglik")
    parser.add_argument("--loglik-samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--image", type=Path, help="a PNG to send (default: a synthetic digit)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("server_flags", nargs="*", help="after --: flags for recmix-serve")
    args = parser.parse_args()

    body = test_image(args.image)
    process = None
    if args.url:
        target = args.url.removeprefix("http://").rstrip("/")
        host, _, port_text = target.partition(":")
        port = int(port_text or 80)
    else:
        host, port = HOST, free_port()
        process = start_server(args.model_dir, port, args.server_flags)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/models")
        info = {m["name"]: m for m in json.loads(conn.getresponse().read())["models"]}
        conn.close()
        report: dict[str, Any] = {
            "models": {
                m: {k: info[m][k] for k in ("mixture_order", "provider", "encode_mode")}
                for m in args.models
            },
            "cpu_count": os.cpu_count(),
        }
        report["encode"] = measure(
            host, port, args.models, "/encode", body, args.requests, args.warmup
        )
        loglik_path = f"/loglik?num_samples={args.loglik_samples}&seed=0"
        report["loglik"] = measure(
            host, port, args.models, loglik_path, body, args.loglik_requests, min(args.warmup, 10)
        )
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    first, second = args.models
    for endpoint in ("encode", "loglik"):
        figures = report[endpoint]
        ratio = figures[first]["p50_ms"] / figures[second]["p50_ms"]
        figures["p50_ratio"] = ratio
        figures["p99_ratio"] = figures[first]["p99_ms"] / figures[second]["p99_ms"]
        print(
            f"/{endpoint} (batch 1, {figures[first]['requests']} requests per model, interleaved)"
        )
        for model in args.models:
            f = figures[model]
            print(f"  {model:<16} p50 {f['p50_ms']:8.3f} ms   p99 {f['p99_ms']:8.3f} ms")
        print(f"  ratio {first}/{second}: p50 {ratio:.3f}, p99 {figures['p99_ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
