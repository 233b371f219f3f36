"""Codec for Open Inference Protocol (KServe v2 / Triton) REST inference bodies.

Covers JSON tensors and Triton's binary tensor data extension: a JSON header of
``Inference-Header-Content-Length`` bytes, then the raw little-endian, row-major bytes of each
binary tensor in the order the JSON lists them (``parameters.binary_data_size`` gives each size).
Pure functions over bytes, no framework: the HTTP layer maps :class:`TensorError` to 400 with
:func:`error_body`. Specs: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``
and triton-inference-server/server ``docs/protocol/extension_binary_data.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson


class TensorError(Exception):
    """A malformed or unacceptable inference request; the message says what to fix."""


DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_NAMES = ", ".join(DATATYPES)
# JSON element types each kind accepts, exact: bool is an int subclass and must not pass as one.
_JSON_TYPES: dict[str, tuple[set[type], str]] = {
    "b": ({bool}, "true or false"),
    "i": ({int}, "integers"),
    "u": ({int}, "integers"),
    "f": ({int, float}, "numbers"),
}
# Parameters of extensions this server does not implement. Refused, not ignored: ignoring them
# would answer something else than what the client asked for (e.g. no shared-memory write).
_UNSUPPORTED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_UNSUPPORTED_OUTPUT = (*_UNSUPPORTED, "classification")


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's "outputs": the tensor's name and whether to send it binary."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed and validated inference request."""

    id: str | None
    inputs: dict[str, np.ndarray]  # by name, shaped and typed as the request declared
    input_datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None  # None: the request named none (send them all)
    binary_default: bool  # parameters.binary_data_output: outputs without their own choice
    parameters: dict[str, Any]  # request-level parameters, binary_data_output removed


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object, ``{"error": message}``."""
    return {"error": message}


def _show(value: Any) -> str:
    """A repr short enough for an error message: client data can be arbitrarily long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parameters(value: Any, where: str, unsupported: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate a $parameters object: a JSON object whose values are strings, numbers or bools."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"{where}: parameters must be a JSON object, got {_show(value)}")
    for key, item in value.items():
        if not isinstance(item, (str, int, float)):  # bool is an int; null, list, object are not
            raise TensorError(f"{where}: parameter {key!r} is {_show(item)}, not a JSON scalar")
        if key in unsupported:
            raise TensorError(f"{where}: parameter {key!r} is not supported by this server")
    return dict(value)


def _name(spec: Any, where: str) -> str:
    """The name of an "inputs"/"outputs" entry, which must be an object with a non-empty name."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise TensorError(f'{where} must be an object with a non-empty string "name"')
    return spec["name"]


def _dtype(datatype: Any, where: str) -> tuple[str, np.dtype[Any]]:
    """The v2 datatype name and its numpy dtype, or a TensorError naming the supported ones."""
    if datatype == "BYTES":
        raise TensorError(f"{where}: datatype BYTES is not supported; use one of {_NAMES}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise TensorError(f"{where}: unknown datatype {_show(datatype)}; supported: {_NAMES}")
    return datatype, DATATYPES[datatype]


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of nested lists; iterative, as JSON nesting may exceed recursion limits."""
    if list not in set(map(type, data)):
        return data  # already flat: the common case, no copy
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _from_json(
    data: Any, where: str, datatype: str, dtype: np.dtype[Any], shape: list[int]
) -> np.ndarray:
    """An array from the JSON "data" (flat or nested), every element checked against the datatype."""
    if not isinstance(data, list):
        raise TensorError(
            f'{where}: "data" must be a JSON array (or send the tensor binary with '
            f"parameters.binary_data_size), got {_show(data)}"
        )
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise TensorError(f"{where}: data has {len(flat)} elements but shape {shape} needs {count}")
    allowed, what = _JSON_TYPES[dtype.kind]
    if not set(map(type, flat)) <= allowed:  # set(map(type)) runs in C: one pass, no Python loop
        i = next(i for i, v in enumerate(flat) if type(v) not in allowed)
        raise TensorError(f"{where}: element {i} is {_show(flat[i])}, {datatype} needs {what}")
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        if min(flat) < info.min or max(flat) > info.max:
            i = next(i for i, v in enumerate(flat) if not info.min <= v <= info.max)
            bounds = f"[{info.min}, {info.max}]"
            raise TensorError(f"{where}: element {i} ({flat[i]}) is outside {datatype} {bounds}")
    with np.errstate(over="ignore"):  # overflow becomes inf, refused just below with its index
        array = np.array(flat, dtype=dtype)
    # JSON cannot carry NaN or inf, so a non-finite value here is a finite number too large.
    if dtype.kind == "f" and not np.isfinite(array).all():
        i = int(np.flatnonzero(~np.isfinite(array))[0])
        raise TensorError(f"{where}: element {i} ({flat[i]}) is outside the {datatype} range")
    return array.reshape(shape)


def _from_binary(
    body: bytes, offset: int, size: Any, where: str, datatype: str, shape: list[int]
) -> np.ndarray:
    """An array from ``size`` little-endian bytes of the body at ``offset``, sizes checked first."""
    dtype, count = DATATYPES[datatype], math.prod(shape)
    if type(size) is not int or size < 0:
        raise TensorError(f"{where}: binary_data_size must be an integer >= 0, got {_show(size)}")
    if size != count * dtype.itemsize:
        raise TensorError(
            f"{where}: binary_data_size is {size} but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize} bytes"
        )
    if offset + size > len(body):
        raise TensorError(
            f"{where}: binary data needs {size} bytes at offset {offset} but the body "
            f"has only {len(body) - offset} left"
        )
    raw = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
    # Any byte but 0 or 1 would make a numpy bool that is neither True nor False.
    if dtype.kind == "b" and count and raw.view(np.uint8).max() > 1:
        raise TensorError(f"{where}: BOOL binary data must be bytes 0 or 1")
    # A copy, not a view of the body: aligned (the offset follows the JSON and need not be),
    # writeable, native byte order, and it does not keep the whole body alive.
    return raw.astype(dtype).reshape(shape)


def _outputs(raw: Any, binary_default: bool) -> list[RequestedOutput] | None:
    """The requested outputs; None when the request names none."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise TensorError(f'"outputs" must be a list, got {_show(raw)}')
    outputs: list[RequestedOutput] = []
    for j, spec in enumerate(raw):
        name = _name(spec, f"outputs[{j}]")
        where = f"output {name!r}"
        if any(o.name == name for o in outputs):
            raise TensorError(f"{where} is requested twice")
        params = _parameters(spec.get("parameters"), where, _UNSUPPORTED_OUTPUT)
        binary = params.get("binary_data", binary_default)  # the output's own choice wins
        if not isinstance(binary, bool):
            raise TensorError(f"{where}: binary_data must be true or false, got {_show(binary)}")
        outputs.append(RequestedOutput(name, binary))
    # An empty list names no output: read it as an omitted one (all outputs), not as "send none".
    return outputs or None


def parse_infer_request(
    body: bytes, header_length: int | None, *, max_elements: int
) -> InferRequest:
    """Parse and validate an inference request body (JSON, or a JSON header and binary tensors).

    ``header_length`` is the Inference-Header-Content-Length header (None when absent: the whole
    body is JSON). No tensor of more than ``max_elements`` elements is ever allocated.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise TensorError(
            f"Inference-Header-Content-Length is {header_length}, outside the body "
            f"(must be 1 to {len(body)})"
        )
    json_end = len(body) if header_length is None else header_length
    try:
        doc = orjson.loads(memoryview(body)[:json_end])
    except orjson.JSONDecodeError as exc:
        # Binary tensors after JSON sent without the header are the likely cause: say so.
        hint = (
            " (binary data needs Inference-Header-Content-Length)" if header_length is None else ""
        )
        raise TensorError(f"the inference request is not valid JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise TensorError("the inference request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError(f'"id" must be a string, got {_show(request_id)}')
    parameters = _parameters(doc.get("parameters"), "request")
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise TensorError(f"binary_data_output must be true or false, got {_show(binary_default)}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError('"inputs" must be a non-empty list of tensors')

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = json_end  # where the next binary tensor starts
    for i, spec in enumerate(raw_inputs):
        name = _name(spec, f"inputs[{i}]")
        where = f"input {name!r}"
        if name in inputs:
            raise TensorError(f"{where} is given twice")
        datatype, dtype = _dtype(spec.get("datatype"), where)
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise TensorError(f"{where}: shape must be a list of integers >= 0, got {_show(shape)}")
        # From the declared shape, before anything is allocated or the data is even looked at.
        if (count := math.prod(shape)) > max_elements:
            raise TensorError(f"{where}: shape {shape} has {count} elements, limit {max_elements}")
        params = _parameters(spec.get("parameters"), where, _UNSUPPORTED)
        if "binary_data_size" not in params:
            inputs[name] = _from_json(spec.get("data"), where, datatype, dtype, shape)
        elif "data" in spec:
            raise TensorError(f'{where}: has both "data" and parameters.binary_data_size')
        elif header_length is None:
            raise TensorError(f"{where} is binary but Inference-Header-Content-Length is missing")
        else:
            size = params["binary_data_size"]
            inputs[name] = _from_binary(body, offset, size, where, datatype, shape)
            offset += size
        datatypes[name] = datatype
    if offset != len(body):
        raise TensorError(
            f"{len(body) - offset} bytes left over after the JSON header and the binary data the "
            "inputs declare (check Inference-Header-Content-Length and binary_data_size)"
        )
    outputs = _outputs(doc.get("outputs"), binary_default)
    return InferRequest(request_id, inputs, datatypes, outputs, binary_default, parameters)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, str, np.ndarray, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode an inference response; returns the body and the headers to send with it.

    ``outputs`` holds (name, v2 datatype, array, binary). Binary outputs go after the JSON as
    little-endian bytes. JSON outputs are written by orjson straight from the array (float32 as
    its shortest round-tripping repr). JSON has no NaN or infinity: orjson writes such elements
    as null, which tritonclient reads back as NaN (so +-inf arrive as NaN); a client that needs
    them exactly asks for that output binary. A datatype that does not match the array's dtype is
    a server bug: ValueError.
    """
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, datatype, array, binary in outputs:
        dtype = DATATYPES.get(datatype)
        if dtype is None or array.dtype != dtype:
            raise ValueError(f"output {name!r}: a {array.dtype} array cannot be sent as {datatype}")
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            # orjson needs a C-contiguous native array; row-major flat, as the protocol allows.
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {
        "Inference-Header-Content-Length": str(len(header)),
        "content-type": "application/octet-stream",
    }
