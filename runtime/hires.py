"""The web UI's hires fix between its two passes: the second pass's size, and the upscale of the first pass's
latents (a latent upscaler: torch's interpolation in latent space) or of its picture (an image upscaler, then the
second pass encodes it again, as img2img does).

The second pass is diffusers' img2img on the upscaled latents or image, with the request's seed drawn afresh (the
web UI draws the second pass's noise from the same seeds): ``strength`` x ``steps`` of its schedule run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import Hires

if TYPE_CHECKING:  # torch at import would slow the command line's start
    import torch


class LatentMode(NamedTuple):
    mode: str  # torch.nn.functional.interpolate's
    antialias: bool


# the web UI's latent upscalers (modules/shared.py, latent_upscale_modes)
LATENT_UPSCALERS: dict[str, LatentMode] = {
    "Latent": LatentMode("bilinear", False),
    "Latent (antialiased)": LatentMode("bilinear", True),
    "Latent (bicubic)": LatentMode("bicubic", False),
    "Latent (bicubic antialiased)": LatentMode("bicubic", True),
    "Latent (nearest)": LatentMode("nearest", False),
    "Latent (nearest-exact)": LatentMode("nearest-exact", False),
}
# the web UI's plain image upscalers, as PIL resamples ("None" resizes with Lanczos, as the web UI's resize does)
IMAGE_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


def check_upscaler(name: str) -> str:
    if name in LATENT_UPSCALERS or name in IMAGE_UPSCALERS:
        return name
    raise SdrtError(
        f"hires upscaler {name!r} is not supported (model upscalers such as ESRGAN are not exported); "
        f"use one of: {', '.join(UPSCALERS)}",
        field="hires.upscaler",
    )


def target_size(width: int, height: int, hires: Hires) -> tuple[int, int]:
    """(width, height) of the second pass, as the web UI computes it from hr_scale or hr_resize_x / _y."""
    rx, ry = hires.width, hires.height
    for name, value in (("x", rx), ("y", ry)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SdrtError(
                f"hr_resize_{name} must be a whole number >= 0 (0: from hr_scale), got {value!r}",
                field="hires.width" if name == "x" else "hires.height",
            )
    if not rx and not ry:
        scale = hires.scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 1 <= scale <= 8:
            raise SdrtError(
                f"the hires scale (hr_scale) must be a number in [1, 8], got {scale!r}", field="hires.scale"
            )
        return int(width * scale), int(height * scale)
    if not ry:
        return rx, rx * height // width
    if not rx:
        return ry * width // height, ry
    if rx * height != ry * width:  # the web UI upscales in proportion, then crops
        raise SdrtError(
            f"hr_resize {rx}x{ry} is not in proportion to {width}x{height} (the web UI would crop it); "
            "give hr_resize_x or hr_resize_y alone",
            field="hires.width",
        )
    return rx, ry


def upscale_latents(latents: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, size]: the web UI's `torch.nn.functional.interpolate` of its latent upscaler."""
    import torch

    mode = LATENT_UPSCALERS[name]
    return torch.nn.functional.interpolate(latents, size=size, mode=mode.mode, antialias=mode.antialias)


def upscale_image(image: Image.Image, name: str, width: int, height: int) -> Image.Image:
    """The web UI's plain upscalers (modules/images.py `resize_image`, modules/upscaler.py): "None" resizes to the
    size with Lanczos; Lanczos and Nearest scale by the larger factor with their filter, then what differs from the
    size (down to a multiple of 8, then the size itself) is resized with Lanczos."""
    resample = IMAGE_UPSCALERS[name]
    if name == "None":
        return image.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    out = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    dest = (int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8)
    if out.size != dest:
        out = out.resize(dest, resample=Image.LANCZOS)
    return out if out.size == (width, height) else out.resize((width, height), resample=Image.LANCZOS)
