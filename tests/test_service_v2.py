"""The Open Inference Protocol (v2) routes: in process, and over HTTP with the real tritonclient."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from service_support import ServerProcess, digit, encoded, settings_for
from tritonclient.utils import InferenceServerException

from service.http.app import create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KEY = "v2-secret-key"


@pytest.fixture(scope="module")
def client(tiny_model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_model_repo))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server(tiny_model_repo: Path) -> Iterator[ServerProcess]:
    """The real server on loopback, with an API key, for tritonclient."""
    proc = ServerProcess(tiny_model_repo, "--drain-seconds", "0", "--api-key", KEY)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield connection
    connection.close()


def _images(count: int = 2) -> np.ndarray:
    """``count`` test digits as a UINT8 tensor (B, 1, 28, 28)."""
    return np.stack([digit(seed) for seed in range(count)])[:, None]


def _input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _files(images: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The images of a (B, 1, H, W) UINT8 tensor as PNG files of the same levels."""
    return [
        ("file", (f"{i}.png", encoded(image[0]), "image/png")) for i, image in enumerate(images)
    ]


def _native(url: str, path: str, images: np.ndarray, **query: Any) -> list[dict[str, Any]]:
    """The native API's answer for the same images, in one request (the same batch)."""
    response = httpx.post(
        f"{url}{path}", params=query, files=_files(images), headers={"X-API-Key": KEY}
    )
    assert response.status_code == 200, response.text
    return response.json()["results"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- in process


def test_server_metadata_announces_binary_tensors(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "recmix"
    assert "binary_tensor_data" in body["extensions"]


def test_health_live_and_ready(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_not_ready_is_a_4xx_as_the_protocol_says(tiny_model_repo: Path) -> None:
    app = create_app(settings_for(tiny_model_repo))
    unstarted = TestClient(app)  # no `with`: the models never load
    response = unstarted.get("/v2/health/ready")
    assert response.status_code == 400
    assert response.json() == {"ready": False}
    assert unstarted.get("/v2/health/live").status_code == 200


def test_model_metadata_describes_the_input_and_every_output(client: TestClient) -> None:
    body = client.get("/v2/models/tiny-recmix").json()
    version = body["versions"][0]
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in body["outputs"]}
    assert outputs == {
        "means": ("FP32", [-1, 3, 4]),
        "variances": ("FP32", [-1, 3, 4]),
        "weights": ("FP64", [-1, 3]),
        "reconstruction": ("FP32", [-1, 1, 28, 28]),
        "log_likelihood": ("FP64", [-1]),
        "elbo": ("FP64", [-1]),
    }
    assert client.get(f"/v2/models/tiny-recmix/versions/{version}").json() == body
    ready = client.get(f"/v2/models/tiny-recmix/versions/{version}/ready")
    assert ready.json() == {"name": "tiny-recmix", "ready": True}


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/v2/models/nope", 404, "no model named 'nope'"),
        ("/v2/models/tiny-vae/versions/999/ready", 404, "no version '999'"),
        ("/v2/models/tiny-vae/nothing", 404, "Not Found"),
    ],
)
def test_errors_take_the_protocols_shape(
    client: TestClient, path: str, status: int, fragment: str
) -> None:
    response = client.get(path)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and fragment in body["error"], body


def test_infer_with_json_tensors(client: TestClient) -> None:
    x = _images(2)
    request = {
        "id": "req-7",
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}
        ],
        "outputs": [{"name": "weights"}, {"name": "log_likelihood"}],
        "parameters": {"num_samples": 30, "seed": 3},
    }
    response = client.post("/v2/models/tiny-recmix/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny-recmix" and body["id"] == "req-7"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == ["weights", "log_likelihood"]
    weights = np.array(outputs["weights"]["data"]).reshape(outputs["weights"]["shape"])
    assert weights.shape == (2, 3)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-12)
    assert outputs["log_likelihood"]["shape"] == [2]
    assert all(v < 0 for v in outputs["log_likelihood"]["data"])


@pytest.mark.parametrize(
    ("request_body", "fragment"),
    [
        ({"inputs": [{"name": "y", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}, "one input named 'x'"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": [0] * 784}]}, "FP32 or UINT8"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 14, 56], "datatype": "FP32", "data": [0.0] * 784}]}, "[batch, 1, 28, 28]"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [2.0] * 784}]}, "[0, 1]"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 783}]}, "783"),
        ({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}], "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ],
)  # fmt: skip
def test_bad_infer_requests_get_a_400_that_says_what_to_fix(
    client: TestClient, request_body: dict[str, Any], fragment: str
) -> None:
    response = client.post("/v2/models/tiny-recmix/infer", json=request_body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_bad_parameters_and_limits(client: TestClient) -> None:
    x = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
    too_few = {"inputs": [x], "outputs": [{"name": "elbo"}], "parameters": {"num_samples": 2}}
    response = client.post("/v2/models/tiny-recmix/infer", json=too_few)
    assert response.status_code == 422 and "mixture order 3" in response.json()["error"]
    negative = {"inputs": [x], "parameters": {"seed": -1}, "outputs": [{"name": "elbo"}]}
    response = client.post("/v2/models/tiny-recmix/infer", json=negative)
    assert response.status_code == 422 and "'seed'" in response.json()["error"]
    too_many = {**x, "shape": [257, 1, 28, 28], "data": [0] * (257 * 784)}
    response = client.post("/v2/models/tiny-recmix/infer", json={"inputs": [too_many]})
    assert response.status_code in (400, 422)
    assert "257" in response.json()["error"] or "limit" in response.json()["error"]


def test_get_on_infer_is_a_405_with_allow(client: TestClient) -> None:
    response = client.get("/v2/models/tiny-recmix/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert set(response.json()) == {"error"}


def test_metrics_label_v2_requests(client: TestClient) -> None:
    x = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": [0] * 784}
    assert client.post("/v2/models/tiny-vae/infer", json={"inputs": [x]}).status_code == 200
    assert client.get("/v2/models/nope").status_code == 404
    text = client.get("/metrics").text
    assert (
        'recmix_request_duration_seconds_count{endpoint="/v2/models/{name}/infer",'
        'model="tiny-vae",status_class="2xx"}'
    ) in text
    assert 'recmix_errors_total{endpoint="/v2/models/{name}",kind="model_not_found"}' in text
    assert 'recmix_batch_size_count{endpoint="/encode",model="tiny-vae"}' in text


def test_openapi_documents_the_v2_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/infer"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert "tritonclient" in infer["description"]
    assert "application/json" in infer["requestBody"]["content"]


# ---------------------------------------------------------------- over HTTP, with tritonclient


def test_tritonclient_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("tiny-recmix")
    assert not triton_client.is_model_ready("nope")
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    metadata = triton_client.get_model_metadata("tiny-vae")
    assert metadata["inputs"][0]["name"] == "x"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_posterior_equals_encode(
    server: ServerProcess, triton_client: triton.InferenceServerClient, binary: bool
) -> None:
    x = _images(3)
    result = triton_client.infer(
        "tiny-recmix",
        [_input(x, binary)],
        outputs=[
            triton.InferRequestedOutput(name, binary_data=binary)
            for name in ("means", "variances", "weights")
        ],
        headers={"X-API-Key": KEY},
    )
    native = _native(server.url, "/encode", x)
    for b, answer in enumerate(native):
        components = answer["components"]
        np.testing.assert_array_equal(
            result.as_numpy("means")[b], np.array([c["mean"] for c in components], np.float32)
        )
        np.testing.assert_array_equal(
            result.as_numpy("variances")[b],
            np.array([c["variance"] for c in components], np.float32),
        )
        np.testing.assert_array_equal(
            result.as_numpy("weights")[b], np.array([c["weight"] for c in components])
        )


def test_tritonclient_default_outputs_are_the_posterior(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = (_images(1) / 255.0).astype(np.float32)  # FP32 intensities in [0, 1]
    result = triton_client.infer("tiny-vae", [_input(x)], headers={"X-API-Key": KEY})
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert names == {"means", "variances", "weights"}
    assert result.as_numpy("means").shape == (1, 1, 4)
    np.testing.assert_array_equal(result.as_numpy("weights"), [[1.0]])


def test_tritonclient_loglik_equals_native_loglik_for_the_same_seed(
    server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    x = _images(2)
    result = triton_client.infer(
        "tiny-recmix",
        [_input(x)],
        outputs=[
            triton.InferRequestedOutput(n) for n in ("log_likelihood", "elbo", "reconstruction")
        ],
        parameters={"num_samples": 60, "seed": 11},
        headers={"X-API-Key": KEY},
    )
    query = {"model": "tiny-recmix", "num_samples": 60, "seed": 11}
    native = _native(server.url, "/loglik", x, **query)
    np.testing.assert_array_equal(
        result.as_numpy("log_likelihood"), [r["log_likelihood"] for r in native]
    )
    np.testing.assert_array_equal(result.as_numpy("elbo"), [r["elbo"] for r in native])
    reconstruction = result.as_numpy("reconstruction")
    assert reconstruction.shape == (2, 1, 28, 28) and reconstruction.dtype == np.float32
    recon_native = _native(server.url, "/reconstruct", x, model="tiny-recmix", format="json")
    np.testing.assert_allclose(
        reconstruction[:, 0], [r["pixels"] for r in recon_native], rtol=1e-6, atol=1e-7
    )


def test_tritonclient_needs_the_api_key(triton_client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="API key") as raised:
        triton_client.infer("tiny-vae", [_input(_images(1))])
    assert raised.value.status() == "401"
    # health and metadata stay open, as the native API's do
    assert triton_client.is_server_ready()


def test_tritonclient_sees_protocol_errors(triton_client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as raised:
        triton_client.infer("nope", [_input(_images(1))], headers={"X-API-Key": KEY})
    assert raised.value.status() == "404"
    bad = _input(np.zeros((1, 1, 27, 28), np.uint8))
    with pytest.raises(InferenceServerException, match=r"\[batch, 1, 28, 28\]"):
        triton_client.infer("tiny-vae", [bad], headers={"X-API-Key": KEY})


def test_binary_request_by_hand_round_trips(server: ServerProcess) -> None:
    """The binary extension without tritonclient: a JSON header, then the raw tensor bytes."""
    x = _images(1)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "weights", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = httpx.post(
        f"{server.url}/v2/models/tiny-recmix/infer",
        content=header + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
            "X-API-Key": KEY,
        },
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    (output,) = meta["outputs"]
    assert output["parameters"]["binary_data_size"] == 3 * 8
    weights = np.frombuffer(response.content[length:], dtype="<f8")
    assert weights.shape == (3,) and abs(weights.sum() - 1.0) < 1e-12
    png_answer = _native(server.url, "/encode", x)[0]["components"]
    np.testing.assert_array_equal(weights, [c["weight"] for c in png_answer])
