"""Which ONNX initializer holds each PyTorch weight: the map `sdrt lora add` keys adapters by.

torch.onnx's dynamo exporter keeps a parameter's name only where the graph uses it as it is (convolutions, Gemm);
a Linear layer on 3-D activations becomes a MatMul whose weight constant folding (`trace.fold_constants`) has
transposed into an initializer named ``val_N``. Names cannot say which is which, so the weights are matched by
value: every 2-D or larger parameter, as it is and (2-D) transposed, against every initializer of the fp32 trace.
A parameter whose value two initializers share (or that shares one with another parameter) is marked ``shared``:
changing that initializer would change more than the one weight, so adapters refuse it.

A parameter no initializer holds is listed as ``unused`` when the graph's outputs do not depend on it (autograd finds
no path; the exporter dropped it): SDXL's first text encoder gives its penultimate layer's states, so its last layer
is such a weight, and kohya files for SDXL carry adapters for it. An adapter on an unused weight changes nothing, in
diffusers as here. A parameter that is used but not found stays out of the map: adapters refuse it.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

WEIGHTS_FORMAT = 1


def _digest(data: Any, shape: tuple[int, ...]) -> tuple[bytes, tuple[int, ...]]:
    # SHA-256: OpenSSL's uses the CPU's SHA instructions (twice BLAKE2's speed here) and, like every step of the
    # fingerprints, releases the GIL, so `ordered_map` spreads them over the cores
    return hashlib.sha256(data).digest(), shape


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], ahead: int = 4) -> Iterator[Any]:
    """``fn`` over ``items`` on a thread per core, results in order, at most ``ahead`` in flight (each may hold a
    tensor's data). For per-tensor work that numpy, torch and hashlib do without the GIL; ``items`` is consumed
    on the calling thread, so it may read protobuf messages that the workers must not touch."""
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def float_parameters(module: torch.nn.Module) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """(prefix, [(name, tensor)]) of every float parameter of 2 or more dimensions of the graph module, named as the
    wrapped diffusers / transformers model names it (the wrapper's ``prefix`` removed)."""
    named, prefixes = [], set()
    for name, p in module.named_parameters():
        if p.ndim >= 2 and p.is_floating_point():
            prefix, fqn = name.split(".", 1)
            prefixes.add(prefix)
            named.append((fqn, p.detach()))
    if len(prefixes) > 1:
        raise ValueError(f"graph module wraps more than one model: {sorted(prefixes)}")
    return (prefixes.pop() + "." if prefixes else ""), named


def parameter_fingerprints(named: list[tuple[str, torch.Tensor]]) -> dict[tuple, list[tuple[str, bool]]]:
    """{fingerprint: [(name, transposed)]} of `float_parameters`, each as it is and (2-D) transposed. Reads only the
    tensors it is given, so it may run while torch.export has swapped the module's own parameters."""

    def fingerprints(item: tuple[str, torch.Tensor]) -> list[tuple[tuple, tuple[str, bool]]]:
        fqn, p = item
        w = p.float().contiguous()
        out = [(_digest(w.numpy(), tuple(w.shape)), (fqn, False))]
        if w.ndim == 2:
            t = w.t().contiguous()
            out.append((_digest(t.numpy(), tuple(t.shape)), (fqn, True)))
        return out

    out: dict[tuple, list[tuple[str, bool]]] = {}
    for pairs in ordered_map(fingerprints, named):
        for fp, entry in pairs:
            out.setdefault(fp, []).append(entry)
    return out


def initializer_fingerprints(path: Path) -> dict[tuple, list[str]]:
    """{fingerprint: [initializer names]} of a float32 ONNX file, a few tensors' bytes in memory at a time."""
    model = onnx.load(str(path), load_external_data=False)
    out: dict[tuple, list[str]] = {}
    with ExternalData(path.parent) as external:

        def jobs() -> Iterator[tuple[str, tuple[int, ...], Any]]:
            for t in model.graph.initializer:
                if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
                    where = (
                        external.where(t) if uses_external_data(t) else np.ascontiguousarray(numpy_helper.to_array(t))
                    )
                    yield t.name, tuple(t.dims), where

        def fingerprint(job: tuple[str, tuple[int, ...], Any]) -> tuple[str, tuple]:
            name, dims, where = job
            return name, _digest(external.read(where) if isinstance(where, tuple) else where, dims)

        for name, fp in ordered_map(fingerprint, jobs()):
            out.setdefault(fp, []).append(name)
    return out


class ExternalData:
    """Reads externally stored tensors straight from their data files, never into the model: protobuf keeps a
    message's memory in its arena until the whole model is freed, so loading then clearing each tensor in turn would
    hold every weight at once (3.4 GB for SD 1.5's fp32 U-Net, 10 GB for SDXL's). `read` may run on any thread."""

    def __init__(self, folder: Path):
        self.folder, self.files, self._lock = folder, {}, threading.Lock()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()

    def where(self, t: onnx.TensorProto) -> tuple[str, int, int]:
        """(data file, offset, length in bytes) of an external tensor."""
        info = {e.key: e.value for e in t.external_data}
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        length = int(info["length"]) if "length" in info else itemsize * math.prod(t.dims)
        return info["location"], int(info.get("offset", 0)), length

    def read(self, where: tuple[str, int, int]) -> bytes:
        location, offset, length = where
        with self._lock:
            if location not in self.files:
                self.files[location] = open(self.folder / location, "rb")  # noqa: SIM115 (closed by __exit__)
        fd, parts = self.files[location].fileno(), []
        while length:  # positional reads: no shared file position between threads; one read returns <= 2 GB
            part = os.pread(fd, length, offset)
            if not part:
                raise ValueError(f"{location}: ends before offset {offset} + {length} bytes")
            parts.append(part)
            offset, length = offset + len(part), length - len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def raw(self, t: onnx.TensorProto) -> bytes:
        """The tensor's little-endian bytes."""
        return self.read(self.where(t))

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        return np.frombuffer(self.raw(t), dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(t.dims)


def unreached_parameters(
    module: torch.nn.Module,
    example: Sequence[torch.Tensor],
    prefix: str,
    params: dict[tuple, list[tuple[str, bool]]],
    inits: dict[tuple, list[str]],
) -> list[str]:
    """The parameters (names without the wrapper's prefix) that no initializer holds and that the module's outputs
    on ``example`` do not depend on. Only those few require grad, so the backward is as small as they are."""
    found = {fqn for fp, names in params.items() if fp in inits for fqn, _ in names}
    missing = sorted({fqn for names in params.values() for fqn, _ in names} - found)
    if not missing:
        return []
    tensors = [module.get_parameter(prefix + fqn) for fqn in missing]
    before = {p: p.requires_grad for p in module.parameters()}
    try:
        for p in before:
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad():
            out = module(*example)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        none = [None] * len(tensors)
        grads = torch.autograd.grad([o.sum() for o in outs], tensors, allow_unused=True) if outs else none
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
    return [fqn for fqn, g in zip(missing, grads, strict=True) if g is None]


def weight_map(
    prefix: str, params: dict[tuple, list[tuple[str, bool]]], inits: dict[tuple, list[str]], unused: list[str]
) -> dict[str, Any]:
    """The weights file of one graph: for each parameter found among the fp32 trace's initializers ``inits``, its
    initializer, that initializer's shape, and whether the exporter stored it transposed; and the parameters the
    graph does not use. Dtypes are added by `add_dtypes`."""
    weights: dict[str, dict[str, Any]] = {}
    users: dict[str, int] = {}
    for fp, names in inits.items():
        for fqn, transposed in params.get(fp, []):
            for init in names:
                users[init] = users.get(init, 0) + 1
                entry = {"initializer": init, "shape": list(fp[1]), "transposed": transposed}
                if fqn in weights or len(names) > 1:
                    entry["shared"] = True
                weights[fqn] = entry
    for entry in weights.values():
        if users[entry["initializer"]] > 1:
            entry["shared"] = True
    return {"format": WEIGHTS_FORMAT, "prefix": prefix, "weights": dict(sorted(weights.items())), "unused": unused}


def add_dtypes(weights: dict[str, Any], model: onnx.ModelProto) -> dict[str, Any]:
    """Record each initializer's element type in the saved graph (fp16 conversion changes it, and may leave some
    in float32); entries whose initializer the saved graph no longer has are dropped."""
    dtypes = {
        t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    kept = {}
    for fqn, entry in weights["weights"].items():
        if entry["initializer"] in dtypes:
            kept[fqn] = {**entry, "dtype": dtypes[entry["initializer"]]}
    return {**weights, "weights": kept}
