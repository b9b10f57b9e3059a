"""TensorRT plans at run time: refuse one built for another GPU or TensorRT, and run one on torch CUDA tensors.

A plan is only valid on the TensorRT version and GPU model it was built with, so `sdrt build` records both in its
build key (manifest["engines"][name]["key"]) and `check_plan` compares them with this machine before anything is
deserialised. Nothing here imports torch or tensorrt at module level.

The runner is written against the TensorRT 10.x / 11.x Python API (Runtime.deserialize_cuda_engine,
IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3): name-based I/O, one optimisation
profile, device buffers owned by torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import sha256_file

# Build-key fields that describe the machine, and how a message names them.
ENV_FIELDS = {"tensorrt": "TensorRT", "gpu": "GPU", "compute_capability": "compute capability"}


class TrtEnvironment(NamedTuple):
    tensorrt: str  # tensorrt.__version__, e.g. "10.9.0.34"
    gpu: str  # torch.cuda.get_device_name(), e.g. "NVIDIA GeForce RTX 4090"
    compute_capability: str  # "8.9"


def current_trt_environment() -> TrtEnvironment:
    """The TensorRT version and the current CUDA device, as a build key records them."""
    try:
        import tensorrt
    except ImportError as err:
        raise SdrtError(f"TensorRT is not importable ({err}); pip install tensorrt on a machine with a GPU") from None
    import torch

    if not torch.cuda.is_available():
        raise SdrtError(f"TensorRT needs a CUDA GPU and torch sees none (torch {torch.__version__})")
    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return TrtEnvironment(tensorrt.__version__, torch.cuda.get_device_name(i), f"{major}.{minor}")


def rebuild_command(root: str | os.PathLike) -> str:
    return f"sdrt build {root}"


def check_plan(
    root: str | os.PathLike,
    manifest: dict[str, Any],
    name: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    *,
    verify_hash: bool = True,
) -> Path:
    """The path of ``name``'s plan if it was built for this TensorRT and GPU from the current ONNX; else a one-line
    SdrtError that says what differs and gives the rebuild command."""
    root = Path(root)
    fix = f"rebuild it with `{rebuild_command(root)}`"
    entry = manifest.get("engines", {}).get(name)
    if not entry:
        raise SdrtError(f"{root} has no TensorRT plan for {name}; build one with `{rebuild_command(root)}`")
    path, key = root / entry["file"], entry["key"]
    here = {"tensorrt": trt_version, "gpu": gpu_name, "compute_capability": str(compute_capability)}
    differ = [
        f"{label} {key.get(f)} (this machine: {here[f]})" for f, label in ENV_FIELDS.items() if key.get(f) != here[f]
    ]
    if differ:
        raise SdrtError(f"{entry['file']} was built for " + ", ".join(differ) + f"; {fix}")
    graph_files = manifest["graphs"][name]["files"]
    if key.get("onnx") != {f: manifest["files"].get(f) for f in graph_files}:
        raise SdrtError(f"{entry['file']} was built from a different {name}.onnx than {root} holds now; {fix}")
    if not path.is_file():
        raise SdrtError(f"{path} is missing; {fix}")
    if verify_hash and sha256_file(path) != entry["sha256"]:
        raise SdrtError(f"{path}: SHA-256 differs from the manifest (damaged or replaced); {fix}")
    return path


_LOGGER = None


def _trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _torch_dtype(trt_dtype):
    import torch

    by_name = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "BOOL": torch.bool,
    }
    if trt_dtype.name not in by_name:
        raise SdrtError(f"plan I/O of TensorRT type {trt_dtype.name} has no torch equivalent")
    return by_name[trt_dtype.name]


class TrtRunner:
    """Runs one plan on torch CUDA tensors. Use as a context manager::

        with TrtRunner(path) as unet:
            out = unet.infer({"sample": x, "timestep": t, "encoder_hidden_states": c})  # {"noise_pred": ...}

    `infer` checks names, dtypes, devices and shapes at the door, binds tensors by address and enqueues on the
    current torch stream (no host sync). Outputs are allocated once per input shape and reused: a returned tensor
    is overwritten by the next call with the same shapes (what CUDA-graph capture needs).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.runtime = self.engine = self.context = None

    def __enter__(self) -> TrtRunner:
        import tensorrt as trt

        self.runtime = trt.Runtime(_trt_logger(trt))  # kept until the engine is gone
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise SdrtError(f"TensorRT could not deserialise {self.path}; rebuild it with `sdrt build`")
        self.context = self.engine.create_execution_context()
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in io}
        self.inputs = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in io if is_input[n]}
        self.outputs = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in io if not is_input[n]}
        # profile 0 (a plan from `sdrt build` has one): (min, opt, max) per input
        self.ranges = {n: [tuple(d) for d in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._out: dict[tuple, dict[str, Any]] = {}
        return self

    def __exit__(self, *exc) -> None:
        self._out.clear()
        self.context = None  # the context goes before its engine, the engine before its runtime
        self.engine = None
        self.runtime = None

    def _check(self, feed: dict[str, Any]) -> None:
        if set(feed) != set(self.inputs):
            raise SdrtError(f"{self.path.name} takes inputs {sorted(self.inputs)}, got {sorted(feed)}")
        for name, x in feed.items():
            lo, _, hi = self.ranges[name]
            if not x.is_cuda or x.dtype != self.inputs[name] or not x.is_contiguous():
                raise SdrtError(
                    f"{name}: expected a contiguous CUDA {self.inputs[name]} tensor, got {x.dtype} on {x.device}"
                )
            if len(x.shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, x.shape, hi, strict=True)):
                raise SdrtError(
                    f"{name}: shape {list(x.shape)} is outside {list(lo)}..{list(hi)} that {self.path.name} was built "
                    "for; rebuild with `sdrt build DIR` at this size or with --dynamic"
                )

    def _bind(self, name: str, x) -> None:
        if not self.context.set_tensor_address(name, x.data_ptr()):
            raise SdrtError(f"TensorRT rejected the address of {name}")

    def infer(self, feed: dict[str, Any], stream=None) -> dict[str, Any]:
        """Enqueue one run on ``stream`` (default: torch's current stream) and return the output tensors."""
        import torch

        self._check(feed)
        for name, x in feed.items():
            if self._shapes.get(name) != tuple(x.shape):
                if not self.context.set_input_shape(name, tuple(x.shape)):
                    raise SdrtError(f"TensorRT rejected shape {list(x.shape)} for {name}")
                self._shapes[name] = tuple(x.shape)
            self._bind(name, x)
        shapes = tuple(self._shapes[n] for n in sorted(self.inputs))
        if shapes not in self._out:
            device = next(iter(feed.values())).device
            self._out[shapes] = {
                n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=dt, device=device)
                for n, dt in self.outputs.items()
            }
        out = self._out[shapes]
        for name, y in out.items():
            self._bind(name, y)
        stream = stream or torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SdrtError(f"TensorRT failed to enqueue {self.path.name} (see the TensorRT log above)")
        return out
