"""Build-time stage: checkpoint -> verified ONNX engine directory; ONNX -> TensorRT engines (`sdrt build`).

The export needs the ``export`` extra (diffusers, transformers, onnx); the build only the ``build`` extra (onnx)
and a TensorRT. Names are imported on first use, so ``sdrt.export.cli`` and ``sdrt.export.presets`` work on a
runtime-only install. The runtime never imports this package.
"""

from importlib import import_module
from typing import Any

_NAMES = {
    "Components": "load",
    "load_model": "load",
    "Dims": "graphs",
    "PRESETS": "presets",
    "export_model": "directory",
    "verify_directory": "directory",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(import_module(f"sdrt.export.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'sdrt.export' has no attribute {name!r}")
