"""The v2 (Open Inference Protocol) tensor codec, with tritonclient as the reference peer.

Requests are built by ``InferenceServerClient.generate_request_body`` exactly as the client sends
them; responses are read back by ``InferenceServerClient.parse_response_body`` as it reads them.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from service.http.v2_tensors import (
    DATATYPES,
    InferRequest,
    RequestedOutput,
    TensorError,
    encode_infer_response,
    error_body,
    parse_infer_request,
)

try:
    import tritonclient.http as httpclient
except ImportError:  # not a project dependency: the peer tests skip, the codec's own ones still run
    httpclient = None
needs_triton = pytest.mark.skipif(httpclient is None, reason="needs tritonclient[http]")
LIMIT = 1_000_000


def _sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random data covering the datatype's range: extremes for ints, any finite bits for floats."""
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype]
    n = int(np.prod(shape))
    if dtype.kind == "b":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        values[: min(n, 2)] = [info.min, info.max][:n]
        return values.reshape(shape)
    bits = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    bits[~np.isfinite(bits)] = 0  # JSON cannot carry non-finite values
    return bits.reshape(shape)


def _request(arrays: dict[str, np.ndarray], binary: bool, **kwargs: Any) -> tuple[bytes, Any]:
    """The (body, header length) tritonclient sends for these inputs."""
    inputs = []
    for name, array in arrays.items():
        datatype = next(k for k, v in DATATYPES.items() if v == array.dtype)
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return httpclient.InferenceServerClient.generate_request_body(inputs, **kwargs)


def _parse(body: bytes, header_length: int | None, max_elements: int = LIMIT) -> InferRequest:
    return parse_infer_request(body, header_length, max_elements=max_elements)


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Same shape, dtype and bits (a float compare would pass -0.0 for 0.0)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


# ---- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(DATATYPES))
@needs_triton
def test_every_datatype_round_trips_from_tritonclient(datatype: str, binary: bool) -> None:
    array = _sample(datatype, (3, 5), seed=len(datatype))
    body, header_length = _request({"x": array}, binary)
    assert (header_length is not None) == binary  # binary rides after a JSON header
    parsed = _parse(body, header_length)
    _same(parsed.inputs["x"], array)
    assert parsed.input_datatypes == {"x": datatype}


@needs_triton
def test_binary_and_json_inputs_give_the_same_arrays() -> None:
    images = _sample("FP32", (2, 1, 28, 28), seed=1)
    labels = np.array([0, 7, 255, 128], dtype=np.uint8)
    inputs = {"images": images, "labels": labels}
    as_binary = _parse(*_request(inputs, binary=True))
    as_json = _parse(*_request(inputs, binary=False))
    for name, array in inputs.items():
        _same(as_binary.inputs[name], array)
        _same(as_json.inputs[name], array)


def test_binary_inputs_are_little_endian_aligned_and_writeable() -> None:
    # An odd-length header puts the tensor at an odd offset of the body.
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [3],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 12},
                }
            ]
        }
    )
    header += b" " * (1 - len(header) % 2)
    array = _parse(header + struct.pack("<3i", 1, -2, 70000), len(header)).inputs["x"]
    assert array.tolist() == [1, -2, 70000]
    assert array.dtype.isnative and array.flags.aligned and array.flags.writeable


def test_nested_json_data_equals_flat() -> None:
    def body(data: list[Any]) -> bytes:
        return orjson.dumps(
            {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": data}]}
        )

    nested = _parse(body([[1, 2.5, 3], [4, 5, 6]]), None).inputs["x"]
    flat = _parse(body([1, 2.5, 3, 4, 5, 6]), None).inputs["x"]
    _same(nested, flat)
    assert nested.tolist() == [[1, 2.5, 3], [4, 5, 6]]


def test_bool_json_data() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "m", "shape": [3], "datatype": "BOOL", "data": [True, False, True]}]}
    )
    assert _parse(body, None).inputs["m"].tolist() == [True, False, True]


@needs_triton
def test_no_outputs_requested_means_none_and_binary_default() -> None:
    body, header_length = _request({"x": _sample("FP32", (2,))}, binary=False)
    assert b'"binary_data_output":true' in body  # what tritonclient adds when naming no output
    parsed = _parse(body, header_length)
    assert parsed.outputs is None
    assert parsed.binary_default is True
    assert parsed.parameters == {}


@needs_triton
def test_requested_outputs_binary_and_json() -> None:
    outputs = [
        httpclient.InferRequestedOutput("recon", binary_data=True),
        httpclient.InferRequestedOutput("z", binary_data=False),
    ]
    parsed = _parse(*_request({"x": _sample("FP32", (2,))}, binary=True, outputs=outputs))
    assert parsed.outputs == [RequestedOutput("recon", True), RequestedOutput("z", False)]
    assert (
        parsed.binary_default is False
    )  # tritonclient sets binary_data_output only without outputs


def test_binary_data_output_is_the_default_for_outputs_without_their_own_choice() -> None:
    def parsed(default: bool) -> InferRequest:
        doc = {
            "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": not default}}],
            "parameters": {"binary_data_output": default},
        }
        return _parse(orjson.dumps(doc), None)

    for default in (True, False):
        assert parsed(default).outputs == [
            RequestedOutput("a", default),
            RequestedOutput("b", not default),
        ]


def test_empty_outputs_list_means_all_outputs() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": []}
    assert _parse(orjson.dumps(doc), None).outputs is None


@needs_triton
def test_request_parameters_and_id_pass_through() -> None:
    params = {"num_samples": 8, "seed": 3, "mode": "iwae", "temperature": 0.5, "exact": True}
    body, header_length = _request(
        {"x": _sample("FP32", (2,))}, binary=True, request_id="req-42", parameters=params
    )
    parsed = _parse(body, header_length)
    assert parsed.id == "req-42"
    assert parsed.parameters == {**params}  # binary_data_output is removed, the rest untouched
    assert parsed.binary_default is True
    assert _parse(*_request({"x": _sample("FP32", (2,))}, binary=True)).id is None


# ---- request errors ---------------------------------------------------------------------------


def _doc(**input_fields: Any) -> dict[str, Any]:
    """A valid JSON request with one FP32 [2] input, its fields overridden (None drops one)."""
    tensor = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0], **input_fields}
    return {"inputs": [{k: v for k, v in tensor.items() if v is not None}]}


def _binary(size: Any = 8, tail: bytes = b"\0" * 8, **extra: Any) -> tuple[bytes, int]:
    """A binary request for an FP32 [2] input declaring ``size`` bytes, followed by ``tail``."""
    header = orjson.dumps(_doc(**{"data": None, "parameters": {"binary_data_size": size}, **extra}))
    return header + tail, len(header)


def _json(doc: Any) -> tuple[bytes, None]:
    return orjson.dumps(doc), None


BAD_REQUESTS: dict[str, tuple[tuple[bytes, int | None], str]] = {
    "invalid JSON": ((b'{"inputs": [', None), "not valid JSON"),
    "not UTF-8": ((b'{"id": "\xff"}', None), "not valid JSON"),
    "not an object": (_json([1]), "must be a JSON object"),
    "no inputs": (_json({"outputs": []}), '"inputs" must be a non-empty list'),
    "empty inputs": (_json({"inputs": []}), '"inputs" must be a non-empty list'),
    "id not a string": (_json({**_doc(), "id": 7}), '"id" must be a string'),
    "input not an object": (
        _json({"inputs": [3]}),
        'inputs[0] must be an object with a non-empty string "name"',
    ),
    "missing name": (
        _json(_doc(name=None)),
        'inputs[0] must be an object with a non-empty string "name"',
    ),
    "empty name": (
        _json(_doc(name="")),
        'inputs[0] must be an object with a non-empty string "name"',
    ),
    "duplicate name": (_json({"inputs": _doc()["inputs"] * 2}), "input 'x' is given twice"),
    "unknown datatype": (
        _json(_doc(datatype="FLOAT32")),
        "unknown datatype 'FLOAT32'; supported: BOOL",
    ),
    "missing datatype": (_json(_doc(datatype=None)), "unknown datatype None"),
    "BYTES": (_json(_doc(datatype="BYTES")), "datatype BYTES is not supported"),
    "shape not a list": (_json(_doc(shape=2)), "shape must be a list of integers >= 0, got 2"),
    "shape missing": (_json(_doc(shape=None)), "shape must be a list of integers >= 0, got None"),
    "negative dim": (_json(_doc(shape=[-2])), "shape must be a list of integers >= 0, got [-2]"),
    "float dim": (_json(_doc(shape=[2.0])), "shape must be a list of integers >= 0, got [2.0]"),
    "bool dim": (
        _json(_doc(shape=[True, 2])),
        "shape must be a list of integers >= 0, got [True, 2]",
    ),
    "too few elements": (_json(_doc(data=[1.0])), "data has 1 elements but shape [2] needs 2"),
    "too many nested": (
        _json(_doc(data=[[1, 2], [3]])),
        "data has 3 elements but shape [2] needs 2",
    ),
    "no data": (_json(_doc(data=None)), '"data" must be a JSON array'),
    "data not array": (_json(_doc(data=1.0, shape=[])), '"data" must be a JSON array'),
    "string element": (_json(_doc(data=[1.0, "2"])), "element 1 is '2', FP32 needs numbers"),
    "bool in FP32": (_json(_doc(data=[1.0, True])), "element 1 is True, FP32 needs numbers"),
    "null element": (_json(_doc(data=[None, 1.0])), "element 0 is None, FP32 needs numbers"),
    "FP32 overflow": (_json(_doc(data=[1.0, 1e39])), "element 1 (1e+39) is outside the FP32 range"),
    "FP16 overflow": (
        _json(_doc(datatype="FP16", data=[70000, 1])),
        "element 0 (70000) is outside the FP16 range",
    ),
    "UINT8 300": (
        _json(_doc(datatype="UINT8", data=[1, 300])),
        "element 1 (300) is outside UINT8 [0, 255]",
    ),
    "UINT8 negative": (
        _json(_doc(datatype="UINT8", data=[-1, 3])),
        "element 0 (-1) is outside UINT8 [0, 255]",
    ),
    "INT8 128": (
        _json(_doc(datatype="INT8", data=[0, 128])),
        "element 1 (128) is outside INT8 [-128, 127]",
    ),
    "INT64 too big": (
        _json(_doc(datatype="INT64", data=[0, 2**63])),
        "element 1 (9223372036854775808) is outside INT64",
    ),
    "INT32 fraction": (
        _json(_doc(datatype="INT32", data=[1, 1.5])),
        "element 1 is 1.5, INT32 needs integers",
    ),
    "INT32 float": (
        _json(_doc(datatype="INT32", data=[1.0, 1])),
        "element 0 is 1.0, INT32 needs integers",
    ),
    "BOOL from 1": (
        _json(_doc(datatype="BOOL", data=[True, 1])),
        "element 1 is 1, BOOL needs true or false",
    ),
    "binary too short": (_binary(tail=b"\0" * 5), "binary data needs 8 bytes at offset"),
    "binary left over": (_binary(tail=b"\0" * 9), "1 bytes left over"),
    "JSON with left over": (
        (orjson.dumps(_doc()) + b"\0\0", len(orjson.dumps(_doc()))),
        "2 bytes left over",
    ),
    "binary size wrong": (
        _binary(size=4, tail=b"\0" * 4),
        "binary_data_size is 4 but shape [2] of FP32 needs 8 bytes",
    ),
    "binary size negative": (_binary(size=-8), "binary_data_size must be an integer >= 0"),
    "binary size float": (_binary(size=8.0), "binary_data_size must be an integer >= 0"),
    "binary and data": (
        _binary(data=[1.0, 2.0]),
        'has both "data" and parameters.binary_data_size',
    ),
    "binary without header": (
        (_binary()[0], None),
        "(binary data needs Inference-Header-Content-Length)",
    ),
    "binary declared without header": (
        (_binary(tail=b"")[0], None),
        "binary but Inference-Header-Content-Length is missing",
    ),
    "header length 0": (
        (_binary()[0], 0),
        "Inference-Header-Content-Length is 0, outside the body",
    ),
    "header length negative": (
        (_binary()[0], -1),
        "Inference-Header-Content-Length is -1, outside the body",
    ),
    "header length past end": (
        (b"{}", 3),
        "Inference-Header-Content-Length is 3, outside the body (must be 1 to 2)",
    ),
    "header length cuts JSON": ((_binary()[0], _binary()[1] - 1), "not valid JSON"),
    "too many elements": (
        _json(_doc(shape=[LIMIT + 1], data=[])),
        f"has {LIMIT + 1} elements, limit {LIMIT}",
    ),
    "output twice": (
        _json({**_doc(), "outputs": [{"name": "z"}, {"name": "z"}]}),
        "output 'z' is requested twice",
    ),
    "output no name": (
        _json({**_doc(), "outputs": [{"parameters": {}}]}),
        "outputs[0] must be an object",
    ),
    "outputs not a list": (_json({**_doc(), "outputs": {"name": "z"}}), '"outputs" must be a list'),
    "output binary_data not bool": (
        _json({**_doc(), "outputs": [{"name": "z", "parameters": {"binary_data": 1}}]}),
        "output 'z': binary_data must be true or false, got 1",
    ),
    "output classification": (
        _json({**_doc(), "outputs": [{"name": "z", "parameters": {"classification": 3}}]}),
        "parameter 'classification' is not supported",
    ),
    "input shared memory": (
        _json(
            _doc(data=None, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})
        ),
        "parameter 'shared_memory_region' is not supported",
    ),
    "binary_data_output not bool": (
        _json({**_doc(), "parameters": {"binary_data_output": "yes"}}),
        "binary_data_output must be true or false, got 'yes'",
    ),
    "parameters not an object": (
        _json({**_doc(), "parameters": [1]}),
        "request: parameters must be a JSON object",
    ),
    "list parameter": (
        _json({**_doc(), "parameters": {"seeds": [1, 2]}}),
        "parameter 'seeds' is [1, 2], not a JSON scalar",
    ),
    "object parameter": (
        _json({**_doc(), "parameters": {"o": {"a": 1}}}),
        "parameter 'o' is {'a': 1}, not a JSON scalar",
    ),
    "null parameter": (
        _json({**_doc(), "parameters": {"seed": None}}),
        "parameter 'seed' is None, not a JSON scalar",
    ),
    "input list parameter": (
        _json(_doc(parameters={"p": [1]})),
        "input 'x': parameter 'p' is [1], not a JSON scalar",
    ),
}


@pytest.mark.parametrize(("request_", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_raise_tensor_error_naming_the_problem(
    request_: tuple[bytes, int | None], message: str
) -> None:
    with pytest.raises(TensorError) as caught:
        _parse(*request_)
    assert message in str(caught.value)


def test_bool_binary_bytes_must_be_0_or_1() -> None:
    header = orjson.dumps(_doc(datatype="BOOL", data=None, parameters={"binary_data_size": 2}))
    assert _parse(header + b"\1\0", len(header)).inputs["x"].tolist() == [True, False]
    with pytest.raises(TensorError, match="BOOL binary data must be bytes 0 or 1"):
        _parse(header + b"\1\2", len(header))


def test_max_elements_is_checked_from_the_shape_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10^12 FP32 elements (4 TB) declared binary with a matching size: any allocation, read or
    # size check before the limit check would fail differently (MemoryError, "body has only").
    huge = [1_000_000, 1_000_000]
    header = orjson.dumps(_doc(shape=huge, data=None, parameters={"binary_data_size": 4 * 10**12}))

    def no_allocation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("allocated before the element limit was checked")

    for name in ("frombuffer", "array", "empty", "zeros"):
        monkeypatch.setattr(np, name, no_allocation)
    with pytest.raises(
        TensorError, match=r"shape \[1000000, 1000000\] has 1000000000000 elements, limit 1000"
    ):
        _parse(header + b"\0" * 8, len(header), max_elements=1000)


@needs_triton
def test_max_elements_boundary() -> None:
    body, header_length = _request({"x": _sample("FP32", (4, 5))}, binary=True)
    assert _parse(body, header_length, max_elements=20).inputs["x"].shape == (4, 5)
    with pytest.raises(TensorError, match="has 20 elements, limit 19"):
        _parse(body, header_length, max_elements=19)


# ---- responses --------------------------------------------------------------------------------


def _read(body: bytes, headers: dict[str, str]) -> Any:
    """Parse a response as tritonclient does."""
    length = headers.get("Inference-Header-Content-Length")
    return httpclient.InferenceServerClient.parse_response_body(
        body,
        verbose=False,
        header_length=None if length is None else int(length),
        content_encoding=None,
    )


@needs_triton
def test_mixed_binary_and_json_outputs_parse_back_identically_with_tritonclient() -> None:
    outputs = [
        ("recon_bin", "FP32", _sample("FP32", (4, 7), seed=1), True),
        ("recon_json", "FP32", _sample("FP32", (4, 7), seed=2), False),
        ("mask", "BOOL", _sample("BOOL", (5,)), True),
        ("counts", "INT64", _sample("INT64", (2, 3)), False),
        ("big", "UINT64", _sample("UINT64", (3,)), False),
        ("half", "FP16", _sample("FP16", (6,)), False),
        ("bytes", "UINT8", _sample("UINT8", (0, 3)), True),  # empty binary output
        ("scalar", "FP64", np.array(0.1), False),
        ("strided", "INT16", _sample("INT16", (4, 6))[:, ::2], True),
        ("strided_json", "INT16", _sample("INT16", (4, 6))[::2].T, False),
    ]
    body, headers = encode_infer_response("recmix", "3", "req-7", outputs, {"num_samples": 8})
    assert headers["content-type"] == "application/octet-stream"
    header_length = int(headers["Inference-Header-Content-Length"])
    document = orjson.loads(body[:header_length])  # exactly the JSON part
    result = _read(body, headers)
    for name, _, array, _ in outputs:
        _same(result.as_numpy(name), np.array(array, order="C"))
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        "recmix",
        "3",
        "req-7",
    )
    assert response["parameters"] == {"num_samples": 8}
    by_name = {o["name"]: o for o in document["outputs"]}
    assert [o["name"] for o in document["outputs"]] == [o[0] for o in outputs]  # order kept
    assert by_name["recon_bin"]["parameters"] == {"binary_data_size": 4 * 7 * 4}
    assert "data" not in by_name["recon_bin"]
    flat = np.array(by_name["recon_json"]["data"], dtype=np.float32)  # flat, row-major
    _same(flat, outputs[1][2].reshape(-1))
    assert "parameters" not in by_name["recon_json"]
    assert by_name["scalar"] == {"name": "scalar", "datatype": "FP64", "shape": [], "data": [0.1]}
    binary_bytes = sum(o[2].nbytes for o in outputs if o[3])
    assert len(body) == header_length + binary_bytes


@needs_triton
def test_json_fp32_is_bit_exact_through_tritonclient() -> None:
    values = _sample("FP32", (200_000,), seed=5)
    values[:4] = [0.1, 1 / 3, np.finfo(np.float32).tiny / 8, -0.0]  # short, long, subnormal, -0
    body, headers = encode_infer_response("m", None, None, [("y", "FP32", values, False)])
    _same(_read(body, headers).as_numpy("y"), values)


@needs_triton
def test_json_only_response_has_no_header_length() -> None:
    body, headers = encode_infer_response(
        "m", None, None, [("y", "UINT8", np.arange(6, dtype=np.uint8), False)]
    )
    assert headers == {"content-type": "application/json"}
    assert orjson.loads(body) == {
        "model_name": "m",
        "outputs": [{"name": "y", "datatype": "UINT8", "shape": [6], "data": [0, 1, 2, 3, 4, 5]}],
    }  # no model_version, id or parameters when not given
    _same(_read(body, headers).as_numpy("y"), np.arange(6, dtype=np.uint8))


@needs_triton
def test_non_finite_values_are_null_in_json_and_exact_in_binary() -> None:
    values = np.array([1.5, np.nan, np.inf, -np.inf], dtype=np.float32)
    body, headers = encode_infer_response(
        "m", None, None, [("j", "FP32", values, False), ("b", "FP32", values, True)]
    )
    header = orjson.loads(body[: int(headers["Inference-Header-Content-Length"])])
    assert header["outputs"][0]["data"] == [1.5, None, None, None]  # valid JSON: null, not NaN
    result = _read(body, headers)
    assert np.isnan(result.as_numpy("j")[1:]).all() and result.as_numpy("j")[0] == 1.5
    _same(result.as_numpy("b"), values)


def test_response_datatype_must_match_the_array() -> None:
    with pytest.raises(ValueError, match="a float64 array cannot be sent as FP32"):
        encode_infer_response("m", None, None, [("y", "FP32", np.zeros(2), True)])
    with pytest.raises(ValueError, match="cannot be sent as BYTES"):
        encode_infer_response("m", None, None, [("y", "BYTES", np.zeros(2), False)])


@needs_triton
def test_request_parsed_then_answered_round_trip() -> None:
    x = _sample("FP32", (3, 4), seed=9)
    request = _parse(*_request({"x": x}, binary=True, request_id="abc"))
    outputs = [
        (name, request.input_datatypes[name], array * 2, request.binary_default)
        for name, array in request.inputs.items()
    ]
    body, headers = encode_infer_response("m", None, request.id, outputs)
    result = _read(body, headers)
    assert result.get_response()["id"] == "abc"
    _same(result.as_numpy("x"), x * 2)


def test_error_body() -> None:
    assert error_body("input 'x' is given twice") == {"error": "input 'x' is given twice"}
