"""fp32 ONNX -> strongly-typed fp16 ONNX, and the element types a written graph declares.

TensorRT 11 builds strongly typed networks only, so an fp16 engine needs a real fp16 graph: weights and
activations in float16, with float32 kept, by explicit Casts in the graph, exactly where fp16 is known to break.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from sdrt.export.graphs import Graph
from sdrt.export.onnx_save import point_to

# Float32 islands in fp16 graphs, and why:
# - GroupNormalization / LayerNormalization: the mean and variance of a group of 4096 activations overflow or
#   lose all precision in fp16 (the classic black-image failure of SD VAEs), so statistics and scaling run in fp32.
# - Softmax: exp() of attention logits and the row sum accumulate in fp32 (diffusers' upcast_softmax).
# - The timestep / time_ids embeddings (see `_conditioning_nodes`): sin/cos of t * freq for t up to 1000
#   needs more than fp16's 11 bits of mantissa; diffusers computes them in fp32 too.
FP32_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "Softmax")


def fp16_from_fp32(src: Path, g: Graph) -> onnx.ModelProto:
    """Convert the fp32 ONNX file ``src`` to fp16 with ORT's converter and this project's fp32 islands.

    The weights stay in ``src``'s data file: the converter retypes the external tensors without their data, and
    `save_onnx(model, path, weights_from=src.parent)` converts them one by one as it writes them."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src), load_external_data=False)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            raise ValueError(f"{src}: node {i} ({node.op_type}) has no name; cannot address it for fp16 conversion")
    keep = _conditioning_nodes(model.graph, g.keep_fp32_inputs)
    if g.upcast_attention:
        keep += _attention_logit_nodes(model.graph)
    # The exporter records the type of every intermediate value, so the converter's own shape inference (which
    # for graphs over 2 GB writes and re-reads a full copy on disk) is not needed.
    blocked_ops = DEFAULT_OP_BLOCK_LIST + list(FP32_OPS)
    with _external_set_aside(model):
        model = convert_float_to_float16(
            model,
            disable_shape_infer=True,
            keep_io_types=list(g.keep_fp32_inputs),
            op_block_list=blocked_ops,
            node_block_list=keep,
        )
    _drop_duplicate_casts(model.graph)
    fp32_nodes = {n.name for n in model.graph.node if n.name in set(keep) or n.op_type in blocked_ops}
    _skip_round_trips(model.graph, fp32_nodes)
    _declare_initializer_types(model.graph)
    OnnxModel(model).topological_sort()  # the converter appends its Casts out of order
    return model


def _conditioning_nodes(graph: onnx.GraphProto, fp32_inputs: tuple[str, ...]) -> list[str]:
    """Nodes computed from the fp32 conditioning inputs alone (timestep -> sin/cos embedding), up to the first
    matrix product: diffusers runs exactly this part in fp32 and casts before the embedding's Linear layers."""
    fp32 = set(fp32_inputs)
    static = {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            continue
        ins = [i for i in node.input if i]
        if ins and any(i in fp32 for i in ins) and all(i in fp32 or i in static for i in ins):
            names.append(node.name)
            fp32.update(node.output)
    return names


def _attention_logit_nodes(graph: onnx.GraphProto) -> list[str]:
    """For `upcast_attention` models (SD 2.x): the Q·Kᵀ product and its scaling before each Softmax."""
    producer = {o: n for n in graph.node for o in n.output}
    names = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        cur = producer.get(node.input[0])
        while cur is not None and cur.op_type in ("Mul", "Div", "Add", "Cast", "MatMul"):
            names.append(cur.name)
            if cur.op_type == "MatMul":
                break
            cur = producer.get(cur.input[0])
    return names


@contextlib.contextmanager
def _external_set_aside(model: onnx.ModelProto):
    """Let the fp16 converter retype external tensors without reading them.

    The converter reads an initializer only for its shape (to declare the value's type), so for its run each
    external tensor is an empty one of shape [0]; afterwards it points back into its data file, with its own shape,
    its source length recorded (the retyping would make it ambiguous) and the declared shape restored."""
    aside = {}
    for t in model.graph.initializer:
        if uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
            aside[t.name] = (info["location"], int(info.get("offset", 0)), int(info.get("length", size)), list(t.dims))
            del t.external_data[:], t.dims[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.dims.append(0)
    yield
    for t in model.graph.initializer:
        if t.name in aside:
            location, offset, length, dims = aside[t.name]
            t.dims[:] = dims
            point_to(t, location, offset, length)
    for v in model.graph.value_info:
        if v.name in aside:
            shape = v.type.tensor_type.shape
            del shape.dim[:]
            for d in aside[v.name][3]:
                shape.dim.add().dim_value = d


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """The converter emits one Cast per use of a shared fp32 initializer, all with the same output name.
    Identical duplicates are dropped; any other clash of output names is a real error."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for node in graph.node:
        clash = [o for o in node.output if o in seen]
        if not clash:
            seen.update({o: node for o in node.output})
            keep.append(node)
            continue
        first = seen[clash[0]]
        if (node.op_type, list(node.input), list(node.output), list(node.attribute)) != (
            first.op_type,
            list(first.input),
            list(first.output),
            list(first.attribute),
        ):
            raise ValueError(f"fp16 conversion produced two different nodes writing {clash[0]!r}")
    del graph.node[:]
    graph.node.extend(keep)


def _skip_round_trips(graph: onnx.GraphProto, fp32_nodes: set[str]) -> None:
    """Where a float32 value feeds a float32 node (one island to the next: the timestep input to its embedding,
    Mul to Sin), the converter still routes it through fp16: Cast(to fp16) then Cast(to fp32), which rounds t * freq
    near 700 to steps of 0.5 and a fractional timestep to fp16. The float32 node reads the float32 value instead,
    as diffusers computes it; the fp16 Cast stays only where an fp16 node reads it."""
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    producer = {o: n for n in graph.node for o in n.output}
    declared = {v.name: v.type.tensor_type.elem_type for v in graph.input} | {
        t.name: t.data_type for t in graph.initializer
    }

    def cast_to(node: onnx.NodeProto | None) -> int | None:
        if node is None or node.op_type != "Cast":
            return None
        return next(a.i for a in node.attribute if a.name == "to")

    def is_fp32(name: str) -> bool:
        node = producer.get(name)
        if node is None:
            return declared.get(name) == F32
        return cast_to(node) == F32 or (node.op_type != "Cast" and node.name in fp32_nodes)

    outputs = {v.name for v in graph.output}
    rename, dropped = {}, set()
    for node in graph.node:
        first = producer.get(node.input[0]) if cast_to(node) == F32 else None
        if cast_to(first) != F16 or not is_fp32(first.input[0]):
            continue
        if node.output[0] in outputs:  # a graph output keeps its name: a float32 -> float32 Cast
            node.input[0] = first.input[0]
        else:
            rename[node.output[0]] = first.input[0]
            dropped.add(node.name)
    if not rename:
        return
    for name in rename:  # a float32 Cast skipped in turn (Cast to fp32, to fp16, to fp32): its own source
        while rename[name] in rename:
            rename[name] = rename[rename[name]]
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    read = {i for n in graph.node if n.name not in dropped for i in n.input} | outputs
    unread = {n.name for n in graph.node if cast_to(n) == F16 and n.output[0] not in read}
    kept = [n for n in graph.node if n.name not in dropped | unread]
    gone = {o for n in graph.node if n.name in dropped | unread for o in n.output}
    del graph.node[:]
    graph.node.extend(kept)
    info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)


def _declare_initializer_types(graph: onnx.GraphProto) -> None:
    """The converter declares every float value fp16, also the initializers it leaves float32 for the float32
    nodes (GroupNorm's scale and bias): their declared type is made their data's, so the graph passes
    `onnx.checker.check_model(full_check=True)`."""
    types = {t.name: t.data_type for t in graph.initializer}
    for v in graph.value_info:
        if v.name in types:
            v.type.tensor_type.elem_type = types[v.name]


def io_types(model: onnx.ModelProto) -> dict[str, str]:
    """``{input or output name: element type}`` as the graph declares them, e.g. ``float16``."""
    values = list(model.graph.input) + list(model.graph.output)
    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values}


def graph_precision(model: onnx.ModelProto) -> dict[str, int]:
    """Count initializer elements per data type: the evidence that a graph really is fp16."""
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type).lower()
        n = 1
        for d in t.dims:
            n *= d
        counts[name] = counts.get(name, 0) + n
    return counts
