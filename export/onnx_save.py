"""An ONNX model -> its file, with the weights streamed to one external data file beside it for large graphs.

The weights may still sit in the data file of the graph the model was made from (`fp16.fp16_from_fp32` loads
without them): each is read there, converted to the type the graph now declares and written out one at a time,
so no full graph's weights are ever in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from sdrt.export.weights import ExternalData, ordered_map

# Weights go to one `<graph>.onnx.data` file beside the graph above this size: required past protobuf's 2 GB limit,
# and already worth it above ~0.5 GB, where serialising one protobuf would hold a second full copy in memory.
_EXTERNAL_DATA_BYTES = 512 << 20


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
                point_to(t, dest.name, offset, f.tell() - offset)


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


def point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
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
