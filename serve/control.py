"""ControlNets in request bodies -> `Params.controlnets`, and each ControlNet's fields as the client spells them.

- ``POST /v1/images``: ``controlnets: [{name, image, scale, start, end}]`` (`ControlNetSpec`, `ControlNetArg`'s
  fields); unknown keys are refused, as in the rest of that body.
- ``POST /sdapi/v1/txt2img`` and ``img2img``: the units of the web UI's ControlNet extension, ``alwayson_scripts:
  {"controlnet": {"args": [unit, ...]}}`` (the key in any case, as the web UI matches script names; `WebUIUnit`).
  A unit with ``enabled`` false is skipped. sdrt runs each ControlNet on the control image it is sent, resized to
  the request's size as diffusers resizes it (the extension's "Just Resize"), so what would make the extension do
  something else is refused in one line naming the fix: a preprocessor (``module`` other than "none"), a
  ``control_mode`` other than "Balanced" (the other two change the guidance), a unit mask, and "Crop and Resize"
  (the extension's default) or "Resize and Fill" for a control image without the request's aspect ratio (with
  it, both are a plain resize). The extension's other keys (``low_vram``, ``processor_res``, ``threshold_a``,
  ``threshold_b``, ``pixel_perfect``, ``hr_option``, ...) concern preprocessing or hires fix and are ignored.

The runtime names a ControlNet's fields ``controlnets.K.name`` (``.image``, ``.scale``, ``.start``, ``.end``), K
its place in `Params.controlnets`; `v1_fields` and `webui_fields` spell them as each endpoint's client does (on
``/sdapi``, K counts enabled units only, so the table points at the unit's own index in ``args``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdrt.runtime.params import ControlNetArg
from sdrt.serve.inputs import bad_request, decode_image

FIELDS = ("name", "image", "scale", "start", "end")  # a ControlNet's fields, as `check_controls` names them
WEBUI_FIELDS = {"name": "model", "scale": "weight", "start": "guidance_start", "end": "guidance_end"}  # and image
MODEL_HASH = re.compile(r"\s+\[[0-9a-fA-F]+\]$")  # the web UI lists models as "NAME [shorthash]"
# the extension's resize modes (and their older names) -> the one sdrt honours only at the request's aspect ratio
RESIZE_MODES = {
    "just resize": None,
    0: None,
    "crop and resize": "Crop and Resize",
    1: "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "resize and fill": "Resize and Fill",
    2: "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
}


class ControlNetSpec(BaseModel):
    """One ControlNet of a ``/v1/images`` request."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a ControlNet exported with `sdrt export --controlnet DIR=NAME`")
    image: str = Field(description="the control image (an edge map, a depth map, ...) as given, base64 or data: URL")
    scale: float = Field(1.0, description="diffusers' controlnet_conditioning_scale")
    start: float = Field(0.0, description="the fraction of the steps where it starts acting")
    end: float = Field(1.0, description="the fraction of the steps where it stops acting")


def v1_controlnets(specs: list[ControlNetSpec], max_pixels: int) -> tuple[ControlNetArg, ...]:
    return tuple(
        ControlNetArg(s.name, decode_image(s.image, f"controlnets.{k}.image", max_pixels), s.scale, s.start, s.end)
        for k, s in enumerate(specs)
    )


def v1_fields(count: int) -> dict[str, str]:
    """The runtime's fields of ``count`` ControlNets, spelt as ``/v1/images`` spells them: the same."""
    return {f"controlnets.{k}.{f}": f"controlnets.{k}.{f}" for k in range(count) for f in FIELDS}


class WebUIUnit(BaseModel):
    """One unit of the ControlNet extension's ``args``: the keys sdrt reads; the others are ignored."""

    model_config = ConfigDict(extra="ignore")
    enabled: bool = True
    image: str | dict[str, Any] | None = None  # newer extension versions; or {"image": ..., "mask": ...}
    input_image: str | None = None  # older ones
    mask: str | None = None
    mask_image: str | None = None
    module: str | None = "none"
    model: str | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "Balanced"
    resize_mode: str | int = "Crop and Resize"  # the extension's default
    guessmode: bool | None = None  # older versions' spelling of "ControlNet is more important"


@dataclass(frozen=True)
class Unit:
    """An enabled unit, checked: where it is (``at``: ``alwayson_scripts.KEY.args.J``), the key its image came in,
    the ControlNet it asks for (image decoded), and the resize mode that is a plain resize only at the request's
    aspect ratio (None: "Just Resize")."""

    at: str
    image_key: str
    arg: ControlNetArg
    fit: str | None


def webui_units(scripts: dict[str, Any], max_pixels: int) -> list[Unit]:
    """The enabled ControlNet units of ``alwayson_scripts``, in order; a unit sdrt cannot honour is a 400 naming
    its field (``alwayson_scripts.KEY.args.J.FIELD``)."""
    key = next((k for k in scripts if k.lower() == "controlnet"), None)
    if key is None:
        return []
    at, script = f"alwayson_scripts.{key}", scripts[key]
    if not isinstance(script, dict) or not isinstance(script.get("args", []), list):
        raise bad_request(at, f'{at} must be {{"args": [unit, ...]}}, the ControlNet extension\'s units')
    units = []
    for j, raw in enumerate(script.get("args", [])):
        if not isinstance(raw, dict):
            raise bad_request(f"{at}.args.{j}", f"{at}.args.{j} must be an object, a ControlNet unit")
        try:
            unit = WebUIUnit.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = f"{at}.args.{j}.{first['loc'][0]}"
            raise bad_request(where, f"{where}: {first['msg']}") from None
        if unit.enabled:
            units.append(_checked(unit, f"{at}.args.{j}", max_pixels))
    return units


def _checked(u: WebUIUnit, at: str, max_pixels: int) -> Unit:
    if (u.module or "none").lower() != "none":
        raise bad_request(
            f"{at}.module",
            f"{at}.module {u.module!r}: sdrt does not run preprocessors; send the "
            'preprocessed control image with module "none"',
        )
    if u.control_mode not in ("Balanced", 0) or u.guessmode:
        field, mode = ("guessmode", "guessmode true") if u.guessmode else ("control_mode", repr(u.control_mode))
        raise bad_request(
            f"{at}.{field}",
            f'{at}.{field}: {mode} changes the guidance in a way sdrt does not; send control_mode "Balanced"',
        )
    mode = u.resize_mode.lower() if isinstance(u.resize_mode, str) else u.resize_mode
    if mode not in RESIZE_MODES:
        raise bad_request(
            f"{at}.resize_mode",
            f"{at}.resize_mode {u.resize_mode!r} is not one of the extension's: "
            '"Just Resize", "Crop and Resize", "Resize and Fill" (or 0, 1, 2)',
        )
    key, data = _image_data(u, at)
    name = MODEL_HASH.sub("", (u.model or "").strip())
    if name.lower() in ("", "none"):
        raise bad_request(
            f"{at}.model", f"{at}.model: name the ControlNet, as exported with `sdrt export --controlnet DIR=NAME`"
        )
    image = decode_image(data, f"{at}.{key}", max_pixels)
    return Unit(at, key, ControlNetArg(name, image, u.weight, u.guidance_start, u.guidance_end), RESIZE_MODES[mode])


def _image_data(u: WebUIUnit, at: str) -> tuple[str, str]:
    """(the key the control image came in, its base64); a unit mask, or no image, is a 400."""
    masked = next((k for k in ("mask", "mask_image") if getattr(u, k)), None)
    key = "image" if u.image or "input_image" not in u.model_fields_set else "input_image"
    data = u.image if key == "image" else u.input_image
    if isinstance(data, dict):  # {"image": ..., "mask": ...}
        data, masked = data.get("image"), masked or (data.get("mask") and key)
    if masked:
        raise bad_request(
            f"{at}.{masked}", f"{at}.{masked}: sdrt takes no ControlNet unit mask; send the control image alone"
        )
    if not data or not isinstance(data, str):
        raise bad_request(f"{at}.{key}", f"{at} has no control image: send it, base64, in {key}")
    return key, data


def fitted_size(
    units: list[Unit], width: int | None, height: int | None, init: Image.Image | None
) -> tuple[int | None, int | None]:
    """The (width, height) to ask the engine for, given the request's (None: not given). Where a unit crops or
    fills, its control image must have the size's aspect ratio (to half a pixel: then cropping or filling changes
    nothing), so the size must be known here: a side not given is the init image's, as the engine would take it,
    else the first control image's, as is (the engine would round it down to its size step)."""
    fitting = [u for u in units if u.fit]
    if not fitting:
        return width, height
    base = init or units[0].arg.image
    width, height = width or base.width, height or base.height
    for u in fitting:
        w, h = u.arg.image.size
        if abs(h * width - w * height) * 2 > min(w, h):  # scaled to one side, the other misses by over half a px
            raise bad_request(
                f"{u.at}.resize_mode",
                f"{u.at}.resize_mode {u.fit!r} would crop or pad the {w}x{h} "
                f"control image to {width}x{height}, and sdrt only resizes it: send resize_mode "
                '"Just Resize" or a control image of the request\'s aspect ratio',
            )
    return width, height


def webui_fields(units: list[Unit]) -> dict[str, str]:
    """The runtime's fields of these units' ControlNets, spelt as the web UI's clients spell them."""
    table = {"controlnets": units[0].at.rpartition(".args.")[0]} if units else {}
    for k, u in enumerate(units):
        spelt = {**WEBUI_FIELDS, "image": u.image_key}
        table.update({f"controlnets.{k}.{f}": f"{u.at}.{spelt[f]}" for f in FIELDS})
    return table


def webui_echo(scripts: dict[str, Any]) -> dict[str, Any]:
    """``alwayson_scripts`` as echoed: the ControlNet units without their images (as the init images are left
    out); the other scripts, which sdrt ignores, not at all."""
    out = {}
    for key, script in scripts.items():
        if key.lower() == "controlnet" and isinstance(script, dict) and isinstance(script.get("args"), list):
            images = ("image", "input_image", "mask", "mask_image")
            args = [{k: None if k in images else v for k, v in u.items()} for u in script["args"]]
            out[key] = {**script, "args": args}
    return out
