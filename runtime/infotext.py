"""The PNG ``parameters`` text chunk: a request's prompt, negative prompt and settings in the web UI's infotext
format, which image tools already read, and the one PNG writer that carries it. Written by `sdrt generate`
(`save_png`) and the server (`encode_png`) alike."""

from __future__ import annotations

import io
import json
from os import PathLike

from PIL import Image, PngImagePlugin

from sdrt.runtime.prompts import EMPHASIS


def png_parameters(req, model: str, index: int, precision: str | None = None, refiner: str | None = None) -> str:
    """The `parameters` text chunk in the format image tools already read (prompt, negative, key: value list); LoRA
    adapters as the web UI writes them, `<lora:NAME:SCALE>` tags at the end of the prompt; ControlNets as its
    ControlNet extension does. ``precision``: a backend's inference precision where it is not the graphs' own
    (OpenVINO's bf16 or f32 on the CPU), which changes the picture. ``refiner``: the refiner's model name."""
    fields = [
        f"Steps: {req.steps}", f"Sampler: {req.sampler}", f"CFG scale: {req.guidance:g}", f"Seed: {req.seed}",
        f"Size: {req.width}x{req.height}", f"Model: {model}",
    ]  # fmt: skip
    if req.image is not None:
        fields.append(f"Denoising strength: {req.strength:g}")
    if req.hires is not None:
        fields += hires_fields(req)
    if req.refine is not None:  # as the web UI writes its refiner
        fields += [f"Refiner: {refiner}", f"Refiner switch at: {req.end:g}"]
    if req.clip_skip[0]:  # the web UI counts the last layer as 1
        fields.append(f"Clip skip: {req.clip_skip[0] + 1}")
    if req.eta:
        fields.append(f"Eta: {req.eta:g}")
    if req.guidance_rescale:
        fields.append(f"Guidance rescale: {req.guidance_rescale:g}")
    if req.aesthetic is not None:
        fields.append(f"Aesthetic score: {req.aesthetic[0]:g}, Negative aesthetic score: {req.aesthetic[1]:g}")
    if req.texts is not None and req.texts.syntax == "webui":
        fields.append("Prompt syntax: webui")
        if req.texts.emphasis != "original":  # as the web UI names its modes
            fields.append(f"Emphasis: {EMPHASIS[req.texts.emphasis]}")
    for k, c in enumerate(req.control):  # as the web UI's ControlNet extension writes its units
        fields.append(
            f'ControlNet {k}: "Model: {c.name}, Weight: {c.scale:g}, Guidance Start: {c.start:g}, '
            f'Guidance End: {c.end:g}"'
        )
    if precision:
        fields.append(f"Inference precision: {precision}")
    if req.batch > 1:
        fields += [f"Batch size: {req.batch}", f"Batch pos: {index}"]
    prompt = req.prompts[index // req.images_per_prompt]
    prompt += "".join(f" <lora:{name}:{scale:g}>" for name, scale in req.loras)
    negative = req.negatives[index // req.images_per_prompt]
    return f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "") + ", ".join(fields)


def hires_fields(req) -> list[str]:
    """The hires fix as the web UI records it: the second pass's strength, the scale or the size asked for, the
    steps where given, the upscaler, and the second pass's sampler, prompts and guidance where they differ."""
    h, second = req.hires.settings, req.hires.second
    out = [f"Denoising strength: {second.strength:g}"]
    out.append(f"Hires upscale: {h.scale:g}" if not (h.width or h.height) else f"Hires resize: {h.width}x{h.height}")
    if h.steps:
        out.append(f"Hires steps: {h.steps}")
    out.append(f"Hires upscaler: {h.upscaler}")
    if second.sampler != req.sampler:
        out.append(f"Hires sampler: {second.sampler}")
    for name, ours, first in (
        ("Hires prompt", second.prompts[0], req.prompts[0]),
        ("Hires negative prompt", second.negatives[0], req.negatives[0]),
    ):
        if ours != first:
            out.append(f"{name}: {_quoted(ours or '')}")
    if second.guidance != req.guidance:
        out.append(f"Hires CFG Scale: {second.guidance:g}")
    return out


def _quoted(text: str) -> str:
    """A value as the web UI's infotext quotes it: JSON-quoted where it holds a comma, colon or newline."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def encode_png(pixels, parameters: str) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes carrying ``parameters`` in the text chunk image tools read."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=_png_info(parameters))
    return buf.getvalue()


def save_png(pixels, path: str | PathLike, parameters: str) -> None:
    """uint8 [H, W, 3] -> a file at ``path`` carrying ``parameters`` in the same text chunk (the format is PIL's
    pick from the path's suffix, as `sdrt generate --out` names it; only a PNG keeps the chunk)."""
    Image.fromarray(pixels).save(path, pnginfo=_png_info(parameters))


def _png_info(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info
