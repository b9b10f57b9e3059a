"""The INT8 U-Net of an engine directory, for the OpenVINO backend (`--cpu-int8`).

`sdrt quantize DIR` (export/quantize.py) writes ``unet.int8.xml`` / ``unet.int8.bin`` (OpenVINO IR quantized by
NNCF) beside ``unet.onnx`` and records them in the manifest: their SHA-256 in ``files``, and under ``cpu_int8`` how
they were made, with the SHA-256 of the U-Net graph files they were made from. The runtime reads the entry here,
and refuses an INT8 model that no longer belongs to the directory's U-Net. No OpenVINO or NNCF import here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import check_files

ENTRY = "cpu_int8"  # the manifest's key
XML, BIN = "unet.int8.xml", "unet.int8.bin"
MODES = ("hybrid", "full", "weights")


def unet_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """``{file: sha256}`` of the U-Net graph's files (unet.onnx and its external data), as the manifest has them."""
    return {name: manifest["files"][name] for name in manifest["graphs"]["unet"]["files"]}


def int8_entry(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The directory's ``cpu_int8`` entry, its files checked against their SHA-256 and its source against the
    U-Net graph the directory has now; any problem is one line naming `sdrt quantize`."""
    entry = manifest.get(ENTRY)
    if entry is None:
        raise SdrtError(
            f"{root} has no INT8 U-Net; make one with `sdrt quantize {root}` (pip install 'sdrt[openvino]')",
            field="cpu_int8",
        )
    if entry.get("unet_sha256") != unet_hashes(manifest):
        raise SdrtError(
            f"{root}: the INT8 U-Net was made from another unet.onnx than the directory's; make it again "
            f"with `sdrt quantize {root} --force`",
            field="cpu_int8",
        )
    problems = check_files(root, manifest, entry["files"])
    if problems:
        raise SdrtError(
            f"{root}: {'; '.join(problems)}; make the INT8 U-Net again with `sdrt quantize {root} --force`",
            field="cpu_int8",
        )
    return entry


def describe(entry: dict[str, Any]) -> str:
    """How the PNG parameters and benchmarks name it: "U-Net int8 (hybrid)"."""
    return f"U-Net int8 ({entry['mode']})"
