"""TensorRT plans at run time: refuse one built for another GPU or TensorRT, and run one on torch CUDA tensors.

A TensorRT plan is only valid on the TensorRT version and GPU model it was built with; a TensorRT for RTX engine
on the version it was built with and the compute capabilities it targets. `sdrt build` records that in the build
key (manifest["engines"][name]["key"]), and `check_plan` compares it with this machine before anything is
deserialised. Nothing here imports torch or TensorRT at module level.

The runner is written against the Python API both families share (Runtime.deserialize_cuda_engine,
IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3): name-based I/O, one optimisation
profile, device buffers owned by torch. For TensorRT for RTX it adds a runtime cache of the kernels it compiles
when an engine is loaded, and fixes their specialisation before anything can be captured.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import sha256_file, write_atomic
from sdrt.runtime.trt_family import ENV_FIELDS, FAMILIES, TENSORRT, TrtEnvironment, current_gpu, import_family
from sdrt.runtime.user_cache import cache_dir, slug


def runtime_environment(family_name: str) -> TrtEnvironment:
    """The family's version and this machine's GPU (name, compute capability), to check plans against."""
    family = FAMILIES[family_name]
    trt, why = import_family(family)
    if trt is None:
        raise SdrtError(f"{why}; {family.install}")
    gpu = current_gpu()
    if gpu is None:
        raise SdrtError(f"the {family.name} backend needs a CUDA GPU and torch sees none; use --backend onnxruntime")
    return TrtEnvironment(family.name, trt.__version__, *gpu)


def rebuild_command(root: str | os.PathLike, family: str = "tensorrt") -> str:
    return f"sdrt build {root}" + (f" --backend {family}" if family != "tensorrt" else "")


def _env_mismatch(key: dict[str, Any], here: TrtEnvironment) -> list[str]:
    """What in the key does not fit this machine. A portable (RTX) engine fits any GPU of its target list."""
    if FAMILIES.get(key.get("family", "tensorrt"), FAMILIES["tensorrt"]).portable:
        targets = str(key.get("compute_capability", "")).split(",")
        differ = [
            f"{ENV_FIELDS[f]} {key.get(f)} (this machine: {getattr(here, f)})"
            for f in ("family", "version")
            if key.get(f) != getattr(here, f)
        ]
        if here.compute_capability not in targets:
            differ.append(f"compute capabilities {','.join(targets)} (this GPU: {here.compute_capability})")
        return differ
    return [
        f"{label} {key.get(f)} (this machine: {getattr(here, f)})"
        for f, label in ENV_FIELDS.items()
        if key.get(f) != getattr(here, f)
    ]


def check_plan(
    root: str | os.PathLike, manifest: dict[str, Any], name: str, here: TrtEnvironment, *, verify_hash: bool = True
) -> Path:
    """The path of ``name``'s plan if it was built for this TensorRT and GPU from the current ONNX; else a one-line
    SdrtError that says what differs and gives the rebuild command."""
    root = Path(root)
    command = rebuild_command(root, here.family)
    fix = f"rebuild it with `{command}`"
    entry = manifest.get("engines", {}).get(name)
    if not entry:
        raise SdrtError(f"{root} has no TensorRT plan for {name}; build one with `{command}`")
    path, key = root / entry["file"], entry["key"]
    if differ := _env_mismatch(key, here):
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

    def __init__(self, path: str | os.PathLike, trt: ModuleType | None = None, kernel_cache: Any = None):
        self.path = Path(path)
        self.trt = trt  # the family's module (default: tensorrt)
        self.kernel_cache = kernel_cache  # TensorRT for RTX: a `KernelCache` shared by the backend's runners
        self.runtime = self.engine = self.context = None

    def _rebuild(self) -> str:
        """The command that rebuilds this plan's directory with this plan's TensorRT."""
        module = getattr(self.trt, "__name__", TENSORRT.module)
        family = next((f.name for f in FAMILIES.values() if f.module == module), TENSORRT.name)
        return rebuild_command(self.path.parent, family)

    def __enter__(self) -> TrtRunner:
        if self.trt is None:
            import tensorrt

            self.trt = tensorrt
        trt = self.trt
        self.runtime = trt.Runtime(_trt_logger(trt))  # kept until the engine is gone
        data = self.path.read_bytes()
        if hasattr(self.runtime, "get_engine_validity"):  # TensorRT for RTX: ask before deserialising
            validity, diagnostics = self.runtime.get_engine_validity(data[: self.runtime.engine_header_size])
            if validity == trt.EngineValidity.INVALID:
                raise SdrtError(
                    f"{self.path.name} cannot run on this GPU (TensorRT for RTX says INVALID, diagnostics "
                    f"{diagnostics}); rebuild it with `{self._rebuild()}`"
                )
        self.engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if self.engine is None:
            raise SdrtError(f"TensorRT could not deserialise {self.path}; rebuild it with `{self._rebuild()}`")
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT for RTX
            config = self.engine.create_runtime_config()
            # kernels specialised as soon as a shape is set (in the warm-up), never lazily inside a capture
            config.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
            if self.kernel_cache is not None:
                self.kernel_cache.attach(self.engine)
            if self.kernel_cache is not None and not config.set_runtime_cache(self.kernel_cache.cache):
                raise SdrtError(f"TensorRT for RTX refused the runtime cache for {self.path.name}")
            self.context = self.engine.create_execution_context(config)
        else:
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

    def capturable(self, stream) -> bool:
        """Whether this context's work on ``stream`` may be recorded into a CUDA graph."""
        check = getattr(self.context, "is_stream_capturable", None)
        return True if check is None else bool(check(stream.cuda_stream))

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

    def refit(self, values: dict[str, Any], stream=None) -> None:
        """Give the plan's refittable weights new values (CUDA tensors of the weight's dtype, in the initializer's
        layout), on ``stream`` (default: torch's current stream); returns once the engine holds them, the tensors
        may then go. The engine keeps its weight memory, so contexts and captured CUDA graphs stay valid."""
        import torch

        trt = self.trt
        refitter = trt.Refitter(self.engine, _trt_logger(trt))
        for name, x in values.items():
            dtype = {torch.float16: trt.float16, torch.float32: trt.float32}[x.dtype]
            weights = trt.Weights(dtype, x.data_ptr(), x.numel())
            if not refitter.set_named_weights(name, weights, trt.TensorLocation.DEVICE):
                raise SdrtError(
                    f"{self.path.name}: weight {name} is not refittable in this plan; rebuild it with "
                    f"`{self._rebuild()}` (adapters added after a build need a new one)"
                )
        stream = stream or torch.cuda.current_stream()
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise SdrtError(f"TensorRT could not refit {self.path.name} (see the TensorRT log above)")
        stream.synchronize()


class KernelCache:
    """TensorRT for RTX's runtime cache of the kernels it compiles when an engine is loaded: one per backend,
    shared by its runners, read from ``path`` at start (where the file fits this GPU, driver and version: TensorRT
    for RTX checks and otherwise starts empty) and written back atomically by `save`."""

    def __init__(self, path: Path):
        self.path = path
        self.cache = None  # made from the first engine: the API creates caches through a runtime config

    def attach(self, engine) -> None:
        """Create the cache from the first engine's runtime config and load the file into it."""
        if self.cache is not None:
            return
        self.cache = engine.create_runtime_config().create_runtime_cache()
        if self.path.is_file():
            self.cache.deserialize(self.path.read_bytes())  # False: another GPU/driver/version; start empty

    def save(self) -> None:
        if self.cache is None:
            return
        write_atomic(self.path, self.cache.serialize())


def kernel_cache_path(version: str, gpu: str) -> Path:
    """~/.cache/sdrt/rtx-kernels-<version>-<gpu>-cuda<driver API>.cache: a runtime cache is valid for one of each."""
    import ctypes

    driver = ctypes.c_int(0)
    try:
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(driver))
    except OSError:
        pass
    return cache_dir() / f"rtx-kernels-{version}-{slug(gpu)}-cuda{driver.value}.cache"
