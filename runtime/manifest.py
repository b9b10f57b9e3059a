"""The engine directory's manifest: what was exported from what, and a SHA-256 for every file.

The manifest is the contract between export, build and runtime (DESIGN.md). Nothing here imports torch,
diffusers or onnx, so the runtime can check a directory before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sdrt.runtime.errors import SdrtError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (graphs can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    """``{relative name: sha256}`` for the given files under ``root``, sorted by name."""
    return {name: sha256_file(root / name) for name in sorted(names)}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a reader never sees half a manifest)."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check DIR/manifest.json; any problem is a one-line SdrtError."""
    root = Path(root)
    if not root.is_dir():
        raise SdrtError(f"{root}: no such engine directory; create one with `sdrt export MODEL {root}`")
    path = root / MANIFEST
    if not path.is_file():
        raise SdrtError(f"{root} has no {MANIFEST}: it is not an engine directory; re-run `sdrt export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SdrtError(f"{path} is damaged ({err}); re-run `sdrt export ... --force`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise SdrtError(
            f"{path} is not an sdrt manifest of format {FORMAT_VERSION}; re-export with this version of sdrt"
        )
    return manifest


def check_files(root: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Compare files against their recorded SHA-256. Returns the problems, one line each (empty: all good)."""
    root = Path(root)
    recorded: dict[str, str] = manifest.get("files", {})
    problems = []
    for name in names if names is not None else sorted(recorded):
        if name not in recorded:
            problems.append(f"{name}: not recorded in the manifest")
        elif not (root / name).is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(root / name) != recorded[name]:
            problems.append(f"{name}: SHA-256 differs from the manifest (damaged or replaced)")
    return problems
