"""The engine directory's manifest: what was exported from what, and a SHA-256 for every file.

The manifest is the contract between export, build and runtime (DESIGN.md). Nothing here imports torch,
diffusers or onnx, so the runtime can check a directory before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed onto ``path`` when the block ends without an error
    and removed otherwise: a reader never sees half a file, and a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | bytearray | memoryview | str) -> None:
    """``data`` (bytes, or text as UTF-8) into ``path`` through `replaced_atomically`."""
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else memoryview(data))


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a reader never sees half a manifest)."""
    write_atomic(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


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


@dataclass(frozen=True)
class Geometry:
    """The checkpoint's own sizes, read from it at export (DESIGN.md: "The model's numbers, never constants"), and
    every size default derived from them: the one definition export, build, runtime and server use."""

    vae_scale_factor: int  # pixels per latent: 2 ** (VAE blocks - 1)
    unet_downsampling: int  # the U-Net's total downsampling: 2 ** (down blocks that downsample)
    sample_size: int  # latent side the U-Net was trained at

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Geometry:
        """The numbers the export recorded (a KeyError where a manifest lacks one: `Model` names the fix)."""
        unet, latent = manifest["unet"], manifest["latent"]
        return cls(int(latent["vae_scale_factor"]), int(unet["downsampling"]), int(unet["sample_size"]))

    @property
    def px_multiple(self) -> int:
        """Image sides are multiples of this: diffusers' pipelines take multiples of 8 (check_inputs) and make the
        latent px // vae_scale_factor, which is exact for multiples of both."""
        return math.lcm(8, self.vae_scale_factor)

    @property
    def native_px(self) -> int:
        """The size the U-Net was trained at, as diffusers' default: sample_size x vae_scale_factor (rounded down
        to a valid size)."""
        return max(self.sample_size * self.vae_scale_factor // self.px_multiple, 1) * self.px_multiple

    @property
    def min_latent(self) -> int:
        """The smallest latent side the traced U-Net takes: its deepest feature map must be at least 2 x 2 (at 1 x 1
        the tracer specialises broadcasting)."""
        return 2 * self.unet_downsampling

    @property
    def smallest_px(self) -> int:
        return -(-self.min_latent * self.vae_scale_factor // self.px_multiple) * self.px_multiple

    def default_range(self) -> tuple[int, int]:
        """(min px, max px) of a default export: half to twice the native size (SD 1.5: 256-1024, SD 2.1: 384-1536,
        SDXL: 512-2048, which holds its training buckets from 512x2048 to 2048x512)."""
        m = self.px_multiple
        lo = max(self.native_px // 2 // m * m, self.smallest_px)
        return lo, max(lo, -(-2 * self.native_px // m) * m)


def concrete_shape(shape: list | tuple, rows: int, h: int, w: int, factor: int, tokens: int = 77) -> tuple[int, ...]:
    """A graph's symbolic shape (the manifest's, or export/graphs.py's) at ``rows`` (``B``) and latent size ``h`` x
    ``w``; ``H`` / ``W`` are pixels, ``factor`` x latent (the manifest's VAE scale factor); ``h/N`` is ceil(h / N),
    the size after one stride-2 conv per halving (the U-Net's down path: ControlNet residuals); ``T`` is the text
    axis, ``tokens`` = 77 x prompt chunks."""
    values = {"B": rows, "h": h, "w": w, "H": h * factor, "W": w * factor, "T": tokens}

    def size(d: str) -> int:
        base, _, n = d.partition("/")
        return -(-values[base] // int(n)) if n else values[d]

    return tuple(size(d) if isinstance(d, str) else int(d) for d in shape)
