"""export/trace.py: a small module traced to ONNX runs in ONNX Runtime as it runs in PyTorch, at sizes other than
the trace example's; its .pt2 program in fp16 runs as the fp32 module does, to fp16's precision."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.export.graphs import Dims, Graph, trace_latent
from sdrt.export.trace import OPSET, export_torch, save_torch_program
from sdrt.runtime.manifest import Geometry

# latents 2..8 wide (16..64 px at a VAE scale factor of 8; the trace example is 3 x 5), 1..4 rows
DIMS = Dims(16, 64).for_model(Geometry(vae_scale_factor=8, unet_downsampling=1, sample_size=4))


class Block(torch.nn.Module):
    """A conv, a group norm, and a Linear over channels on 3-D activations (a MatMul whose weight the exporter's
    constant folding pre-transposes), scaled by a per-row timestep."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, sample, timestep):
        x = torch.nn.functional.silu(self.norm(self.conv(sample)))  # [B, 8, h, w]
        b, c, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, 4, h, w)  # [B, 4, h, w]
        return x * torch.cos(timestep / 1000.0).to(x.dtype)[:, None, None, None]  # cos in float32, as diffusers


def block_graph() -> Graph:
    f32 = torch.float32
    inputs = {"sample": (("B", 4, "h", "w"), f32), "timestep": (("B",), f32)}
    g = Graph("block", Block(), inputs, ("out",), (("B", 4, "h", "w"),), keep_fp32_inputs=("timestep",))
    g.module.eval()
    return g


def feeds(rows: int, h: int, w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows * 100 + h * 10 + w)
    sample = rng.standard_normal((rows, 4, h, w)).astype(np.float32)
    return {"sample": sample, "timestep": rng.integers(0, 1000, rows).astype(np.float32)}


def torch_out(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in inputs.values())).numpy()


def test_export_torch_writes_onnx_that_runs_as_the_module_at_every_declared_size(tmp_path):
    g = block_graph()
    path = tmp_path / "block.onnx"
    export_torch(g, DIMS, path)

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [v.name for v in model.graph.input] == ["sample", "timestep"]
    assert [v.name for v in model.graph.output] == ["out"]
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET
    # rows and sizes are symbols, the channels a number
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 4 and all(isinstance(d, str) for d in dims[2:])
    # folded: no Constant nodes, no Transpose of a weight left to run
    initializers = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type == "Constant"]
    assert not [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert (3, 5) == trace_latent(DIMS)  # the sizes below are none of the trace example's
    for rows, h, w in [(1, 2, 2), (4, 8, 3), (3, 7, 8)]:
        inputs = feeds(rows, h, w)
        got = session.run(None, inputs)[0]
        assert got.shape == (rows, 4, h, w)
        np.testing.assert_allclose(got, torch_out(g.module, inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fp16", [False, True])
def test_save_torch_program_runs_as_the_module(tmp_path, fp16):
    """The program loads with torch alone; in fp16 its weights and float inputs are half except the kept timestep,
    and the module it was made from stays float32."""
    g = block_graph()
    path = tmp_path / "block.pt2"
    save_torch_program(g, DIMS, path, fp16=fp16)

    program = torch.export.load(str(path))
    assert {p.dtype for p in program.state_dict.values()} == {torch.float16 if fp16 else torch.float32}
    assert {p.dtype for p in g.module.parameters()} == {torch.float32}
    inputs = feeds(2, 6, 4)
    want = torch_out(g.module, inputs)
    args = [torch.from_numpy(v) for v in inputs.values()]
    if fp16:
        args[0] = args[0].half()
    with torch.no_grad():
        got = program.module()(*args)
    assert got.dtype == (torch.float16 if fp16 else torch.float32) and got.shape == (2, 4, 6, 4)
    tol = dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.float().numpy(), want, **tol)
