"""Which ONNX nodes TensorRT's ONNX parser will refuse, found before a long build (and without TensorRT).

The data below is ONNX-TensorRT's published operator support matrix, ``docs/operators.md`` of
https://github.com/onnx/onnx-tensorrt (the same table NVIDIA's TensorRT documentation links as "Supported ONNX
Operators"), as published for TensorRT 10.15 GA (2026-02): opset 9 to 24, per operator the tensor types it
accepts and its restrictions. TensorRT 11.0's changelog (github.com/NVIDIA/TensorRT, CHANGELOG.md) adds the
`Swish` operator and the custom `TRT_*` ops; neither is listed here, so a newer TensorRT may accept more than this
check does (see `LIST_VERSION`). Only restrictions that can be read off a graph's structure are checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx.inliner

LIST_VERSION = (10, 15)
OPSETS = (9, 24)  # "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"

# Supported operators, grouped by the "Supported Types" column of the matrix.
_F = "FP32 FP16 BF16"
_FI = _F + " INT32 INT64"
_FIB = _FI + " BOOL"
_BY_TYPES = {
    _F: "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh "
    "CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization "
    "GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LayerNormalization LeakyRelu Log "
    "LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization ParametricSoftplus PRelu "
    "QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize RMSNormalization "
    "RNN RotaryEmbedding Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh "
    "ThresholdedRelu Upsample",
    _FI: "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul "
    "Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd "
    "ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK",
    _FIB: "Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape "
    "ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where",
    "FP32 FP16": "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero "
    "RoiAlign",
    "FP32": "STFT",
    "BOOL": "And Not Or Xor",
    "FP32 FP16 BF16 INT32 INT64 UINT8 BOOL": "Cast CastLike",
    "FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL": "Constant ConstantOfShape",
    "FP32 FP16 BF16 INT8 FP8": "Attention",
    "FP32 FP16 BF16 INT8 INT32 INT64": "Gelu",
    "FP32 FP16 BF16 FP8 INT32 INT64": "Mean",
    "FP32 FP16 BF16 INT32": "TensorScatter",
    "INT8 FP8 FP4 INT4": "DequantizeLinear",
}
SUPPORTED: dict[str, frozenset[str]] = {op: frozenset(t.split()) for t, ops in _BY_TYPES.items() for op in ops.split()}
# Listed with "N" in the matrix.
UNSUPPORTED = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement "
    "QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit "
    "TfIdfVectorizer Unique".split()
)

_P = onnx.TensorProto
_TYPE_NAMES = {  # ONNX element type -> the matrix's name; DOUBLE is cast down to FLOAT by the parser
    _P.FLOAT: "FP32",
    _P.DOUBLE: "FP32",
    _P.FLOAT16: "FP16",
    _P.BFLOAT16: "BF16",
    _P.INT32: "INT32",
    _P.INT64: "INT64",
    _P.INT8: "INT8",
    _P.UINT8: "UINT8",
    _P.BOOL: "BOOL",
    _P.FLOAT8E4M3FN: "FP8",
    _P.INT4: "INT4",
    _P.FLOAT4E2M1: "FP4",
}
_TYPED_BY_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"}


@dataclass(frozen=True)
class OpProblem:
    """One node TensorRT's parser would reject, and why."""

    graph: str
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.graph}: node {self.node!r} ({self.op}): {self.reason}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _outputs(node: onnx.NodeProto) -> list[int]:
    return [i for i, o in enumerate(node.output) if o]


def _constant_input(node: onnx.NodeProto, i: int, constants: set[str]) -> bool:
    return len(node.input) <= i or not node.input[i] or node.input[i] in constants


def _resize(node, constants) -> str | None:
    allowed = {
        "mode": ({"nearest", "linear"}, "nearest"),
        "coordinate_transformation_mode": (
            {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"},
            "half_pixel",
        ),
        "keep_aspect_ratio_policy": ({"stretch"}, "stretch"),
    }
    if _attr(node, "mode", "nearest") == "nearest":
        allowed["nearest_mode"] = ({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}, "round_prefer_floor")
    for name, (ok, default) in allowed.items():
        if (value := _attr(node, name, default)) not in ok:
            return f"{name}={value!r} is not supported (supported: {', '.join(sorted(ok))})"
    return "antialias=1 is not supported" if _attr(node, "antialias", 0) else None


def _dilations(node, constants) -> str | None:
    d = _attr(node, "dilations", [])
    return None if all(x == 1 for x in d) else f"dilations={list(d)} is not supported (must be empty or all ones)"


def _max_pool(node, constants) -> str | None:
    return "the Indices output is not supported" if 1 in _outputs(node) else _dilations(node, constants)


def _attention(node, constants) -> str | None:
    if [i for i, x in enumerate(node.input) if x and i >= 4]:
        return "inputs past_key, past_value and nonpad_kv_seqlen are not supported"
    if [i for i in _outputs(node) if i >= 1]:
        return "outputs present_key, present_value and qk_matmul_output are not supported"
    bad = [a for a in ("qk_matmul_output_mode", "softcap") if _attr(node, a, 0)]
    return f"attribute {bad[0]} is not supported" if bad else None


def _axes_constant(node, constants) -> str | None:
    return None if _constant_input(node, 1, constants) else "`axes` must be an initializer"


# op -> check of the restrictions in the matrix's "Restrictions" column that a graph's structure shows
RESTRICTIONS: dict[str, Callable[[onnx.NodeProto, set[str]], str | None]] = {
    "Resize": _resize,
    "MaxPool": _max_pool,
    "AveragePool": _dilations,
    "LpPool": _dilations,
    "Attention": _attention,
    "LayerNormalization": lambda n, c: "only the first output Y is supported" if _outputs(n) != [0] else None,
    "Constant": lambda n, c: next(
        (f"attribute {a.name} is not supported" for a in n.attribute if a.name.startswith(("sparse", "value_str"))),
        None,
    ),
    "Dropout": lambda n, c: None if _constant_input(n, 2, c) else "`is_training` must be an initializer (False)",
    "TopK": lambda n, c: None if _attr(n, "sorted", 1) == 1 else "`sorted` must be 1",
    "ScatterND": lambda n, c: None if _attr(n, "reduction", "none") == "none" else "`reduction` must be 'none'",
    "LSTM": lambda n, c: (
        "`input_forget` and `layout` must be 0" if _attr(n, "input_forget", 0) + _attr(n, "layout", 0) else None
    ),
    "CumSum": lambda n, c: None if _constant_input(n, 1, c) else "`axis` must be a build-time constant",
    **{op: _axes_constant for op in SUPPORTED if op.startswith("Reduce")},
}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value, from the declarations and ONNX shape inference (structure only)."""
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - a graph inference cannot follow is still checked with what it declares
        pass
    out: dict[str, int] = {}

    def visit(g: onnx.GraphProto) -> None:
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.HasField("tensor_type"):
                out[v.name] = v.type.tensor_type.elem_type
        out.update({t.name: t.data_type for t in g.initializer})
        for node in g.node:
            for a in node.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    visit(sub)

    visit(model.graph)
    return out


def _type_problem(node: onnx.NodeProto, types: dict[str, int]) -> str | None:
    if node.op_type in ("Cast", "CastLike"):
        names = [node.input[0], node.output[0]]
    elif node.op_type in _TYPED_BY_OUTPUT:
        names = [node.output[0]]
    else:
        names = [x for x in node.input[:1] if x]
    for name in names:
        if name not in types or types[name] == _P.UNDEFINED:
            continue
        t = _TYPE_NAMES.get(types[name])
        if t not in SUPPORTED[node.op_type]:
            t = t or onnx.TensorProto.DataType.Name(types[name])
            return f"type {t} of {name!r} is not supported (supported: {', '.join(sorted(SUPPORTED[node.op_type]))})"
    return None


def _node_problem(node: onnx.NodeProto, types: dict[str, int], constants: set[str]) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"operator of domain {node.domain!r} is not in the ONNX standard set; TensorRT needs a plugin for it"
    if node.op_type in UNSUPPORTED:
        return "not supported by TensorRT's ONNX parser"
    if node.op_type not in SUPPORTED:
        return "not in TensorRT's ONNX operator list"
    check = RESTRICTIONS.get(node.op_type)
    return (check(node, constants) if check else None) or _type_problem(node, types)


def check_model(model: onnx.ModelProto, graph: str = "") -> list[OpProblem]:
    """Every node of ``model`` (subgraphs and local functions included) that the operator list rules out."""
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and not OPSETS[0] <= opset <= OPSETS[1]:
        problems.append(OpProblem(graph, "(model)", "opset", f"opset {opset} is outside {OPSETS[0]}-{OPSETS[1]}"))
    types = _types(model)

    def visit(g: onnx.GraphProto, constants: set[str]) -> None:
        constants = constants | {t.name for t in g.initializer}
        constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
        for i, node in enumerate(g.node):
            if reason := _node_problem(node, types, constants):
                problems.append(OpProblem(graph, node.name or f"#{i}", node.op_type, reason))
            for a in node.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    visit(sub, constants)

    visit(model.graph, set())
    return problems
