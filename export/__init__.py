"""Build-time stage: checkpoint -> verified ONNX engine directory (and TensorRT plans where TensorRT exists).

Needs the ``export`` extra (diffusers, transformers, onnx). The runtime never imports this package.
"""

from sdrt.export.directory import export_model, verify_directory
from sdrt.export.graphs import Dims
from sdrt.export.load import Components, load_model
from sdrt.export.presets import PRESETS

__all__ = ["Components", "Dims", "PRESETS", "export_model", "load_model", "verify_directory"]
