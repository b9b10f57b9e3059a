"""The one place the build touches TensorRT: ONNX file -> serialized engine, for either TensorRT family.

Written against the builder API that TensorRT 10.x / 11.x and TensorRT for RTX share (OnnxParser, Builder,
IBuilderConfig, build_serialized_network), on the family's module passed in; it is imported only when an engine
is built or a graph is parsed, so the rest of `sdrt build` (profiles, keys, the operator table) imports and tests
without it. Polygraphy's loaders pick the TensorRT module once per process from an environment variable and
leave `set_compute_capability`'s result unchecked (an unchecked failure builds for the build machine's GPU
instead of the targets), so the few builder calls are made here directly, every return value checked.

The graphs carry their own precision (fp16 weights and activations, explicit fp32 Casts): no precision flag is
set. TensorRT 10.x creates the network strongly typed; 11.x and TensorRT for RTX are strongly typed only.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import write_atomic

Profiles = list[dict[str, dict[str, list[int]]]]  # [{input: {"min"/"opt"/"max": shape}}]


def _network(trt: ModuleType, builder, logger):
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if trt.__name__ == "tensorrt" and major < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    return network, trt.OnnxParser(network, logger)


def parser_errors(parser, onnx_name: str) -> list[str]:
    """One line per error of NVIDIA's ONNX parser, naming the node, its operator and the parser's reason."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f"node {e.node_name()!r} ({e.node_operator()})" if e.node_name() else f"node #{e.node()}"
        out.append(f"{onnx_name}: {where}: {e.desc()}")
    return out


def parse_onnx(trt: ModuleType, onnx_path: Path) -> list[str]:
    """NVIDIA's ONNX parser over the graph (weights included, freed on return): its errors, [] if it parses."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network, parser = _network(trt, builder, logger)
    if parser.parse_from_file(str(onnx_path)):
        return []
    return parser_errors(parser, onnx_path.name) or [f"{onnx_path.name}: the ONNX parser failed without a reason"]


class PlanFromOnnx:
    """Loader: stores the ONNX path, shape profiles and options when made; builds the engine (an ``IHostMemory``,
    bytes-like) when called. The builder, network and parser live only inside the call.

    ``targets``: TensorRT for RTX's compute capabilities ("8.6", ...); ``timing_cache``: TensorRT's tactic timings
    (read if the file exists, written back after the build); each is for its family only. ``refittable``: the
    initializers LoRA adapters change, marked refittable one by one (REFIT_INDIVIDUAL) so every other weight keeps
    its constant folding and fusions.
    """

    def __init__(
        self,
        trt: ModuleType,
        onnx_path: str | os.PathLike,
        profiles: Profiles,
        workspace_gib: float | None,
        timing_cache: str | os.PathLike | None = None,
        targets: tuple[str, ...] = (),
        refittable: tuple[str, ...] = (),
    ):
        self.trt, self.onnx_path, self.profiles = trt, Path(onnx_path), profiles
        self.workspace_gib, self.targets, self.refittable = workspace_gib, targets, refittable
        self.timing_cache = Path(timing_cache) if timing_cache else None

    def __call__(self):
        trt, name = self.trt, self.onnx_path.name
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, parser = _network(trt, builder, logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            raise SdrtError("the ONNX parser rejects " + "; ".join(parser_errors(parser, name)[:3]))
        config = builder.create_builder_config()
        for shapes in self.profiles:
            profile = builder.create_optimization_profile()
            for tensor, s in shapes.items():
                profile.set_shape(tensor, s["min"], s["opt"], s["max"])
            if config.add_optimization_profile(profile) < 0:
                raise SdrtError(f"TensorRT rejected the shape profile of {name}: {shapes}")
        if self.workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        self._set_targets(config)
        self._mark_refittable(network, config)
        cache = self._load_timing_cache(config)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise SdrtError(f"TensorRT could not build {name} (its log above says why)")
        if cache is not None:
            write_atomic(self.timing_cache, config.get_timing_cache().serialize())
        return engine

    def _mark_refittable(self, network, config) -> None:
        if not self.refittable:
            return
        config.set_flag(self.trt.BuilderFlag.REFIT_INDIVIDUAL)
        for name in self.refittable:
            if not network.mark_weights_refittable(name):
                raise SdrtError(
                    f"{self.onnx_path.name}: TensorRT cannot make weight {name} refittable (the parser "
                    "did not keep it as one); a LoRA adapter cannot change it on this backend"
                )

    def _set_targets(self, config) -> None:
        """The count first, then each target, every call checked; then read back, so the engine cannot silently
        target the build machine instead."""
        if not self.targets:
            return
        config.num_compute_capabilities = len(self.targets)
        for i, cc in enumerate(self.targets):
            value = getattr(self.trt.ComputeCapability, "SM" + cc.replace(".", ""), None)
            if value is None or not config.set_compute_capability(value, i):
                raise SdrtError(f"TensorRT for RTX {self.trt.__version__} cannot target compute capability {cc}")
        got = [config.get_compute_capability(i) for i in range(config.num_compute_capabilities)]
        want = [getattr(self.trt.ComputeCapability, "SM" + cc.replace(".", "")) for cc in self.targets]
        if got != want:
            raise SdrtError(f"TensorRT for RTX kept targets {got}, not {want}")

    def _load_timing_cache(self, config):
        if self.timing_cache is None:
            return None
        data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise SdrtError(f"TensorRT refused the timing cache {self.timing_cache}; delete it to start a new one")
        return cache
