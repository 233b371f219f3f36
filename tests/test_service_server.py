"""The real server: started as a process on loopback, called over HTTP, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_support import ServerProcess, png

from service.cli import access_log, settings_from_args

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tiny_model_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_model_repo, "--drain-seconds", "0")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_import_does_not_load_torch_or_build_anything() -> None:
    code = (
        "import sys\n"
        "import service, service.http.app, service.http.v2, service.cli, service.serving.runtime\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from service.http.app import create_app\n"
        "app = create_app()\n"  # builds settings, loads nothing until the lifespan
        "assert app.state.runtime.state == 'starting'\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {**os.environ, "RECMIX_MODEL_DIR": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECMIX_PORT", "7001")
    monkeypatch.setenv("RECMIX_MAX_LOGLIK_SAMPLES", "800")
    monkeypatch.setenv("RECMIX_DEFAULT_LOGLIK_SAMPLES", "100")
    settings = settings_from_args(["--port", "9000", "--skip-bad-models", "--resize", "refuse"])
    assert settings.port == 9000
    assert settings.max_loglik_samples == 800
    assert settings.skip_bad_models is True and settings.resize == "refuse"
    assert settings_from_args([]).port == 7001
    assert str(settings_from_args(["--model-dir", "elsewhere"]).model_dir) == "elsewhere"
    assert settings_from_args(["--api-key", "k"]).api_key.get_secret_value() == "k"  # type: ignore[union-attr]
    with pytest.raises(SystemExit):
        settings_from_args(["--encode-mode", "magic"])


def test_access_log_only_at_debug_level() -> None:
    assert access_log(settings_from_args([])) is False
    assert access_log(settings_from_args(["--log-level", "debug"])) is True


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_concurrent_requests_over_http(server: ServerProcess) -> None:
    calls = [
        ("/encode", {}),
        ("/encode", {"model": "tiny-vae"}),
        ("/loglik", {"num_samples": 200}),
        ("/loglik", {"model": "tiny-vae", "num_samples": 200}),
        ("/reconstruct", {}),
        ("/sample", {"n": 4, "decode": "true"}),
    ] * 12
    images = [png(seed) for seed in range(8)]

    def call(index: int) -> tuple[str, int, dict[str, str]]:
        path, params = calls[index]
        files = {"file": ("x.png", images[index % len(images)], "image/png")}
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            response = client.post(path, params=params, files=files)
        return path, response.status_code, dict(params)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(len(calls))))
    assert all(status == 200 for _, status, _ in results), results
    metrics = httpx.get(f"{server.url}/metrics").text
    line = (
        'recmix_request_duration_seconds_count{endpoint="/encode",model="tiny-vae",'
        'status_class="2xx"} 12.0'
    )
    assert line in metrics
    assert '"POST /encode' not in server.output()  # no access log line per request by default


@pytest.mark.timeout(60)
def test_a_client_gone_mid_upload_is_counted_apart_not_as_a_5xx(server: ServerProcess) -> None:
    body = png(4)
    for path in ("/encode", "/v2/models/tiny-vae/infer"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((HOST, server.port), timeout=10) as client:
            client.sendall(head + body[:20])  # then the client goes away mid-body
    deadline = time.monotonic() + 10
    metrics = ""
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        if 'recmix_client_disconnects_total{endpoint="/v2/models/{name}/infer"} 1.0' in metrics:
            break
        time.sleep(0.1)
    assert 'recmix_client_disconnects_total{endpoint="/encode"} 1.0' in metrics
    assert 'recmix_client_disconnects_total{endpoint="/v2/models/{name}/infer"} 1.0' in metrics
    assert 'status_class="5xx"' not in metrics
    assert "internal_error" not in metrics
    output = server.output()
    assert "Traceback" not in output
    assert output.count("client disconnected before its request body was read") == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_drains_finishes_in_flight_and_exits_zero(tiny_model_repo: Path) -> None:
    proc = ServerProcess(tiny_model_repo, "--drain-seconds", "1.5")
    try:
        proc.wait_ready()
        body = png(3)
        head = (
            f"POST /encode HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        # a request in flight: headers and part of the body sent, the rest held back
        in_flight = socket.create_connection((HOST, proc.port), timeout=30)
        in_flight.sendall(head + body[:20])
        time.sleep(0.3)
        proc.process.send_signal(signal.SIGTERM)

        # while draining, readiness says 503 and new requests are still served
        deadline = time.monotonic() + 1.0
        ready = httpx.get(f"{proc.url}/readyz", timeout=5)
        while ready.status_code != 503 and time.monotonic() < deadline:
            ready = httpx.get(f"{proc.url}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(f"{proc.url}/healthz", timeout=5).status_code == 200

        # then the server stops listening, but still waits for the request in flight
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, proc.port), timeout=1).close()
                time.sleep(0.1)
            except OSError:
                break
        else:
            raise AssertionError("the server kept listening")
        assert proc.process.poll() is None, "exited with a request in flight"
        in_flight.sendall(body[20:])
        answer = b""
        while chunk := in_flight.recv(65536):
            answer += chunk
        in_flight.close()
        status_line, _, rest = answer.partition(b"\r\n")
        assert b" 200 " in status_line, answer[:300]
        payload = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert payload["model"] == "tiny-recmix" and len(payload["results"]) == 1

        assert proc.process.wait(timeout=20) == 0
        log = proc.output()
        assert "draining" in log
    finally:
        proc.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_bad_model_stops_the_start_with_a_clear_log_line(
    tiny_model_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_repo, repo)
    with (repo / "tiny-vae" / "encoder_1.onnx").open("ab") as fh:
        fh.write(b"\0")
    proc = ServerProcess(repo)
    code = proc.process.wait(timeout=60)
    log = proc.output()
    assert code != 0
    assert "refusing to start" in log and "encoder_1.onnx" in log and "size" in log

    skipping = ServerProcess(repo, "--skip-bad-models")
    try:
        skipping.wait_ready()
        models = httpx.get(f"{skipping.url}/models").json()["models"]
        assert [m["name"] for m in models] == ["tiny-recmix"]
    finally:
        assert skipping.stop() == 0


@pytest.mark.slow
def test_entry_point_is_installed() -> None:
    entry = Path(sys.executable).parent / "recmix-serve"
    assert entry.exists(), "recmix-serve is not installed: pip install -e '.[serve]'"
    done = subprocess.run([str(entry), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--model-dir" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_arguments_serve_the_shipped_models() -> None:
    shipped = {"mnist-recmix", "mnist-vae"}
    assert all((ROOT / "models" / name / "manifest.json").is_file() for name in shipped)
    proc = ServerProcess(None, "--drain-seconds", "0")
    try:
        proc.wait_ready()
        body = httpx.get(f"{proc.url}/models").json()
        assert body["default_model"] == "mnist-recmix"
        assert shipped <= {m["name"] for m in body["models"]}
        answer = httpx.post(f"{proc.url}/encode", files={"file": ("d.png", png(), "image/png")})
        assert answer.status_code == 200 and answer.json()["model"] == "mnist-recmix"
        assert len(answer.json()["results"][0]["components"]) == 4
    finally:
        assert proc.stop() == 0
