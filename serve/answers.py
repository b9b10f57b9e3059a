"""What the server answers besides the images themselves: a PNG as base64 (`b64`), a request's resolved
parameters (`echo_v1`: random seed drawn, default size and sampler filled in) and the web UI's ``info`` string
built from them (`webui_info`)."""

from __future__ import annotations

import base64
import json
from typing import Any

from sdrt.serve.sampler_names import WEBUI_NAMES


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def echo_v1(req, model: str) -> dict[str, Any]:
    """The resolved parameters of a `Request` (random seed drawn, default size and sampler filled in)."""
    one = len(req.prompts) == 1
    out = {
        "prompt": req.prompts[0] if one else list(req.prompts),
        "negative_prompt": req.negatives[0] if one else list(req.negatives),
        "steps": req.steps,
        "guidance": req.guidance,
        "seed": req.seed,
        "height": req.height,
        "width": req.width,
        "sampler": req.sampler,
        "n": req.images_per_prompt,
        "model": model,
    }
    if req.image is not None:
        out["strength"] = req.strength
    if req.loras:
        out["loras"] = dict(req.loras)
    if req.control:  # without their images, as the init image is left out
        out["controlnets"] = [{"name": c.name, "scale": c.scale, "start": c.start, "end": c.end} for c in req.control]
    return out


def webui_info(parameters: list[dict[str, Any]], infotexts: list[str], model: str, prompt: str) -> str:
    """The web UI's ``info`` string (JSON) for calls echoed by `echo_v1`: where its clients read seeds back from.
    ``prompt`` is the one sent, its ``<lora:...>`` tags kept, as the web UI echoes it."""
    first = parameters[0]
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * len(parameters),
        "negative_prompt": first["negative_prompt"],
        "all_negative_prompts": [p["negative_prompt"] for p in parameters],
        "seed": first["seed"],
        "all_seeds": [p["seed"] for p in parameters],
        "width": first["width"],
        "height": first["height"],
        "sampler_name": WEBUI_NAMES.get(first["sampler"], first["sampler"]),
        "cfg_scale": first["guidance"],
        "steps": first["steps"],
        "batch_size": len(parameters),
        "sd_model_name": model,
        "infotexts": infotexts,
    }
    if "strength" in first:
        info["denoising_strength"] = first["strength"]
    return json.dumps(info)
