"""server.v2_codec: JSON and binary tensors, classification, limits; checked against tritonclient."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.v2_codec import (
    InferRequest,
    RequestedOutput,
    TensorSpec,
    V2ProtocolError,
    classify,
    decode_infer_request,
    decompress,
    encode_infer_response,
    select_outputs,
)

PIXELS = TensorSpec("pixel_values", "FP32", (-1, 3, -1, -1))
LOGITS = TensorSpec("logits", "FP32", (-1, 4))
LIMIT = 10_000


def _decode(doc_or_body: dict | bytes, header_length: str | None = None, specs=(PIXELS,), limit=LIMIT):
    body = doc_or_body if isinstance(doc_or_body, bytes) else json.dumps(doc_or_body).encode()
    return decode_infer_request(body, header_length, specs, (LOGITS,), limit)


def _pixels_input(data: object, shape=(1, 3, 2, 2), datatype="FP32", **extra) -> dict:
    return {"name": "pixel_values", "shape": list(shape), "datatype": datatype, "data": data, **extra}


def _error(doc_or_body, header_length=None, **kw) -> V2ProtocolError:
    with pytest.raises(V2ProtocolError) as info:
        _decode(doc_or_body, header_length, **kw)
    return info.value


def _tritonclient_body(x: np.ndarray, binary: bool, outputs=None, **kw) -> tuple[bytes, str | None]:
    inp = triton.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([inp], outputs=outputs, **kw)
    return body, None if json_size is None else str(json_size)


# --- requests as tritonclient writes them ---------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_request_decodes_to_the_same_array(binary: bool) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)]
    body, header_length = _tritonclient_body(x, binary, outputs, request_id="r-7", timeout=2_500_000)
    request = _decode(body, header_length)
    got = request.inputs["pixel_values"]
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, x)
    assert request.id == "r-7"
    assert request.timeout_s == pytest.approx(2.5)
    assert request.outputs == (RequestedOutput("logits", binary=binary, class_count=3),)


def test_tritonclient_without_outputs_asks_for_all_of_them_binary() -> None:
    body, header_length = _tritonclient_body(np.zeros((1, 3, 2, 2), np.float32), binary=True)
    request = _decode(body, header_length)
    assert request.outputs is None and request.binary_output is True and request.id is None


def test_nested_json_data_is_read_in_row_major_order() -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    flat = _decode({"inputs": [_pixels_input(x.reshape(-1).tolist())]}).inputs["pixel_values"]
    nested = _decode({"inputs": [_pixels_input(x.tolist())]}).inputs["pixel_values"]
    np.testing.assert_array_equal(flat, x)
    np.testing.assert_array_equal(nested, x)


def test_integers_are_valid_fp32_json_values() -> None:
    got = _decode({"inputs": [_pixels_input([1] * 12)]}).inputs["pixel_values"]
    assert got.dtype == np.float32 and got.sum() == 12


# --- JSON data that must be refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data, words",
    [
        ([0.0] * 11, "has 11 values; shape [1, 3, 2, 2] needs 12"),
        ([0.0] * 13, "has 13 values"),
        ([[0.0] * 6, [0.0] * 5 + [[0.0]]], "regular array of FP32"),
        ([[0.0] * 6, [0.0] * 5], "regular array of FP32"),
        ([True] + [0.0] * 11, "regular array of FP32"),
        (["0.5"] + [0.0] * 11, "regular array of FP32"),
        ([None] + [0.0] * 11, "regular array of FP32"),
        ([1e39] + [0.0] * 11, "NaN or infinite"),
        (0.5, "'data' (a JSON array) or binary_data_size is required"),
    ],
)
def test_bad_json_data_is_refused_naming_the_rule(data: object, words: str) -> None:
    error = _error({"inputs": [_pixels_input(data)]})
    assert words in str(error) and error.status == 400


def test_non_standard_json_constants_are_refused() -> None:
    body = json.dumps({"inputs": [_pixels_input([0.0] * 11 + [float("nan")])]}).encode()
    assert b"NaN" in body
    assert "not valid JSON" in str(_error(body))


@pytest.mark.parametrize(
    "spec, data, words",
    [
        (TensorSpec("i", "INT8", (2,)), [1, 200], "out of range for INT8"),
        (TensorSpec("i", "UINT8", (2,)), [1, 2.5], "regular array of UINT8"),
        (TensorSpec("i", "BOOL", (2,)), [True, 1], "regular array of BOOL"),
    ],
)
def test_integer_and_bool_datatypes_are_strict(spec: TensorSpec, data: list, words: str) -> None:
    doc = {"inputs": [{"name": "i", "shape": [2], "datatype": spec.datatype, "data": data}]}
    assert words in str(_error(doc, specs=(spec,)))


# --- envelope and contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": {"name": "pixel_values"}}, "'inputs' must be a non-empty list"),
        ({"inputs": [_pixels_input([0.0] * 12, datatype="FP16")]}, "datatype 'FP16'; the model takes FP32"),
        ({"inputs": [_pixels_input([0.0] * 16, shape=(1, 4, 2, 2))]}, "the model takes [-1, 3, -1, -1]"),
        ({"inputs": [_pixels_input([0.0] * 6, shape=(3, 2, 1))]}, "the model takes [-1, 3, -1, -1]"),
        ({"inputs": [_pixels_input([], shape=(1, 3, -2, 2))]}, "non-negative integers"),
        ({"inputs": [_pixels_input([], shape=(1, 3, True, 2))]}, "non-negative integers"),
        ({"inputs": [_pixels_input([0.0] * 12), _pixels_input([0.0] * 12)]}, "given twice"),
        ({"inputs": [{**_pixels_input([]), "name": "image"}]}, "unknown input 'image'"),
        ({"inputs": [_pixels_input([0.0] * 12)], "id": 42}, "'id' must be a string"),
        ({"inputs": [_pixels_input([0.0] * 12, parameters=[])]}, "'parameters' must be an object"),
        (
            {"inputs": [_pixels_input([0.0] * 12, parameters={"shared_memory_region": "r"})]},
            "shared-memory extension is not supported",
        ),
    ],
)
def test_requests_breaking_the_contract_are_refused(doc: dict, words: str) -> None:
    assert words in str(_error(doc))


def test_missing_input_is_named() -> None:
    other = TensorSpec("mask", "BOOL", (-1,))
    doc = {"inputs": [{"name": "mask", "shape": [1], "datatype": "BOOL", "data": [True]}]}
    assert "missing input(s) ['pixel_values']" in str(_error(doc, specs=(PIXELS, other)))


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"{" * 100_000])
def test_body_must_be_a_json_object(body: bytes) -> None:
    assert "JSON" in str(_error(body))


def test_a_huge_shape_is_refused_before_anything_is_allocated() -> None:
    doc = {"inputs": [_pixels_input([], shape=(10**9, 3, 10**6, 10**6))]}
    error = _error(doc)
    assert error.status == 413 and "the limit is 10000" in str(error)


# --- binary tensor data extension -----------------------------------------------------------------


def _binary_input(size: object) -> dict:
    return {
        "name": "pixel_values",
        "shape": [1, 3, 2, 2],
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }


def _binary_body(doc: dict, *chunks: bytes) -> tuple[bytes, str]:
    header = json.dumps(doc).encode()
    return header + b"".join(chunks), str(len(header))


def test_binary_inputs_are_read_in_order_next_to_json_ones() -> None:
    specs = (TensorSpec("a", "INT32", (2,)), TensorSpec("b", "FP32", (-1,)), TensorSpec("c", "FP64", (1,)))
    a, c = np.array([7, -9], np.int32), np.array([0.25])
    doc = {
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
            {"name": "b", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "c", "shape": [1], "datatype": "FP64", "parameters": {"binary_data_size": 8}},
        ]
    }
    request = _decode(*_binary_body(doc, a.tobytes(), c.tobytes()), specs=specs)
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], [1, 2, 3])
    np.testing.assert_array_equal(request.inputs["c"], c)


@pytest.mark.parametrize(
    "size, tail, header_length, words",
    [
        (47, b"\0" * 47, None, "takes 48 bytes"),
        ("48", b"\0" * 48, None, "binary_data_size is '48'"),
        (48, b"\0" * 40, None, "48 bytes of binary data declared, 40 left"),
        (48, b"\0" * 52, None, "4 bytes of binary data follow the inputs unclaimed"),
        (48, b"\0" * 48, "abc", "must be an integer"),
        (48, b"\0" * 48, "0", "must be an integer"),
        (48, b"\0" * 48, "999999", "must be an integer"),
        (48, np.full(12, np.nan, np.float32).tobytes(), None, "NaN or infinite"),
    ],
)
def test_bad_binary_data_is_refused(size: object, tail: bytes, header_length: str | None, words: str) -> None:
    body, own_length = _binary_body({"inputs": [_binary_input(size)]}, tail)
    assert words in str(_error(body, header_length or own_length))


def test_binary_data_without_the_header_says_the_header_is_needed() -> None:
    error = _error({"inputs": [_binary_input(48)]})
    assert "needs the Inference-Header-Content-Length header" in str(error)


def test_data_and_binary_data_size_together_are_refused() -> None:
    doc = {"inputs": [_pixels_input([0.0] * 12, parameters={"binary_data_size": 48})]}
    assert "both 'data' and binary_data_size" in str(_error(*_binary_body(doc, b"\0" * 48)))


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4).map(lambda s: (s[0], 3, *s[2:])),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    binary=st.booleans(),
)
def test_any_fp32_tensor_survives_both_encodings_exactly(x: np.ndarray, binary: bool) -> None:
    body, header_length = _tritonclient_body(x, binary)
    np.testing.assert_array_equal(_decode(body, header_length).inputs["pixel_values"], x)


# --- requested outputs and parameters -------------------------------------------------------------


@pytest.mark.parametrize(
    "outputs, parameters, words",
    [
        ([{"name": "probs"}], {}, "unknown output 'probs'; the model's outputs are ['logits']"),
        ([{"name": "logits"}, {"name": "logits"}], {}, "requested twice"),
        ([{"name": "logits", "parameters": {"classification": -1}}], {}, "non-negative integer"),
        ([{"name": "logits", "parameters": {"classification": True}}], {}, "non-negative integer"),
        ([{"name": "logits", "parameters": {"binary_data": 1}}], {}, "must be true or false"),
        ([{"name": "logits", "parameters": {"shared_memory_region": "r"}}], {}, "shared-memory"),
        ("logits", {}, "'outputs' must be a list"),
        (None, {"binary_data_output": "yes"}, "must be true or false"),
        (None, {"timeout": -5}, "positive number of microseconds"),
    ],
)
def test_bad_outputs_and_parameters_are_refused(outputs: object, parameters: dict, words: str) -> None:
    doc = {"inputs": [_pixels_input([0.0] * 12)], "parameters": parameters}
    if outputs is not None:
        doc["outputs"] = outputs
    assert words in str(_error(doc))


def test_unknown_request_parameters_are_ignored() -> None:
    doc = {"inputs": [_pixels_input([0.0] * 12)], "parameters": {"priority": 1, "custom": "x"}}
    assert _decode(doc).timeout_s is None


# --- classification --------------------------------------------------------------------------------


def test_classification_matches_tritons_documented_example() -> None:
    values = np.array([[1.1, 3.3, 0.5, 2.4]], np.float32)
    assert classify(values, 2, []).tolist() == [["3.3:1", "2.4:3"]]
    labels = [f"index_{i}_label" for i in range(4)]
    assert classify(values, 2, labels).tolist() == [["3.3:1:index_1_label", "2.4:3:index_3_label"]]


def test_classification_is_per_row_clipped_to_the_classes_and_keeps_ties_in_index_order() -> None:
    values = np.array([[0.0, 2.0, 2.0], [5.0, -1.0, 0.5]], np.float32)
    got = classify(values, 10, ["a", "b:c", "d"])
    assert got.shape == (2, 3)
    assert got.tolist() == [["2.0:1:b:c", "2.0:2:d", "0.0:0:a"], ["5.0:0:a", "0.5:2:d", "-1.0:1:b:c"]]


# --- responses, read back by tritonclient's own parser ----------------------------------------------


def _request(outputs=None, binary_output=False) -> InferRequest:
    return InferRequest(id="abc", inputs={}, outputs=outputs, binary_output=binary_output, timeout_s=None)


def _read_back(body: bytes, header_length: int | None) -> triton.InferResult:
    return triton.InferResult.from_response_body(body, header_length=header_length)


@pytest.mark.parametrize("binary", [False, True])
def test_responses_read_back_through_tritonclient(binary: bool) -> None:
    logits = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    wanted = (RequestedOutput("logits", binary=binary), RequestedOutput("top", binary=binary, class_count=2))
    results = {"logits": logits, "top": logits}
    outs = select_outputs(_request(wanted), results, ["cat", "dog", "owl", "fox"])
    body, header_length = encode_infer_response("vit", "2", "abc", outs)
    assert (header_length is not None) is binary
    result = _read_back(body, header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    top = result.as_numpy("top")
    assert top.shape == (3, 2)
    first = top[0, 0].decode() if binary else top[0, 0]
    value, index, label = first.split(":")
    assert int(index) == int(np.argmax(logits[0])) and label == ["cat", "dog", "owl", "fox"][int(index)]
    assert float(value) == pytest.approx(float(logits[0].max()), rel=1e-6)
    response = result.get_response()
    assert response["model_name"] == "vit" and response["model_version"] == "2" and response["id"] == "abc"


def test_request_wide_binary_default_and_per_output_override() -> None:
    logits = np.zeros((1, 4), np.float32)
    every = select_outputs(_request(None, binary_output=True), {"logits": logits}, [])
    assert [(o.name, o.datatype, o.binary) for o in every] == [("logits", "FP32", True)]
    override = select_outputs(
        _request((RequestedOutput("logits", binary=False),), True), {"logits": logits}, []
    )
    assert override[0].binary is False
    body, header_length = encode_infer_response("vit", "1", None, override)
    assert header_length is None and "id" not in json.loads(body)


# --- Content-Encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress), ("identity", lambda b: b)]
)
def test_compressed_bodies_are_inflated(encoding: str, pack) -> None:
    body = b'{"inputs": []}' * 100
    assert decompress(pack(body), encoding, max_bytes=len(body)) == body


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)
    assert len(bomb) < 100_000
    with pytest.raises(V2ProtocolError) as info:
        decompress(bomb, "gzip", max_bytes=1_000_000)
    assert info.value.status == 413


@pytest.mark.parametrize(
    "body, encoding, status",
    [
        (b"plain", "br", 415),
        (b"not gzip at all", "gzip", 400),
        (gzip.compress(b"x" * 1000)[:-20], "gzip", 400),
    ],
)
def test_bad_encodings_are_refused(body: bytes, encoding: str, status: int) -> None:
    with pytest.raises(V2ProtocolError) as info:
        decompress(body, encoding, max_bytes=10_000)
    assert info.value.status == status
