"""OpenVINO: the engine directory's ONNX graphs compiled for the CPU, behind the same backend contract as ONNX Runtime.

Each graph is read from its ONNX file, reshaped to the shapes of the call (static shapes: OpenVINO's CPU plugin
plans memory and picks kernels once per shape; a few recent shapes per graph are kept, like the captured-graph
cache on a GPU) and compiled with an inference precision: bf16 where the CPU has it (OpenVINO's own default
there), f32 on request or where the CPU lacks bf16. Compiled models go to OpenVINO's model cache under a folder
named by the graph files' SHA-256 from the manifest and the precision, so a second start skips compilation and a
changed graph never meets a stale blob. LoRA adapters are initializer overrides, as on ONNX Runtime: the graph is
read again from its file, the changed weights replaced from the exported base, and compiled (uncached). With
``cpu_int8`` the U-Net is read from the INT8 model `sdrt quantize` made (runtime/int8.py), cached under its hash.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdrt.runtime.backends import Backend
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.int8 import XML, describe, int8_entry
from sdrt.runtime.user_cache import cache_dir

PRECISIONS = ("bf16", "f32")
SHAPES_KEPT = 3  # compiled shapes kept per graph (each holds its own weights, in the compiled layout)
_OV_TYPE = {"bf16": "bf16", "f32": "f32"}


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise SdrtError("the openvino backend needs OpenVINO: pip install 'sdrt[openvino]'") from None
    return openvino


def cpu_precisions(core: Any) -> tuple[str, ...]:
    """The inference precisions this CPU runs natively, best first (bf16 needs AVX512_BF16 or AMX)."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ("bf16", "f32") if "BF16" in caps else ("f32",)


def resolve_precision(core: Any, asked: str | None) -> str:
    """``None``: the best this CPU has (OpenVINO's own default); an explicit one must be native here."""
    have = cpu_precisions(core)
    if asked is None:
        return have[0]
    if asked not in PRECISIONS:
        raise SdrtError(f"unknown CPU precision {asked!r}; use one of {', '.join(PRECISIONS)}", field="cpu_precision")
    if asked not in have:
        raise SdrtError(
            f"this CPU has no native {asked} (OpenVINO reports {', '.join(have)}); use --cpu-precision {have[0]}",
            field="cpu_precision",
        )
    return asked


def cache_root() -> Path:
    """Where compiled models are cached: the user's cache folder's openvino/."""
    return cache_dir() / "openvino"


_SHAPE_OPS = ("Reshape", "Transpose", "Unsqueeze", "Squeeze")


def fold_scalar_scales(model: Any) -> int:
    """Fold each scalar multiply of a MatMul's output, through shape-only ops, into the MatMul's f32 constant
    weights: x @ (W * c) for (x @ W) * c. torch's ONNX export scales the attention's q and k by sqrt(scale) that way;
    left as they are, OpenVINO fuses each multiply into its projection as a post-op, which moves the projection to a
    slower kernel (sd15 at 256 px: 186 ms of such projections per U-Net call against 74). Returns how many."""
    ov = import_openvino()
    folded = 0
    for op in model.get_ordered_ops():
        scaled = _scalar_operand(op) if op.get_type_name() == "Multiply" else None
        if scaled is None:
            continue
        scale, value = scaled
        node = value.get_node()
        while node.get_type_name() in _SHAPE_OPS and _used_once(node):
            node = node.input_value(0).get_node()
        weight = node.input_value(1).get_node() if node.get_type_name() == "MatMul" and _used_once(node) else None
        if weight is None or weight.get_type_name() != "Constant" or weight.get_element_type() != ov.Type.f32:
            continue
        node.input(1).replace_source_output(ov.op.Constant(weight.get_data() * np.float32(scale)).output(0))
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(value)
        folded += 1
    return folded


def fold_constants(model: Any) -> None:
    """OpenVINO's constant folding: after a static reshape, the graph's shape arithmetic (ShapeOf, Slice, Concat
    into a Reshape) becomes constants, and the nodes whose shapes it read are left with their one real consumer."""
    import_openvino()
    from openvino.passes import ConstantFolding, Manager

    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)


def merge_key_transposes(model: Any) -> int:
    """Replace each Transpose(0,2,1,3) -> Reshape [B*H, L, D] -> Transpose(0,2,1) -> Reshape [B, H, D, L] of a
    statically shaped model by the one Transpose(0,2,3,1) it amounts to. torch's ONNX export of scaled dot-product
    attention transposes the keys that way (heads first, then k^T through a 3-D view); OpenVINO's CPU plugin keeps
    the two transposes and their reorders outside its fused attention, where a plain 4-D permute folds into it.
    Only where every shape is static and says so; returns how many."""
    ops = _opset()
    merged = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Reshape" or not op.get_output_partial_shape(0).is_static:
            continue
        inner = op.input_value(0).get_node()
        view = inner.input_value(0).get_node() if _is_transpose(inner, (0, 2, 1)) else None
        heads = view.input_value(0).get_node() if view is not None and _is_reshape_used_once(view) else None
        if heads is None or not _is_transpose(heads, (0, 2, 1, 3)) or not heads.get_output_partial_shape(0).is_static:
            continue
        b, h, n, d = heads.get_output_shape(0)
        if list(view.get_output_shape(0)) != [b * h, n, d] or list(op.get_output_shape(0)) != [b, h, d, n]:
            continue
        keys = ops.transpose(heads.input_value(0), ops.constant(np.array([0, 2, 3, 1], dtype=np.int64)))
        op.output(0).replace(keys.output(0))
        merged += 1
    return merged


def _is_transpose(node: Any, perm: tuple[int, ...]) -> bool:
    """``node`` is a Transpose by the constant ``perm``, and its output goes to one place only."""
    if node.get_type_name() != "Transpose" or not _used_once(node):
        return False
    order = node.input_value(1).get_node()
    return order.get_type_name() == "Constant" and tuple(int(i) for i in order.get_data().ravel()) == perm


def _is_reshape_used_once(node: Any) -> bool:
    return node.get_type_name() == "Reshape" and _used_once(node) and node.get_output_partial_shape(0).is_static


def _opset() -> Any:
    import_openvino()
    import openvino.opset13 as ops

    return ops


def _scalar_operand(op: Any) -> tuple[float, Any] | None:
    """(c, x) of a Multiply x * c whose c is a one-element constant, else None."""
    for i in (0, 1):
        const = op.input_value(i).get_node()
        if const.get_type_name() == "Constant" and const.get_data().size == 1:
            return float(const.get_data().ravel()[0]), op.input_value(1 - i)
    return None


def _used_once(node: Any) -> bool:
    return node.get_output_size() == 1 and len(node.output(0).get_target_inputs()) == 1


class OpenVinoBackend(Backend):
    """OpenVINO's CPU plugin. ``precision``: "bf16" or "f32" (None: bf16 where native); ``cache``: the model cache
    folder (None: `cache_root()`; False: no cache); ``static``: compile per call shape (else one dynamic model);
    ``cpu_int8``: the U-Net from the directory's INT8 model instead of unet.onnx (the other graphs as they are)."""

    name = "openvino"

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        device: torch.device,
        precision: str | None = None,
        cache: Path | bool | None = None,
        static: bool = True,
        cpu_int8: bool = False,
    ):
        super().__init__(root, manifest, device)
        if device.type != "cpu":
            raise SdrtError("the openvino backend runs on the CPU; use --device cpu, or another backend on the GPU")
        ov = import_openvino()
        self.core = ov.Core()
        self.precision = self.inference_precision = resolve_precision(self.core, precision)
        self.int8 = int8_entry(root, manifest) if cpu_int8 else None  # the manifest's cpu_int8 entry, checked
        if self.int8 is not None:
            self.inference_precision = f"{self.precision}, {describe(self.int8)}"
        self.cache = None if cache is False else Path(cache_root() if cache in (None, True) else cache)
        self.static = static
        self.threads = torch.get_num_threads()  # as ONNX Runtime's: the two thread pools never oversubscribe
        self.overrides: dict[str, dict[str, np.ndarray]] = {}  # graph -> {initializer: value}, from the base
        self.compiled: dict[str, OrderedDict[tuple, Any]] = {}  # graph -> {shape key: infer request}, LRU

    def _config(self, graph: str) -> dict[str, Any]:
        config = {
            "INFERENCE_PRECISION_HINT": _OV_TYPE[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
        }
        if self.cache is not None and not self.overrides.get(graph):
            config["CACHE_DIR"] = str(self.cache / self.graph_key(graph))
        return config

    def graph_key(self, graph: str) -> str:
        """The cache folder of ``graph``: its files' SHA-256 (as the manifest, checked at load, records them) and
        the precision; OpenVINO's own key (the model, shapes and options) decides within it."""
        h = hashlib.sha256()
        for name in self._int8_files(graph) or self.manifest["graphs"][graph]["files"]:
            h.update(f"{name}={self.manifest['files'][name]};".encode())
        return f"{graph}-{h.hexdigest()[:16]}-{self.precision}"

    def _int8_files(self, graph: str) -> list[str]:
        return self.int8["files"] if self.int8 is not None and graph == "unet" else []

    def _model(self, graph: str, shapes: dict[str, tuple[int, ...]] | None) -> Any:
        """The graph as exported, with this backend's weight overrides, reshaped to ``shapes`` (None: dynamic)."""
        ov = import_openvino()
        file = XML if self._int8_files(graph) else self.manifest["graphs"][graph]["file"]
        model = self.core.read_model(str(self.root / file))
        overrides = self.overrides.get(graph)
        if overrides:
            found = 0
            for op in model.get_ops():
                value = overrides.get(op.get_friendly_name()) if op.get_type_name() == "Constant" else None
                if value is not None:
                    op.output(0).replace(ov.op.Constant(value).output(0))
                    found += 1
            if found != len(overrides):
                raise SdrtError(
                    f"{graph}: OpenVINO's reading of the graph lacks some adapted weights; use --backend "
                    "onnxruntime for LoRA on this directory",
                    field="loras",
                )
        # NNCF's INT8 model holds its weights in its own form: constant folding would turn them back into f32
        exported = not self._int8_files(graph)
        if shapes is not None:
            model.reshape({model.input(name): list(shape) for name, shape in shapes.items()})
            if exported:
                fold_constants(model)  # the shape arithmetic of the dynamic graph, now constant
                merge_key_transposes(model)
        if exported:
            fold_scalar_scales(model)
        return model

    def request(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> Any:
        """The infer request compiled for these input shapes (or the dynamic one), compiling on first use."""
        kept = self.compiled.setdefault(graph, OrderedDict())
        key = tuple(sorted(shapes.items())) if self.static else ()
        if key in kept:
            kept.move_to_end(key)
            return kept[key]
        model = self._model(graph, shapes if self.static else None)
        try:
            compiled = self.core.compile_model(model, "CPU", self._config(graph))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SdrtError(f"OpenVINO cannot compile {graph} ({first}); use --backend onnxruntime") from None
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        if actual != _OV_TYPE[self.precision]:  # never report a precision the CPU did not compute in
            raise SdrtError(
                f"OpenVINO compiled {graph} in {actual}, not {self.precision}; use --cpu-precision {actual}",
                field="cpu_precision",
            )
        kept[key] = compiled.create_infer_request()
        while len(kept) > SHAPES_KEPT:
            kept.popitem(last=False)
        return kept[key]

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        arrays = {name: x.contiguous().numpy() for name, x in feeds.items()}
        req = self.request(graph, {name: tuple(a.shape) for name, a in arrays.items()})
        req.infer(arrays, share_inputs=True)
        # copied out: the request's output memory is reused by its next call
        names = self.manifest["graphs"][graph]["outputs"]
        return tuple(torch.from_numpy(req.get_tensor(name).data.copy()) for name in names)

    def lora_refusal(self) -> str | None:
        if self.int8 is not None:  # its weights are quantized from the exported ones: W0 + delta is not in it
            return (
                "LoRA adapters change the exported U-Net's weights, which the INT8 U-Net no longer holds; leave "
                "out --cpu-int8 to use --lora"
            )
        return super().lora_refusal()

    def set_weights(self, graph: str, updates: list) -> None:
        """Overrides from the exported base (W0 + delta); the graph's compiled shapes are dropped and compiled
        again on their next call."""
        from safetensors import safe_open

        from sdrt.runtime.lora import BASE_FILE

        values = {}
        if updates:
            with safe_open(str(self.root / BASE_FILE), "pt") as base:
                for u in updates:
                    values[u.initializer] = u.applied_to(base.get_tensor(f"{graph}/{u.initializer}")).numpy()
        self.compiled.pop(graph, None)
        self.overrides[graph] = values

    def close(self) -> None:
        self.compiled.clear()
