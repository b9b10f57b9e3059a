"""The user's cache folder: what sdrt compiles once per machine and reuses across runs (TensorRT's tactic timings,
TensorRT for RTX's kernels, OpenVINO's compiled models)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def cache_dir() -> Path:
    """``$SDRT_CACHE``, else ``$XDG_CACHE_HOME/sdrt``, else ``~/.cache/sdrt``."""
    if root := os.environ.get("SDRT_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt"


def slug(name: str) -> str:
    """A GPU's name as a file-name part: "NVIDIA GeForce RTX 4090" -> "nvidia-geforce-rtx-4090"."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()
