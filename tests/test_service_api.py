"""Every endpoint and every documented error, in process (FastAPI's TestClient)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel
from service_support import digit, encoded, png, settings_for

from service.http import schemas
from service.http.app import create_app
from service.http.metrics import METRIC_NAMES, Metrics
from service.http.responses import FastJSONResponse
from service.model.manifest import Manifest
from service.model.preprocess import preprocess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def recmix(tiny_model_repo: Path) -> Manifest:
    return Manifest.load(tiny_model_repo / "tiny-recmix")


@pytest.fixture(scope="module")
def client(tiny_model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_model_repo))) as test_client:
        yield test_client


def _client(repo: Path, **overrides: Any) -> TestClient:
    return TestClient(create_app(settings_for(repo, **overrides)))


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def _files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


# ---------------------------------------------------------------- health and models


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": ["tiny-recmix", "tiny-vae"]}


def test_start_up_objects_are_frozen_while_serving(tiny_model_repo: Path) -> None:
    """Full collections under load walk only what requests create, not the loaded models."""
    import gc

    with _client(tiny_model_repo) as serving:
        assert gc.get_freeze_count() > 10_000
        assert serving.post("/encode", files=_files(png())).status_code == 200
    assert gc.get_freeze_count() == 0


def test_not_ready_before_the_models_load(tiny_model_repo: Path) -> None:
    app = create_app(settings_for(tiny_model_repo))
    test_client = TestClient(app)  # no `with`: the lifespan (model loading) never runs
    assert test_client.get("/healthz").status_code == 200
    assert test_client.get("/readyz").status_code == 503
    assert test_client.get("/readyz").json()["status"] == "starting"
    _error(test_client.post("/encode", files=_files(png())), 503, "not_ready")


def test_models(client: TestClient, tiny_model_repo: Path) -> None:
    body = client.get("/models").json()
    assert body["default_model"] == "tiny-recmix"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"tiny-recmix", "tiny-vae"}
    recmix = by_name["tiny-recmix"]
    assert recmix["mixture_order"] == 3 and recmix["default"] is True
    assert recmix["provider"] == "CPUExecutionProvider"
    assert recmix["encode_mode"] == "fused"  # the default: measured fastest over HTTP on CPU
    assert by_name["tiny-vae"]["encode_mode"] == "sequential"  # one component: nothing to fuse
    detail = client.get("/models/tiny-recmix").json()
    on_disk = Manifest.load(tiny_model_repo / "tiny-recmix")
    assert Manifest.model_validate(detail["manifest"]) == on_disk
    _error(client.get("/models/nope"), 404, "model_not_found")


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/encode", "/reconstruct", "/sample", "/loglik", "/models", "/readyz"):
        assert path in schema["paths"]
    body = schema["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    # at least one image, as the server requires
    assert body["application/json"]["schema"]["properties"]["images"]["minItems"] == 1
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["minItems"] == 1
    for path in ("/encode", "/reconstruct", "/sample", "/loglik"):
        parameters = {p["name"]: p for p in schema["paths"][path]["post"]["parameters"]}
        assert parameters["model"]["in"] == "query" and parameters["model"]["description"]
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- /encode


def _check_posterior(result: dict[str, Any], order: int, dim: int) -> None:
    components = result["components"]
    assert len(components) == order
    assert sum(c["weight"] for c in components) == pytest.approx(1.0, abs=1e-9)
    for c in components:
        assert 0.0 <= c["weight"] <= 1.0
        assert len(c["mean"]) == dim and len(c["variance"]) == dim
        assert all(v > 0 for v in c["variance"])


def test_encode_every_body_type_gives_the_same_answer(client: TestClient, recmix: Manifest) -> None:
    pixels = digit(3)
    data = encoded(pixels)
    by_multipart = client.post("/encode", files=_files(data)).json()
    by_base64 = client.post(
        "/encode", json={"images": [{"base64": base64.b64encode(data).decode()}]}
    ).json()
    by_pixels = client.post("/encode", json={"images": [{"pixels": (pixels / 255).tolist()}]})
    by_raw = client.post("/encode", content=data, headers={"content-type": "image/png"}).json()
    assert by_multipart["model"] == "tiny-recmix"
    assert by_multipart["version"] == recmix.version
    _check_posterior(by_multipart["results"][0], 3, recmix.latent_dim)
    assert by_base64 == by_multipart == by_raw
    assert by_pixels.status_code == 200
    assert by_pixels.json() == by_multipart


def test_encode_batch_keeps_request_order(client: TestClient) -> None:
    images = [png(seed) for seed in range(5)]
    batch = client.post("/encode", files=_files(*images)).json()["results"]
    assert len(batch) == 5
    for data, result in zip(images, batch, strict=True):
        single = client.post("/encode", files=_files(data)).json()["results"][0]
        for a, b in zip(single["components"], result["components"], strict=True):
            np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-5, atol=1e-6)
            assert a["weight"] == pytest.approx(b["weight"], abs=1e-6)


def test_encode_vae_has_one_component_of_weight_one(client: TestClient) -> None:
    result = client.post("/encode?model=tiny-vae", files=_files(png())).json()
    assert result["model"] == "tiny-vae"
    [component] = result["results"][0]["components"]
    assert component["weight"] == 1.0


@pytest.mark.parametrize("precision", ["auto", "float32", "int8"])
def test_encode_equals_raw_onnxruntime(tiny_model_repo: Path, precision: str) -> None:
    """The service's answer is the output of the graphs it says it runs, for the same image."""
    folder = tiny_model_repo / "tiny-recmix"
    manifest = Manifest.load(folder)
    pixels = digit(7)
    # the manifest's preprocessing, written out independently: [0, 1], threshold, NCHW
    x = (pixels.astype(np.float32) / 255.0 > manifest.input.threshold).astype(np.float32)
    x = x[None, None]
    with _client(tiny_model_repo, encoder_precision=precision) as other:
        running = other.get("/models/tiny-recmix").json()["encoder_precision"]
        answer = other.post("/encode", files=_files(encoded(pixels))).json()["results"][0]
    # on CPU, auto runs the int8 copies the model ships
    assert running == ("float32" if precision == "float32" else "int8")
    suffix = ".int8" if running == "int8" else ""
    fused = ort.InferenceSession(str(folder / f"encoder_fused{suffix}.onnx"))
    _, _, log_w = fused.run(["means", "logvars", "log_weights"], {"x": x})
    for m, component in enumerate(answer["components"], start=1):
        session = ort.InferenceSession(str(folder / f"encoder_{m}{suffix}.onnx"))
        mean, logvar = session.run(["mean", "logvar"], {"x": x})[:2]
        np.testing.assert_allclose(component["mean"], mean[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(component["variance"], np.exp(logvar[0]), rtol=1e-5, atol=1e-6)
        assert component["weight"] == pytest.approx(float(np.exp(log_w[0, m - 1])), abs=1e-5)


def _copy_without(repo: Path, source: Path, drop: Any) -> Path:
    """A copy of a model folder without the files ``drop(entry)`` picks (manifest updated)."""
    folder = repo / source.name
    shutil.copytree(source, folder)
    manifest = Manifest.load(folder)
    kept = [f for f in manifest.files if not drop(f)]
    for entry in manifest.files:
        if drop(entry):
            (folder / entry.path).unlink()
    int8_left = any(f.precision == "int8" for f in kept)
    update = {"files": kept} if int8_left else {"files": kept, "quantization": None}
    manifest.model_copy(update=update).dump(folder)
    return folder


def test_int8_asked_of_a_model_without_it_runs_float32(
    tmp_path: Path, tiny_model_repo: Path
) -> None:
    _copy_without(tmp_path, tiny_model_repo / "tiny-vae", lambda f: f.precision == "int8")
    with _client(tmp_path, encoder_precision="int8", default_model="tiny-vae") as other:
        detail = other.get("/models/tiny-vae").json()
        assert detail["encoder_precision"] == "float32" and detail["quantization"] is None
        assert other.post("/encode", files=_files(png(3))).status_code == 200


def test_fused_asked_of_a_model_without_it_runs_sequential(
    tmp_path: Path, tiny_model_repo: Path, client: TestClient
) -> None:
    _copy_without(tmp_path, tiny_model_repo / "tiny-recmix", lambda f: f.role == "fused_encoder")
    images = _files(png(1), png(2))
    with _client(tmp_path, encode_mode="fused") as other:
        assert other.get("/models/tiny-recmix").json()["encode_mode"] == "sequential"
        answer = other.post("/encode", files=images).json()
    expected = client.post("/encode", files=images).json()  # the fused graph's answer
    for a, b in zip(expected["results"], answer["results"], strict=True):
        for ca, cb in zip(a["components"], b["components"], strict=True):
            np.testing.assert_allclose(ca["mean"], cb["mean"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_encode_modes_agree(client: TestClient, tiny_model_repo: Path, mode: str) -> None:
    images = _files(png(1), png(2))
    fused = client.post("/encode", files=images).json()
    with _client(tiny_model_repo, encode_mode=mode) as other:
        assert other.get("/models/tiny-recmix").json()["encode_mode"] == mode
        answer = other.post("/encode", files=images).json()
    for a, b in zip(fused["results"], answer["results"], strict=True):
        for ca, cb in zip(a["components"], b["components"], strict=True):
            np.testing.assert_allclose(ca["mean"], cb["mean"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ca["variance"], cb["variance"], rtol=1e-5, atol=1e-6)
            assert ca["weight"] == pytest.approx(cb["weight"], abs=1e-6)


def test_encode_accepts_common_formats_and_sizes(client: TestClient, recmix: Manifest) -> None:
    pixels = digit(4)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    images = [
        encoded(pixels, "JPEG", quality=95),
        encoded(pixels, "BMP"),
        encoded(pixels, "GIF"),
        encoded(pixels, "TIFF"),
        encoded(rgb, "PNG"),
        encoded(digit(4, size=56)),  # resized to 28x28
    ]
    response = client.post("/encode", files=_files(*images))
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        _check_posterior(result, 3, recmix.latent_dim)


# ---------------------------------------------------------------- /reconstruct


def test_reconstruct_png_and_json(client: TestClient) -> None:
    data = png(5)
    response = client.post("/reconstruct", files=_files(data))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (28, 28) and image.mode == "L"
    body = client.post("/reconstruct?format=json", files=_files(data, png(6))).json()
    assert body["mode"] == "mean" and len(body["results"]) == 2
    pixels = np.array(body["results"][0]["pixels"])
    assert pixels.shape == (28, 28)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    np.testing.assert_allclose(np.asarray(image) / 255.0, pixels, atol=0.5 / 255 + 1e-9)


def test_reconstruct_from_a_sample_is_seeded(client: TestClient) -> None:
    data = png(5)
    url = "/reconstruct?format=json&mode=sample&seed=3"
    first = client.post(url, files=_files(data)).json()
    assert first == client.post(url, files=_files(data)).json()
    assert first["mode"] == "sample"
    other = client.post("/reconstruct?format=json&mode=sample&seed=4", files=_files(data)).json()
    assert other != first


def test_reconstruct_png_takes_one_image(client: TestClient) -> None:
    _error(client.post("/reconstruct", files=_files(png(), png(1))), 422, "invalid_parameter")


# ---------------------------------------------------------------- /sample


def test_sample(client: TestClient, recmix: Manifest) -> None:
    body = client.post("/sample?n=7&seed=1", files=_files(png(), png(1))).json()
    assert len(body["results"]) == 2
    for result in body["results"]:
        samples = result["samples"]
        assert len(samples) == 7
        for s in samples:
            assert 1 <= s["component"] <= 3 and len(s["z"]) == recmix.latent_dim
            assert "image_png" not in s and "pixels" not in s
    again = client.post("/sample?n=7&seed=1", files=_files(png(), png(1))).json()
    assert again == body


def test_sample_components_follow_the_weights(client: TestClient) -> None:
    data = png(2)
    weights = [
        c["weight"]
        for c in client.post("/encode", files=_files(data)).json()["results"][0]["components"]
    ]
    samples = client.post("/sample?n=1000&seed=0", files=_files(data)).json()["results"][0]
    counts = np.bincount([s["component"] for s in samples["samples"]], minlength=4)[1:]
    # binomial standard error at n = 1000 is at most 0.016
    np.testing.assert_allclose(counts / 1000, weights, atol=0.06)


def test_sample_decoded(client: TestClient) -> None:
    as_png = client.post("/sample?n=2&decode=true", files=_files(png())).json()
    sample = as_png["results"][0]["samples"][0]
    image = Image.open(io.BytesIO(base64.b64decode(sample["image_png"])))
    assert image.size == (28, 28)
    as_json = client.post("/sample?n=2&decode=true&image_format=json", files=_files(png()))
    pixels = np.array(as_json.json()["results"][0]["samples"][1]["pixels"])
    assert pixels.shape == (28, 28) and pixels.min() >= 0 and pixels.max() <= 1


def test_sample_bounds(client: TestClient) -> None:
    _error(client.post("/sample?n=0", files=_files(png())), 422, "invalid_parameter")
    _error(client.post("/sample?n=1001", files=_files(png())), 422, "invalid_parameter")
    _error(client.post("/sample?n=two", files=_files(png())), 422, "invalid_parameter")


# ---------------------------------------------------------------- /loglik


def test_loglik(client: TestClient) -> None:
    body = client.post("/loglik?seed=0", files=_files(png(), png(1))).json()
    assert body["model"] == "tiny-recmix"
    for result in body["results"]:
        assert result["num_samples"] == 1000
        assert np.isfinite(result["log_likelihood"]) and np.isfinite(result["elbo"])
        assert result["log_likelihood"] < 0
        # Jensen, on the very same samples: the importance-sampled bound is at least the ELBO
        assert result["log_likelihood"] >= result["elbo"]
    assert client.post("/loglik?seed=0", files=_files(png(), png(1))).json() == body


def test_loglik_sample_counts(client: TestClient) -> None:
    vae = client.post("/loglik?model=tiny-vae&num_samples=5000", files=_files(png())).json()
    assert vae["results"][0]["num_samples"] == 5000
    odd = client.post("/loglik?num_samples=10", files=_files(png())).json()
    assert odd["results"][0]["num_samples"] == 10
    _error(client.post("/loglik?num_samples=5001", files=_files(png())), 422, "invalid_parameter")
    _error(client.post("/loglik?num_samples=0", files=_files(png())), 422, "invalid_parameter")
    # fewer samples than components cannot sample every component
    _error(client.post("/loglik?num_samples=2", files=_files(png())), 422, "invalid_parameter")


# ---------------------------------------------------------------- bad input


def test_unknown_model(client: TestClient) -> None:
    error = _error(client.post("/encode?model=nope", files=_files(png())), 404, "model_not_found")
    assert "tiny-recmix" in error["message"]  # says what exists
    # looked up before the route's own parameters are checked
    _error(client.post("/sample?model=nope&n=0", files=_files(png())), 404, "model_not_found")


def test_unsupported_body_type(client: TestClient) -> None:
    response = client.post("/encode", content=b"hello", headers={"content-type": "text/plain"})
    _error(response, 415, "unsupported_media_type")
    _error(client.post("/encode"), 415, "unsupported_media_type")


def test_not_an_image(client: TestClient) -> None:
    _error(client.post("/encode", files=_files(b"GIF? no, plain text")), 415,
           "unsupported_media_type")  # fmt: skip
    _error(client.post("/encode", files=_files(b"")), 415, "unsupported_media_type")


def test_truncated_image(client: TestClient) -> None:
    data = encoded(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))
    error = _error(client.post("/encode", files=_files(data[: len(data) // 2])), 400,
                   "undecodable_image")  # fmt: skip
    assert "truncated" in error["message"]


def test_error_names_the_bad_image(client: TestClient) -> None:
    error = _error(client.post("/encode", files=_files(png(), b"nonsense")), 415,
                   "unsupported_media_type")  # fmt: skip
    assert error["message"].startswith("image 1:")
    assert error["details"]["image"] == 1


def test_bad_json(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    _error(client.post("/encode", content=b"{nope", headers=headers), 400, "bad_request")
    _error(client.post("/encode", json={"images": [{"base64": "***"}]}), 400, "bad_request")
    _error(client.post("/encode", json={"pictures": []}), 422, "invalid_input")
    _error(client.post("/encode", json={"images": [{}]}), 422, "invalid_input")
    both = {"base64": base64.b64encode(png()).decode(), "pixels": [[0]]}
    _error(client.post("/encode", json={"images": [both]}), 422, "invalid_input")
    _error(client.post("/encode", json={"images": []}), 422, "invalid_input")


@pytest.mark.parametrize(
    "pixels",
    [
        pytest.param([[0.0, 2.0], [0.0, 0.0]], id="out-of-range"),
        pytest.param([[0.0, -0.1]], id="negative"),
        pytest.param([[0.0, 1.0], [0.0]], id="ragged"),
        pytest.param([[["a", "b"]]], id="strings"),
        pytest.param([[[0.0, 0.0]]], id="two-channels"),
        pytest.param([0.0, 1.0], id="one-dimensional"),
        pytest.param([[[[0.0]]]], id="four-dimensional"),
    ],
)
def test_bad_pixel_arrays(client: TestClient, pixels: Any) -> None:
    _error(client.post("/encode", json={"images": [{"pixels": pixels}]}), 422, "invalid_input")


def test_too_many_pixels_is_refused_undecoded(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_pixels=100 * 100) as small:
        big = encoded(np.zeros((101, 100), dtype=np.uint8))
        error = _error(small.post("/encode", files=_files(big)), 422, "too_many_pixels")
        assert "100x101" in error["message"]
        assert small.post("/encode", files=_files(png(size=100))).status_code == 200
        huge = {"pixels": np.zeros((101, 100)).tolist()}
        _error(small.post("/encode", json={"images": [huge]}), 422, "too_many_pixels")


def test_decompression_bomb(client: TestClient) -> None:
    """A PNG that claims 60000 x 60000 pixels in a few hundred bytes is never decoded."""
    bomb = encoded(np.zeros((1, 1), dtype=np.uint8))
    width_height = (60000).to_bytes(4, "big") * 2
    ihdr = bomb[12:16] + width_height + bomb[24:29]
    import zlib

    forged = bomb[:16] + width_height + bomb[24:29] + zlib.crc32(ihdr).to_bytes(4, "big")
    forged += bomb[33:]
    _error(client.post("/encode", files=_files(forged)), 422, "too_many_pixels")


def test_resize_refused_by_setting(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, resize="refuse") as strict:
        error = _error(strict.post("/encode", files=_files(png(size=32))), 422, "invalid_input")
        assert "32x32" in error["message"] and "28x28" in error["message"]
        assert strict.post("/encode", files=_files(png())).status_code == 200


def test_too_many_images(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_images_per_request=2) as limited:
        _error(limited.post("/encode", files=_files(png(), png(), png())), 422, "too_many_images")
        many = {"images": [{"pixels": [[0.0]]}] * 3}
        _error(limited.post("/encode", json=many), 422, "too_many_images")
        assert limited.post("/encode", files=_files(png(), png())).status_code == 200


def test_body_over_the_limit(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_body_bytes=2000) as limited:
        big = encoded(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
        assert len(big) > 2000
        # refused by its Content-Length
        error = _error(
            limited.post("/encode", content=big, headers={"content-type": "image/png"}),
            413,
            "payload_too_large",
        )
        assert "2000" in error["message"]
        _error(limited.post("/encode", files=_files(big)), 413, "payload_too_large")

        # and while reading, when the length is not declared (chunked)
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        response = limited.post("/encode", content=chunks(), headers={"content-type": "image/png"})
        _error(response, 413, "payload_too_large")
        assert limited.post("/encode", files=_files(png())).status_code == 200


def test_unknown_route_and_method(client: TestClient) -> None:
    _error(client.get("/nothing-here"), 404, "not_found")
    for path in ("/encode", "/reconstruct", "/sample", "/loglik"):
        response = client.get(path)
        _error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "POST"
        # a trailing slash is redirected, method and query kept
        moved = client.post(f"{path}/?model=tiny-vae", follow_redirects=False)
        assert moved.status_code == 307
        assert moved.headers["location"].endswith(f"{path}?model=tiny-vae")
    answer = client.post("/encode/?model=tiny-vae", files=_files(png()), follow_redirects=True)
    assert answer.status_code == 200 and answer.json()["model"] == "tiny-vae"
    # the redirect is relative: never to a host the client named
    for path in ("/encode", "/models", "/v2/models/tiny-vae/infer"):
        moved = client.post(
            f"{path}/?seed=1", headers={"host": "evil.example.com"}, follow_redirects=False
        )
        assert moved.status_code == 307
        assert moved.headers["location"] == f"{path}?seed=1"
    # every 405 says what is allowed, the operational routes' too
    for path in ("/models", "/healthz", "/readyz", "/metrics"):
        response = client.post(path)
        _error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "GET", path
    # the fixed-path routes match their path exactly, nothing that starts with it
    for path in ("/encodex", "/encode/x", "/Encode"):
        _error(client.post(path, files=_files(png())), 404, "not_found")
    # a repeated query parameter: the last one counts
    twice = client.post("/encode?model=nope&model=tiny-vae", files=_files(png()))
    assert twice.status_code == 200 and twice.json()["model"] == "tiny-vae"


# ---------------------------------------------------------------- query parameters


def test_parameters_are_parsed_as_documented(client: TestClient) -> None:
    image = _files(png())
    for word, decoded in (("true", True), ("1", True), ("On", True), ("no", False), ("0", False)):
        body = client.post(f"/sample?n=1&decode={word}", files=image).json()
        assert ("image_png" in body["results"][0]["samples"][0]) is decoded, word
    for n in ("+2", " 2", "2"):
        assert len(client.post(f"/sample?n={n}", files=image).json()["results"][0]["samples"]) == 2
    for bad in ("n=1_000", "n=2.0", "n=", "decode=maybe", "image_format=gif", "seed=-1"):
        _error(client.post(f"/sample?{bad}", files=image), 422, "invalid_parameter")
    # unknown names are ignored, and the last of a repeated name counts, as FastAPI does
    body = client.post("/sample?n=1&n=3&colour=blue", files=image).json()
    assert len(body["results"][0]["samples"]) == 3


def test_every_wrong_parameter_is_named(client: TestClient) -> None:
    error = _error(
        client.post("/sample?n=0&seed=x&decode=maybe", files=_files(png())),
        422,
        "invalid_parameter",
    )
    locations = [p["location"] for p in error["details"]["problems"]]
    assert locations == ["query.n", "query.decode", "query.seed"]
    assert "greater than or equal to 1" in error["message"]


def test_parameters_are_checked_before_the_body(client: TestClient) -> None:
    # a bad parameter is a 422 even when the body is bad too: as FastAPI's routes did
    _error(
        client.post("/sample?n=0", content=b"junk", headers={"content-type": "text/plain"}),
        422,
        "invalid_parameter",
    )
    # and the model before the parameters
    _error(client.post("/sample?model=nope&n=0", files=_files(png())), 404, "model_not_found")


def test_openapi_documents_the_parameters_that_are_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    documented = {
        path: {p["name"]: p["schema"] for p in schema["paths"][path]["post"]["parameters"]}
        for path in ("/encode", "/reconstruct", "/sample", "/loglik")
    }
    assert set(documented["/encode"]) == {"model"}
    assert set(documented["/reconstruct"]) == {"model", "mode", "format", "seed"}
    assert set(documented["/sample"]) == {"model", "n", "decode", "image_format", "seed"}
    assert set(documented["/loglik"]) == {"model", "num_samples", "seed"}
    assert documented["/sample"]["n"]["minimum"] == 1
    assert documented["/reconstruct"]["format"]["enum"] == ["png", "json"]
    ok = schema["paths"]["/encode"]["post"]["responses"]["200"]["content"]["application/json"]
    name = ok["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(schema["components"]["schemas"][name]["properties"]) == {
        "model",
        "version",
        "results",
    }


# ---------------------------------------------------------------- API key


def test_api_key(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, api_key="s3cret") as locked:
        _error(locked.post("/encode", files=_files(png())), 401, "unauthorized")
        wrong = {"X-API-Key": "nope"}
        _error(locked.post("/encode", files=_files(png()), headers=wrong), 401, "unauthorized")
        basic = {"Authorization": "Basic czNjcmV0"}
        _error(locked.post("/loglik", files=_files(png()), headers=basic), 401, "unauthorized")
        ok = locked.post("/encode", files=_files(png()), headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert locked.post("/sample", files=_files(png()), headers=bearer).status_code == 200
        # checked before anything else: an unknown model or a bad parameter is still a 401
        _error(locked.post("/encode?model=nope", files=_files(png())), 401, "unauthorized")
        _error(locked.post("/loglik?num_samples=0", files=_files(png())), 401, "unauthorized")
        for open_path in ("/healthz", "/readyz", "/metrics", "/models"):
            assert locked.get(open_path).status_code == 200


# ---------------------------------------------------------------- metrics


def _samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_appear_and_move(tiny_model_repo: Path, recmix: Manifest) -> None:
    with _client(tiny_model_repo, encode_mode="concurrent") as fresh:
        text = fresh.get("/metrics").text
        for name in METRIC_NAMES:
            assert name in text
        before = _samples(fresh)
        assert fresh.post("/encode", files=_files(png(), png(1))).status_code == 200
        assert fresh.post("/loglik?num_samples=30", files=_files(png())).status_code == 200
        fresh.post("/encode", content=b"x", headers={"content-type": "text/plain"})
        after = _samples(fresh)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    ok = {"endpoint": "/encode", "model": "tiny-recmix", "status_class": "2xx"}
    assert moved("recmix_request_duration_seconds_count", **ok) == 1
    refused = {"endpoint": "/encode", "model": "tiny-recmix", "status_class": "4xx"}
    assert moved("recmix_request_duration_seconds_count", **refused) == 1
    for stage in ("preprocess", "encode", "component_1", "component_2", "component_3", "decode",
                  "loglik"):  # fmt: skip
        count = moved("recmix_inference_duration_seconds_count", model="tiny-recmix", stage=stage)
        assert count >= 1, stage
    batch = {"model": "tiny-recmix", "endpoint": "/encode"}
    assert moved("recmix_batch_size_count", **batch) == 1
    assert moved("recmix_batch_size_sum", **batch) == 2
    errors = {"endpoint": "/encode", "kind": "unsupported_media_type"}
    assert moved("recmix_errors_total", **errors) == 1
    info = {
        "model": "tiny-recmix",
        "version": recmix.version,
        "provider": "CPUExecutionProvider",
        "mixture_order": "3",
        "method": "recmix",
        "encoder_precision": "int8",  # on CPU, the int8 copies the model ships
        "encode_mode": "concurrent",  # as this client was started
    }
    assert _value(after, "recmix_model_info", **info) == 1
    assert _value(after, "recmix_requests_in_flight", endpoint="/metrics") == 1  # this request


def test_fused_encode_stage_is_timed(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, encode_mode="fused") as fused:
        fused.post("/encode", files=_files(png()))
        samples = _samples(fused)
    labels = {"model": "tiny-recmix", "stage": "fused_encode"}
    assert _value(samples, "recmix_inference_duration_seconds_count", **labels) >= 1


def test_apps_have_separate_registries(tiny_model_repo: Path) -> None:
    first, second = (
        create_app(settings_for(tiny_model_repo)),
        create_app(settings_for(tiny_model_repo)),
    )
    assert first.state.metrics.registry is not second.state.metrics.registry


def test_metric_children_are_remembered() -> None:
    metrics = Metrics()
    child = metrics.child(metrics.request_duration, "/encode", "tiny-vae", "2xx")
    assert child is metrics.child(metrics.request_duration, "/encode", "tiny-vae", "2xx")
    assert child is metrics.request_duration.labels("/encode", "tiny-vae", "2xx")
    assert metrics.child(metrics.in_flight, "/encode") is not metrics.child(
        metrics.in_flight, "/sample"
    )


def test_error_bodies_are_json_everywhere(client: TestClient) -> None:
    for response in (
        client.post("/encode", content=b"x", headers={"content-type": "text/plain"}),
        client.get("/models/none"),
        client.get("/nowhere"),
        client.post("/loglik?num_samples=-1", files=_files(png())),
    ):
        assert response.headers["content-type"] == "application/json"
        assert set(json.loads(response.content)) == {"error"}


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("url", "schema"),
    [
        ("/encode", schemas.EncodeResponse),
        ("/encode?model=tiny-vae", schemas.EncodeResponse),
        ("/reconstruct?format=json", schemas.ReconstructResponse),
        ("/reconstruct?format=json&mode=sample&seed=1", schemas.ReconstructResponse),
        ("/sample?n=3&seed=1", schemas.SampleResponse),
        ("/sample?n=2&decode=true&seed=1", schemas.SampleResponse),
        ("/sample?n=2&decode=true&image_format=json&seed=1", schemas.SampleResponse),
        ("/loglik?num_samples=30&seed=1", schemas.LoglikResponse),
    ],
)
def test_answers_match_their_documented_schemas(
    client: TestClient, url: str, schema: type[BaseModel]
) -> None:
    response = client.post(url, files=_files(png(1), png(2)))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    schema.model_validate_json(response.content, strict=True)


def test_encode_answer_holds_the_runtimes_float32_values(
    client: TestClient, recmix: Manifest
) -> None:
    """The JSON's numbers are exactly the runtime's float32 outputs, weights float64."""
    data = png(4)
    answer = client.post("/encode", files=_files(data)).json()["results"][0]["components"]
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    x = preprocess([data], recmix.input, runtime.limits)
    assert x is not None
    posterior = runtime.model("tiny-recmix").encode(x)
    means = np.array([c["mean"] for c in answer], dtype=np.float32)
    variances = np.array([c["variance"] for c in answer], dtype=np.float32)
    np.testing.assert_array_equal(means, posterior.means[0])
    np.testing.assert_array_equal(variances, np.exp(posterior.logvars[0]))
    assert [c["weight"] for c in answer] == posterior.weights[0].tolist()


def test_json_answers_write_arrays_of_every_layout() -> None:
    """Numpy arrays and scalars as JSON; a view that is not C-contiguous goes through lists."""
    grid = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    content = {
        "f32": grid,
        "view": grid.T,
        "f64": np.float64(0.1),
        "int": np.int64(3),
        "none": None,
        "nested": [[grid[0]], {"z": np.zeros(2)}],
        "nan": np.float32("nan"),
    }
    body = json.loads(FastJSONResponse(content).body)
    assert body == {
        "f32": [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5]],
        "view": np.float64(grid.T).tolist(),
        "f64": 0.1,
        "int": 3,
        "none": None,
        "nested": [[[0.0, 0.1, 0.2]], {"z": [0.0, 0.0]}],
        "nan": None,
    }


# ---------------------------------------------------------------- cost budgets


def test_work_over_budget_is_refused_before_any_work(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_loglik_work=100, max_sample_draws=10) as small:
        three = _files(png(0), png(1), png(2))
        error = _error(small.post("/loglik?num_samples=50", files=three), 413, "over_budget")
        assert "150 samples" in error["message"] and "at most 2 images" in error["message"]
        assert small.post("/loglik?num_samples=50", files=three[:2]).status_code == 200
        error = _error(small.post("/sample?n=6", files=three[:2]), 413, "over_budget")
        assert "12 draws" in error["message"] and "limit of 10" in error["message"]
        assert small.post("/sample?n=5", files=three[:2]).status_code == 200
        # the Open Inference Protocol's requests share the budget
        x = {"name": "x", "shape": [3, 1, 28, 28], "datatype": "UINT8", "data": [0] * 3 * 784}
        v2 = small.post(
            "/v2/models/tiny-recmix/infer",
            json={"inputs": [x], "outputs": [{"name": "elbo"}], "parameters": {"num_samples": 50}},
        )
        assert v2.status_code == 413 and "at most 2 images" in v2.json()["error"]


def test_an_answer_over_budget_is_refused_before_any_work(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_answer_bytes=20_000) as small:
        error = _error(
            small.post("/sample?n=5&decode=true&image_format=json", files=_files(png())),
            413,
            "over_budget",
        )
        assert "limit of 20000" in error["message"] and "PNG instead of JSON" in error["message"]
        assert small.post("/sample?n=5&decode=true", files=_files(png())).status_code == 200
        assert small.post("/encode", files=_files(png())).status_code == 200


def test_the_pixels_of_a_whole_request_are_bounded(tiny_model_repo: Path) -> None:
    with _client(tiny_model_repo, max_request_pixels=1000) as small:
        error = _error(small.post("/encode", files=_files(png(0), png(1))), 422, "too_many_pixels")
        assert "1568 pixels in all" in error["message"] and "several requests" in error["message"]
        assert small.post("/encode", files=_files(png(0))).status_code == 200
