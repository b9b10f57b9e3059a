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

from sdrt.runtime.errors import SdrtError


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
ENV_FIELDS = {"family": "TensorRT family", "version": "version", "gpu": "GPU",
              "compute_capability": "compute capability"}  # fmt: skip


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


def choose(backend: str) -> TrtFamily | None:
    """The family for ``backend`` ("auto", "tensorrt" or "tensorrt-rtx"); for "auto" the installed one that suits
    this machine (TensorRT on a data-centre GPU; TensorRT for RTX on an RTX GPU or without a GPU), or None."""
    if backend != "auto":
        if backend not in FAMILIES:
            raise SdrtError(f"unknown TensorRT family {backend!r}; use auto, {' or '.join(FAMILIES)}")
        return FAMILIES[backend]
    gpu = current_gpu()
    order = (TENSORRT, TENSORRT_RTX) if gpu and not is_rtx_gpu(gpu[0]) else (TENSORRT_RTX, TENSORRT)
    for family in order:
        if family is TENSORRT_RTX and gpu and not is_rtx_gpu(gpu[0]):
            continue  # its engines would not run on this GPU
        if import_family(family)[0] is not None:
            return family
    return None


def parse_targets(text: str | None) -> tuple[str, ...]:
    """``--compute-capability 8.6,8.9`` -> ("8.6", "8.9"), checked against TensorRT for RTX's list; None: default."""
    if text is None:
        return RTX_DEFAULT_TARGETS
    targets = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    known = rtx_targets()
    if not targets or (known and any(t not in known for t in targets)):
        raise SdrtError(f"--compute-capability {text!r}: use some of {', '.join(known)} (comma-separated)")
    return targets


def rtx_targets() -> list[str]:
    """The compute capabilities the installed TensorRT for RTX can target ("7.5", ..., "12.0"); [] without it."""
    trt, _ = import_family(TENSORRT_RTX)
    members = trt.ComputeCapability.__members__ if trt else {}
    return sorted((m[2:-1] + "." + m[-1] for m in members if m.startswith("SM")), key=lambda v: float(v))


def environment(family: TrtFamily, targets: tuple[str, ...] = RTX_DEFAULT_TARGETS) -> TrtEnvironment:
    """This machine's environment for building with ``family`` (TensorRT needs the target GPU here)."""
    trt, why = import_family(family)
    if trt is None:
        raise SdrtError(f"{why}; {family.install}")
    if family.portable:
        return TrtEnvironment(family.name, trt.__version__, "", ",".join(targets))
    gpu = current_gpu()
    if gpu is None:
        raise SdrtError("TensorRT builds on the GPU that will run the plans and torch sees none; on a machine "
                        "without a GPU, build RTX engines with --backend tensorrt-rtx")  # fmt: skip
    return TrtEnvironment(family.name, trt.__version__, *gpu)
