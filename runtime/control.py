"""ControlNet at run time: a request's control (checked against the engine directory), the host buffers it reads,
and the residuals each U-Net call adds, as diffusers' StableDiffusionControlNetPipeline computes them.

The per-step scale (the conditioning scale times diffusers' ``controlnet_keep`` for control_guidance_start/end) is
a [calls, rows] buffer filled before the batch runs, like the sampler's timesteps: scales and windows are data, so
requests that differ only in them share one engine batch and one captured graph.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError


class Control(NamedTuple):
    """One request's ControlNet: the graph's name, the control image (RGB at the request's size), its scale and
    the fraction of steps it acts in, [start, end]."""

    name: str
    image: Image.Image
    scale: float
    start: float
    end: float


def check_control(manifest: dict[str, Any], backend: Any, p: Any) -> Control | None:
    """`Params`' ControlNet fields -> a `Control` with the image read (not yet resized), or a one-line error."""
    from sdrt.runtime.request import open_image

    if p.controlnet is None and p.control_image is None:
        return None
    have = sorted(manifest.get("controlnets", {}))
    if p.controlnet is None or p.control_image is None:
        missing = "controlnet" if p.controlnet is None else "control_image"
        hint = f" (this directory has: {', '.join(have)})" if have and missing == "controlnet" else ""
        raise SdrtError(f"ControlNet needs both a control image and a ControlNet name: give {missing}{hint}",
                        field=missing)  # fmt: skip
    if p.controlnet not in have:
        has = f"it has {', '.join(have)}" if have else "re-export it with `sdrt export ... --controlnet DIR=NAME`"
        raise SdrtError(f"this engine directory has no ControlNet {p.controlnet!r}; {has}", field="controlnet")
    if not getattr(backend, "controlnet", False):
        raise SdrtError(f"the {backend.name} backend cannot run ControlNet yet; use --backend onnxruntime or torch",
                        field="controlnet")  # fmt: skip
    if p.image is not None or p.mask is not None:
        raise SdrtError("ControlNet with an init image or mask is not supported yet; use txt2img", field="image")
    if p.loras:
        raise SdrtError("LoRA adapters together with ControlNet are not supported yet", field="loras")
    s, a, b = p.control_scale, p.control_start, p.control_end
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
        raise SdrtError(f"control scale must be a finite number, got {s!r}", field="control_scale")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) or not 0 <= a < b <= 1:
        raise SdrtError(f"control start and end must satisfy 0 <= start < end <= 1, got {a!r} and {b!r}",
                        field="control_start")  # fmt: skip
    image = open_image(p.control_image, "control image").convert("RGB")
    return Control(p.controlnet, image, float(s), float(a), float(b))


def resized(c: Control, width: int, height: int) -> Control:
    """diffusers' control_image_processor: RGB, resized with Lanczos to the request's size."""
    if c.image.size == (width, height):
        return c
    return c._replace(image=c.image.resize((width, height), Image.LANCZOS))


def keep(calls: int, start: float, end: float) -> list[float]:
    """diffusers' controlnet_keep: 1 where call i of n lies inside [start, end], else 0."""
    return [1.0 - float(i / calls < start or (i + 1) / calls > end) for i in range(calls)]


def control_host(reqs: list, calls: int) -> dict[str, torch.Tensor]:
    """control_image [B, 3, H, W] in [0, 1] (each request's image on each of its rows), control_scale [calls, B]."""
    images, scales = [], []
    for r in reqs:
        pixels = torch.from_numpy(np.asarray(r.control.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        images.append(pixels[None].expand(r.batch, -1, -1, -1))
        k = torch.tensor(keep(calls, r.control.start, r.control.end), dtype=torch.float32)
        scales.append((r.control.scale * k)[:, None].expand(-1, r.batch))
    return {"control_image": torch.cat(images).contiguous(), "control_scale": torch.cat(scales, 1).contiguous()}


class Residuals:
    """The ControlNet graph's residuals for U-Net call i, as the unet_controlnet graph's extra feeds. Under
    classifier-free guidance both halves get the control image and the scale (diffusers without guess_mode)."""

    def __init__(self, backend: Any, name: str, cfg: bool, buf: dict[str, torch.Tensor]):
        self.backend, self.graph = backend, f"controlnet_{name}"
        image, scale = buf["control_image"], buf["control_scale"]  # [B, 3, H, W], [calls, B]
        image = torch.cat([image, image]) if cfg else image
        self.image = image.to(backend.dtype(self.graph, "controlnet_cond"))
        self.scale = (torch.cat([scale, scale], dim=1) if cfg else scale).contiguous()  # [calls, rows]
        self.outputs = list(backend.manifest["graphs"][self.graph]["outputs"])

    def __call__(self, feeds: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        dtype = self.backend.dtype
        ins = {k: v.to(dtype(self.graph, k)) for k, v in feeds.items()}
        ins.update(
            controlnet_cond=self.image, conditioning_scale=self.scale[i].to(dtype(self.graph, "conditioning_scale"))
        )
        outs = self.backend.run(self.graph, ins)
        return {n: o.to(dtype("unet_controlnet", n)) for n, o in zip(self.outputs, outs, strict=True)}
