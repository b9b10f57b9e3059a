"""What `sdrt serve` accepts and answers: JSON bodies -> `Params`, results -> PNGs and echoes.

Each request shape maps onto the same engine call, `Params` (what `Pipeline.request` checks):
- ``POST /v1/images``: sdrt's own names (``guidance``, ``sampler``, ``n``, ``image``, ``strength``); ``n`` images
  come from one seed, as `sdrt generate --batch n` and diffusers' ``num_images_per_prompt`` give them.
- ``POST /sdapi/v1/txt2img`` and ``img2img``: the body the web-UI clients send. As there, image ``i`` of a batch
  has seed ``seed + i``, so each image of a batch is the one a single-image request with that seed gives; the
  ``batch_size`` calls then join one engine batch in the server.

LoRA adapters (added with `sdrt lora add`) come as ``loras: {NAME: scale}`` on ``/v1/images`` and as the web UI's
``<lora:NAME:SCALE>`` tags in the prompt on ``/sdapi`` (`prompt_loras`); either way they become ``Params.loras``.
ControlNets come as ``controlnets: [...]`` on ``/v1/images`` and as the web UI's ControlNet extension's units on
``/sdapi`` (`sdrt.serve.control`); either way they become ``Params.controlnets``.

Problems are `ApiError`s that name the offending field as the client spelled it: each body's `fields` maps the
engine's `SdrtError.field` to its spelling.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections import Counter
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from sdrt.runtime.errors import SdrtError
from sdrt.runtime.params import DEFAULT_GUIDANCE, DEFAULT_STEPS, SAMPLERS, Hires, Params
from sdrt.serve.control import (
    ControlNetSpec,
    Unit,
    fitted_size,
    v1_controlnets,
    v1_fields,
    webui_echo,
    webui_fields,
    webui_units,
)
from sdrt.serve.inputs import bad_request, decode_image
from sdrt.serve.webui import check_fields, sampling_options

# web-UI sampler names (and the k-diffusion aliases older clients send) -> sdrt samplers
WEBUI_SAMPLERS = {
    "euler a": "euler_a", "k_euler_a": "euler_a", "euler": "euler", "k_euler": "euler", "ddim": "ddim",
    "heun": "heun", "k_heun": "heun", "dpm2": "dpm2", "k_dpm_2": "dpm2", "dpm2 a": "dpm2_a", "k_dpm_2_a": "dpm2_a",
    "dpm++ sde": "dpmpp_sde", "k_dpmpp_sde": "dpmpp_sde", "dpm++ sde karras": "dpmpp_sde_karras",
    "dpm++ 2m": "dpmpp_2m", "k_dpmpp_2m": "dpmpp_2m", "dpm++ 2m karras": "dpmpp_2m_karras",
    "dpm++ 2m sde": "dpmpp_2m_sde", "k_dpmpp_2m_sde": "dpmpp_2m_sde", "dpm++ 2m sde karras": "dpmpp_2m_sde_karras",
    "lcm": "lcm", "plms": "pndm", "pndm": "pndm", "unipc": "unipc", "deis": "deis",
}  # fmt: skip
WEBUI_NAMES = {"euler_a": "Euler a", "euler": "Euler", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
               "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_karras": "DPM++ SDE Karras", "ddim": "DDIM",
               "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde": "DPM++ 2M SDE",
               "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "lcm": "LCM", "pndm": "PLMS", "unipc": "UniPC",
               "deis": "DEIS"}  # fmt: skip
# the web UI's scheduler: Karras
KARRAS = {"dpmpp_sde": "dpmpp_sde_karras", "dpmpp_2m": "dpmpp_2m_karras", "dpmpp_2m_sde": "dpmpp_2m_sde_karras"}

# `SdrtError.field` (the Python argument at fault) -> each endpoint's spelling of it; the web UI's adapters are
# tags in its prompt; a ControlNet's own fields (controlnets.K.name, ...) are added per request (`control`)
V1_FIELDS = {name: name for name in ("prompt", "negative_prompt", "steps", "guidance", "height", "width", "n", "seed",
                                     "sampler", "image", "strength", "mask", "loras", "controlnets", "clip_skip",
                                     "eta", "guidance_rescale", "prompt_syntax", "emphasis", "hires", "refiner",
                                     "refiner_switch_at")}  # fmt: skip
V1_FIELDS.update({f"hires.{name}": f"hires.{name}" for name in Hires.__dataclass_fields__})
SDAPI_FIELDS = {**V1_FIELDS, "guidance": "cfg_scale", "n": "batch_size", "sampler": "sampler_name",
                "image": "init_images", "strength": "denoising_strength", "loras": "prompt",
                "controlnets": "alwayson_scripts", "emphasis": "override_settings.emphasis",
                "webui_clip_skip": "override_settings.CLIP_stop_at_last_layers", "hires": "enable_hr",
                "hires.scale": "hr_scale", "hires.width": "hr_resize_x", "hires.height": "hr_resize_y",
                "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
                "hires.strength": "denoising_strength", "hires.sampler": "hr_sampler_name",
                "hires.prompt": "hr_prompt", "hires.negative_prompt": "hr_negative_prompt",
                "hires.guidance": "hr_cfg", "refiner": "refiner_checkpoint"}  # fmt: skip

# the web UI's extra-network tags, <KIND:ARG:ARG...> (its modules/extra_networks.py, re_extra_net); its Lora
# extension answers to "lora" and to the alias "lyco"
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


def field_of(err: SdrtError, names: dict[str, str]) -> str:
    """The request field an engine error is about, in the endpoint's own spelling ("body" when no one field is)."""
    return names.get(err.field, "body") if err.field else "body"


class HiresSpec(BaseModel):
    """``hires`` of ``/v1/images``: the web UI's hires fix (`Hires`), its fields named as sdrt names them."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(2.0, description="upscale factor (the web UI's hr_scale)")
    width: int = Field(0, description="upscale to this width instead (hr_resize_x; 0: from scale)")
    height: int = Field(0, description="upscale to this height instead (hr_resize_y; 0: from scale)")
    upscaler: str = Field("Latent", description="a latent upscaler (Latent, Latent (bicubic), ...) or Lanczos, "
                          "Nearest, None")  # fmt: skip
    steps: int = Field(0, description="second-pass steps (0: the first pass's)")
    strength: float = Field(0.7, description="second-pass denoising strength in (0, 1]")
    sampler: str | None = Field(None, description="second-pass sampler (default: the first's)")
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float | None = None

    def hires(self) -> Hires:
        return Hires(**dict(self.model_dump(), sampler=sampler_name(self.sampler, None, "hires.sampler")))


class ImagesRequest(BaseModel):
    """``POST /v1/images``. Unknown fields are refused, so a misspelt option never silently does nothing."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    sampler: str | None = Field(None, description="an sdrt sampler name, or its web-UI name")
    n: int = 1
    image: str | None = Field(None, description="img2img: the init image, base64 (or a data: URL)")
    mask: str | None = Field(None, description="inpainting, with image: white is repainted, base64")
    strength: float | None = Field(None, description="img2img default 0.8, inpainting default 1")
    loras: dict[str, Any] | None = Field(None, description="{adapter added with `sdrt lora add`: scale}; they add up")
    controlnets: list[ControlNetSpec] | None = Field(None, description="ControlNets exported with `sdrt export "
                                                     "--controlnet`; their residuals add up")  # fmt: skip
    clip_skip: int = Field(0, description="diffusers' clip_skip: the prompt's states this many layers earlier")
    eta: float | None = Field(None, description="DDIM's eta in [0, 1] (default 0)")
    guidance_rescale: float = Field(0.0, description="diffusers' guidance_rescale in [0, 1]")
    prompt_syntax: str = Field("plain", description="plain (diffusers') or webui: (word:1.3), BREAK, long prompts")
    emphasis: str = Field("original", description="with webui: original, no_norm, ignore or none")
    hires: HiresSpec | None = Field(None, description="txt2img: the web UI's hires fix, a second pass at a larger "
                                    "size")  # fmt: skip
    refiner_switch_at: float | None = Field(None, description="SDXL with `sdrt serve --refiner`: the fraction of "
                                            "the schedule the base runs (diffusers' denoising_end)")  # fmt: skip
    timeout_s: float | None = Field(None, gt=0, description="answer 504 and drop the work after this long")

    def calls(self, max_pixels: int, model: str = "") -> list[Params]:
        image = decode_image(self.image, "image", max_pixels) if self.image is not None else None
        mask = decode_image(self.mask, "mask", max_pixels) if self.mask is not None else None
        sampler = sampler_name(self.sampler, None, "sampler")
        controlnets = v1_controlnets(self.controlnets or [], max_pixels)
        return [
            Params(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.guidance,
                   height=self.height, width=self.width, n=self.n, seed=self.seed, sampler=sampler, image=image,
                   strength=self.strength, mask=mask, loras=self.loras, controlnets=controlnets,
                   clip_skip=self.clip_skip, eta=self.eta, guidance_rescale=self.guidance_rescale,
                   prompt_syntax=self.prompt_syntax, emphasis=self.emphasis,
                   hires=self.hires.hires() if self.hires else None, refiner_switch_at=self.refiner_switch_at)
        ]  # fmt: skip

    def fields(self) -> dict[str, str]:
        """`SdrtError.field` -> this body's field."""
        return {**V1_FIELDS, **v1_fields(len(self.controlnets or ()))}


class Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``, the web-UI body. Prompts are read with the web UI's syntax (emphasis, BREAK,
    75-token chunks); ``eta`` and ``override_settings`` as the web UI reads them (`sdrt.serve.webui`). Fields that
    would change the picture in a way sdrt cannot honour (``restore_faces``, ``styles``, ...) are refused; those
    that do not (``send_images``, ...) are ignored. ``enable_hr`` runs the hires fix with the ``hr_*`` fields and
    ``denoising_strength`` (default 0.7, the web UI's) as the web UI reads them. Of ``alwayson_scripts``, the ControlNet
    extension's units are read (`sdrt.serve.control`); the other scripts are ignored."""

    model_config = ConfigDict(extra="allow")  # every field the client sent, to check it (`check_fields`)
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # what older clients send the sampler's name in
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: the web UI's default, "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    eta: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    disable_extra_networks: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    _units: list[Unit] = PrivateAttr(default_factory=list)  # the enabled ControlNet units, once `calls` read them

    def calls(self, max_pixels: int, model: str = "") -> list[Params]:
        return self._calls(max_pixels, model, [None])

    def _calls(self, max_pixels: int, model: str, images: list[Image.Image | None], strength: float | None = None,
               mask=None) -> list[Params]:  # fmt: skip
        check_fields(self.model_dump())
        for name in ("batch_size", "n_iter"):
            if getattr(self, name) < 1:
                raise bad_request(name, f"{name} must be >= 1, got {getattr(self, name)}")
        sampler = sampler_name(self.sampler_name or self.sampler_index, self.scheduler, "sampler_name")
        if not -1 <= self.seed < 2**64:
            raise bad_request("seed", f"seed must be -1 (random) or in [0, 2^64), got {self.seed}")
        seed = secrets.randbits(32) if self.seed == -1 else self.seed
        prompt, loras = prompt_loras(self.prompt)  # the negative prompt is text, as in the web UI
        loras = {} if self.disable_extra_networks else loras  # the tags are removed either way, as there
        options = sampling_options(self.override_settings, self.eta, sampler, model)
        count = self.batch_size * self.n_iter  # image i has seed + i, as in the web UI
        self._units = webui_units(self.alwayson_scripts, max_pixels)
        controlnets = tuple(u.arg for u in self._units)
        sizes = [fitted_size(self._units, self.width, self.height, image) for image in images]  # (width, height)
        return [
            Params(prompt=prompt, negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.cfg_scale,
                   height=sizes[i % len(images)][1], width=sizes[i % len(images)][0], n=1, seed=(seed + i) % 2**64,
                   sampler=sampler, image=images[i % len(images)], strength=strength, mask=mask,
                   loras=loras or None, controlnets=controlnets, hires=self._hires(), **self._refiner(), **options)
            for i in range(count)
        ]  # fmt: skip

    def _refiner(self) -> dict[str, Any]:
        """The web UI's refiner fields: ``refiner_checkpoint`` names the refiner served beside the model
        (`sdrt serve --refiner`), ``refiner_switch_at`` where it takes over (diffusers' denoising_end)."""
        if self.refiner_checkpoint in (None, "", "None", "none"):
            return {}
        if self.refiner_switch_at is None:
            raise bad_request("refiner_switch_at", "refiner_checkpoint needs refiner_switch_at, in (0, 1)")
        return {"refiner": self.refiner_checkpoint.rsplit(" [", 1)[0], "refiner_switch_at": self.refiner_switch_at}

    def _hires(self) -> Hires | None:
        if not self.enable_hr:
            return None
        scheduler = None if self.hr_scheduler in (None, "", "Use same scheduler", "Automatic") else self.hr_scheduler
        sampler = self.hr_sampler_name if self.hr_sampler_name not in ("", "Use same sampler") else None
        if scheduler and not sampler:
            raise bad_request("hr_scheduler", "hr_scheduler needs hr_sampler_name: name the second pass's sampler")
        return Hires(scale=self.hr_scale, width=self.hr_resize_x, height=self.hr_resize_y,
                     upscaler=self.hr_upscaler or "Latent", steps=self.hr_second_pass_steps,
                     strength=0.7 if self.denoising_strength is None else self.denoising_strength,
                     sampler=sampler_name(sampler, scheduler, "hr_sampler_name") if sampler else None,
                     prompt=self.hr_prompt, negative_prompt=self.hr_negative_prompt, guidance=self.hr_cfg)  # fmt: skip

    def fields(self) -> dict[str, str]:
        """`SdrtError.field` -> this body's field, the ControlNet units' fields at their place in ``args``."""
        return {**SDAPI_FIELDS, **webui_fields(self._units)}

    def echo(self) -> dict[str, Any]:
        return {**self.model_dump(), "alwayson_scripts": webui_echo(self.alwayson_scripts)}


class Img2ImgRequest(Txt2ImgRequest):
    """``POST /sdapi/v1/img2img``: image ``i`` of the batch starts from ``init_images[i % len(init_images)]``.
    With ``mask`` it inpaints (white is repainted; ``inpainting_mask_invert`` 1 repaints black). The mask is used
    as given: ``mask_blur``, ``inpainting_fill`` and ``inpaint_full_res`` are ignored."""

    init_images: list[str] = Field(..., min_length=1)
    denoising_strength: float = 0.75
    mask: str | None = None
    inpainting_mask_invert: int = 0

    def calls(self, max_pixels: int, model: str = "") -> list[Params]:
        images = [decode_image(s, f"init_images.{i}", max_pixels) for i, s in enumerate(self.init_images)]
        mask = decode_image(self.mask, "mask", max_pixels) if self.mask is not None else None
        if mask is not None and self.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))
        return self._calls(max_pixels, model, images, self.denoising_strength, mask)

    def echo(self) -> dict[str, Any]:
        return {**super().echo(), "init_images": None, "mask": None}  # as the web UI: no images echoed


def sampler_name(name: str | None, scheduler: str | None, field: str) -> str | None:
    """An sdrt sampler for an sdrt or web-UI sampler name (and the web UI's separate ``scheduler`` field)."""
    if scheduler not in (None, "", "Automatic", "automatic"):
        plain = sampler_name(name, None, field)
        if scheduler.lower() != "karras" or plain not in (*KARRAS, *KARRAS.values()):
            raise bad_request("scheduler", f"scheduler {scheduler!r} is only supported as Karras with DPM++ SDE, "
                              "DPM++ 2M and DPM++ 2M SDE")  # fmt: skip
        return KARRAS.get(plain, plain)
    if name is None or name in SAMPLERS:
        return name
    if name.lower() in WEBUI_SAMPLERS:
        return WEBUI_SAMPLERS[name.lower()]
    known = ", ".join([*WEBUI_NAMES.values(), *SAMPLERS])
    raise bad_request(field, f"unknown sampler {name!r}; samplers are: {known}")


def prompt_loras(prompt: str) -> tuple[str, dict[str, float]]:
    """The web UI's LoRA tags, ``<lora:NAME>`` (scale 1) or ``<lora:NAME:SCALE>``, anywhere in a prompt -> the
    prompt without them and ``{NAME: scale}``. As in the web UI, each tag is replaced by nothing (CLIP's tokenizer
    drops the spaces left behind) and different adapters add up; only the prompt is parsed, a tag in the negative
    prompt is text (the web UI's `parse_extra_network_prompts` reads the prompts alone).

    The same name twice does what it does in the web UI (extensions-builtin/Lora/networks.py, `load_networks`):
    both tags get the one network object, whose multiplier ends as the last tag's, and that network is applied once
    per tag, so ``<lora:a:0.2> <lora:a:0.3>`` is ``a`` at 2 x 0.3 = 0.6 (equal scales simply add up).

    What sdrt cannot honour is a 400 naming ``prompt``: another kind of extra network (``<hypernet:...>``),
    separate text-encoder and U-Net scales (``<lora:a:0.5:0.8>``, ``te=``, ``unet=``, ``dyn=``), a scale that is
    not a number. Names and scales are then checked by the engine (`check_loras`: ``loras``, i.e. ``prompt`` here).
    """
    tags: list[tuple[str, float]] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind not in LORA_KINDS:
            raise bad_request("prompt", f"prompt tag {m.group(0)!r}: sdrt applies LoRA adapters only, as "
                              "<lora:NAME:SCALE>")  # fmt: skip
        if len(args) > 2 or any("=" in a for a in args):
            raise bad_request("prompt", f"prompt tag {m.group(0)!r}: give <lora:NAME> or <lora:NAME:SCALE>, one "
                              "scale for text encoder and U-Net (te=, unet=, dyn= are not supported)")  # fmt: skip
        try:
            tags.append((args[0], float(args[1]) if len(args) > 1 else 1.0))
        except ValueError:
            raise bad_request("prompt", f"prompt tag {m.group(0)!r}: the scale {args[1]!r} is not a number") from None
        return ""

    text = EXTRA_NETWORK_TAG.sub(take, prompt)
    last, count = dict(tags), Counter(name for name, _ in tags)
    return text, {name: count[name] * scale for name, scale in last.items()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def echo_v1(req, model: str) -> dict[str, Any]:
    """The resolved parameters of a `Request` (random seed drawn, default size and sampler filled in)."""
    one = len(req.prompts) == 1
    out = {
        "prompt": req.prompts[0] if one else list(req.prompts),
        "negative_prompt": req.negatives[0] if one else list(req.negatives),
        "steps": req.steps, "guidance": req.guidance, "seed": req.seed, "height": req.height, "width": req.width,
        "sampler": req.sampler, "n": req.images_per_prompt, "model": model,
    }  # fmt: skip
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
        "prompt": prompt, "all_prompts": [prompt] * len(parameters),
        "negative_prompt": first["negative_prompt"], "all_negative_prompts": [p["negative_prompt"] for p in parameters],
        "seed": first["seed"], "all_seeds": [p["seed"] for p in parameters], "width": first["width"],
        "height": first["height"], "sampler_name": WEBUI_NAMES.get(first["sampler"], first["sampler"]),
        "cfg_scale": first["guidance"], "steps": first["steps"], "batch_size": len(parameters),
        "sd_model_name": model, "infotexts": infotexts,
    }  # fmt: skip
    if "strength" in first:
        info["denoising_strength"] = first["strength"]
    return json.dumps(info)
