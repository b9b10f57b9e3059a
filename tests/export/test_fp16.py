"""export/fp16.py on graphs written by hand with onnx.helper, laid out as the exporter leaves them (every node named,
every value's type recorded), run in ONNX Runtime against float64 numpy references."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.fp16 import _drop_duplicate_casts, fp16_from_fp32, graph_precision, io_types
from sdrt.export.graphs import Graph
from sdrt.export.onnx_save import save_onnx

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 8)).astype(np.float32)
SCALE, BIAS = RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
FREQ = np.float32(0.5)  # t * 0.5 for integer t is exact in fp16 too (see the xfail below)


def save(path, nodes, inputs, outputs, initializers, values) -> None:
    """An opset-21 model at ``path``: ``inputs``/``outputs``/``values`` as {name: shape}, all float32; as the
    exporter does, the initializers' types are recorded too."""
    info = [helper.make_tensor_value_info(k, F32, s) for k, s in values.items()]
    info += [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for k, a in initializers.items()
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, F32, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(k, F32, s) for k, s in outputs.items()],
        [numpy_helper.from_array(a, k) for k, a in initializers.items()],
        value_info=info,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


def unet_like(path, freq: np.float32 = FREQ) -> Graph:
    """x [2,4,8] -> MatMul -> GroupNorm -> GroupNorm (sharing the first's scale and bias) -> Softmax, plus a
    timestep embedding sin(t * FREQ) [2] -> [2,1,1] added to it: out [2,4,8]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("GroupNormalization", ["a", "scale", "bias"], ["b"], name="gn", num_groups=2, epsilon=1e-5),
        helper.make_node("GroupNormalization", ["b", "scale", "bias"], ["c"], name="gn2", num_groups=2, epsilon=1e-5),
        helper.make_node("Softmax", ["c"], ["s"], name="softmax", axis=-1),
        helper.make_node("Mul", ["t", "freq"], ["tf"], name="t_mul"),
        helper.make_node("Sin", ["tf"], ["emb"], name="t_sin"),
        helper.make_node("Unsqueeze", ["emb", "axes"], ["emb3"], name="t_unsqueeze"),
        helper.make_node("Add", ["s", "emb3"], ["out"], name="add"),
    ]
    inits = {"w": W, "scale": SCALE, "bias": BIAS, "freq": np.array([freq]), "axes": np.array([1, 2], np.int64)}
    values = {"a": [2, 4, 8], "b": [2, 4, 8], "c": [2, 4, 8], "s": [2, 4, 8], "tf": [2], "emb": [2], "emb3": [2, 1, 1]}
    save(path, nodes, {"x": [2, 4, 8], "t": [2]}, {"out": [2, 4, 8]}, inits, values)
    return Graph("unet", None, {}, ("out",), (), keep_fp32_inputs=("t",))


def group_norm(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(x.shape) * scale[None, :, None] + bias[None, :, None]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    typed = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    return {v.name: v.type.tensor_type.elem_type for v in typed} | {
        t.name: t.data_type for t in model.graph.initializer
    }


def test_fp16_keeps_normalisation_softmax_and_the_timestep_embedding_in_float32(tmp_path):
    g = unet_like(tmp_path / "g.onnx")
    model = fp16_from_fp32(tmp_path / "g.onnx", g)
    onnx.checker.check_model(model)  # one writer per value, nodes in order

    assert io_types(model) == {"x": "float16", "t": "float32", "out": "float16"}
    types = value_types(model)
    nodes = {n.name: n for n in model.graph.node}
    float_inputs = {name: [types[i] for i in nodes[name].input if types[i] != TensorProto.INT64] for name in nodes}
    for name in ("gn", "gn2", "softmax", "t_mul", "t_sin", "t_unsqueeze"):
        assert set(float_inputs[name]) == {F32}, name
    for name in ("mm", "add"):
        assert set(float_inputs[name]) == {F16}, name
    assert types["w"] == F16 and types["scale"] == types["bias"] == types["freq"] == F32  # fp32 nodes' weights
    producers = {o: n for n in model.graph.node for o in n.output}
    cast = producers[nodes["gn"].input[0]]  # fed by a Cast to float32 from the fp16 MatMul before it
    assert cast.op_type == "Cast" and cast.attribute[0].i == F32 and types[cast.input[0]] == F16
    for name, before in (("gn2", "gn"), ("softmax", "gn2"), ("t_sin", "t_mul")):  # float32 to float32: no fp16 trip
        assert producers[nodes[name].input[0]].name == before, name
    assert nodes["t_mul"].input[0] == "t"  # the float32 timestep input as it is
    onnx.checker.check_model(model, full_check=True)  # every declared type is its value's (initializers too)

    x = RNG.standard_normal((2, 4, 8)).astype(np.float16)
    t = np.array([999.0, 3.0], np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "t": t})[0]
    assert got.dtype == np.float16
    a = x.astype(np.float64) @ W.astype(np.float64)
    c = group_norm(group_norm(a, 2, SCALE, BIAS), 2, SCALE, BIAS)
    want = softmax(c) + np.sin(t.astype(np.float64) * np.float64(FREQ))[:, None, None]
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=3e-3)


def test_weights_left_in_the_source_file_are_converted_as_the_converter_converts_loaded_ones(tmp_path):
    """The export's way: the fp32 graph loaded without its weights, converted, and written by `save_onnx` from the
    source data file gives the graph ORT's converter makes of the fully loaded model, byte for byte."""
    g = unet_like(tmp_path / "inline.onnx")
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / "g.onnx"
    onnx.save_model(onnx.load(str(tmp_path / "inline.onnx")), str(src), save_as_external_data=True, size_threshold=0)
    reference = fp16_from_fp32(tmp_path / "inline.onnx", g)

    (tmp_path / "out").mkdir()
    assert save_onnx(fp16_from_fp32(src, g), tmp_path / "out" / "g.onnx", weights_from=src.parent) == ["g.onnx"]
    written = onnx.load(str(tmp_path / "out" / "g.onnx"))
    assert [(n.name, n.op_type, n.input, n.output, n.attribute) for n in written.graph.node] == [
        (n.name, n.op_type, n.input, n.output, n.attribute) for n in reference.graph.node
    ]
    want = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert {k: (a.dtype, a.shape, a.tobytes()) for k, a in got.items()} == {
        k: (a.dtype, a.shape, a.tobytes()) for k, a in want.items()
    }
    assert written.graph.value_info == reference.graph.value_info


def test_duplicate_casts_are_dropped_and_other_clashes_refused():
    def cast(name: str, to: int) -> onnx.NodeProto:
        return helper.make_node("Cast", ["w"], ["w_cast_to_fp32"], name=name, to=to)

    relu = helper.make_node("Relu", ["w_cast_to_fp32"], ["y"], name="relu")
    graph = helper.make_graph([cast("c", F32), relu, cast("c", F32)], "g", [], [])
    _drop_duplicate_casts(graph)
    assert [n.name for n in graph.node] == ["c", "relu"]

    graph = helper.make_graph([cast("c", F32), cast("c", F16)], "g", [], [])
    with pytest.raises(ValueError, match="two different nodes writing 'w_cast_to_fp32'"):
        _drop_duplicate_casts(graph)


def test_fp32_islands_pass_values_between_them_in_float32(tmp_path):
    """sin(999.25 * 0.7): the product, 699.475, is made by a float32 Mul and read by a float32 Sin. ORT's converter
    puts a Cast to fp16 and back between them (fp16's step near 700 is 0.5: sin off by up to ~0.25) and casts the
    timestep input to fp16 first (999.25 -> 999); the export reads float32 across, as diffusers computes it."""
    model = fp16_from_fp32(tmp_path / "g.onnx", unet_like(tmp_path / "g.onnx", freq=np.float32(0.7)))
    x = np.zeros((2, 4, 8), np.float16)
    t = np.array([999.25, 3.0], np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "t": t})[0]
    want = 1 / 8 + np.sin(t.astype(np.float64) * np.float64(np.float32(0.7)))[:, None, None]  # softmax of a constant
    np.testing.assert_allclose(got.astype(np.float64), np.broadcast_to(want, got.shape), rtol=0, atol=3e-3)


@pytest.mark.parametrize("upcast", [False, True])
def test_upcast_attention_keeps_the_attention_logits_in_float32(tmp_path, upcast):
    """softmax(q @ k * scale) @ v: with `upcast_attention` (SD 2.x) the logits' MatMul and scaling run in float32,
    otherwise only the Softmax does; the result matches float64 either way."""
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("Mul", ["qk", "scale"], ["logits"], name="scale_logits"),
        helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"], name="pv"),
    ]
    shapes = {"q": [1, 6, 4], "k": [1, 4, 6], "v": [1, 6, 4]}
    values = {"qk": [1, 6, 6], "logits": [1, 6, 6], "p": [1, 6, 6]}
    save(tmp_path / "a.onnx", nodes, shapes, {"out": [1, 6, 4]}, {"scale": np.array([0.5], np.float32)}, values)
    g = Graph("unet", None, {}, ("out",), (), upcast_attention=upcast)
    model = fp16_from_fp32(tmp_path / "a.onnx", g)

    types = value_types(model)
    by_name = {n.name: n for n in model.graph.node}
    logits_type = F32 if upcast else F16
    for name in ("qk", "scale_logits"):
        assert {types[i] for i in by_name[name].input} == {logits_type}, name
    assert {types[i] for i in by_name["softmax"].input} == {F32}
    assert {types[i] for i in by_name["pv"].input} == {F16}

    feeds = {k: RNG.standard_normal(s).astype(np.float16) for k, s in shapes.items()}
    got = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    q, k, v = (feeds[n].astype(np.float64) for n in ("q", "k", "v"))
    np.testing.assert_allclose(got.astype(np.float64), softmax(q @ k * 0.5) @ v, rtol=0, atol=5e-3)


def test_unnamed_nodes_are_refused(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    save(tmp_path / "g.onnx", nodes, {"x": [2]}, {"y": [2]}, {}, {})
    with pytest.raises(ValueError, match=r"node 0 \(Relu\) has no name"):
        fp16_from_fp32(tmp_path / "g.onnx", Graph("g", None, {}, ("y",), ()))


def test_io_types_and_graph_precision_read_what_the_graph_declares():
    """Element types by name; initializer elements per ONNX type name, an external tensor counted by its shape
    (its data is never read)."""
    external = TensorProto(name="ext", data_type=F16, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    external.external_data.add(key="location", value="missing.data")
    graph = helper.make_graph(
        [],
        "g",
        [
            helper.make_tensor_value_info("x", F16, [1, 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 77]),
        ],
        [
            helper.make_tensor_value_info("y", F32, [1, 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [1]),
        ],
        [
            numpy_helper.from_array(np.zeros((8, 8), np.float32), "w"),
            numpy_helper.from_array(np.float32(1.0), "scalar"),
            numpy_helper.from_array(np.zeros(3, np.float16), "b"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
            external,
        ],
    )
    model = helper.make_model(graph)
    assert io_types(model) == {"x": "float16", "ids": "int32", "y": "float32", "mask": "bool"}
    assert graph_precision(model) == {"float": 65, "float16": 19, "int64": 2}
