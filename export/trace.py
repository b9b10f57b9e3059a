"""PyTorch module -> fp32 ONNX file (torch.onnx's dynamo exporter) or .pt2 program (torch.export), with the
dynamic row and size axes of export/graphs.py."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from sdrt.export.graphs import TRACE_ROWS, Dims, Graph, dynamic_shapes, sample_inputs, trace_latent

OPSET = 21  # GroupNormalization-21 / LayerNormalization keep their statistics in float32 (stash_type=1)


def export_torch(g: Graph, dims: Dims, path: Path, opset: int = OPSET) -> None:
    """Trace ``g.module`` with torch.export (dynamic rows and sizes) and write fp32 ONNX to ``path``."""
    h, w = trace_latent(dims)
    example = sample_inputs(g, dims, rows=TRACE_ROWS, h=h, w=w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            g.module,
            tuple(example.values()),
            input_names=list(g.inputs),
            output_names=list(g.outputs),
            dynamic_shapes=dynamic_shapes(g, dims),
            dynamo=True,
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
        fold_constants(program.model)
        program.save(str(path), external_data=True)
    del program


def fold_constants(model: Any) -> None:
    """The exporter's optimisation (``optimize=True``) without its pattern rewriter, in place on an `onnx_ir` model.

    Constant folding is what ONNX Runtime and TensorRT need done (Linear weights pre-transposed, the sequence ops
    of chunk() and the shape arithmetic of dynamic sizes resolved, constants as initializers). The rewriter's rules
    only tidy what both fold themselves (a Div by 1, Reshape pairs) and take most of the optimisation's time (64 of
    its 69 s for SD 1.5's U-Net under cProfile; SDXL's U-Net trace step: 571 s with them, 229 s without)."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants as fold

    common.InlinePass()(model)
    for _ in range(2):  # as the exporter's optimiser: folding, then what it left unused, twice unless nothing changed
        modified = fold(model, onnx_shape_inference=True).modified
        for cleanup in (common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass, common.RemoveUnusedOpsetsPass):
            cleanup()(model)
        if not modified:
            break
    for final in (
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ):
        final(model)


def save_torch_program(g: Graph, dims: Dims, path: Path, fp16: bool) -> None:
    """``torch.export`` the module (in fp16 where the graph is fp16, as diffusers runs it) and save it as a .pt2
    program, which the runtime's torch backend loads with torch alone."""
    h, w = trace_latent(dims)
    example = sample_inputs(g, dims, rows=TRACE_ROWS, h=h, w=w, generator=torch.Generator().manual_seed(0))
    module = g.module
    if fp16:
        module = _half_copy(module)
        keep = set(g.keep_fp32_inputs)
        example = {k: v.half() if v.is_floating_point() and k not in keep else v for k, v in example.items()}
    with torch.no_grad(), _quiet_exporter():
        program = torch.export.export(module, tuple(example.values()), dynamic_shapes=dynamic_shapes(g, dims))
        torch.export.save(program, str(path))


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp16 copy that costs only the fp16 bytes: deepcopy with every float tensor pre-mapped to its half.
    (The original stays fp32: the VAE module serves two graphs, and the ONNX graphs come from fp32 weights.)"""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().half() if p.is_floating_point() else p.detach(), False)
    for b in module.buffers():
        memo[id(b)] = b.half() if b.is_floating_point() else b.clone()
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about torchvision ops and pytree deprecations that do not concern these graphs."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            log.setLevel(level)
