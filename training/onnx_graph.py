"""Edits to an exported ViT graph: the ranking outputs, native-grid defaults, the float16 variant,
the int8 variant.

The last three leave the position-embedding path (the nodes fed by the two resampling matrices and not by
the pixels) in float32: it is tiny, and keeping it exact keeps every variant's resolutions honest.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.model_config import OnnxIO
from server.postprocess import MAX_TOP_K

# Kept in float32 in the fp16 variant: decomposed or half-precision LayerNorm/Softmax lose accuracy in ViTs.
FP32_OPS = ("LayerNormalization", "Softmax")
RANKED = OnnxIO(ranked_probabilities="ranked_probabilities", ranked_classes="ranked_classes")
"""The graph's names with the ranking outputs `add_ranking` adds."""


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (block lists and exclusion lists refer to nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _downstream(graph: onnx.GraphProto, sources: set[str]) -> set[str]:
    """Names of nodes that (transitively) consume any tensor in `sources`; nodes are topologically sorted."""
    tensors, nodes = set(sources), set()
    for node in graph.node:
        if tensors.intersection(node.input):
            nodes.add(node.name)
            tensors.update(node.output)
    return nodes


def pos_path_nodes(model: onnx.ModelProto, io: OnnxIO) -> set[str]:
    """Nodes computing the resampled position embeddings: fed by the matrices, not by the pixels."""
    graph = model.graph
    return _downstream(graph, {io.pos_rows, io.pos_cols}) - _downstream(graph, {io.input})


def add_ranking(model: onnx.ModelProto, io: OnnxIO, num_classes: int) -> None:
    """Rank the classes inside the graph: TopK of the logits picks the first min(num_classes,
    MAX_TOP_K) classes, sorted (ties: lower index first, as ONNX specifies), and their softmax
    probabilities are gathered from a Softmax over all the logits.

    Ranked by the logits, not the probabilities: float32 probabilities of different logits can be
    equal, and the order stays the logits' (which is what ranking float64 probabilities gives). The
    server answers top-k from these two outputs (`server.postprocess.predictions`) without touching
    the logits; the logits stay the first output. Added to each variant as written (after the fp16
    conversion, which would turn the outputs of these nodes to float16), so it always ranks float32.
    """
    if io.ranked_probabilities is None or io.ranked_classes is None:
        raise ValueError("add_ranking needs the names of both ranking outputs")
    graph, count = model.graph, min(num_classes, MAX_TOP_K)
    k, top, every = (f"{io.ranked_classes}/{part}" for part in ("k", "logits", "probabilities"))
    graph.initializer.append(numpy_helper.from_array(np.array([count], np.int64), k))
    graph.node.extend([
        helper.make_node("TopK", [io.output, k], [top, io.ranked_classes], name="ranking/topk", axis=-1),
        helper.make_node("Softmax", [io.output], [every], name="ranking/softmax", axis=-1),
        helper.make_node(
            "GatherElements", [every, io.ranked_classes], [io.ranked_probabilities], name="ranking/gather",
            axis=-1,
        ),
    ])  # fmt: skip
    graph.output.extend([
        helper.make_tensor_value_info(io.ranked_probabilities, TensorProto.FLOAT, ["batch", count]),
        helper.make_tensor_value_info(io.ranked_classes, TensorProto.INT64, ["batch", count]),
    ])  # fmt: skip


def add_identity_defaults(model: onnx.ModelProto, native_grid: tuple[int, int], io: OnnxIO) -> None:
    """Add identity initializers named like the two matrix inputs: their defaults at the native grid.

    An initializer that shares a graph input's name is that input's default value (ONNX IR >= 4);
    ONNX Runtime uses it when the caller does not feed the input.
    """
    present = {init.name for init in model.graph.initializer}
    for name, size in ((io.pos_rows, native_grid[0]), (io.pos_cols, native_grid[1])):
        if name not in present:
            model.graph.initializer.append(numpy_helper.from_array(np.eye(size, dtype=np.float32), name))


def to_fp16(base: onnx.ModelProto, io: OnnxIO) -> onnx.ModelProto:
    """A float16 copy with float32 inputs and outputs, for the CUDA provider.

    Existing Cast nodes (shape arithmetic) are left alone: onnxconverter-common retypes their outputs
    without changing their target type, which gives an invalid graph.
    """
    from onnxconverter_common import float16

    model = onnx.ModelProto()
    model.CopyFrom(base)
    name_nodes(model)
    keep = pos_path_nodes(model, io) | {n.name for n in model.graph.node if n.op_type == "Cast"}
    with warnings.catch_warnings():
        # One warning per weight below fp16's range (|w| < 1e-7, set to +-1e-7): harmless, and many.
        warnings.filterwarnings("ignore", message=".*will be truncated to", category=UserWarning)
        return float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
            node_block_list=sorted(keep),
        )


class _DropQuantHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    hint = _DropQuantHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def write_int8(base: onnx.ModelProto, path: Path, io: OnnxIO) -> None:
    """Dynamic int8 quantisation (QInt8 weights, per channel) of the linear layers, written to `path`.

    Quantised: every MatMul with a constant weight (qkv, proj, fc1, fc2 and the head, whose Gemm the
    quantiser turns into a MatMul). Kept float32: the patch-embedding Conv (the first layer is the most
    sensitive), the attention products between activations and the position-embedding path.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.ModelProto()
    model.CopyFrom(base)
    name_nodes(model)
    with _quiet_quantizer():
        quantize_dynamic(
            model,
            path,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=False,  # VNNI CPUs have no u8s8 saturation problem
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(pos_path_nodes(model, io)),
            extra_options={"MatMulConstBOnly": True},
        )
