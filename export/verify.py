"""Check an ONNX graph: the ONNX checker, its I/O contract, then ONNX Runtime against the PyTorch module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sdrt.export.graphs import Dims, Graph, sample_inputs
from sdrt.runtime.errors import SdrtError

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # relative L2 error of each output, per graph precision
_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-30))


def verify_shapes(g: Graph, dims: Dims) -> list[tuple[int, int, int]]:
    """(rows, latent h, latent w): the cost of the check follows the model, not the range. One row at the smallest
    declared square; two rows, non-square, at the smallest size the graph takes (the graph is one for all its
    sizes; below the declared range where that starts higher, as SDXL's at 512 px), with one side the U-Net's
    downsampling does not divide, which takes the upsample-to-skip-size path."""
    lo = dims.latent()[0]
    small = dims.geometry.min_latent  # twice the downsampling: of it and the next side, one is not a multiple of 2
    return [(1, lo, lo), (min(2, dims.rows(g.name)[1]), small, small + 1)]


def check_graph_file(path: Path, g: Graph) -> None:
    """The ONNX checker, and the exact input and output names of DESIGN.md."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError) as err:
        raise SdrtError(f"{path.name} fails the ONNX checker: {str(err).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if ins != list(g.inputs) or outs != list(g.outputs):
        raise SdrtError(f"{path.name}: I/O {ins} -> {outs}, expected {list(g.inputs)} -> {list(g.outputs)}")


@dataclass
class Case:
    """PyTorch's answer for one set of random inputs, kept so the module can be freed before ONNX Runtime runs."""

    shape: tuple[int, int, int]  # rows, latent h, latent w
    inputs: dict[str, torch.Tensor]
    outputs: tuple[np.ndarray, ...]


def reference_cases(g: Graph, dims: Dims) -> list[Case]:
    """Run ``g.module`` (PyTorch, fp32) on random inputs at each of `verify_shapes`: one prompt chunk, then two
    (where the range has them)."""
    gen = torch.Generator().manual_seed(1234)
    cases = []
    for i, (rows, h, w) in enumerate(verify_shapes(g, dims)):
        inputs = sample_inputs(g, dims, rows, h, w, gen, chunks=1 if i == 0 else None)  # then the trace's chunks
        with torch.no_grad():
            out = g.module(*inputs.values())
        out = out if isinstance(out, tuple) else (out,)
        cases.append(Case((rows, h, w), inputs, tuple(o.float().numpy() for o in out)))
    return cases


def compare(path: Path, g: Graph, cases: list[Case], precision: str, threads: int | None = None) -> dict[str, Any]:
    """Run ``path`` in ONNX Runtime (CPU EP) on each case's inputs; report the relative L2 error per output.
    ``threads``: intra-op threads, by default torch's count (which follows OMP_NUM_THREADS)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
    opts.log_severity_level = 3
    # The graph as written, not an optimised copy: this also keeps the CPU provider from constant-folding its
    # fp16->fp32 weight casts into a second, float32 copy of every weight (5 GB for SD 1.5's U-Net).
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The CPU provider runs fp16 layers in float32 through Casts it inserts. In the default execution order the
    # float32 copies of the weights pile up (SDXL's fp16 U-Net, one run at 2 rows: 13.3 GB peak); in priority
    # order, with freed buffers returned instead of kept by the arena, the run stays at the fp16 weights (5.4 GB).
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    errors: dict[str, float] = {name: 0.0 for name in g.outputs}
    for case in cases:
        feeds = {i.name: case.inputs[i.name].numpy().astype(_NUMPY[i.type]) for i in session.get_inputs()}
        outs = session.run(list(g.outputs), feeds)
        for name, o, r in zip(g.outputs, outs, case.outputs, strict=True):
            if o.shape != r.shape:
                raise SdrtError(f"{path.name}: output {name} has shape {o.shape}, PyTorch gives {r.shape}")
            errors[name] = max(errors[name], rel_l2(o, r))
    tol = TOLERANCE[precision]
    return {
        "shapes": [{"rows": c.shape[0], "latent": list(c.shape[1:])} for c in cases],
        "rel_l2": errors,
        "tolerance": tol,
        "passed": all(e <= tol for e in errors.values()),
    }
