"""Which TensorRT: the one module that chooses between TensorRT (data-centre GPUs, built on the target GPU) and
TensorRT for RTX (`tensorrt_rtx`: RTX GPUs; builds ahead of time without a GPU, engines portable across the
compute capabilities they target, kernels specialised when loaded).

Both share one Python API for what sdrt uses (ONNX parser, builder, runtime, execution context), so the build and
the runner take the family's module and differ only where the family says so (its data below). Nothing here
imports torch or either TensorRT at module level.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple


@dataclass(frozen=True)
class TrtFamily:
    name: str  # how --backend spells it
    module: str  # the Python module
    portable: bool  # engines target compute capabilities, not the build machine's GPU
    timing_cache: bool  # whether the builder takes a timing cache (deprecated in TensorRT for RTX)
    install: str  # how to get it, for messages


TENSORRT = TrtFamily("tensorrt", "tensorrt", False, True, "pip install tensorrt on a machine with an NVIDIA GPU")
TENSORRT_RTX = TrtFamily("tensorrt-rtx", "tensorrt_rtx", True, False, "pip install 'sdrt[rtx]' (TensorRT for RTX)")
FAMILIES = {f.name: f for f in (TENSORRT, TENSORRT_RTX)}
# TensorRT for RTX's default targets: Ampere, Ada and Blackwell RTX GPUs (its engines run on these only)
RTX_DEFAULT_TARGETS = ("8.6", "8.9", "12.0")


class TrtEnvironment(NamedTuple):
    """What makes an engine valid, as a build key records it."""

    family: str  # "tensorrt" or "tensorrt-rtx"
    version: str  # the module's __version__
    gpu: str  # TensorRT: the build GPU's name; TensorRT for RTX: "" (portable across its targets)
    compute_capability: str  # TensorRT: the build GPU's, "9.0"; TensorRT for RTX: the targets, "8.6,8.9,12.0"


# Build-key fields that describe the machine, and how a message names them.
ENV_FIELDS = {
    "family": "TensorRT family",
    "version": "version",
    "gpu": "GPU",
    "compute_capability": "compute capability",
}


def import_family(family: TrtFamily) -> tuple[ModuleType | None, str]:
    """(the family's module, "") or (None, why it cannot be imported)."""
    try:
        return importlib.import_module(family.module), ""
    except (ImportError, OSError, RuntimeError) as err:  # not installed, or its CUDA libraries are missing
        first = str(err).splitlines()[0] if str(err) else ""
        return None, f"import {family.module} failed: {first}" if first else f"{family.module} is not installed"


def current_gpu() -> tuple[str, str] | None:
    """(name, "major.minor") of torch's current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return torch.cuda.get_device_name(i), f"{major}.{minor}"


def is_rtx_gpu(name: str) -> bool:
    """GeForce RTX, RTX PRO and RTX workstation GPUs: TensorRT for RTX's targets (H100/H200, A100, L40S are not)."""
    return "RTX" in name.upper().split()
