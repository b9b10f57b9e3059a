"""The one place the build touches TensorRT: ONNX file -> serialized plan, through Polygraphy's loaders.

Written against TensorRT 10.x / 11.x and Polygraphy's `polygraphy.backend.trt` loaders; both are imported only when
a plan is built, so the rest of `sdrt build` (profiles, keys, the operator check) imports and tests without them.
The graphs carry their own precision (fp16 weights and activations, explicit fp32 Casts), so no precision flag is
set: on 10.x the network is created strongly typed; on 11.x strong typing is the only mode (the creation flag is
deprecated there and ignored, `BuilderFlag.FP16` no longer exists).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from sdrt.runtime.errors import SdrtError


def import_tensorrt() -> tuple[ModuleType | None, str]:
    """(the tensorrt module, "") or (None, why it cannot be imported)."""
    try:
        import tensorrt
    except (ImportError, OSError, RuntimeError) as err:  # not installed, or its CUDA libraries are missing
        return None, f"import tensorrt failed: {str(err).splitlines()[0]}" if str(err) else "tensorrt is not installed"
    return tensorrt, ""


class PlanFromOnnx:
    """Loader: stores the ONNX path, shape profiles, workspace limit and timing cache when made; builds the plan
    (an ``IHostMemory``, bytes-like) when called. The builder, network and parser live only inside the call."""

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        profiles: list[dict[str, dict[str, list[int]]]],  # [{input: {"min"/"opt"/"max": shape}}]
        workspace_gib: float | None,
        timing_cache: str | os.PathLike,
    ):
        self.onnx_path, self.profiles = Path(onnx_path), profiles
        self.workspace_gib, self.timing_cache = workspace_gib, Path(timing_cache)

    def __call__(self):
        import tensorrt as trt

        try:
            from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
            from polygraphy.exception import PolygraphyException
            from polygraphy.logger import G_LOGGER
        except ImportError:
            raise SdrtError("building plans needs Polygraphy: pip install 'sdrt[export]'") from None
        G_LOGGER.module_severity = G_LOGGER.WARNING  # TensorRT's warnings and errors; sdrt reports the steps

        profiles = []
        for shapes in self.profiles:
            profile = Profile()
            for name, s in shapes.items():
                profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
            profiles.append(profile)
        limits = None
        if self.workspace_gib is not None:
            limits = {trt.MemoryPoolType.WORKSPACE: int(self.workspace_gib * (1 << 30))}
        network = NetworkFromOnnxPath(str(self.onnx_path), strongly_typed=int(trt.__version__.split(".")[0]) < 11)
        config = CreateConfig(
            tf32=True,  # TensorRT's own default; fp32 islands take fp16-cast inputs, which TF32 holds exactly
            profiles=profiles,
            memory_pool_limits=limits,
            load_timing_cache=str(self.timing_cache) if self.timing_cache.is_file() else None,
        )
        try:
            # save_timing_cache merges this build's timings into the file (under a lock), so the next build,
            # of this graph after a small change or of another graph, reuses them
            return EngineBytesFromNetwork(network, config, save_timing_cache=str(self.timing_cache))()
        except PolygraphyException as err:
            raise SdrtError(f"TensorRT could not build {self.onnx_path.name}: {str(err).splitlines()[0]}") from None
