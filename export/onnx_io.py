"""PyTorch module -> ONNX file, and fp32 ONNX -> strongly-typed fp16 ONNX.

TensorRT 11 builds strongly typed networks only, so an fp16 engine needs a real fp16 graph: weights and
activations in float16, with float32 kept, by explicit Casts in the graph, exactly where fp16 is known to break.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data

from sdrt.export.graphs import TRACE_ROWS, Dims, Graph, dynamic_shapes, sample_inputs, trace_latent
from sdrt.export.weights import ExternalData, ordered_map

OPSET = 21  # GroupNormalization-21 / LayerNormalization keep their statistics in float32 (stash_type=1)
# Weights go to one `<graph>.onnx.data` file beside the graph above this size: required past protobuf's 2 GB limit,
# and already worth it above ~0.5 GB, where serialising one protobuf would hold a second full copy in memory.
_EXTERNAL_DATA_BYTES = 512 << 20

# Float32 islands in fp16 graphs, and why:
# - GroupNormalization / LayerNormalization: the mean and variance of a group of 4096 activations overflow or
#   lose all precision in fp16 (the classic black-image failure of SD VAEs), so statistics and scaling run in fp32.
# - Softmax: exp() of attention logits and the row sum accumulate in fp32 (diffusers' upcast_softmax).
# - The timestep / time_ids embeddings (see `_conditioning_nodes`): sin/cos of t * freq for t up to 1000
#   needs more than fp16's 11 bits of mantissa; diffusers computes them in fp32 too.
FP32_OPS = ("GroupNormalization", "LayerNormalization", "InstanceNormalization", "Softmax")


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


def map_large_buffers() -> None:
    """Serve every allocation of 1 MiB or more from its own mmap, returned to the OS the moment it is freed.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which mid-sized weight
    tensors live on the heap and their pages stay with the process when freed; a U-Net traced, released and
    followed by its fp16 conversion would then count twice. A fixed threshold keeps the peak at what is live."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also stops its adjustment)


def trim_heap() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc keeps them otherwise, and a 3.4 GB graph's
    worth of freed float32 buffers would count against the next step's memory)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


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


def _initializer_bytes(model: onnx.ModelProto, weights: _Weights) -> int:
    return sum(weights.nbytes(t) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path, weights_from: Path | None = None) -> list[str]:
    """Save ``model``; weights go to ``<name>.data`` beside it for large graphs (always past 2 GB). Returns files.

    ``weights_from``: the folder of the data file that ``model``'s external tensors still point into (a graph loaded
    without its weights, e.g. by `fp16_from_fp32`). Each such tensor is read there, converted to the type the graph
    now declares, and written out one at a time, so a 10 GB float32 U-Net never has to be in memory."""
    data = path.name + ".data"
    if (path.parent / data).exists():
        os.remove(path.parent / data)
    with _Weights(weights_from) as weights:
        if _initializer_bytes(model, weights) > _EXTERNAL_DATA_BYTES:
            weights.stream(model, path.parent / data)
        else:
            weights.inline(model)
        onnx.save_model(model, str(path))
    files = [path.name, data] if (path.parent / data).exists() else [path.name]
    for name in files:  # onnx writes external data through a temporary file, mode 0600: make it an ordinary file
        os.chmod(path.parent / name, 0o666 & ~current_umask())
    return files


class _Weights:
    """The data of a graph's initializers, whether in the model or still in a source data file (`save_onnx`)."""

    _ALIGN = 4096  # large tensors start on a page boundary, so a runtime can map them in place
    _INLINE_BYTES = 1024  # smaller tensors stay in the graph file

    def __init__(self, folder: Path | None):
        self.source = ExternalData(folder) if folder is not None else None

    def __enter__(self) -> _Weights:
        return self

    def __exit__(self, *exc) -> None:
        if self.source is not None:
            self.source.__exit__(*exc)

    def external(self, model: onnx.ModelProto) -> list[onnx.TensorProto]:
        found = [t for t in model.graph.initializer if uses_external_data(t)]
        if found and self.source is None:
            raise ValueError(f"{found[0].name} is stored outside the model; say where (weights_from)")
        return found

    def nbytes(self, t: onnx.TensorProto) -> int:
        """The tensor's size in the type the graph declares for it."""
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        return itemsize * math.prod(t.dims) if uses_external_data(t) else len(t.raw_data) or t.ByteSize()

    def raw(self, t: onnx.TensorProto) -> bytes:
        """An external tensor's bytes in its declared type (float32 source data of a tensor the fp16 conversion
        retyped is converted here, as the converter converts the tensors it holds)."""
        return self._convert(self._plan(t))

    def _plan(self, t: onnx.TensorProto) -> tuple:
        """What `_convert` needs of an external tensor, read from its message (on the caller's thread)."""
        return t.name, self.source.where(t), t.data_type, math.prod(t.dims), self.nbytes(t)

    def _convert(self, plan: tuple) -> bytes:
        name, where, data_type, n, want = plan
        data = self.source.read(where)
        if len(data) == want:
            return data
        if data_type == onnx.TensorProto.FLOAT16 and len(data) == 4 * n:
            return _half(np.frombuffer(data, np.float32)).tobytes()
        raise ValueError(f"{name}: {len(data)} bytes of source data for {n} elements of {data_type}")

    def inline(self, model: onnx.ModelProto) -> None:
        for t in self.external(model):
            t.raw_data = self.raw(t)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT

    def stream(self, model: onnx.ModelProto, dest: Path) -> None:
        """Write every initializer over `_INLINE_BYTES` to ``dest``, a few tensors in memory at a time (read and
        converted on every core, written in order)."""

        def jobs() -> Iterator[tuple[onnx.TensorProto, tuple | None]]:
            for t in model.graph.initializer:
                if uses_external_data(t):
                    yield t, self._plan(t)
                elif t.HasField("raw_data") and len(t.raw_data) > self._INLINE_BYTES:
                    yield t, None

        def data(job: tuple[onnx.TensorProto, tuple | None]) -> tuple[onnx.TensorProto, bytes | None]:
            t, plan = job
            return t, None if plan is None else self._convert(plan)

        with open(dest, "wb") as f:
            for t, converted in ordered_map(data, jobs()):
                raw = t.raw_data if converted is None else converted
                del converted
                if len(raw) >= self._ALIGN:
                    f.write(b"\0" * (-f.tell() % self._ALIGN))
                offset = f.tell()
                f.write(raw)
                del raw
                t.ClearField("raw_data")
                _point_to(t, dest.name, offset, f.tell() - offset)


def _half(a: np.ndarray) -> np.ndarray:
    """float32 -> float16 by ORT's converter's rule: nonzero values keep their sign and finiteness, clamped into
    [5.96e-8, 65504] in magnitude. Its `convert_np_to_float16` makes several full-size passes (minutes for SDXL's
    U-Net), so it is given only the elements that rule changes; every other one is a plain rounding cast."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with np.errstate(over="ignore"):  # the values past fp16's range are set by ORT's rule below
        out = a.astype(np.float16)
    mag = np.abs(a)
    odd = np.flatnonzero((mag > 65504.0) | ((mag < 5.96e-08) & (mag > 0)))
    if odd.size:
        out[odd] = convert_np_to_float16(a[odd])
    return out


def _point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` an external tensor at ``offset`` of ``location`` (onnx's own helper wants the data in hand)."""
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL


def current_umask() -> int:
    """The process's umask, read without changing it (Linux reports it in /proc; elsewhere set and restore)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    with _external_set_aside(model):
        model = convert_float_to_float16(
            model,
            disable_shape_infer=True,
            keep_io_types=list(g.keep_fp32_inputs),
            op_block_list=DEFAULT_OP_BLOCK_LIST + list(FP32_OPS),
            node_block_list=keep,
        )
    _drop_duplicate_casts(model.graph)
    OnnxModel(model).topological_sort()  # the converter appends its Casts out of order
    return model


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
            _point_to(t, location, offset, length)
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
