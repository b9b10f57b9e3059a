"""``POST /sdapi/v1/txt2img`` and ``img2img``: the body the web UI's clients send (`Txt2ImgRequest`,
`Img2ImgRequest`) -> `Params` (what `Pipeline.request` checks).

As in the web UI, image ``i`` of a batch has seed ``seed + i``, so each image of a batch is the one a single-image
request with that seed gives; the ``batch_size`` calls then join one engine batch in the server. LoRA adapters come
as the web UI's ``<lora:NAME:SCALE>`` tags in the prompt (`sdrt.serve.lora_tags`) and become ``Params.loras``;
ControlNets come as the web UI's ControlNet extension's units (`sdrt.serve.control`) and become
``Params.controlnets``; samplers by the web UI's names (`sdrt.serve.sampler_names`).

Problems are `ApiError`s that name the offending field as the client spelled it: a body's `fields` maps the
engine's `SdrtError.field` to its spelling (`SDAPI_FIELDS`, and the ControlNet units' fields).
"""

from __future__ import annotations

import secrets
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from sdrt.runtime.params import Hires, Params
from sdrt.serve.control import Unit, fitted_size, webui_echo, webui_fields, webui_units
from sdrt.serve.inputs import bad_request, decode_image
from sdrt.serve.lora_tags import prompt_loras
from sdrt.serve.sampler_names import sampler_name
from sdrt.serve.v1_api import V1_FIELDS
from sdrt.serve.webui import check_fields, sampling_options

# `SdrtError.field` -> the web UI's spelling of it: `V1_FIELDS` renamed; the adapters are tags in its prompt
SDAPI_FIELDS = {
    **V1_FIELDS,
    "guidance": "cfg_scale",
    "n": "batch_size",
    "sampler": "sampler_name",
    "image": "init_images",
    "strength": "denoising_strength",
    "loras": "prompt",
    "controlnets": "alwayson_scripts",
    "emphasis": "override_settings.emphasis",
    "webui_clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "hires": "enable_hr",
    "hires.scale": "hr_scale",
    "hires.width": "hr_resize_x",
    "hires.height": "hr_resize_y",
    "hires.upscaler": "hr_upscaler",
    "hires.steps": "hr_second_pass_steps",
    "hires.strength": "denoising_strength",
    "hires.sampler": "hr_sampler_name",
    "hires.prompt": "hr_prompt",
    "hires.negative_prompt": "hr_negative_prompt",
    "hires.guidance": "hr_cfg",
    "refiner": "refiner_checkpoint",
}


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

    def _calls(
        self, max_pixels: int, model: str, images: list[Image.Image | None], strength: float | None = None, mask=None
    ) -> list[Params]:
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
            Params(
                prompt=prompt,
                negative_prompt=self.negative_prompt,
                steps=self.steps,
                guidance=self.cfg_scale,
                height=sizes[i % len(images)][1],
                width=sizes[i % len(images)][0],
                n=1,
                seed=(seed + i) % 2**64,
                sampler=sampler,
                image=images[i % len(images)],
                strength=strength,
                mask=mask,
                loras=loras or None,
                controlnets=controlnets,
                hires=self._hires(),
                **self._refiner(),
                **options,
            )
            for i in range(count)
        ]

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
        return Hires(
            scale=self.hr_scale,
            width=self.hr_resize_x,
            height=self.hr_resize_y,
            upscaler=self.hr_upscaler or "Latent",
            steps=self.hr_second_pass_steps,
            strength=0.7 if self.denoising_strength is None else self.denoising_strength,
            sampler=sampler_name(sampler, scheduler, "hr_sampler_name") if sampler else None,
            prompt=self.hr_prompt,
            negative_prompt=self.hr_negative_prompt,
            guidance=self.hr_cfg,
        )

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
