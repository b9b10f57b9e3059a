"""ControlNet at run time: a request's ControlNets (checked against the engine directory), the host buffers they
read, and the residuals each U-Net call adds, as diffusers' ControlNet pipelines (and MultiControlNetModel, for
several) compute them.

Each ControlNet's per-step scale (its conditioning scale times diffusers' ``controlnet_keep`` for
control_guidance_start/end) is a [calls, rows] buffer filled before the batch runs, like the sampler's timesteps:
scales and windows are data, so requests that differ only in them share one engine batch and one captured graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import ControlNetArg, ImageArg


class Control(NamedTuple):
    """One ControlNet of a request: the name, the control image (RGB; at the request's size once `resized`), its
    scale and the fraction of steps it acts in, [start, end]."""

    name: str
    image: Image.Image
    scale: float
    start: float
    end: float


def controlnet_args(
    controlnet: str | Sequence[str] | None,
    control_image: ImageArg | Sequence[ImageArg] | None,
    scale: float | Sequence[float] = 1.0,
    start: float | Sequence[float] = 0.0,
    end: float | Sequence[float] = 1.0,
) -> tuple[ControlNetArg, ...]:
    """diffusers' spelling (one value, or one per ControlNet as for MultiControlNetModel; a single scale, start or
    end applies to every ControlNet) -> `ControlNetArg`s, or a one-line error naming the argument."""
    if controlnet is None and control_image is None:
        return ()
    if controlnet is None or control_image is None:
        missing = "controlnet" if controlnet is None else "control_image"
        raise SdrtError(f"ControlNet needs both a control image and a ControlNet name: give {missing}", field=missing)
    names = [controlnet] if isinstance(controlnet, str) else list(controlnet)
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(names):
        raise SdrtError(
            f"{len(names)} ControlNet(s) and {len(images)} control image(s): give one image per ControlNet",
            field="control_image",
        )
    per = {}
    for field, value in (("control_scale", scale), ("control_start", start), ("control_end", end)):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(names)
        if len(values) != len(names):
            raise SdrtError(
                f"{len(values)} values of {field} for {len(names)} ControlNets: give one, or one per ControlNet",
                field=field,
            )
        per[field] = values
    columns = zip(names, images, per["control_scale"], per["control_start"], per["control_end"], strict=True)
    return tuple(ControlNetArg(*column) for column in columns)


def check_controls(manifest: dict[str, Any], args: Sequence[ControlNetArg]) -> tuple[Control, ...]:
    """`Params.controlnets` -> `Control`s with their images read (not yet resized), or a one-line error about one
    ControlNet: its ``field`` is ``controlnets.K.name`` (``.image``, ``.scale``, ``.start``, ``.end``) for the K-th,
    which the server maps to its clients' spelling of that ControlNet's field."""
    if not args:
        return ()
    return tuple(_control(manifest, k, a) for k, a in enumerate(args))


def _control(manifest: dict[str, Any], k: int, a: ControlNetArg) -> Control:
    from sdrt.runtime.request import open_image

    at = f"controlnets.{k}"
    if not isinstance(a, ControlNetArg):
        raise SdrtError(f"a ControlNet is given as ControlNetArg(name, image, ...), got {a!r}", field=at)
    have = sorted(manifest.get("controlnets", {}))
    if a.name not in have:
        has = f"it has {', '.join(have)}" if have else "re-export it with `sdrt export ... --controlnet DIR=NAME`"
        raise SdrtError(f"this engine directory has no ControlNet {a.name!r}; {has}", field=f"{at}.name")
    s, start, end = a.scale, a.start, a.end
    if not _number(s) or not math.isfinite(s):
        raise SdrtError(f"ControlNet {a.name!r}: control scale must be a finite number, got {s!r}", field=f"{at}.scale")
    if not (_number(start) and _number(end) and 0 <= start < end <= 1):
        blame = "start" if not (_number(start) and 0 <= start < 1) else "end"  # a valid start: the end is at fault
        raise SdrtError(
            f"ControlNet {a.name!r}: control start and end must satisfy 0 <= start < end <= 1, got "
            f"{start!r} and {end!r}",
            field=f"{at}.{blame}",
        )
    image = open_image(a.image, f"{at}.image", what="control image").convert("RGB")
    return Control(a.name, image, float(s), float(start), float(end))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resized(c: Control, width: int, height: int) -> Control:
    """diffusers' control_image_processor: RGB, resized with Lanczos to the request's size."""
    if c.image.size == (width, height):
        return c
    return c._replace(image=c.image.resize((width, height), Image.LANCZOS))


def keep(calls: int, start: float, end: float) -> list[float]:
    """diffusers' controlnet_keep: 1 where call i of n lies inside [start, end], else 0."""
    return [1.0 - float(i / calls < start or (i + 1) / calls > end) for i in range(calls)]


def control_host(reqs: list, calls: int) -> dict[str, torch.Tensor]:
    """Per ControlNet k of the batch: control_image_k [B, 3, H, W] in [0, 1] (each request's image on each of its
    rows) and control_scale_k [calls, B]."""
    host = {}
    for k in range(len(reqs[0].control)):
        images, scales = [], []
        for r in reqs:
            c = r.control[k]
            pixels = torch.from_numpy(np.asarray(c.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            images.append(pixels[None].expand(r.batch, -1, -1, -1))
            scales.append((c.scale * torch.tensor(keep(calls, c.start, c.end)))[:, None].expand(-1, r.batch))
        host[f"control_image_{k}"] = torch.cat(images).contiguous()
        host[f"control_scale_{k}"] = torch.cat(scales, 1).contiguous()
    return host


class Residuals:
    """The summed residuals of a batch's ControlNets for U-Net call i, as the unet_controlnet graph's extra feeds.
    Under classifier-free guidance both halves get the control images and scales (diffusers without guess_mode).
    A ControlNet reads the latents without an inpainting U-Net's extra channels, as diffusers feeds it."""

    def __init__(self, backend: Any, names: Sequence[str], cfg: bool, buf: dict[str, torch.Tensor]):
        self.backend, self.graphs, self.images, self.scales = backend, [f"controlnet_{n}" for n in names], [], []
        for k, graph in enumerate(self.graphs):
            image, scale = buf[f"control_image_{k}"], buf[f"control_scale_{k}"]  # [B, 3, H, W], [calls, B]
            image = torch.cat([image, image]) if cfg else image
            self.images.append(image.to(backend.dtype(graph, "controlnet_cond")))
            scale = torch.cat([scale, scale], dim=1) if cfg else scale  # [calls, rows], cast once, not per step
            self.scales.append(scale.to(backend.dtype(graph, "conditioning_scale")).contiguous())
        self.outputs = list(backend.manifest["graphs"][self.graphs[0]]["outputs"])

    def __call__(self, x_in: torch.Tensor, feeds: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """``x_in``: the scaled latents [rows, C, h, w]; ``feeds``: the U-Net's conditioning feeds. Several
        ControlNets' residuals add up in the graphs' own dtype, as MultiControlNetModel adds them."""
        dtype, total, graphs = self.backend.dtype, None, self.backend.manifest["graphs"]
        for graph, image, scale in zip(self.graphs, self.images, self.scales, strict=True):
            # same dtypes as the U-Net's: no copies; a distilled U-Net's timestep_cond is the U-Net's alone
            ins = {k: v.to(dtype(graph, k)) for k, v in feeds.items() if k in graphs[graph]["inputs"]}
            ins.update(sample=x_in.to(dtype(graph, "sample")), controlnet_cond=image, conditioning_scale=scale[i])
            outs = self.backend.run(graph, ins)
            total = list(outs) if total is None else [t + o for t, o in zip(total, outs, strict=True)]
        return {n: t.to(dtype("unet_controlnet", n)) for n, t in zip(self.outputs, total, strict=True)}
