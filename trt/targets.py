"""What `sdrt build` builds for: the TensorRT family a build uses (`auto` picks the one that suits this machine),
the compute capabilities TensorRT for RTX targets, and the build environment a plan's key records. The families
themselves, and what the runtime needs to load a plan, are `sdrt.runtime.trt_family`."""

from __future__ import annotations

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.trt_family import (
    FAMILIES,
    RTX_DEFAULT_TARGETS,
    TENSORRT,
    TENSORRT_RTX,
    TrtEnvironment,
    TrtFamily,
    current_gpu,
    import_family,
    is_rtx_gpu,
)


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
        raise SdrtError(
            "TensorRT builds on the GPU that will run the plans and torch sees none; on a machine "
            "without a GPU, build RTX engines with --backend tensorrt-rtx"
        )
    return TrtEnvironment(family.name, trt.__version__, *gpu)
