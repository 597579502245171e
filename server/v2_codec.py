"""KServe V2 / Open Inference Protocol tensors: HTTP bodies to numpy and back. Pure: no web framework here.

Three encodings are understood, so that standard clients (tritonclient, KServe's) work unchanged:

- the protocol's JSON tensors (`"data"`, flat or nested, row-major);
- Triton's binary tensor data extension: the JSON header is followed by raw little-endian tensor bytes,
  its length given by the `Inference-Header-Content-Length` HTTP header, each binary input marked with a
  `binary_data_size` parameter; outputs come back binary when asked for with `binary_data` (per output) or
  `binary_data_output` (per request);
- Triton's classification extension: an output requested with `{"classification": k}` comes back as a
  BYTES tensor of `"value:index:label"` strings, the k highest values of its last axis, highest first.

Every size is checked against the declared shape and the caller's limits before anything is allocated.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EXTENSIONS = ("binary_tensor_data", "classification")
"""What `GET /v2` advertises, as Triton names them."""

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
        "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}  # fmt: skip
"""V2 numeric datatypes as they travel (little-endian). BYTES is produced (classification), never decoded."""

# Python types a JSON element may have for each numpy kind; bool is not a number here, though Python says so.
_JSON_TYPES = {"b": {bool}, "i": {int}, "u": {int}, "f": {int, float}}


class V2ProtocolError(ValueError):
    """A request that breaks the protocol or the model's tensor contract; `status` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model as metadata shows it; -1 marks a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of the request's `outputs`: `binary` None means "as the request-wide default says"."""

    name: str
    binary: bool | None = None
    class_count: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request; `outputs` None means every output, encoded as `binary_output` says."""

    id: str | None
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    timeout_s: float | None


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of a response: numeric, or BYTES as an object array of str."""

    name: str
    datatype: str
    data: np.ndarray
    binary: bool


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo a request's `Content-Encoding` (gzip or deflate, as tritonclient sends), up to `max_bytes`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2ProtocolError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", 415)
    inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # 32: accept a zlib or a gzip header
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise V2ProtocolError(f"request body is not valid {encoding}: {e}") from None
    if len(out) > max_bytes:
        raise V2ProtocolError(f"decompressed request body exceeds {max_bytes} bytes", 413)
    if not inflater.eof:
        raise V2ProtocolError(f"request body is truncated {encoding} data")
    return out


def decode_infer_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_elements: int,
) -> InferRequest:
    """Parse an inference request and check it against the model's inputs and outputs.

    Args:
        body: The whole (decompressed) HTTP body.
        header_length: The `Inference-Header-Content-Length` header, None when absent (all JSON).
        inputs: The model's inputs; every one must be given, nothing else.
        outputs: The model's outputs; requested outputs must be among them.
        max_elements: The most elements any one input may declare; larger ones are refused unread.

    Raises:
        V2ProtocolError: naming the field and the rule it breaks.
    """
    header, binary = _split_body(body, header_length)
    doc = _parse_json(header)
    params = _parameters(doc, "request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2ProtocolError("'id' must be a string")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise V2ProtocolError("'inputs' must be a non-empty list")
    arrays = _decode_inputs(entries, binary, inputs, max_elements)
    return InferRequest(
        id=request_id,
        inputs=arrays,
        outputs=_decode_outputs(doc.get("outputs"), outputs),
        binary_output=_flag(params, "binary_data_output", "request"),
        timeout_s=_timeout_s(params),
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    view = memoryview(body)
    if header_length is None:
        return view, view[:0]
    text = header_length.strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        raise V2ProtocolError(f"{HEADER_LENGTH} must be an integer in 1..{len(body)} (the body's length)")
    return view[: int(text)], view[int(text) :]


def _parse_json(header: memoryview) -> dict:
    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    try:
        doc = json.loads(bytes(header), parse_constant=refuse)
    except (ValueError, RecursionError) as e:
        raise V2ProtocolError(f"request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise V2ProtocolError("request must be a JSON object")
    return doc


def _decode_inputs(
    entries: list, binary: memoryview, specs: Sequence[TensorSpec], max_elements: int
) -> dict[str, np.ndarray]:
    by_name = {spec.name: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        spec = _match_input(entry, by_name, arrays)
        shape = _shape(entry, spec, max_elements)
        size = _parameters(entry, f"input {spec.name!r}").get("binary_data_size")
        if size is None:
            arrays[spec.name] = _from_json(entry, spec, shape)
        else:
            arrays[spec.name] = _from_binary(binary[offset:], size, spec, shape, "data" in entry)
            offset += size
    if offset != len(binary):
        raise V2ProtocolError(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    missing = [name for name in by_name if name not in arrays]
    if missing:
        raise V2ProtocolError(f"missing input(s) {missing}")
    return arrays


def _match_input(entry: object, by_name: dict[str, TensorSpec], seen: dict) -> TensorSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise V2ProtocolError("each input must be an object with a string 'name'")
    name = entry["name"]
    if name not in by_name:
        raise V2ProtocolError(f"unknown input {name!r}; the model's inputs are {list(by_name)}")
    if name in seen:
        raise V2ProtocolError(f"input {name!r} is given twice")
    spec = by_name[name]
    if entry.get("datatype") != spec.datatype:
        raise V2ProtocolError(
            f"input {name!r} has datatype {entry.get('datatype')!r}; the model takes {spec.datatype}"
        )
    if "shared_memory_region" in _parameters(entry, f"input {name!r}"):
        raise V2ProtocolError("the shared-memory extension is not supported; send the data in the body")
    return spec


def _shape(entry: dict, spec: TensorSpec, max_elements: int) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise V2ProtocolError(f"input {spec.name!r}: 'shape' must be a list of non-negative integers")
    fits = len(shape) == len(spec.shape) and all(w in (-1, d) for d, w in zip(shape, spec.shape, strict=True))
    if not fits:
        raise V2ProtocolError(f"input {spec.name!r} has shape {shape}; the model takes {list(spec.shape)}")
    if math.prod(shape) > max_elements:
        raise V2ProtocolError(
            f"input {spec.name!r} has {math.prod(shape)} elements; the limit is {max_elements}", 413
        )
    return tuple(shape)


def _from_json(entry: dict, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    data = entry.get("data")
    if not isinstance(data, list):
        raise V2ProtocolError(f"input {spec.name!r}: 'data' (a JSON array) or binary_data_size is required")
    dtype = DATATYPES[spec.datatype]
    try:
        flat = np.array(data, dtype=object).reshape(-1).tolist()  # a ragged nesting leaves lists in here
    except ValueError:  # nested deeper than numpy's 64 dimensions
        flat = [data]
    if not set(map(type, flat)) <= _JSON_TYPES[dtype.kind]:
        raise V2ProtocolError(
            f"input {spec.name!r}: 'data' must be a regular array of {spec.datatype} values"
        )
    if len(flat) != math.prod(shape):
        needs = f"shape {list(shape)} needs {math.prod(shape)}"
        raise V2ProtocolError(f"input {spec.name!r}: 'data' has {len(flat)} values; {needs}")
    try:
        with np.errstate(over="ignore"):
            array = np.array(flat, dtype=dtype.newbyteorder("=")).reshape(shape)
    except OverflowError:
        raise V2ProtocolError(f"input {spec.name!r}: a value is out of range for {spec.datatype}") from None
    return _finite(array, spec.name)


def _from_binary(
    rest: memoryview, size: object, spec: TensorSpec, shape: tuple[int, ...], has_data: bool
) -> np.ndarray:
    dtype = DATATYPES[spec.datatype]
    expected = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size != expected:
        raise V2ProtocolError(
            f"input {spec.name!r}: binary_data_size is {size!r}; shape {list(shape)} of {spec.datatype} "
            f"takes {expected} bytes"
        )
    if has_data:
        raise V2ProtocolError(f"input {spec.name!r} has both 'data' and binary_data_size")
    if size > len(rest):
        raise V2ProtocolError(
            f"input {spec.name!r}: {size} bytes of binary data declared, {len(rest)} left in the body"
            + ("" if len(rest) else f" (binary data needs the {HEADER_LENGTH} header)")
        )
    array = np.frombuffer(rest[:size], dtype=dtype).reshape(shape)
    return _finite(array.astype(dtype.newbyteorder("="), copy=False), spec.name)


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise V2ProtocolError(f"input {name!r} holds NaN or infinite values")
    return array


def _decode_outputs(entries: object, specs: Sequence[TensorSpec]) -> tuple[RequestedOutput, ...] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise V2ProtocolError("'outputs' must be a list")
    known = [spec.name for spec in specs]
    requested: dict[str, RequestedOutput] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise V2ProtocolError("each requested output must be an object with a string 'name'")
        name = entry["name"]
        if name not in known:
            raise V2ProtocolError(f"unknown output {name!r}; the model's outputs are {known}")
        if name in requested:
            raise V2ProtocolError(f"output {name!r} is requested twice")
        requested[name] = _requested_output(name, _parameters(entry, f"output {name!r}"))
    return tuple(requested.values())


def _requested_output(name: str, params: dict) -> RequestedOutput:
    if "shared_memory_region" in params:
        raise V2ProtocolError("the shared-memory extension is not supported; outputs come in the body")
    count = params.get("classification", 0)
    if type(count) is not int or count < 0:
        raise V2ProtocolError(f"output {name!r}: 'classification' must be a non-negative integer")
    binary = _flag(params, "binary_data", f"output {name!r}") if "binary_data" in params else None
    return RequestedOutput(name=name, binary=binary, class_count=count)


def _parameters(entry: dict, where: str) -> dict:
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise V2ProtocolError(f"{where}: 'parameters' must be an object")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if type(value) is not bool:
        raise V2ProtocolError(f"{where}: parameter {key!r} must be true or false")
    return value


def _timeout_s(params: dict) -> float | None:
    value = params.get("timeout")  # Triton's request timeout, in microseconds
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise V2ProtocolError("parameter 'timeout' must be a positive number of microseconds")
    return value / 1e6


def select_outputs(
    request: InferRequest, results: Mapping[str, np.ndarray], labels: Sequence[str]
) -> list[OutputTensor]:
    """Turn the model's results into the response tensors the request asked for, in its order.

    Args:
        request: The decoded request.
        results: Every output of the model by name, numeric arrays.
        labels: Class labels by index, appended to classification strings.
    """
    wanted = request.outputs or tuple(RequestedOutput(name) for name in results)
    tensors = []
    for out in wanted:
        binary = request.binary_output if out.binary is None else out.binary
        values = results[out.name]
        if out.class_count:
            tensors.append(OutputTensor(out.name, "BYTES", classify(values, out.class_count, labels), binary))
        else:
            tensors.append(OutputTensor(out.name, _datatype(values), values, binary))
    return tensors


def classify(values: np.ndarray, count: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification: the `count` largest entries of the last axis as "value:index[:label]"."""
    count = min(count, values.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[..., :count]
    top = np.take_along_axis(values, order, axis=-1)
    strings = [
        f"{v!s}:{i}:{labels[i]}" if i < len(labels) else f"{v!s}:{i}"
        for v, i in zip(top.reshape(-1), order.reshape(-1).tolist(), strict=True)
    ]
    return np.array(strings, dtype=object).reshape(top.shape)


def _datatype(values: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if dtype == values.dtype.newbyteorder("<"):
            return name
    raise TypeError(f"no V2 datatype for numpy {values.dtype}")


def encode_infer_response(
    model_name: str, model_version: str, request_id: str | None, outputs: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it (else None).

    Args:
        model_name: Echoed as `model_name`.
        model_version: The version that ran, echoed as `model_version`.
        request_id: The request's `id`, echoed when given.
        outputs: From `select_outputs`.
    """
    doc: dict = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"], chunks = [], []
    for out in outputs:
        entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.data.shape)}
        if out.binary:
            chunks.append(_to_bytes(out))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = out.data.reshape(-1).tolist()
        doc["outputs"].append(entry)
    header = json.dumps(doc, separators=(",", ":")).encode()
    return (header, None) if not chunks else (b"".join([header, *chunks]), len(header))


def _to_bytes(out: OutputTensor) -> bytes:
    if out.datatype != "BYTES":
        return out.data.astype(DATATYPES[out.datatype], copy=False).tobytes()
    encoded = [s.encode() for s in out.data.reshape(-1)]
    return b"".join(len(b).to_bytes(4, "little") + b for b in encoded)
