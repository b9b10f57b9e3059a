"""export/weights.py: which ONNX initializer holds each PyTorch weight (the map `sdrt lora add` keys adapters by).

The ONNX files are written here by hand with onnx.helper, laid out as the exporter leaves them (a convolution's
weight under its own name, a Linear's weight transposed under a ``val_N`` name, a constant duplicated), so every
expectation is written down from the module's contract, not taken from an export.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdrt.export.weights import (
    WEIGHTS_FORMAT,
    ExternalData,
    add_dtypes,
    float_parameters,
    initializer_fingerprints,
    ordered_map,
    parameter_fingerprints,
    unreached_parameters,
    weight_map,
)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)  # weight [6, 4]: the exporter's MatMul keeps it transposed, [4, 6]
        self.conv = torch.nn.Conv2d(2, 3, 3)  # weight [3, 2, 3, 3]: kept as it is, under its own name
        self.norm = torch.nn.LayerNorm(6)  # 1-D parameters only: never mapped


class Wrapper(torch.nn.Module):
    """A graph module as the export wraps a model: the model under one attribute, whose name is the prefix."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.unet = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.unet(*args)


def save_onnx(path, arrays: dict[str, np.ndarray], **save) -> None:
    """A one-node ONNX file whose initializers are ``arrays`` (by name)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in arrays.items()],
    )
    onnx.save_model(helper.make_model(graph), str(path), **save)


def weights_of(module: torch.nn.Module, path) -> dict:
    prefix, named = float_parameters(module)
    return weight_map(prefix, parameter_fingerprints(named), initializer_fingerprints(path), [])


def test_float_parameters_are_the_2d_and_larger_weights_named_inside_the_wrapper():
    torch.manual_seed(0)
    model = Block()
    prefix, named = float_parameters(Wrapper(model))
    assert prefix == "unet."
    assert [name for name, _ in named] == ["proj.weight", "conv.weight"]
    assert named[0][1] is not model.proj.weight and torch.equal(named[0][1], model.proj.weight)  # detached


def test_a_module_wrapping_two_models_is_refused():
    two = Wrapper(Block())
    two.text = Block()
    with pytest.raises(ValueError, match=r"more than one model: \['text', 'unet'\]"):
        float_parameters(two)


def test_each_weight_maps_to_the_initializer_holding_it_as_it_is_or_transposed(tmp_path):
    torch.manual_seed(0)
    model = Block()
    conv, proj = model.conv.weight.detach().numpy(), model.proj.weight.detach().numpy()
    save_onnx(tmp_path / "g.onnx", {
        "unet.conv.weight": conv,
        "val_12": proj.T,  # the Linear's weight, transposed by constant folding
        "unet.proj.bias": model.proj.bias.detach().numpy(),  # 1-D
        "val_13": np.ones((6, 4), np.float32),  # a constant no parameter has
    })  # fmt: skip
    assert weights_of(Wrapper(model), tmp_path / "g.onnx") == {
        "format": WEIGHTS_FORMAT,
        "prefix": "unet.",
        "weights": {
            "conv.weight": {"initializer": "unet.conv.weight", "shape": [3, 2, 3, 3], "transposed": False},
            "proj.weight": {"initializer": "val_12", "shape": [4, 6], "transposed": True},
        },
        "unused": [],
    }


def test_an_initializer_with_two_users_or_a_weight_in_two_initializers_is_shared(tmp_path):
    """Changing such an initializer would change more than the one weight: both cases are marked ``shared``; a
    weight no initializer holds is left out of the map (adapters refuse it)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 6), "b": torch.nn.Linear(4, 6), "c": torch.nn.Conv2d(2, 3, 1),
                                 "gone": torch.nn.Linear(3, 5)})  # fmt: skip
    with torch.no_grad():
        model["b"].weight.copy_(model["a"].weight)  # tied by value: one initializer serves both
    a, c = model["a"].weight.detach().numpy(), model["c"].weight.detach().numpy()
    save_onnx(tmp_path / "g.onnx", {"val_1": a.T, "c_first": c, "c_copy": c})
    weights = weights_of(Wrapper(model), tmp_path / "g.onnx")["weights"]
    assert set(weights) == {"a.weight", "b.weight", "c.weight"}
    for name in ("a.weight", "b.weight"):
        assert weights[name] == {"initializer": "val_1", "shape": [4, 6], "transposed": True, "shared": True}
    assert weights["c.weight"]["initializer"] in ("c_first", "c_copy") and weights["c.weight"]["shared"] is True


@pytest.mark.parametrize("one_file", [True, False])
def test_external_data_is_read_from_its_files_as_inline_data_is(tmp_path, one_file):
    """The same initializers stored inline and as external data give the same map; `ExternalData` reads each
    tensor back exactly, at its own offset."""
    torch.manual_seed(1)
    model = Block()
    arrays = {"unet.conv.weight": model.conv.weight.detach().numpy(), "val_7": model.proj.weight.detach().numpy().T,
              "filler": np.arange(24, dtype=np.float32).reshape(4, 6)}  # fmt: skip
    inline, external = tmp_path / "inline" / "g.onnx", tmp_path / "external" / "g.onnx"
    inline.parent.mkdir()
    external.parent.mkdir()
    save_onnx(inline, arrays)
    save_onnx(external, arrays, save_as_external_data=True, all_tensors_to_one_file=one_file, location="g.bin",
              size_threshold=0)  # fmt: skip
    stored = onnx.load(str(external), load_external_data=False).graph.initializer
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored)
    assert weights_of(Wrapper(model), external) == weights_of(Wrapper(model), inline)
    assert initializer_fingerprints(external) == initializer_fingerprints(inline)
    with ExternalData(external.parent) as data:
        for t in stored:
            assert np.array_equal(data.array(t), arrays[t.name]), t.name


def test_a_truncated_data_file_is_an_error_not_short_data(tmp_path):
    save_onnx(tmp_path / "g.onnx", {"w": np.ones((8, 8), np.float32)}, save_as_external_data=True,
              location="g.bin", size_threshold=0)  # fmt: skip
    (tmp_path / "g.bin").write_bytes((tmp_path / "g.bin").read_bytes()[:100])
    (t,) = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False).graph.initializer
    with ExternalData(tmp_path) as data, pytest.raises(ValueError, match="g.bin: ends before offset"):
        data.raw(t)


class Truncated(torch.nn.Module):
    """Gives the first layer's output: the last layer's weight is in the module but not in the graph (as SDXL's
    first text encoder, whose penultimate states are what the pipeline reads)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4)
        self.last = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x)


def test_weights_the_outputs_do_not_depend_on_are_unreached_and_used_ones_are_not(tmp_path):
    """A weight no initializer holds is listed only where the outputs do not depend on it (its adapters change
    nothing); a used one stays out of the list, found or not. requires_grad is left as it was."""
    torch.manual_seed(2)
    graph = Wrapper(Truncated())
    graph.unet.first.bias.requires_grad_(False)
    before = {name: p.requires_grad for name, p in graph.named_parameters()}
    prefix, named = float_parameters(graph)
    params = parameter_fingerprints(named)
    example = (torch.randn(2, 4),)
    assert unreached_parameters(graph, example, prefix, params, {}) == ["last.weight"]  # neither is found
    assert {name: p.requires_grad for name, p in graph.named_parameters()} == before
    save_onnx(tmp_path / "g.onnx", {"val_3": graph.unet.first.weight.detach().numpy().T})  # the used one is found
    assert unreached_parameters(graph, example, prefix, params, initializer_fingerprints(tmp_path / "g.onnx")) == [
        "last.weight"
    ]


def test_dtypes_are_those_of_the_saved_graph_and_dropped_initializers_drop_their_weight():
    fp16 = numpy_helper.from_array(np.ones((2, 2), np.float16), "val_1")  # converted to fp16
    fp32 = numpy_helper.from_array(np.ones((2, 2), np.float32), "conv.weight")  # kept in float32
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[fp16, fp32]))
    weights = {"format": WEIGHTS_FORMAT, "prefix": "unet.", "unused": ["x.weight"], "weights": {
        "a.weight": {"initializer": "val_1", "shape": [2, 2], "transposed": True},
        "b.weight": {"initializer": "conv.weight", "shape": [2, 2], "transposed": False},
        "c.weight": {"initializer": "val_9", "shape": [2, 2], "transposed": False},  # folded away on saving
    }}  # fmt: skip
    assert add_dtypes(weights, model) == {**weights, "weights": {
        "a.weight": {"initializer": "val_1", "shape": [2, 2], "transposed": True, "dtype": "float16"},
        "b.weight": {"initializer": "conv.weight", "shape": [2, 2], "transposed": False, "dtype": "float32"},
    }}  # fmt: skip


def test_ordered_map_keeps_the_order_and_reads_the_items_on_the_calling_thread():
    """Later items finish first (they sleep less); the results still come in the items' order, with at most
    ``ahead`` calls in flight, and the items are drawn on the caller's thread."""
    lock, running, most, drawn_on = threading.Lock(), [0], [0], set()

    def items():
        for i in range(12):
            drawn_on.add(threading.get_ident())
            yield i

    def slow(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (12 - i))
        with lock:
            running[0] -= 1
        return i * i

    assert list(ordered_map(slow, items(), ahead=3)) == [i * i for i in range(12)]
    assert most[0] <= 3 and drawn_on == {threading.get_ident()}
