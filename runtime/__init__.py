"""Run-time stage: engine directory -> images. Imports torch, numpy, pillow, tokenizers and one backend only.

``from sdrt.runtime import Params, Pipeline``; the Pipeline import is deferred (the CLI starts fast).
"""

from typing import Any

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Params

__all__ = ["Params", "Pipeline", "SdrtError"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdrt.runtime' has no attribute {name!r}")
