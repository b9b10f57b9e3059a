"""The model an engine directory holds, read once from its manifest: its geometry and size limits, its text
encoders, what its U-Net and VAE take and give. Everything that asks "what kind of model is this" (the pipeline,
the server, `sdrt build`, the benchmarks) reads a `Model`, never the manifest's fields, so each question has one
answer and one place. The file tables (which graph is in which file, their SHA-256, adapters) stay the manifest's,
read by the code that opens those files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import Geometry, read_manifest

FAMILIES = ("sd", "sdxl")  # what this runtime runs: SD 1.x / 2.x, and SDXL (base and refiner)


@dataclass(frozen=True)
class Model:
    """What an engine directory's model is (see the module's docstring); `Model.read(DIR)`."""

    name: str  # the preset's name, else the name of the folder or file it was exported from
    family: str  # "sd" or "sdxl"
    precision: str  # the graphs' precision: "fp16" or "fp32"
    geometry: Geometry
    min_px: int  # the image sides the graphs were exported for, in steps of `px_multiple`
    max_px: int
    max_images: int  # images per prompt
    max_prompt_chunks: int  # the U-Net's text axis takes 77 x 1..this tokens (directories exported before: 1)
    latent_channels: int
    scaling_factor: float  # the VAE's latent scaling factor
    unet_channels: int  # the U-Net's input channels: latent_channels, or 9 (an inpainting U-Net)
    text_encoders: tuple[str, ...]  # the text encoder graphs, in the order of the tokenizers
    pooled: bool  # the last text encoder gives pooled embeddings (SDXL)
    zero_negatives: bool  # an empty negative prompt is zeros, not the encoded "" (SDXL's default)
    aesthetics: bool  # the U-Net takes aesthetic scores in its time ids (SDXL's refiner)
    guidance_embedding: int  # a guidance-distilled (LCM) U-Net's timestep_cond width; 0: none
    posterior: bool  # the VAE encoder gives a distribution to sample (AutoencoderKL), not latents (TAESD)
    clip_skip: tuple[str, ...]  # the text encoders that take a clip_skip input
    graphs: Mapping[str, Any]  # each graph's inputs and outputs, as exported (read-only)

    @classmethod
    def read(cls, root: str | os.PathLike) -> Model:
        return cls.from_manifest(read_manifest(root), root)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], root: str | os.PathLike = "") -> Model:
        if manifest.get("family") not in FAMILIES:
            raise SdrtError(f"{root}: {manifest.get('family')} engine directories are not supported by this runtime")
        try:
            graphs, shapes, latent = manifest["graphs"], manifest["shapes"], manifest["latent"]
            text = tuple(g for g in ("text_encoder", "text_encoder_2") if g in graphs)
            pooled = "pooled_embeddings" in graphs[text[-1]]["outputs"]
            pipeline = manifest.get("pipeline", {})
            cond = graphs["unet"]["inputs"].get("timestep_cond")
            source = manifest["source"]
            return cls(
                name=str(source.get("name") or Path(source.get("path", "model")).stem),
                family=manifest["family"],
                precision=manifest["precision"],
                geometry=Geometry.from_manifest(manifest),
                min_px=int(shapes["min_px"]),
                max_px=int(shapes["max_px"]),
                max_images=int(shapes["max_images"]),
                max_prompt_chunks=int(shapes.get("max_prompt_chunks", 1)),
                latent_channels=int(latent["channels"]),
                scaling_factor=float(latent["scaling_factor"]),
                unet_channels=int(manifest["unet"]["in_channels"]),
                text_encoders=text,
                pooled=pooled,
                zero_negatives=bool(pipeline.get("force_zeros_for_empty_prompt", pooled)),
                aesthetics=bool(pipeline.get("requires_aesthetics_score", False)),
                guidance_embedding=int(cond["shape"][-1]) if cond else 0,
                posterior="latent_logvar" in graphs["vae_encoder"]["outputs"],
                clip_skip=tuple(g for g in text if "clip_skip" in graphs[g]["inputs"]),
                graphs=MappingProxyType(graphs),
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise SdrtError(
                f"{root}: the manifest lacks or garbles {err} (written by an older sdrt?); re-export it "
                "with `sdrt export ... --force`"
            ) from None

    @property
    def px_multiple(self) -> int:
        """The size step: image sides are multiples of it (`Geometry.px_multiple`)."""
        return self.geometry.px_multiple

    @property
    def inpainting(self) -> bool:
        """An inpainting U-Net: it takes the mask and the masked image's latents as extra channels."""
        return self.unet_channels != self.latent_channels

    @property
    def default_px(self) -> int:
        """The image side a request without a size gets, and `sdrt build`'s static profile: the native size, within
        the exported range."""
        m = self.px_multiple
        return min(max(self.geometry.native_px, self.min_px), self.max_px) // m * m

    def check_size(self, what: str, px: object, field: str | None = None) -> int:
        """``px`` as an image side this export takes (a multiple of its size step within its range), else a
        one-line error that names ``what`` and the sizes to use instead; ``field``: the argument at fault."""
        lo, hi, m = self.min_px, self.max_px, self.px_multiple
        if not isinstance(px, int) or isinstance(px, bool) or px % m:
            near = [v for v in (px // m * m, px // m * m + m) if lo <= v <= hi] if isinstance(px, int) else []
            use = f"; use {' or '.join(map(str, near))}" if near else ""
            raise SdrtError(f"{what} {px!r} is not a multiple of {m}{use} (this model's size step)", field=field)
        if not lo <= px <= hi:
            near = min(max(round(px / m) * m, lo), hi)
            raise SdrtError(
                f"{what} {px} is outside the {lo}-{hi} px this engine was exported for (in steps of "
                f"{m}); use {near}, or re-export with --min-size/--max-size",
                field=field,
            )
        return px
