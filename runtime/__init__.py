"""Run-time stage: engine directory -> images. Imports torch, numpy, pillow, tokenizers and one backend only.

``from sdrt.runtime import Pipeline``; the import is deferred so that the CLI's other commands start fast.
"""

from typing import Any

from sdrt.runtime.errors import SdrtError

__all__ = ["Pipeline", "SdrtError"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sdrt.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdrt.runtime' has no attribute {name!r}")
