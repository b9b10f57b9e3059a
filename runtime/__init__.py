"""Run-time stage: engine directory -> images. Imports torch, numpy, pillow, tokenizers and one backend only."""

from sdrt.runtime.errors import SdrtError

__all__ = ["SdrtError"]
