"""export/onnx_save.py: what `save_onnx` writes is read back by onnx itself (`onnx.load` with external data) with
every initializer identical, and runs in ONNX Runtime; weights still in a source data file are streamed from it."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from sdrt.export import onnx_save
from sdrt.export.onnx_save import current_umask, save_onnx

RNG = np.random.default_rng(0)
ARRAYS = {
    "b": RNG.standard_normal(300).astype(np.float32),  # 1200 bytes: external, unaligned
    "w": RNG.standard_normal((64, 64)).astype(np.float32),  # 16 KiB: external, page-aligned after b
    "c": RNG.standard_normal(8).astype(np.float32),  # 32 bytes: stays in the graph file
    "shape": np.array([1, 64, 1], np.int64),
}


def mlp() -> onnx.ModelProto:
    """y = reshape((x @ w + b[:64]) * c[0], shape), x [1, 64]."""
    starts, ends = np.array([0], np.int64), np.array([64], np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("Slice", ["b", "starts", "ends"], ["b64"], name="slice"),
        helper.make_node("Add", ["xw", "b64"], ["h"], name="add"),
        helper.make_node("Gather", ["c", "zero"], ["c0"], name="gather", axis=0),
        helper.make_node("Mul", ["h", "c0"], ["hc"], name="mul"),
        helper.make_node("Reshape", ["hc", "shape"], ["y"], name="reshape"),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in ARRAYS.items()]
    inits += [numpy_helper.from_array(starts, "starts"), numpy_helper.from_array(ends, "ends")]
    inits.append(numpy_helper.from_array(np.array(0, np.int64), "zero"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def reference(x: np.ndarray) -> np.ndarray:
    a = {k: v.astype(np.float64) for k, v in ARRAYS.items()}
    return ((x.astype(np.float64) @ a["w"] + a["b"][:64]) * a["c"][0]).reshape(1, 64, 1)


def run(path) -> np.ndarray:
    x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_large_graph_weights_go_to_one_aligned_file_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    model = mlp()
    want = initializers(model)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "g.onnx"

    assert save_onnx(model, path) == ["g.onnx", "g.onnx.data"]
    assert sorted(os.listdir(tmp_path / "out")) == ["g.onnx", "g.onnx.data"]
    onnx.checker.check_model(str(path))
    got = initializers(onnx.load(str(path)))  # onnx's own reader of the external data
    assert got.keys() == want.keys()
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].tobytes() == a.tobytes(), name

    stored = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert sorted(n for n, t in stored.items() if uses_external_data(t)) == ["b", "w"]
    where = {n: {e.key: e.value for e in t.external_data} for n, t in stored.items() if uses_external_data(t)}
    assert {w["location"] for w in where.values()} == {"g.onnx.data"}
    assert int(where["w"]["offset"]) % 4096 == 0 and int(where["w"]["length"]) == ARRAYS["w"].nbytes
    np.testing.assert_allclose(run(path), reference(np.linspace(-1, 1, 64)[None]), rtol=1e-5, atol=1e-5)


def test_small_graph_is_one_file_and_a_stale_data_file_goes(tmp_path):
    path = tmp_path / "g.onnx"
    (tmp_path / "g.onnx.data").write_bytes(b"from an earlier, larger save")
    model = mlp()
    want = initializers(model)

    assert save_onnx(model, path) == ["g.onnx"]
    assert os.listdir(tmp_path) == ["g.onnx"]
    loaded = onnx.load(str(path), load_external_data=False)
    assert not any(uses_external_data(t) for t in loaded.graph.initializer)
    assert {k: v.tobytes() for k, v in initializers(loaded).items()} == {k: v.tobytes() for k, v in want.items()}


@pytest.mark.parametrize("streamed", [False, True])
def test_weights_from_a_source_file_are_read_there_and_converted_to_the_declared_type(tmp_path, monkeypatch, streamed):
    """A graph loaded without its weights, one float32 tensor retyped to float16 as the fp16 conversion leaves it:
    the written tensor is numpy's float16 rounding, with ORT's converter's clamping to fp16's range."""
    if streamed:
        monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    w = ARRAYS["w"].copy()
    w.flat[:4] = [1e6, -1e6, 1e-9, -1e-9]  # past fp16's largest, below its smallest subnormal
    model = mlp()
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w"))
    (tmp_path / "src").mkdir()
    onnx.save_model(model, str(tmp_path / "src" / "g.onnx"), save_as_external_data=True, size_threshold=0)
    source = onnx.load(str(tmp_path / "src" / "g.onnx"), load_external_data=False)
    t = next(t for t in source.graph.initializer if t.name == "w")
    t.data_type = TensorProto.FLOAT16
    assert uses_external_data(t)

    (tmp_path / "out").mkdir()
    files = save_onnx(source, tmp_path / "out" / "g.onnx", weights_from=tmp_path / "src")
    assert files == (["g.onnx", "g.onnx.data"] if streamed else ["g.onnx"])
    got = initializers(onnx.load(str(tmp_path / "out" / "g.onnx")))
    assert got["w"].dtype == np.float16
    assert got["w"].flat[:4].tolist() == [65504.0, -65504.0, 2**-24, -(2**-24)]
    np.testing.assert_array_equal(got["w"].flat[4:], w.flat[4:].astype(np.float16))
    for name, a in ARRAYS.items():
        if name != "w":
            assert got[name].dtype == a.dtype and got[name].tobytes() == a.tobytes(), name


def test_external_tensors_without_weights_from_are_refused(tmp_path):
    model = mlp()
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, size_threshold=0)
    source = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match=r"b is stored outside the model; say where \(weights_from\)"):
        save_onnx(source, tmp_path / "again.onnx")


def test_files_take_the_umask(tmp_path, monkeypatch):
    """Both files end as any file the process makes: onnx may write external data 0600, and a file saved over
    keeps its old mode."""
    monkeypatch.setattr(onnx_save, "_EXTERNAL_DATA_BYTES", 1000)
    (tmp_path / "g.onnx").touch(mode=0o600)
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # read, not changed
        save_onnx(mlp(), tmp_path / "g.onnx")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"g.onnx": 0o640, "g.onnx.data": 0o640}
