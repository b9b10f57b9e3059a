"""Backends: run an engine directory's graphs on torch tensors, behind one small interface.

A backend takes and returns torch tensors on its device, in the dtypes the graph declares. On a GPU the TensorRT
backends (plans enqueued on the current torch stream) and the torch programs can be captured into one CUDA graph;
ONNX Runtime runs step by step (its CUDA provider captures graphs of its own, not inside torch's).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import Geometry, concrete_shape
from sdrt.runtime.params import BACKENDS

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


def resolve_shape(shape: list, feeds: dict[str, torch.Tensor], inputs: dict[str, Any], factor: int) -> tuple[int, ...]:
    """A manifest shape with symbols (B, h, w, H, W) at the sizes of ``feeds``; ``factor``: pixels per latent (the
    manifest's VAE scale factor)."""
    values: dict[str, int] = {}
    for name, entry in inputs.items():
        for sym, size in zip(entry["shape"], feeds[name].shape, strict=True):
            if isinstance(sym, str):
                values[sym] = int(size)
    h = values["h"] if "h" in values else values.get("H", 0) // factor
    w = values["w"] if "w" in values else values.get("W", 0) // factor
    return concrete_shape(shape, values.get("B", 0), h, w, factor, values.get("T", 77))


class Backend:
    """Runs graphs by name. ``run(graph, feeds) -> outputs`` in the graph's output order."""

    name = "?"
    capturable = False  # whether `run` can be recorded inside a torch CUDA graph
    inference_precision: str | None = None  # where the backend computes in another precision than the graphs'

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device):
        self.root, self.manifest, self.device = root, manifest, device

    def dtype(self, graph: str, name: str) -> torch.dtype:
        return _TORCH[self.manifest["graphs"][graph]["inputs"][name]["dtype"]]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def set_weights(self, graph: str, updates: list) -> None:
        """Give ``graph`` the exported weights plus these `runtime.lora.Update` deltas (none: the exported ones)."""
        raise NotImplementedError

    def lora_refusal(self) -> str | None:
        """Why requests with LoRA adapters are refused here, naming the fix (None: they are not). Every backend
        applies them; a backend refuses where its graphs no longer hold the exported weights."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: the CPU provider, or the CUDA provider with I/O bound to torch's device memory."""

    name = "onnxruntime"

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device, threads: int | None = None):
        """``threads``: ONNX Runtime's intra-op threads on the CPU; by default torch's own count
        (`torch.get_num_threads()`, which follows OMP_NUM_THREADS), so the two thread pools never oversubscribe."""
        super().__init__(root, manifest, device)
        import onnxruntime as ort

        self.ort = ort
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SdrtError("this onnxruntime has no CUDA provider: pip install onnxruntime-gpu, or use --device cpu")
        self.threads = torch.get_num_threads() if threads is None else threads
        self.sessions: dict[str, Any] = {}
        self.overrides: dict[str, dict[str, Any]] = {}  # graph -> {initializer: OrtValue}, alive with the session

    def session(self, graph: str):
        if graph not in self.sessions:
            opts = self.ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            if self.overrides.get(graph):
                # ORT_ENABLE_ALL's CPU layout transformer (NCHWc) reorders convolution weights from the model's own
                # values, not the overrides: one level below it, every override is used (the LoRA tests hold to it)
                opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            for name, value in self.overrides.get(graph, {}).items():
                opts.add_initializer(name, value)
            if self.device.type == "cuda":
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
            else:
                providers = ["CPUExecutionProvider"]
            path = self.root / self.manifest["graphs"][graph]["file"]
            self.sessions[graph] = self.ort.InferenceSession(str(path), opts, providers=providers)
        return self.sessions[graph]

    def set_weights(self, graph: str, updates: list) -> None:
        """Initializer overrides (SessionOptions.add_initializer): the next run opens a new session for ``graph``."""
        from safetensors import safe_open

        from sdrt.runtime.lora import BASE_FILE

        values = {}
        if updates:
            with safe_open(str(self.root / BASE_FILE), "pt") as base:
                for u in updates:
                    w = u.applied_to(base.get_tensor(f"{graph}/{u.initializer}"))
                    values[u.initializer] = self.ort.OrtValue.ortvalue_from_numpy(w.numpy())
        self.sessions.pop(graph, None)
        self.overrides[graph] = values

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        session = self.session(graph)
        if self.device.type != "cuda":
            outs = session.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})
            return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)
        entry = self.manifest["graphs"][graph]
        factor = Geometry.from_manifest(self.manifest).vae_scale_factor
        binding = session.io_binding()
        for name, x in feeds.items():
            x = x.contiguous()
            binding.bind_input(name, "cuda", self.device.index or 0, _np(x.dtype), list(x.shape), x.data_ptr())
        outs = []
        for name, spec in entry["outputs"].items():
            y = torch.empty(
                resolve_shape(spec["shape"], feeds, entry["inputs"], factor),
                dtype=_TORCH[spec["dtype"]],
                device=self.device,
            )
            binding.bind_output(name, "cuda", self.device.index or 0, _np(y.dtype), list(y.shape), y.data_ptr())
            outs.append(y)
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        return tuple(outs)


class TensorRTBackend(Backend):
    """Plans built by `sdrt build` with TensorRT (``family="tensorrt"``) or TensorRT for RTX (``"tensorrt-rtx"``),
    each checked against this GPU and version before it is loaded."""

    capturable = True

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device, family: str = "tensorrt"):
        super().__init__(root, manifest, device)
        from sdrt.runtime.plans import KernelCache, TrtRunner, check_plan, kernel_cache_path, runtime_environment
        from sdrt.runtime.trt_family import FAMILIES, import_family, is_rtx_gpu

        self.name = family
        env = runtime_environment(family)
        if FAMILIES[family].portable and not is_rtx_gpu(env.gpu):
            raise SdrtError(
                f"TensorRT for RTX engines run on RTX GPUs, not on {env.gpu}; use --backend tensorrt "
                "(plans built on this GPU), torch or onnxruntime"
            )
        trt = import_family(FAMILIES[family])[0]
        self.kernels = KernelCache(kernel_cache_path(env.version, env.gpu)) if FAMILIES[family].portable else None
        self.runners: dict[str, TrtRunner] = {}
        self.changed: dict[str, set[str]] = {}  # graph -> initializers refitted away from their exported value
        with contextlib.ExitStack() as opened:  # a plan that fails to load releases those loaded before it
            for graph in manifest["graphs"]:
                check_plan(root, manifest, graph, env, verify_hash=False)
                path = root / manifest["engines"][graph]["file"]
                self.runners[graph] = opened.enter_context(TrtRunner(path, trt, self.kernels))
            self._runners = opened.pop_all()

    def set_weights(self, graph: str, updates: list) -> None:
        """Refit ``graph``'s plan on torch's stream: the updated weights get W0 + delta, the ones an earlier set
        changed and this one does not get W0 back (both exactly as `loras/base.safetensors` holds them)."""
        from safetensors import safe_open

        from sdrt.runtime.lora import BASE_FILE
        from sdrt.runtime.plans import rebuild_command

        allowed = set(self.manifest["engines"][graph]["key"].get("refittable", []))
        new = {u.initializer: u for u in updates}
        if missing := sorted(set(new) - allowed):
            raise SdrtError(
                f"{graph}.plan was built without {missing[0]} refittable (adapters added after the "
                f"build?); rebuild it with `{rebuild_command(self.root, self.name)}`",
                field="loras",
            )
        values = {}
        with safe_open(str(self.root / BASE_FILE), "pt") as base:
            for name in sorted(set(new) | self.changed.get(graph, set())):
                w0 = base.get_tensor(f"{graph}/{name}")
                w = w0 if name not in new else new[name].applied_to(w0)
                values[name] = w.contiguous().to(self.device)
        if values:
            self.runners[graph].refit(values)
        self.changed[graph] = set(new)

    def capturable_on(self, stream) -> bool:
        """Whether every plan's work on ``stream`` can be recorded into a CUDA graph."""
        return all(r.capturable(stream) for r in self.runners.values())

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.runners[graph].infer(feeds)
        return tuple(out[name] for name in self.manifest["graphs"][graph]["outputs"])

    def close(self) -> None:
        if self.kernels is not None:
            self.kernels.save()  # the kernels compiled for this GPU, for the next start (while the engines live)
        self._runners.close()
        self.runners.clear()


class TorchBackend(Backend):
    """The PyTorch modules themselves, as `torch.export` programs (`sdrt export --torch-programs`): eager, or
    torch.compile'd with ``compile=True``. Capturable on a GPU: the CUDA-graph path where TensorRT is absent."""

    name = "torch"

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device, compile: bool = False):
        super().__init__(root, manifest, device)
        self.capturable = device.type == "cuda"
        self.modules: dict[str, Any] = {}
        for graph, entry in manifest["graphs"].items():
            if not entry.get("torch_program"):
                raise SdrtError(f"{root} has no torch programs; re-export with `sdrt export ... --torch-programs`")
            module = torch.export.load(str(root / entry["torch_program"])).module().to(device)
            self.modules[graph] = torch.compile(module, mode="max-autotune-no-cudagraphs") if compile else module
        self.base: dict[str, dict[str, torch.Tensor]] = {}  # graph -> {parameter: exported value}, once changed

    @torch.no_grad()
    def set_weights(self, graph: str, updates: list) -> None:
        """In-place copies into the same parameter tensors, so captured CUDA graphs stay valid."""
        module, base = self.modules[graph], self.base.setdefault(graph, {})
        for u in updates:
            if u.param not in base:
                base[u.param] = module.get_parameter(u.param).detach().clone()
        changed = {u.param: u.delta for u in updates}
        for name, w0 in base.items():
            p = module.get_parameter(name)
            p.copy_(w0 if name not in changed else (w0.float() + changed[name].to(w0.device)).to(p.dtype))

    @torch.no_grad()
    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        args = [feeds[name] for name in self.manifest["graphs"][graph]["inputs"]]
        out = self.modules[graph](*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _np(dtype: torch.dtype) -> type:
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}[dtype]


def has_torch_programs(manifest: dict[str, Any]) -> bool:
    return all(g.get("torch_program") for g in manifest["graphs"].values())


def has_plans(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get("engines")) and all(g in manifest["engines"] for g in manifest["graphs"])


def plans_family(manifest: dict[str, Any]) -> str:
    """Which TensorRT built the directory's plans ("tensorrt" or "tensorrt-rtx")."""
    return next(iter(manifest["engines"].values()))["key"].get("family", "tensorrt")


def has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def open_backend(
    root: Path,
    manifest: dict[str, Any],
    backend: str,
    device: torch.device,
    cpu_precision: str | None = None,
    cpu_int8: bool = False,
) -> Backend:
    """`auto`: on a GPU, TensorRT where plans exist, else the torch programs where saved; on the CPU OpenVINO where
    installed; else ONNX Runtime. ``cpu_precision`` ("bf16", "f32"; None: the CPU's best) and ``cpu_int8`` (the
    U-Net `sdrt quantize` made) are OpenVINO's."""
    if backend not in BACKENDS:
        raise SdrtError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    gpu = device.type == "cuda"
    openvino = backend == "openvino" or (backend == "auto" and not gpu and has_openvino())
    for flag, given in (("cpu_precision", cpu_precision), ("cpu_int8", cpu_int8)):
        if given and not openvino:
            raise SdrtError(
                f"--{flag.replace('_', '-')} is OpenVINO's; add --backend openvino (pip install 'sdrt[openvino]')",
                field=flag,
            )
    if openvino:
        from sdrt.runtime.openvino import OpenVinoBackend

        return OpenVinoBackend(root, manifest, device, cpu_precision, cpu_int8=cpu_int8)
    if backend == "torch" or (backend == "auto" and gpu and not has_plans(manifest) and has_torch_programs(manifest)):
        return TorchBackend(root, manifest, device)
    if backend in ("tensorrt", "tensorrt-rtx") or (backend == "auto" and gpu and has_plans(manifest)):
        family = backend if backend != "auto" else plans_family(manifest)
        if not gpu:
            raise SdrtError(f"the {family} backend needs a CUDA GPU; use --backend onnxruntime on the CPU")
        if not has_plans(manifest):
            flag = "" if family == "tensorrt" else f" --backend {family}"
            raise SdrtError(f"{root} has no TensorRT plans; build them with `sdrt build {root}{flag}`")
        return TensorRTBackend(root, manifest, device, family)
    return OnnxRuntimeBackend(root, manifest, device)


def available_backends(manifest: dict[str, Any], device: torch.device) -> list[str]:
    """The backends that can run this directory on ``device`` here, fastest first."""
    from sdrt.runtime.trt_family import FAMILIES, import_family

    out = []
    if device.type != "cuda" and has_openvino():
        out.append("openvino")
    if device.type == "cuda" and has_plans(manifest):
        family = plans_family(manifest)
        if import_family(FAMILIES[family])[0] is not None:
            out.append(family)
    if device.type == "cuda" and has_torch_programs(manifest):
        out.append("torch")
    try:
        import onnxruntime as ort

        if device.type != "cuda" or "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("onnxruntime")
    except ImportError:
        pass
    if device.type != "cuda" and has_torch_programs(manifest):
        out.append("torch")
    return out
